"""Figures of the consistency experiment (matplotlib, the ``vis`` extra): CS histogram, K_I per relation, the
τ sweep, the KN-threshold sweep and a fact's per-query heatmap."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.store import atomic_save_figure
from qloc_tl.experiments.consistency import ConsistencyResult
from qloc_tl.methods.consistency_score import ThresholdKind, consistency_score

__all__ = ["plot_cs_histogram", "plot_relation_ki", "plot_tau_sweep", "plot_threshold_sweep", "plot_fact_heatmap"]



def _save(fig: Any, path: str | Path | None) -> Any:
    if path is not None:
        atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    return fig


def plot_cs_histogram(
    result: ConsistencyResult, method: str = "ig", kind: ThresholdKind = "static", path: str | Path | None = None
) -> Any:
    """Histogram of the facts' CS for one method, with the K_C / K_I threshold τ."""
    import matplotlib.pyplot as plt

    df = result.facts[result.facts["method"] == method]
    if df.empty:
        raise InvalidInputError(f"no facts for method {method!r}")
    cs = df["cs"].dropna().to_numpy()
    tau = float(df[f"tau_{kind}"].iloc[0])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(cs, bins=np.linspace(0, 1, 21).tolist(), color="#4c72b0", edgecolor="white")
    ax.axvline(tau, color="#c44e52", ls="--", label=f"τ ({kind}) = {tau:.2f}")
    ki = float(np.mean(cs < tau)) if cs.size else math.nan
    ax.set(xlabel=f"consistency score ({result.config.cs_mode})", ylabel="facts", title=f"{method.upper()}: K_I = {ki:.0%} of {cs.size} facts")
    ax.legend()
    plt.close(fig)
    return _save(fig, path)


def plot_relation_ki(result: ConsistencyResult, kind: ThresholdKind = "static", path: str | Path | None = None) -> Any:
    """Proportion of inconsistent knowledge (K_I) per relation and method."""
    import matplotlib.pyplot as plt

    df = result.per_relation[result.per_relation["threshold"] == kind]
    piv = df.pivot(index="relation", columns="method", values="prop_KI")
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(piv)), 3.2))
    piv.plot.bar(ax=ax, width=0.8)
    ax.set(ylabel="proportion K_I", ylim=(0, 1), title=f"inconsistent knowledge per relation ({kind} τ)")
    plt.close(fig)
    return _save(fig, path)


def plot_tau_sweep(result: ConsistencyResult, path: str | Path | None = None, **kw: Any) -> Any:
    """Share of K_I against the CS threshold τ (:meth:`ConsistencyResult.tau_sweep`), one line per method
    with its bootstrap band."""
    import matplotlib.pyplot as plt

    df = result.tau_sweep(**kw)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m, g in df.groupby("method", sort=False):
        (line,) = ax.plot(g["tau"], g["prop_KI"], marker="o", ms=3, label=f"{m} (n={int(g['n_facts'].iloc[0])})")
        ax.fill_between(g["tau"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="CS threshold τ (K_I: CS < τ)", ylabel="proportion K_I", ylim=(0, 1), xlim=(0, 1),
           title="K_I share against τ")  # fmt: skip
    ax.legend()
    plt.close(fig)
    return _save(fig, path)


def plot_threshold_sweep(result: ConsistencyResult, kind: ThresholdKind = "static", path: str | Path | None = None) -> Any:
    """Proportion of K_I as the KN threshold t varies, one line per method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m, g in result.sweep.groupby("method"):
        ax.plot(g["kn_fraction"], g[f"prop_KI_{kind}"], marker="o", label=m)
    ax.set(xlabel="KN threshold t (fraction of max)", ylabel="proportion K_I", ylim=(0, 1), title="threshold sweep")
    ax.legend()
    plt.close(fig)
    return _save(fig, path)


def plot_fact_heatmap(
    attribution: Any,
    fact: Any,
    *,
    value: Literal["score", "activation"] = "score",
    kn_fraction: float = 0.2,
    max_neurons: int = 40,
    path: str | Path | None = None,
    percentile: float | None = 99.0,
) -> Any:
    """The paper's Figure-1 view: one row per neighbor query, one column per neuron of the union of the
    queries' KNs; cells are attribution scores (normalised by each query's max) or activations.

    ``attribution`` is the :class:`~qloc_tl.methods.attribution.NeuronAttribution` of the fact's queries (in
    ``fact.queries`` order), e.g. ``attribute_neurons(model, fact.prompts, [fact.answer] * len(fact.queries))``.

    A consistent fact shows the same columns lit in every row; an inconsistent one a block diagonal.

    Colour scale: symmetric limits ±v with v the ``percentile``-th percentile (default 99) of |cell values|
    over all rows (:func:`qloc_tl.reporting.views.robust_limits`), on a colour map diverging at 0, and the colour bar
    extended at both ends: cells beyond ±v are drawn in the end colours. Normalised scores are ≤ 1 by
    construction but their negative side is unbounded (a query's negative attributions can reach several
    times its maximum); a scale set by those few cells would leave every other cell near the middle colour.
    ``percentile=None`` uses the full range.
    """
    import matplotlib.pyplot as plt
    import torch

    from qloc_tl.methods.attribution import select_neurons
    from qloc_tl.reporting.views import robust_limits

    scores = attribution.scores_batched.detach().to("cpu", torch.float64)
    sets = select_neurons(scores, method="fraction_of_max", value=kn_fraction)
    union = sorted(frozenset().union(*[s.to_frozenset() for s in sets]))
    if len(union) > max_neurons:
        # keep the neurons with the highest max normalised score
        norm = scores / scores.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
        union = sorted(union, key=lambda n: -float(norm[:, n.layer, n.index].max()))[:max_neurons]
        union.sort()
    if value == "score":
        mat = scores / scores.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    else:
        mat = attribution.activations.detach().to("cpu", torch.float64)
    data = np.array([[float(mat[q, n.layer, n.index]) for n in union] for q in range(len(fact.queries))])
    cs = consistency_score([s.to_frozenset() for s in sets])
    fig, ax = plt.subplots(figsize=(max(4, 0.28 * len(union) + 2), 0.45 * len(fact.queries) + 1.8))
    vmin, vmax = robust_limits(data, percentile)
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r" if value == "score" else "coolwarm", vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(fact.queries)), [q.text for q in fact.queries], fontsize=7)
    ax.set_xticks(range(len(union)), [str(n) for n in union], rotation=90, fontsize=6)
    ax.set_title(f"{fact.subject} → {fact.object} ({fact.relation}); CS = {cs:.2f}", fontsize=9)
    fig.colorbar(im, ax=ax, label="score / max" if value == "score" else "activation", extend="both")
    plt.close(fig)
    return _save(fig, path)
