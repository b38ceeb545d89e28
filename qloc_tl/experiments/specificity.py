"""Are knowledge neurons specific to a fact? Overlap of KN sets within and across relations, and a control
that suppresses another fact's KNs.

Knowledge Localization assumes a fact's KNs store *that* fact. On a real model they may instead encode the
relation (or the answer type): then facts of one relation share KNs, and suppressing another fact's KNs
removes this fact as well. Two measurements:

* :func:`kn_overlap` — the Jaccard overlap of the fact-level KN sets (the union over a fact's queries) for
  every pair of facts, and :func:`overlap_summary`: the mean within a relation and across relations with
  95 % bootstrap CIs that resample facts (pairs share facts, so pairs are not independent).
* :func:`suppression_control` — per fact, the relative change of P(answer) over its queries when its own KNs
  are suppressed (activation × 0 at the answer position), when those of another fact of the same relation
  are, and when those of a fact of another relation are. Fact-specific KNs give a large drop for ``own`` and
  none for the two controls; relation-level KNs give a drop for ``same_relation`` too.

Examples:
    >>> from qloc_tl import Neuron
    >>> sets = {"a": [{Neuron(0, 1), Neuron(1, 2)}], "b": [{Neuron(0, 1)}], "c": [{Neuron(2, 3)}]}
    >>> pairs = kn_overlap(sets, {"a": "P1", "b": "P1", "c": "P2"})
    >>> pairs[["fact_a", "fact_b", "same_relation", "jaccard"]].values.tolist()
    [['a', 'b', True, 0.5], ['a', 'c', False, 0.0], ['b', 'c', False, 0.0]]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.hooks import intervene
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import TLModel, check_model, require_eval
from qloc_tl.core.stats import seeded_random
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.data.facts import Fact
from qloc_tl.experiments.mapping import RowBatch, row_neuron_hooks

__all__ = ["kn_overlap", "overlap_summary", "suppression_control", "control_summary"]


def _fact_set(sets: Iterable[Iterable[Neuron]]) -> frozenset[Neuron]:
    return frozenset(n for s in sets for n in s)


def kn_overlap(
    kn_sets: Mapping[str, Sequence[Iterable[Neuron]]], relations: Mapping[str, str]
) -> pd.DataFrame:
    """Jaccard overlap of the fact-level KN sets (union over each fact's queries) of every pair of facts.

    Args:
        kn_sets: ``{fact_key: [KN set per query]}`` (e.g. from ``ConsistencyResult.kn_sets`` of one method).
        relations: ``{fact_key: relation}``.

    Returns:
        One row per unordered pair: ``fact_a``, ``fact_b``, ``relation_a``, ``relation_b``, ``same_relation``,
        ``n_a``, ``n_b``, ``shared``, ``jaccard`` (``nan`` when both sets are empty).
    """
    keys = [k for k in kn_sets if k in relations]
    if len(keys) < 2:
        raise InvalidInputError("kn_overlap needs at least two facts with a relation")
    fs = {k: _fact_set(kn_sets[k]) for k in keys}
    rows = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            inter, union = len(fs[a] & fs[b]), len(fs[a] | fs[b])
            rows.append({
                "fact_a": a, "fact_b": b, "relation_a": relations[a], "relation_b": relations[b],
                "same_relation": relations[a] == relations[b], "n_a": len(fs[a]), "n_b": len(fs[b]), "shared": inter,
                "jaccard": inter / union if union else math.nan,
            })  # fmt: skip
    return pd.DataFrame(rows)


def overlap_summary(pairs: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean Jaccard and share of pairs sharing any KN, within a relation and across relations, with 95 %
    percentile bootstrap CIs of the mean Jaccard (facts resampled with replacement; a pair is kept when its
    two facts are distinct draws), plus the difference within − across.

    Returns:
        Rows ``within``, ``across``, ``within − across``: ``n_pairs``, ``n_facts``, ``mean_jaccard``,
        ``ci_low``, ``ci_high``, ``share_sharing``.
    """
    facts = sorted(set(pairs["fact_a"]) | set(pairs["fact_b"]))
    idx = {k: i for i, k in enumerate(facts)}
    n = len(facts)
    J = np.full((n, n), np.nan)
    S = np.zeros((n, n), dtype=bool)
    a = pairs["fact_a"].map(idx).to_numpy()
    b = pairs["fact_b"].map(idx).to_numpy()
    J[a, b] = J[b, a] = pairs["jaccard"].to_numpy(dtype=float)
    S[a, b] = S[b, a] = pairs["same_relation"].to_numpy(dtype=bool)

    def means(sel: np.ndarray) -> tuple[float, float]:
        sub_j, sub_s = J[np.ix_(sel, sel)], S[np.ix_(sel, sel)]
        off = sel[:, None] != sel[None, :]
        ok = off & np.isfinite(sub_j)
        w, x = ok & sub_s, ok & ~sub_s
        return (float(sub_j[w].mean()) if w.any() else math.nan, float(sub_j[x].mean()) if x.any() else math.nan)

    rng = np.random.default_rng(seed)
    boots = np.array([means(rng.integers(0, n, size=n)) for _ in range(n_boot)]) if n >= 2 else np.empty((0, 2))
    full = means(np.arange(n))
    out = []
    for name, col, mask in (("within", 0, pairs["same_relation"]), ("across", 1, ~pairs["same_relation"])):
        sub = pairs[mask]
        v = boots[:, col] if len(boots) else np.array([])
        v = v[np.isfinite(v)]
        out.append({
            "pairs": name, "n_pairs": int(len(sub)), "n_facts": int(len(set(sub["fact_a"]) | set(sub["fact_b"]))),
            "mean_jaccard": full[col], "ci_low": float(np.quantile(v, 0.025)) if len(v) else math.nan,
            "ci_high": float(np.quantile(v, 0.975)) if len(v) else math.nan,
            "share_sharing": float((sub["shared"] > 0).mean()) if len(sub) else math.nan,
        })  # fmt: skip
    d = boots[:, 0] - boots[:, 1] if len(boots) else np.array([])
    d = d[np.isfinite(d)]
    out.append({
        "pairs": "within − across", "n_pairs": int(len(pairs)), "n_facts": n, "mean_jaccard": full[0] - full[1],
        "ci_low": float(np.quantile(d, 0.025)) if len(d) else math.nan,
        "ci_high": float(np.quantile(d, 0.975)) if len(d) else math.nan, "share_sharing": math.nan,
    })  # fmt: skip
    return pd.DataFrame(out)


def _probs(model: TLModel, prompts: list[str], answers: list[int], neurons: Sequence[Neuron] | None) -> np.ndarray:
    """P(answer) of each prompt, with ``neurons`` suppressed (× 0) at every row's answer position: the
    Query-KN mapping's batch and hooks (:class:`~qloc_tl.experiments.mapping.RowBatch`)."""
    batch = RowBatch(model, prompts, answers, rows=range(len(prompts)))
    edits = [(r, list(neurons), 0.0) for r in range(len(batch))] if neurons else []
    with torch.no_grad(), intervene(model, row_neuron_hooks(model, batch, edits)) as mdl:
        return batch.probs(mdl(batch.tokens)).double().cpu().numpy()


def suppression_control(
    model: TLModel,
    facts: Sequence[Fact],
    kn_sets: Mapping[str, Sequence[Iterable[Neuron]]],
    *,
    seed: int = 0,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Per fact, the relative change of P(answer) over its queries when KNs are suppressed: its own
    (``own``), those of a random other fact of its relation with another object (``same_relation``), and
    those of a random fact of another relation (``other_relation``). A fact's KNs are the union over its
    queries of ``kn_sets[fact.key]``. The draws are seeded per fact.

    Returns:
        One row per (fact, control): ``fact_key``, ``relation``, ``control``, ``source_key`` (whose KNs),
        ``n_neurons``, ``shared`` (neurons shared with the fact's own KNs), ``p_before`` and ``p_after`` (mean
        over queries), ``rel_change`` (mean over queries of (p_after − p_before) / p_before).
    """
    check_model(model)
    require_eval(model)
    facts = [f for f in facts if f.key in kn_sets]
    if not facts:
        raise InvalidInputError("suppression_control: no fact has KN sets")
    own = {f.key: _fact_set(kn_sets[f.key]) for f in facts}
    it: Iterable[Fact] = facts
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(facts, desc="suppression control", unit="fact")
    rows = []
    for f in it:
        rng = seeded_random(seed, "control", f.key)
        same = [g for g in facts if g.relation == f.relation and g.key != f.key and g.object != f.object]
        other = [g for g in facts if g.relation != f.relation]
        prompts = list(f.prompts)
        answers = [answer_token_id(model, p, f.object, multi_token="first") for p in prompts]
        before = _probs(model, prompts, answers, None)
        for control, src in (("own", f), ("same_relation", rng.choice(same) if same else None),
                             ("other_relation", rng.choice(other) if other else None)):  # fmt: skip
            if src is None:
                continue
            neurons = sorted(own[src.key])
            after = _probs(model, prompts, answers, neurons)
            rows.append({
                "fact_key": f.key, "relation": f.relation, "control": control, "source_key": src.key,
                "n_neurons": len(neurons), "shared": len(own[src.key] & own[f.key]), "p_before": float(before.mean()),
                "p_after": float(after.mean()), "rel_change": float(np.mean((after - before) / np.maximum(before, 1e-12))),
            })  # fmt: skip
    return pd.DataFrame(rows)


def control_summary(rows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean relative change of P(answer) per control with a 95 % percentile bootstrap CI over facts."""
    rng = np.random.default_rng(seed)
    out = []
    for control in ("own", "same_relation", "other_relation"):
        v = rows.loc[rows["control"] == control, "rel_change"].to_numpy(dtype=float)
        if len(v) >= 2:
            boots = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
            lo, hi = float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))
        else:
            lo = hi = math.nan
        out.append({
            "control": control, "n_facts": int(len(v)), "mean_rel_change": float(v.mean()) if len(v) else math.nan,
            "ci_low": lo, "ci_high": hi,
            "mean_n_neurons": float(rows.loc[rows["control"] == control, "n_neurons"].mean()) if len(v) else math.nan,
        })  # fmt: skip
    return pd.DataFrame(out)
