"""The report's figures, drawn from a run directory's tables when the report is written (matplotlib, the
``vis`` extra; no pyplot state).

Every function takes the stage tables it needs and returns a matplotlib ``Figure``; :func:`png_bytes` turns
one into PNG bytes for inlining. Drawing from the tables (not from the PNGs a run saved) keeps the figures
in step with the tables and lets an older run directory get the same report.

* :func:`ki_share_figure`: the share of K_I facts per method with its CI, static and Otsu τ;
* :func:`cs_histogram_figure`: the CS distribution per method with both thresholds τ;
* :func:`relation_ki_figure`: the share of K_I facts per relation under the run's split;
* :func:`tau_sweep_figure`: the share of K_I facts against τ, with bootstrap bands;
* :func:`mapping_figure`: Δprob per neuron set × class, suppress and enhance, with CIs;
* :func:`dynamic_figure`: ΔValue and Δprob per neuron group under the KS edit, and the edit's Δprob against the
  irrelevant-KS control, with CIs;
* :func:`editing_figure`: Rel, Gen, Loc and Avg per edit, class and neuron set, with bootstrap CIs over facts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from qloc_tl.experiments.editing_config import CLASSES
from qloc_tl.reporting.run_tables import GROUP_ORDER, METHOD_NAMES, SET_ORDER

__all__ = [
    "CLASS_COLORS",
    "METHOD_COLORS",
    "png_bytes",
    "ki_share_figure",
    "cs_histogram_figure",
    "relation_ki_figure",
    "tau_sweep_figure",
    "tau_sweep_from_facts",
    "mapping_figure",
    "dynamic_figure",
    "editing_figure",
]

CLASS_COLORS = {"K_C": "#4c72b0", "K_I": "#dd8452"}
"""One colour per class, the same in every figure."""

METHOD_COLORS = {"ig": "#55a868", "amig": "#8172b3", "sig": "#937860", "∩": "#3a3a3a"}
"""One colour per attribution method (apart from the class colours)."""


def _method_color(m: object, i: int) -> str:
    return METHOD_COLORS.get(str(m), ["#64b5cd", "#ccb974", "#8c8c8c"][i % 3])


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _err(v: Sequence[float], lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """Non-negative error-bar sizes from values and CI bounds (0 where a bound is missing)."""
    a, b, c = (np.asarray(x, dtype=float) for x in (v, lo, hi))
    return np.nan_to_num(np.array([np.clip(a - b, 0, None), np.clip(c - a, 0, None)]), nan=0.0)


def _grouped_bars(
    ax: Any,
    x: list[str],
    series: list[tuple[str, list[float], list[float], list[float], dict[str, Any]]],
    *,
    labels: str | None = None,
) -> None:
    """Bars of several series side by side at each x, with CI error bars; ``labels`` (a format such as
    ``"{:.0%}"``) writes each bar's value above it."""
    pos = np.arange(len(x))
    n = max(1, len(series))
    width = 0.8 / n
    for k, (label, v, lo, hi, style) in enumerate(series):
        has_ci = bool(np.isfinite(np.asarray(lo, dtype=float)).any())
        bars = ax.bar(pos + (k - (n - 1) / 2) * width, np.asarray(v, dtype=float), width,
                      yerr=_err(v, lo, hi) if has_ci else None, capsize=2, label=label, **style)  # fmt: skip
        if labels:
            ax.bar_label(bars, labels=["" if not math.isfinite(float(y)) else labels.format(y) for y in v],
                         fontsize=7, padding=2)  # fmt: skip
    ax.set_xticks(pos, x)
    ax.axhline(0.0, color="black", linewidth=0.6)


def ki_share_figure(summary: pd.DataFrame) -> Any:
    """Bars of the K_I share per method (∩ last) at the static τ and at Otsu's τ, with 95 % bootstrap CIs."""
    methods = [m for m in dict.fromkeys(summary["method"]) if m != "∩"] + [
        m for m in dict.fromkeys(summary["method"]) if m == "∩"
    ]
    fig, axes = _figure(4.2, 2.8)
    ax = axes[0][0]
    series = []
    for kind, color in (("static", "#9aa7b8"), ("otsu", "#c44e52")):
        v, lo, hi = [], [], []
        for m in methods:
            r = summary[(summary["method"] == m) & (summary["threshold"] == kind)]
            v.append(float(r["prop_KI"].iloc[0]) if len(r) else math.nan)
            lo.append(float(r["prop_KI_ci_lo"].iloc[0]) if len(r) else math.nan)
            hi.append(float(r["prop_KI_ci_hi"].iloc[0]) if len(r) else math.nan)
        series.append((f"{'static τ = 0.3' if kind == 'static' else 'Otsu τ'}", v, lo, hi, {"color": color}))
    _grouped_bars(ax, [METHOD_NAMES.get(m, m).split(" ")[0] for m in methods], series, labels="{:.0%}")
    n = int(summary["n_facts"].max()) if len(summary) else 0
    ax.set(ylabel="share of facts that are K_I", ylim=(0, 1.32), title=f"K_I share per method ({n} facts)")
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(fontsize="small", loc="upper center", ncols=2)  # above 1.0: clear of the bars and their labels
    return fig


