"""Neuron selection, refining and adaptive p against hand-made expectations and brute-force oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.methods.attribution import (
    NeuronSet,
    otsu_threshold,
    refine_adaptive,
    refine_neurons,
    select_neurons,
)


def _scores() -> torch.Tensor:
    s = torch.zeros(3, 5)
    s[0, 1] = 1.0  # max
    s[1, 2] = 0.25  # exactly 0.25·max
    s[1, 4] = 0.5
    s[2, 0] = 0.2
    s[2, 3] = -2.0
    return s


def N(*pairs):
    return {Neuron(l, i) for l, i in pairs}


def test_fraction_of_max_ge_and_strict():
    s = _scores()
    assert set(select_neurons(s, value=0.25)) == N((0, 1), (1, 2), (1, 4))
    assert set(select_neurons(s, value=0.25, strict=True)) == N((0, 1), (1, 4))
    assert set(select_neurons(s)) == N((0, 1), (1, 2), (1, 4), (2, 0))  # default 0.2, ≥
    assert select_neurons(s, value=0.25).threshold == pytest.approx(0.25)


def test_fraction_of_max_nonpositive_max_is_empty():
    assert len(select_neurons(-torch.ones(2, 3))) == 0
    assert len(select_neurons(torch.zeros(2, 3))) == 0


def test_absolute_and_percentile():
    s = _scores()
    assert set(select_neurons(s, method="absolute", value=0.5)) == N((0, 1), (1, 4))
    assert set(select_neurons(s, method="absolute", value=0.5, strict=True)) == N((0, 1))
    # percentile: scores 0..9 → numpy's 50th percentile is 4.5 → keep 5..9
    r = torch.arange(10.0).reshape(2, 5)
    assert set(select_neurons(r, method="percentile", value=50)) == N((1, 0), (1, 1), (1, 2), (1, 3), (1, 4))
    assert select_neurons(r, method="percentile", value=50).threshold == pytest.approx(4.5)
    assert set(select_neurons(r, method="percentile", value=90)) == N((1, 4))  # 8.1 → {9}


def test_topk_with_ties():
    s = torch.tensor([[0.5, 0.9, 0.5], [0.5, 0.1, 0.9]])
    assert list(select_neurons(s, method="topk", value=2)) == [Neuron(0, 1), Neuron(1, 2)]
    # ties at 0.5 broken by (layer, index): (0,0) before (0,2) before (1,0)
    assert set(select_neurons(s, method="topk", value=3)) == N((0, 1), (1, 2), (0, 0))
    assert len(select_neurons(s, method="topk", value=0)) == 0
    assert len(select_neurons(s, method="topk", value=100)) == 6


def _bruteforce_otsu_split(values: np.ndarray) -> float:
    """Exhaustive Otsu on the raw values: the cut between sorted values maximising w0·w1·(μ0−μ1)²."""
    v = np.sort(values)
    best, cut = -1.0, None
    for i in range(1, len(v)):
        if v[i] == v[i - 1]:
            continue
        lo, hi = v[:i], v[i:]
        var = len(lo) * len(hi) / len(v) ** 2 * (lo.mean() - hi.mean()) ** 2
        if var > best:
            best, cut = var, (v[i - 1] + v[i]) / 2
    return float(cut)


def _hand_otsu_hist(values: np.ndarray, bins: int) -> float:
    """A direct loop over histogram split points (independent of the vectorised cumsum implementation);
    returns the lower edge of the upper class's first bin for the first (near-)maximal split."""
    lo, hi = values.min(), values.max()
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    var = np.full(bins - 1, -1.0)
    for k in range(bins - 1):
        w0, w1 = hist[: k + 1].sum(), hist[k + 1 :].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (hist[: k + 1] * centers[: k + 1]).sum() / w0
        m1 = (hist[k + 1 :] * centers[k + 1 :]).sum() / w1
        var[k] = w0 * w1 * (m0 - m1) ** 2
    k = next(i for i in range(bins - 1) if var[i] >= var.max() * (1 - 1e-12))
    return float(edges[k + 1])


