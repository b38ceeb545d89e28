"""Completeness of IG per layer: where the quadrature of the path integral fails, why, and a remedy.

IG scores of layer l sum to ``P(clean) − P(baseline_l)`` as the number of steps m grows (completeness):
``Σ_i IG_i = (1/m) Σ_k dP/dα(α_k)`` is a Riemann sum of the derivative of ``P(α)``, the answer probability
with layer l's neurons at the answer position set to ``baseline + α·(x − baseline)`` (every other layer
clean). The gap ``Σ_i IG_i − (P(1) − P(0))`` (``NeuronAttribution.completeness_delta``) is therefore the
quadrature error of that sum, and it is large exactly where ``P(α)`` is not smooth on the scale of 1/m.

* :func:`path_probabilities` draws ``P(α)`` for one layer on a fine grid: the curve the sum samples.
* :func:`completeness_by_layer` tabulates the gap per (prompt, layer) at several m (and rules), with the
  relative gap ``gap / |P(1) − P(0)|``.
* :func:`adaptive_steps` is the remedy: the same IG (same path, baseline, rule), recomputed for each layer
  whose relative gap exceeds ``tol`` with 2m, 4m, ... steps until it is within ``tol`` or ``max_steps`` is
  reached; the steps used and the remaining gap are reported per layer, so nothing is silently wrong.

Examples:
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> curve = path_probabilities(model, "alice was born in", "paris", layer=0, alphas=[0.0, 0.5, 1.0])
    >>> list(curve.columns), len(curve)
    (['layer', 'alpha', 'prob'], 3)
    >>> res = adaptive_steps(model, "alice was born in", "paris", steps=4, tol=0.05, max_steps=64)
    >>> set(res.table.columns) >= {"layer", "steps", "gap", "rel_gap", "converged"}
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.hooks import intervene
from qloc_tl.core.model import TLModel, check_layer, check_model, neuron_hook_name, require_eval
from qloc_tl.core.store import atomic_save_figure
from qloc_tl.core.tokens import answer_token_id, tokenize_prompts
from qloc_tl.core.validation import (
    check_finite_values,
    check_float,
    check_int,
    check_nonempty,
    require_finite_logits,
)
from qloc_tl.methods.attribution import NeuronAttribution, attribute_neurons

logger = logging.getLogger(__name__)

__all__ = ["path_probabilities", "completeness_by_layer", "adaptive_steps", "AdaptiveIG", "plot_path_probabilities"]


def path_probabilities(
    model: TLModel,
    prompt: str,
    answer: str | int,
    *,
    layer: int,
    alphas: Sequence[float] | None = None,
    site: str = "post",
    batch_size: int = 64,
) -> pd.DataFrame:
    """``P(answer | prompt)`` along IG's path for ``layer``: the layer's neurons at the answer (last)
    position scaled by α (the zero baseline), everything else clean.

    Args:
        alphas: points in [0, 1] (default: 201 evenly spaced).
        site: the neuron site (``"post"``, ``"pre"``, ``"pre_linear"``), as in ``attribute_neurons``.

    Returns:
        ``layer``, ``alpha``, ``prob`` — one row per α.
    """
    check_model(model)
    require_eval(model)
    layer = check_layer(model, layer)
    check_int("batch_size", batch_size, 1)
    a = torch.linspace(0.0, 1.0, 201) if alphas is None else torch.tensor(check_finite_values("alphas", alphas, 0.0, 1.0))
    ans = answer if isinstance(answer, int) else answer_token_id(model, prompt, answer, multi_token="first")
    toks, last = tokenize_prompts(model, [prompt])
    pos = int(last[0])
    probs = []
    for start in range(0, a.numel(), batch_size):
        chunk = a[start : start + batch_size]

        def scale(act: torch.Tensor, hook: Any, chunk: torch.Tensor = chunk) -> torch.Tensor:
            act = act.clone()
            act[:, pos] = act[:, pos] * chunk.to(act.device, act.dtype).view(-1, 1)
            return act

        with torch.no_grad(), intervene(model, [(neuron_hook_name(model, layer, site), scale)]) as mdl:
            logits = mdl(toks.expand(chunk.numel(), -1))
            require_finite_logits(model, logits, toks.expand(chunk.numel(), -1), "path logits")
        probs.append(logits[:, pos].double().softmax(-1)[:, ans].cpu())
    return pd.DataFrame({"layer": layer, "alpha": a.double().numpy(), "prob": torch.cat(probs).numpy()})


def completeness_by_layer(
    model: TLModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    steps: Sequence[int] = (20, 60, 200),
    rules: Sequence[str] = ("left",),
    layers: Sequence[int] | None = None,
    site: str = "post",
) -> pd.DataFrame:
    """The completeness gap of IG per (prompt, layer) for each number of steps and quadrature rule.

    Returns:
        ``prompt``, ``layer``, ``steps``, ``rule``, ``clean_prob``, ``baseline_prob``, ``target``
        (= P(clean) − P(baseline)), ``score_sum``, ``gap`` (= score_sum − target) and ``rel_gap``
        (= |gap| / |target|).
    """
    if len(prompts) != len(answers) or not prompts:
        raise InvalidInputError("prompts and answers must be non-empty and of equal length")
    steps = [check_int("steps", m, 1) for m in check_nonempty("steps", steps)]
    rules = list(check_nonempty("rules", rules))
    rows = []
    for m in steps:
        for rule in rules:
            res = attribute_neurons(
                model, list(prompts), list(answers), steps=int(m), rule=rule, layers=layers, site=site, multi_token="first"
            )  # fmt: skip
            for i, prompt in enumerate(prompts):
                for l in res.layers:
                    target = float(res.clean_prob[i] - res.baseline_prob[i, l])
                    gap = float(res.completeness_delta[i, l])
                    rows.append({
                        "prompt": prompt, "layer": l, "steps": int(m), "rule": rule, "clean_prob": float(res.clean_prob[i]),
                        "baseline_prob": float(res.baseline_prob[i, l]), "target": target, "score_sum": gap + target,
                        "gap": gap, "rel_gap": abs(gap) / max(abs(target), 1e-12),
                    })  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class AdaptiveIG:
    """What :func:`adaptive_steps` returns.

    Attributes:
        result: the attribution, each layer's scores from its final number of steps.
        table: one row per layer: ``layer``, ``steps`` (the final m), ``gap``, ``rel_gap``, ``converged``
            (``rel_gap <= tol`` or ``|target| <= atol``).
    """

    result: NeuronAttribution
    table: pd.DataFrame


def adaptive_steps(
    model: TLModel,
    prompt: str,
    answer: str,
    *,
    steps: int = 20,
    tol: float = 0.05,
    atol: float = 1e-3,
    max_steps: int = 320,
    **kwargs: Any,
) -> AdaptiveIG:
    """IG of one prompt with the steps raised per layer until completeness holds within ``tol``.

    Starts from ``steps``; every layer whose relative gap ``|gap| / |F(clean) − F(baseline_l)|`` exceeds
    ``tol`` (F: the attribution's objective, P or log P; layers whose ``|F(clean) − F(baseline_l)|`` is at most
    ``atol`` count as converged: the relative gap means nothing there) is recomputed alone with twice the
    steps, until it converges or ``max_steps`` is reached. The path, baseline and rule do not change, so the scores are the same IG, integrated more
    finely. A layer still above ``tol`` at ``max_steps`` is logged as a WARNING and marked
    ``converged=False``.

    Args:
        kwargs: passed to :func:`~qloc_tl.methods.attribution.attribute_neurons` (``method``, ``rule``, ``site``, ...).
    """
    check_float("tol", tol, 0.0, 1.0, open_lo=True, open_hi=True)
    check_float("atol", atol, lo=0.0)
    check_int("steps", steps, 1)
    check_int("max_steps", max_steps, 1)
    if max_steps < steps:
        raise InvalidInputError(f"need steps <= max_steps, got steps={steps}, max_steps={max_steps}")
    res = attribute_neurons(model, prompt, answer, steps=steps, **kwargs)
    scores = res.scores_batched.clone()
    delta = res.completeness_delta.clone()
    used = {l: steps for l in res.layers}
    # what each layer's scores must sum to: objective(clean) − objective(baseline), the quantity
    # completeness_delta is measured against
    clean = float(res.clean_prob[0]) if res.objective == "prob" else math.log(float(res.clean_prob[0]))
    target = {l: clean - float(res.baseline_objective[0, l]) for l in res.layers}

    def rel_gap(l: int) -> float:
        return abs(float(delta[0, l])) / max(abs(target[l]), 1e-12)

    def bad(l: int) -> bool:
        return abs(target[l]) > atol and rel_gap(l) > tol

    todo = [l for l in res.layers if bad(l)]
    m = steps
    while todo and m * 2 <= max_steps:
        m *= 2
        again = attribute_neurons(model, prompt, answer, steps=m, **{**kwargs, "layers": todo})
        for l in todo:
            scores[0, l] = again.scores_batched[0, l]
            delta[0, l] = again.completeness_delta[0, l]
            used[l] = m
        todo = [l for l in todo if bad(l)]
    if todo:
        logger.warning(
            "IG completeness: layers %s keep a relative gap above %.3g at %d steps (%s)",
            todo, tol, m, ", ".join(f"L{l}: {float(delta[0, l]):+.3g}" for l in todo),
        )  # fmt: skip
    rows = [
        {"layer": l, "steps": used[l], "target": target[l], "gap": float(delta[0, l]), "rel_gap": rel_gap(l),
         "converged": not bad(l)}
        for l in res.layers
    ]  # fmt: skip
    out = replace(res, scores_batched=scores, completeness_delta=delta)
    return AdaptiveIG(out, pd.DataFrame(rows))


def plot_path_probabilities(curves: pd.DataFrame, path: Any = None, steps: int | None = 20) -> Any:
    """``P(α)`` per layer (one line each) from :func:`path_probabilities` frames (concatenated); with
    ``steps``, the left-rule nodes α_k = k/m are marked on each curve. Returns the Figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for layer, g in curves.groupby("layer"):
        (line,) = ax.plot(g["alpha"], g["prob"], label=f"layer {layer}")
        if steps:
            nodes = np.arange(steps) / steps
            ax.plot(nodes, np.interp(nodes, g["alpha"], g["prob"]), "o", ms=3, color=line.get_color())
    ax.set_xlabel("α (layer's neurons at the answer position scaled by α)")
    ax.set_ylabel("P(answer)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        atomic_save_figure(fig, path, dpi=120)
    return fig