def cs_histogram_figure(facts: pd.DataFrame) -> Any:
    """Histogram of the facts' consistency score per method, with the static τ and Otsu's τ; the title gives
    the K_I share under each."""
    methods = [
        m
        for m in dict.fromkeys(facts["method"])
        if m != "∩" and facts.loc[facts["method"] == m, "cs"].notna().any()
    ]
    fig, axes = _figure(3.0 * max(1, len(methods)) + 0.4, 2.8, ncols=max(1, len(methods)))
    for ax, m in zip(axes[0], methods):
        f = facts[facts["method"] == m]
        cs = f["cs"].dropna().to_numpy(float)
        ax.hist(cs, bins=np.linspace(0, 1, 21), color="#8c9cb4", edgecolor="white")
        for col, color, name in (("tau_static", "#555555", "static"), ("tau_otsu", "#c44e52", "Otsu")):
            if col in f.columns and f[col].notna().any():
                tau = float(f[col].dropna().iloc[0])
                ki = float(np.mean(cs < tau)) if cs.size else math.nan
                ax.axvline(tau, color=color, ls="--", lw=1.2, label=f"{name} τ = {tau:.2f}: K_I {ki:.0%}")
        ax.set(
            xlabel="consistency score CS",
            ylabel="facts",
            xlim=(0, 1),
            title=f"{METHOD_NAMES.get(m, m)} ({cs.size} facts)",
        )
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="x-small", loc="upper left")
    return fig


def relation_ki_figure(per_relation: pd.DataFrame, split: str = "otsu") -> Any:
    """Bars of the K_I share per relation, one series per method, under the run's split (``otsu`` or
    ``static``); relations sorted by their mean share, the number of facts under each label."""
    df = per_relation[per_relation["threshold"] == split]
    if df.empty:
        df = per_relation
    piv = df.pivot_table(index="relation", columns="method", values="prop_KI", aggfunc="first")
    n = df.groupby("relation")["n_facts"].max()
    order = piv.mean(axis=1).sort_values(ascending=False).index.tolist()
    piv = piv.loc[order]
    cols = [m for m in dict.fromkeys(df["method"]) if m in piv.columns]
    fig, axes = _figure(min(11.0, max(5.2, 0.42 * len(order) + 1.5)), 3.0)
    ax = axes[0][0]
    nan = [math.nan] * len(order)
    series = [
        (METHOD_NAMES.get(m, m), piv[m].tolist(), nan, nan, {"color": _method_color(m, i)})
        for i, m in enumerate(cols)
    ]
    _grouped_bars(ax, [f"{r}\n{int(n[r])}" for r in order], series)
    ax.tick_params(axis="x", labelsize=7)
    ax.set(
        ylabel="share K_I",
        ylim=(0, 1),
        title=f"K_I per relation ({'Otsu' if split == 'otsu' else 'static'} τ)",
    )
    ax.set_xlabel("relation and its number of facts", fontsize=8)
    ax.legend(fontsize="small")
    return fig