def test_otsu_on_bimodal_scores():
    rng = np.random.default_rng(0)
    low = rng.uniform(0.0, 0.1, size=300)
    high = rng.uniform(0.8, 1.0, size=20)
    vals = np.concatenate([low, high])
    rng.shuffle(vals)
    s = torch.from_numpy(vals).reshape(4, 80)
    chosen = select_neurons(s, method="otsu")
    expected = {Neuron(int(i) // 80, int(i) % 80) for i in np.nonzero(vals >= 0.8)[0]}
    assert set(chosen) == expected
    cut = _bruteforce_otsu_split(vals)
    assert set(select_neurons(s, method="absolute", value=cut)) == expected
    assert otsu_threshold(vals) == pytest.approx(_hand_otsu_hist(vals, 256), abs=1e-12)
    assert otsu_threshold(vals, bins=16) == pytest.approx(_hand_otsu_hist(vals, 16), abs=1e-12)


def test_otsu_threshold_random_matches_hand_loop():
    rng = np.random.default_rng(1)
    for _ in range(5):
        vals = np.concatenate([rng.normal(0, 1, 200), rng.normal(4, 0.5, 50)])
        assert otsu_threshold(vals, bins=64) == pytest.approx(_hand_otsu_hist(vals, 64), abs=1e-12)


def test_nan_layers_are_never_selected_and_ignored_by_max():
    s = _scores()
    s[0] = float("nan")
    assert set(select_neurons(s, value=0.5)) == N((1, 4), (1, 2))  # max over finite = 0.5 → τ = 0.25
    assert set(select_neurons(s, method="topk", value=2)) == N((1, 4), (1, 2))
    assert Neuron(0, 1) not in select_neurons(s, method="otsu")


def test_vectorised_over_prompts_uses_per_prompt_thresholds():
    a = _scores()
    b = _scores() * 10
    b[2, 2] = 100.0
    out = select_neurons(torch.stack([a, b]), value=0.25)
    assert isinstance(out, list) and len(out) == 2
    assert set(out[0]) == N((0, 1), (1, 2), (1, 4))
    assert set(out[1]) == N((2, 2))


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "magic"},
        {"method": "absolute"},
        {"method": "percentile", "value": 101},
        {"method": "topk", "value": 2.5},
        {"method": "otsu", "value": 1},
        {"value": float("nan")},
        {"strict": 1},
    ],
)
def test_invalid_selection(kw):
    with pytest.raises(InvalidInputError):
        select_neurons(_scores(), **kw)
    with pytest.raises(InvalidInputError):
        select_neurons(torch.zeros(5))


def test_neuron_set_semantics():
    a = NeuronSet([Neuron(1, 2), (0, 5), Neuron(1, 2)])
    assert list(a) == [Neuron(0, 5), Neuron(1, 2)] and len(a) == 2
    assert (0, 5) in a and Neuron(3, 3) not in a
    b = NeuronSet([Neuron(0, 5), Neuron(2, 0)])
    assert set(a & b) == N((0, 5))
    assert set(a | b) == N((0, 5), (1, 2), (2, 0))
    assert set(a - b) == N((1, 2))
    assert set(a ^ b) == N((1, 2), (2, 0))
    assert a == NeuronSet([Neuron(1, 2), Neuron(0, 5)]) and hash(a) == hash(NeuronSet(list(a)))
    with pytest.raises(AttributeError):
        a.threshold = 3.0  # type: ignore[misc]
    df = a.to_dataframe()
    assert df.to_dict("list") == {"layer": [0, 1], "neuron": [5, 2]}
    with pytest.raises(InvalidInputError):
        NeuronSet(["L0N1"])  # type: ignore[list-item]


# ------------------------------------------------------------------------------------------------
# refining
# ------------------------------------------------------------------------------------------------

A, B, C, D = Neuron(0, 1), Neuron(1, 2), Neuron(2, 3), Neuron(3, 4)


