"""Views of query-localization results: circuitsvis attention widgets and matplotlib charts.

Renderers are thin adapters. All tensor → list and label logic lives in pure ``_prepare_*`` functions (unit
tested without circuitsvis or matplotlib); circuitsvis and matplotlib (the ``vis`` extra) are imported
lazily, inside the renderers.

* :func:`synapse_heads_view` — ``circuitsvis.attention.attention_heads`` of the heads that hold a query's
  knowledge synapses (names ``L{l}H{h}``; key tokens that are synapse columns are marked ``"⟨KS⟩"``).
* :func:`save_html` — a standalone HTML file from ``RenderedHTML.local_src`` (JS bundle inlined: works
  offline; ``str(obj)`` would load the JS from a CDN).
* :func:`plot_mapping`, :func:`plot_dynamic` — bar charts of the summaries of
  :func:`qloc_tl.experiments.mapping.summarize_mapping` and :func:`qloc_tl.experiments.dynamic.summarize_dynamic`, with CI error bars.
* :func:`plot_causal_trace` — the ROME-style heatmap of a :class:`~qloc_tl.methods.tracing.TraceResult`.

Heatmap colour scales are robust (:func:`robust_limits`): symmetric limits ±P of |values|, P the 99th
percentile of all cells pooled over rows, on a colour map diverging at 0, with the colour bar extended at
both ends (cells beyond the limits are drawn in the end colours). One query or position with extreme values
(e.g. an attribution row whose negative scores reach several times its maximum) then no longer compresses
every other row into a single colour; a whole matrix of similar values keeps its full range.

Matplotlib figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend needed).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Head, Synapse

logger = logging.getLogger(__name__)

__all__ = [
    "KS_MARK",
    "robust_limits",
    "synapse_heads_view",
    "save_html",
    "plot_mapping",
    "plot_dynamic",
    "plot_causal_trace",
]

KS_MARK = "⟨KS⟩"

#: Percentile of |values| that sets the symmetric colour limits of heatmaps (see :func:`robust_limits`).
HEATMAP_PERCENTILE = 99.0


# --------------------------------------------------------------------------------------------------
# Pure preparation functions
# --------------------------------------------------------------------------------------------------


def _prepare_attention_heads(
    patterns: Mapping[Head, Tensor | np.ndarray],
    str_tokens: Sequence[str],
    synapses: Iterable[Synapse] = (),
    *,
    heads: Sequence[Head] | None = None,
    mark: str = KS_MARK,
) -> tuple[list[list[list[float]]], list[str], list[str]]:
    """Inputs of ``attention_heads``: ``(attention [n_heads][pos][pos], tokens, head names)``.

    ``patterns`` maps each head to its ``[pos, pos]`` pattern. Tokens at positions that are synapse columns of
    any shown head get ``mark`` appended. Heads are shown in ``heads`` order (default: sorted keys).

    Examples:
        >>> import torch
        >>> att, toks, names = _prepare_attention_heads(
        ...     {Head(1, 2): torch.eye(2)}, ["a", "b"], [Synapse(1, 2, 0), Synapse(0, 0, 1)])
        >>> names, toks, att[0]
        (['L1H2'], ['a⟨KS⟩', 'b'], [[1.0, 0.0], [0.0, 1.0]])
    """
    heads = list(heads) if heads is not None else sorted(patterns)
    if not heads:
        raise InvalidInputError("no heads to show: the query has no knowledge synapses (or pass heads=)")
    P = len(str_tokens)
    att = []
    for h in heads:
        if h not in patterns:
            raise InvalidInputError(f"no pattern given for {h}")
        a = patterns[h]
        a = a.detach().to("cpu", torch.float64).numpy() if isinstance(a, Tensor) else np.asarray(a, dtype=np.float64)
        if a.shape != (P, P):
            raise InvalidInputError(f"pattern of {h} has shape {a.shape}, expected ({P}, {P}) for {P} tokens")
        att.append(a.tolist())
    shown = set(heads)
    cols = {s.key_position for s in synapses if s.as_head() in shown}
    tokens = [f"{t}{mark}" if i in cols else str(t) for i, t in enumerate(str_tokens)]
    return att, tokens, [str(h) for h in heads]


def _prepare_mapping_bars(
    summary: Any, *, metric: str = "mean_of_ratios", series: Sequence[str] = ("class", "op")
) -> dict[str, Any]:
    """Bar-chart data from a mapping summary: x = sets, one series per (class, op).

    Returns:
        ``{"x": [set names], "series": [(label, values, err_lo, err_hi)], "ylabel": metric}``; missing
        combinations are NaN; error sizes are non-negative (NaN when the CI is missing).

    Examples:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"class": ["K_I"] * 2, "op": ["suppress"] * 2, "set": ["Self", "Union"],
        ...                   "mean_of_ratios": [-0.5, -0.2], "mean_of_ratios_lo": [-0.6, -0.3],
        ...                   "mean_of_ratios_hi": [-0.4, -0.1]})
        >>> d = _prepare_mapping_bars(s)
        >>> d["x"], d["series"][0][0], [round(v, 3) for v in d["series"][0][2]]
        (['Self', 'Union'], 'K_I suppress', [0.1, 0.1])
    """
    from qloc_tl.experiments.mapping import SET_NAMES

    present = list(dict.fromkeys(summary["set"]))
    x = [s for s in SET_NAMES if s in present] + [s for s in present if s not in SET_NAMES]
    return _prepare_bars(summary, x_col="set", x=x, metric=metric, series=series)


def _prepare_dynamic_bars(
    summary: Any, *, metric: str = "dvalue_rel_agg", series: Sequence[str] = ("class", "intervention", "op")
) -> dict[str, Any]:
    """Bar-chart data from a dynamic summary: x = neuron groups, one series per (class, intervention, op).

    Examples:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"class": ["K_I"], "intervention": ["KS"], "op": ["suppress"], "group": ["query"],
        ...                   "dprob": [-0.1]})
        >>> _prepare_dynamic_bars(s, metric="dprob")["series"][0][:2]
        ('K_I KS suppress', [-0.1])
    """
    from qloc_tl.experiments.dynamic import GROUPS

    present = list(dict.fromkeys(summary["group"]))
    x = [g for g in GROUPS if g in present] + [g for g in present if g not in GROUPS]
    return _prepare_bars(summary, x_col="group", x=x, metric=metric, series=series)


def _prepare_bars(summary: Any, *, x_col: str, x: list[str], metric: str, series: Sequence[str]) -> dict[str, Any]:
    if metric not in summary.columns:
        raise InvalidInputError(f"summary has no column {metric!r}; columns: {list(summary.columns)}")
    series = [c for c in series if c in summary.columns]
    out = []
    groups = summary.groupby(series, sort=True) if series else [((), summary)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        label = " ".join(str(k) for k in key) or metric
        by_x = {r[x_col]: r for _, r in g.iterrows()}
        vals, lo, hi = [], [], []
        for xi in x:
            r = by_x.get(xi)
            v = float(r[metric]) if r is not None else math.nan
            vals.append(v)
            lo_v = float(r[f"{metric}_lo"]) if r is not None and f"{metric}_lo" in r else math.nan
            hi_v = float(r[f"{metric}_hi"]) if r is not None and f"{metric}_hi" in r else math.nan
            lo.append(max(0.0, v - lo_v) if math.isfinite(lo_v) else math.nan)
            hi.append(max(0.0, hi_v - v) if math.isfinite(hi_v) else math.nan)
        out.append((label, vals, lo, hi))
    return {"x": x, "series": out, "ylabel": metric}


def robust_limits(values: Any, percentile: float | None = HEATMAP_PERCENTILE) -> tuple[float, float]:
    """Symmetric colour limits ``(−v, v)`` of a heatmap, ``v`` = the ``percentile``-th percentile of |values|
    over all finite cells (rows pooled; numpy's linear interpolation).

    Cells beyond ``v`` are clipped to the end colours, so fewer than ``100 − percentile`` % of the cells (e.g.
    one query's extreme scores) cannot set the scale for the rest. ``percentile=None`` (or 100) gives the
    full range ``v = max |values|``. ``v`` falls back to the largest |value|, then 1.0, when it would be 0.

    Examples:
        >>> robust_limits(np.array([[1.0, -0.5], [0.25, 2.0]]), None)
        (-2.0, 2.0)
        >>> v = np.concatenate([np.linspace(-1, 1, 999), [-50.0]])
        >>> lo, hi = robust_limits(v)
        >>> lo == -hi and hi < 1.0 + 1e-9
        True
    """
    a = values.detach().to("cpu", torch.float64).numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=np.float64)
    a = np.abs(a[np.isfinite(a)])
    if percentile is not None and (isinstance(percentile, bool) or not 0 < float(percentile) <= 100):
        raise InvalidInputError(f"percentile must be in (0, 100] or None, got {percentile!r}")
    if a.size == 0:
        return (-1.0, 1.0)
    v = float(a.max()) if percentile is None else float(np.percentile(a, float(percentile)))
    if v <= 0:
        v = float(a.max()) or 1.0
    return (-v, v)


def _prepare_trace_heatmap(result: Any, kind: str) -> dict[str, Any]:
    """Heatmap data of a trace: ``matrix [n_positions, n_layers]`` (IE), row labels (subject tokens starred),
    column labels (layers) and a title.

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> r = SimpleNamespace(ie={"mlp": torch.tensor([[0.5, 0.25], [1.0, 2.0]])}, str_tokens=("a", "b"),
        ...                     subject_positions=(0,), window={"mlp": 10}, p_clean=0.5, p_corrupt=0.1)
        >>> d = _prepare_trace_heatmap(r, "mlp")
        >>> d["matrix"].tolist(), d["rows"], d["cols"]
        ([[0.5, 1.0], [0.25, 2.0]], ['a*', 'b'], ['0', '1'])
    """
    if kind not in result.ie:
        raise InvalidInputError(f"the trace has no kind {kind!r}; traced kinds: {list(result.ie)}")
    ie = result.ie[kind].detach().to("cpu", torch.float64).numpy()
    L, P = ie.shape
    rows = [f"{t}*" if i in result.subject_positions else str(t) for i, t in enumerate(result.str_tokens)]
    names = {"resid": "residual (resid_pre)", "mlp": "MLP", "attn": "attention"}
    title = (
        f"IE of restoring {names.get(kind, kind)} states"
        + (f" (window {result.window.get(kind)})" if result.window.get(kind, 1) != 1 else "")
        + f"; p clean {result.p_clean:.3g}, corrupt {result.p_corrupt:.3g}"
    )
    return {"matrix": ie.T.copy(), "rows": rows, "cols": [str(i) for i in range(L)], "title": title}


# --------------------------------------------------------------------------------------------------
# Renderers
# --------------------------------------------------------------------------------------------------


def synapse_heads_view(result: Any, patterns: Mapping[Head, Tensor]) -> Any:
    """A circuitsvis ``attention_heads`` widget of the heads holding a query's knowledge synapses.

    Args:
        result: a :class:`~qloc_tl.methods.synapses.SynapseResult` (tokens and synapses to mark).
        patterns: ``{Head: [query_pos, key_pos] pattern}`` in display order, e.g.
            :func:`qloc_tl.methods.synapses.synapse_patterns` ``(model, result, max_heads=6)``.

    Returns:
        A circuitsvis ``RenderedHTML`` (display it in a notebook, or :func:`save_html` it).
    """
    import circuitsvis as cv

    if not patterns:
        raise InvalidInputError("no head patterns to show")
    heads = list(patterns)
    att, tokens, head_names = _prepare_attention_heads(dict(patterns), result.str_tokens, result.synapses, heads=heads)
    return cv.attention.attention_heads(attention=np.asarray(att), tokens=tokens, attention_head_names=head_names)

def save_html(objs: Any, path: str | os.PathLike[str], *, title: str = "qloc_tl") -> str:
    """Write one or several circuitsvis ``RenderedHTML`` objects to a standalone, offline HTML file.

    Uses ``obj.local_src`` (the JS bundle inlined, ~1.3 MB per widget). Returns the path written.
    """
    from qloc_tl.core.store import atomic_write_text

    items = objs if isinstance(objs, (list, tuple)) else [objs]
    bodies = []
    for o in items:
        src = getattr(o, "local_src", None)
        if not isinstance(src, str):
            raise InvalidInputError(f"expected a circuitsvis RenderedHTML (with .local_src), got {type(o).__name__}")
        bodies.append(f"<div>{src}</div>")
    import html

    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        + "\n".join(bodies)
        + "</body></html>"
    )
    atomic_write_text(path, page)
    return os.fspath(path)


def _new_ax(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig.add_subplot()


def _bars(ax: Any, data: dict[str, Any], title: str) -> Any:
    x = np.arange(len(data["x"]))
    n = max(1, len(data["series"]))
    width = 0.8 / n
    for k, (label, vals, lo, hi) in enumerate(data["series"]):
        err = np.array([np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=0.0)])
        ax.bar(x + (k - (n - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(x, data["x"])
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel(data["ylabel"])
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax.figure


def plot_mapping(summary: Any, *, metric: str = "mean_of_ratios", ax: Any = None) -> Any:
    """Grouped bars of a query-KN mapping summary (x = neuron sets, series = class × op); returns the Figure."""
    data = _prepare_mapping_bars(summary, metric=metric)
    return _bars(_new_ax(ax, (8, 4)), data, f"Query-KN mapping: {metric} of P(answer)")


def plot_dynamic(summary: Any, *, metric: str = "dvalue_rel_agg", ax: Any = None) -> Any:
    """Grouped bars of a dynamic-KN-selection summary (x = neuron groups); returns the Figure."""
    data = _prepare_dynamic_bars(summary, metric=metric)
    return _bars(_new_ax(ax, (8, 4)), data, f"Dynamic KN selection: {metric}")


def plot_causal_trace(
    result: Any, kind: str = "resid", *, ax: Any = None, percentile: float | None = HEATMAP_PERCENTILE
) -> Any:
    """ROME-style heatmap (rows = tokens, subject starred; columns = layers) of a trace's IE; returns the Figure.

    Colours: a map diverging at IE = 0 (purple / green / red for positive IE of the residual / MLP /
    attention states, as in ROME's figures; negative IE, where restoring a state lowers P(answer), in the
    opposite colour), limits ±(the ``percentile``-th percentile of |IE|) from :func:`robust_limits`
    (``None``: the full range), colour bar extended at both ends for clipped cells.
    """
    d = _prepare_trace_heatmap(result, kind)
    ax = _new_ax(ax, (max(4.0, 0.35 * len(d["cols"]) + 2), max(2.5, 0.3 * len(d["rows"]) + 1)))
    cmap = {"resid": "PuOr", "mlp": "PRGn", "attn": "RdBu_r"}.get(kind, "RdBu_r")
    vmin, vmax = robust_limits(d["matrix"], percentile)
    im = ax.imshow(d["matrix"], aspect="auto", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(d["rows"])), d["rows"])
    ax.set_xticks(range(len(d["cols"])), d["cols"])
    ax.set_xlabel("layer")
    ax.set_title(d["title"], fontsize="small")
    ax.figure.colorbar(im, ax=ax, label="indirect effect on P(answer)", extend="both")
    return ax.figure