def tau_sweep_from_facts(facts: pd.DataFrame, *, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """The K_I share against τ (0 to 1 by 0.05) per method from ``consistency_facts``, with percentile bootstrap
    CIs over facts: the columns of ``consistency_tau_sweep`` (``method, tau, n_facts, prop_KI, ci_low,
    ci_high``), for runs that did not write that table.

    Examples:
        >>> f = pd.DataFrame({"method": ["ig"] * 4, "cs": [0.1, 0.2, 0.6, 0.9]})
        >>> s = tau_sweep_from_facts(f, n_boot=20)
        >>> s.loc[s["tau"] == 0.5, ["n_facts", "prop_KI"]].values.tolist()
        [[4.0, 0.5]]
    """
    rng = np.random.default_rng(seed)
    taus = np.round(np.arange(0, 1.0001, 0.05), 2)
    out = []
    for m, g in facts[facts["method"] != "∩"].groupby("method", sort=False):
        cs = g["cs"].dropna().to_numpy(float)
        if cs.size == 0:
            continue
        boot = cs[rng.integers(0, cs.size, size=(n_boot, cs.size))]
        for t in taus:
            shares = (boot < t).mean(axis=1)
            out.append({"method": m, "tau": float(t), "n_facts": float(cs.size), "prop_KI": float(np.mean(cs < t)),
                        "ci_low": float(np.quantile(shares, 0.025)), "ci_high": float(np.quantile(shares, 0.975))})  # fmt: skip
    return pd.DataFrame(out)


def tau_sweep_figure(sweep: pd.DataFrame, taus: dict[str, float] | None = None) -> Any:
    """The K_I share against the CS threshold τ, one line per method with its bootstrap band; ``taus``
    (``{"static": 0.3, "Otsu (IG)": 0.74}``) are marked as vertical lines."""
    fig, axes = _figure(5.2, 3.0)
    ax = axes[0][0]
    for i, (m, g) in enumerate(sweep.groupby("method", sort=False)):
        color = _method_color(m, i)
        ax.plot(
            g["tau"],
            g["prop_KI"],
            marker="o",
            ms=2.5,
            color=color,
            label=f"{METHOD_NAMES.get(str(m), m)} (n={int(g['n_facts'].iloc[0])})",
        )
        ax.fill_between(g["tau"], g["ci_low"], g["ci_high"], color=color, alpha=0.18)
    for k, (name, t) in enumerate((taus or {}).items()):
        ax.axvline(t, color="#777777", ls=":" if k else "--", lw=1)
        ax.annotate(
            name,
            (t, 0.97 - 0.08 * k),
            fontsize=7,
            ha="left",
            va="top",
            xytext=(2, 0),
            textcoords="offset points",
        )
    ax.set(
        xlabel="CS threshold τ (K_I: CS < τ)",
        ylabel="share K_I",
        xlim=(0, 1),
        ylim=(0, 1),
        title="K_I share against τ",
    )
    ax.legend(fontsize="small", loc="lower right")
    return fig


def mapping_figure(summary: pd.DataFrame) -> Any:
    """Δprob of the answer per neuron set, one panel for suppression (× 0) and one for enhancement (× 2), one
    bar per class, with 95 % bootstrap CIs over facts."""
    sets = [s for s in SET_ORDER if s in set(summary["set"])] + [
        s for s in dict.fromkeys(summary["set"]) if s not in SET_ORDER
    ]
    classes = [c for c in CLASSES if c in set(summary["class"])]
    ops = [op for op in ("suppress", "enhance") if op in set(summary["op"])]
    fig, axes = _figure(4.6 * max(1, len(ops)), 3.0, ncols=max(1, len(ops)))
    for ax, op in zip(axes[0], ops):
        series = []
        for c in classes:
            g = summary[(summary["class"] == c) & (summary["op"] == op)].set_index("set")
            col = "mean_dprob" if "mean_dprob" in g.columns else "mean_of_ratios"
            vals = [float(g.loc[s, col]) if s in g.index else math.nan for s in sets]
            lo = [float(g.loc[s, f"{col}_lo"]) if s in g.index else math.nan for s in sets]
            hi = [float(g.loc[s, f"{col}_hi"]) if s in g.index else math.nan for s in sets]
            n = int(g["n_facts"].max()) if len(g) else 0
            series.append((f"{c} (n={n})", vals, lo, hi, {"color": CLASS_COLORS.get(c)}))
        _grouped_bars(ax, sets, series)
        ax.tick_params(axis="x", labelsize=8)
        ax.set(ylabel="Δ P(answer)", title=f"{op} the set ({'× 0' if op == 'suppress' else '× 2'})")
        ax.legend(fontsize="small")
    return fig


def dynamic_figure(summary: pd.DataFrame) -> Any:
    """Dynamic KN selection under the KS edit: ΔValue Σ/Σ per neuron group; Δprob carried through each group
    alone; and the whole edit's Δprob against the irrelevant-KS control. Series: class × op; 95 % CIs."""
    classes = [c for c in CLASSES if c in set(summary["class"])]
    ops = [op for op in ("suppress", "enhance") if op in set(summary["op"])]
    groups = [g for g in GROUP_ORDER if g in set(summary["group"])]
    ks = summary[summary["intervention"] == "KS"]
    fig, axes = _figure(13.0, 3.1, ncols=3)
    for ax, (col, ylabel, title) in zip(axes[0][:2], (("dvalue_rel_agg", "ΔValue Σ/Σ", "neuron activations (ΔValue, Σ/Σ)"),
                                                      ("dprob_via", "Δ P(answer) via group", "P(answer) through the group alone"))):  # fmt: skip
        series = []
        for c in classes:
            for op in ops:
                g = ks[(ks["class"] == c) & (ks["op"] == op)].set_index("group")
                vals = [float(g.loc[x, col]) if x in g.index else math.nan for x in groups]
                lo = [float(g.loc[x, f"{col}_lo"]) if x in g.index else math.nan for x in groups]
                hi = [float(g.loc[x, f"{col}_hi"]) if x in g.index else math.nan for x in groups]
                style = {"color": CLASS_COLORS.get(c), "alpha": 1.0 if op == "suppress" else 0.45,
                         "hatch": None if op == "suppress" else "//"}  # fmt: skip
                series.append((f"{c} {op}", vals, lo, hi, style))
        _grouped_bars(ax, groups, series)
        ax.set(ylabel=ylabel, title=title)
        ax.legend(fontsize="x-small")
    ax = axes[0][2]
    q = summary[summary["group"] == "query"]
    labels = [f"{i}\n{op}" for i in ("KS", "irrelevant") for op in ops]
    series = []
    for c in classes:
        vals, lo, hi = [], [], []
        for i in ("KS", "irrelevant"):
            for op in ops:
                r = q[(q["class"] == c) & (q["intervention"] == i) & (q["op"] == op)]
                vals.append(float(r["dprob"].iloc[0]) if len(r) else math.nan)
                lo.append(float(r["dprob_lo"].iloc[0]) if len(r) else math.nan)
                hi.append(float(r["dprob_hi"].iloc[0]) if len(r) else math.nan)
        series.append((c, vals, lo, hi, {"color": CLASS_COLORS.get(c)}))
    _grouped_bars(ax, labels, series)
    ax.tick_params(axis="x", labelsize=8)
    ax.set(ylabel="Δ P(answer)", title="the edit: query's KS vs irrelevant KS")
    ax.legend(fontsize="x-small")
    return fig


def _boot_ci(v: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size < 2:
        return (math.nan, math.nan)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def editing_figure(
    table: pd.DataFrame, rows: pd.DataFrame | None = None, *, n_boot: int = 200, seed: int = 0
) -> Any:
    """Rel, Gen, Loc and Avg per edit (one row of panels each) for every neuron set, one bar per class; 95 %
    bootstrap CIs over facts when the per-fact ``rows`` are given."""
    rng = np.random.default_rng(seed)
    t = table[table["n_facts"] > 0]
    edits = list(dict.fromkeys(t["edit"]))
    methods = list(dict.fromkeys(t["method"]))
    classes = [c for c in CLASSES if c in set(t["class"])]
    metrics = [
        (c, lab)
        for c, lab in (("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc"), ("avg", "Avg"))
        if c in t.columns
    ]
    ok = rows[rows["status"] == "ok"] if rows is not None and "status" in rows.columns else rows
    fig, axes = _figure(
        2.9 * len(metrics) + 0.3, 2.3 * max(1, len(edits)), ncols=len(metrics), nrows=max(1, len(edits))
    )
    for r_i, edit in enumerate(edits):
        for c_i, (col, label) in enumerate(metrics):
            ax = axes[r_i][c_i]
            series = []
            for cls in classes:
                vals, lo, hi = [], [], []
                for m in methods:
                    sel = t[(t["edit"] == edit) & (t["class"] == cls) & (t["method"] == m)]
                    vals.append(float(sel[col].iloc[0]) if len(sel) else math.nan)
                    ci = (math.nan, math.nan)
                    if ok is not None and col in ok.columns:
                        g = ok[(ok["edit"] == edit) & (ok["class"] == cls) & (ok["method"] == m)]
                        ci = _boot_ci(g[col].to_numpy(float), n_boot, rng)
                    lo.append(ci[0])
                    hi.append(ci[1])
                series.append((cls, vals, lo, hi, {"color": CLASS_COLORS.get(cls)}))
            _grouped_bars(ax, methods, series)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{edit}: {label}", fontsize=9)
            if r_i == 0 and c_i == 0:
                ax.legend(fontsize="x-small")
    return fig