def test_refine_dai_rule_hand_computation():
    bag = [NeuronSet(s) for s in ([A, B, C], [A, B], [A, B, D], [A, C], [A], [A, B, C])]
    # counts: A 6, B 4, C 3, D 1; n = 6
    # Dai, p = 0.7: need ≥ max(4.2, 3) → {A}
    assert set(refine_neurons(bag)) == {A}
    # p = 0.5: need ≥ max(3, 3) → {A, B, C}
    assert set(refine_neurons(bag, p=0.5)) == {A, B, C}
    # EleutherAI-style '>' with p = 0.5: > 3 → {A, B}
    assert set(refine_neurons(bag, p=0.5, rule=">", min_count=0)) == {A, B}
    # min count dominates a small p: p = 0.1 (0.6) with min_count 3 → ≥ 3
    assert set(refine_neurons(bag, p=0.1)) == {A, B, C}
    assert set(refine_neurons(bag, p=0.1, min_count=0)) == {A, B, C, D}


def test_refine_edge_cases_and_errors():
    assert len(refine_neurons([])) == 0
    # Dai's min count of 3 empties a 2-prompt bag
    assert len(refine_neurons([NeuronSet([A]), NeuronSet([A])])) == 0
    for kw in ({"p": 1.5}, {"rule": "=>"}, {"min_count": -1}, {"p": True}):
        with pytest.raises(InvalidInputError):
            refine_neurons([NeuronSet([A])], **kw)


def test_refine_adaptive_moves_p_down_until_target():
    bag = [NeuronSet(s) for s in ([A, B, C], [A, B], [A, B, D], [A, C])]  # A 4, B 3, C 2, D 1
    r = refine_adaptive([bag], p0=0.9, step=0.1, target=(2, 5), min_count=0)
    # p = 0.9 → ≥ 3.6: {A} (1 < 2) ; 0.8 → ≥ 3.2: {A} ; 0.7 → ≥ 2.8: {A, B} (2 ∈ [2, 5]) stop
    assert [round(p, 6) for p, _ in r.history] == [0.9, 0.8, 0.7]
    assert [m for _, m in r.history] == [1.0, 1.0, 2.0]
    assert r.converged and r.p == pytest.approx(0.7) and set(r[0]) == {A, B}
    assert r.to_dataframe().shape == (2, 4)


def test_refine_adaptive_moves_p_up_and_averages_over_facts():
    many = [Neuron(0, i) for i in range(8)]
    bag1 = [NeuronSet(many)] * 4 + [NeuronSet(many[:3])]  # n = 5: first 3 in 5 sets, other 5 in 4 sets
    bag2 = [NeuronSet(many[:2])] * 5  # 2 neurons in all 5
    # p = 0.5 (≥ 2.5): fact1 8, fact2 2 → mean 5 ∈ [2, 5] → stays. Use target (2, 4) to force a move up:
    # p = 0.6 (≥ 3): fact1 8, fact2 2 → 5 > 4 ; p = 0.7 (≥ 3.5): 8, 2 → 5 ; p = 0.8 (≥ 4): 8, 2 ; p = 0.9
    # (≥ 4.5): fact1 3, fact2 2 → mean 2.5 → stop
    r = refine_adaptive([bag1, bag2], p0=0.6, step=0.1, target=(2, 4), max_iter=6, min_count=0)
    assert [round(p, 6) for p, _ in r.history] == [0.6, 0.7, 0.8, 0.9]
    assert [m for _, m in r.history] == [5.0, 5.0, 5.0, 2.5]
    assert r.converged and [len(s) for s in r.neuron_sets] == [3, 2]


def test_refine_adaptive_respects_max_iter():
    bag = [NeuronSet([A])] * 4
    r = refine_adaptive([bag], p0=0.7, step=0.05, target=(2, 5), max_iter=3, min_count=0)
    assert len(r.history) == 4 and not r.converged  # one neuron can never reach 2
    with pytest.raises(InvalidInputError):
        refine_adaptive([], p0=0.7)
