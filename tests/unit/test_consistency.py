"""Consistency scores: CS against hand computations, split/statistics against scipy and brute force.
The runner end to end is in ``tests/integration/test_consistency_runner.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qloc_tl import InvalidInputError, Neuron
from qloc_tl.core.stats import bootstrap_proportion_ci
from qloc_tl.methods.consistency_score import class_statistics, consistency_score, cs_threshold, split_facts

A, B, C, D, E = (Neuron(0, 1), Neuron(0, 2), Neuron(1, 3), Neuron(2, 4), Neuron(2, 5))


@pytest.mark.parametrize(
    "sets, strict, relaxed",
    [
        ([{A, B}, {A, B}], 1.0, 1.0),  # identical
        ([{A}, {B}], 0.0, 0.0),  # disjoint
        ([{A, B}, {A, C}, {A, D}], 1 / 4, 1 / 4),  # only A shared (by all)
        ([{A, B}, {A, C}, {B, D}], 0 / 4, 2 / 4),  # A and B each in two sets, none in all
        ([{A, B, C}, {A, B}, {A, D, E}], 1 / 5, 2 / 5),
        ([{A}, set(), {A}], 0.0, 1.0),  # empty set kills the intersection, A still shared
        ([{A, B}, {B, C}], 1 / 3, 1 / 3),  # k = 2: strict == relaxed
    ],
)
def test_cs_hand_computations(sets, strict, relaxed):
    assert consistency_score(sets, "strict") == pytest.approx(strict)
    assert consistency_score(sets, "relaxed") == pytest.approx(relaxed)
    assert consistency_score(sets[::-1], "relaxed") == pytest.approx(relaxed)  # order invariant


def test_cs_edge_cases():
    assert math.isnan(consistency_score([{A, B}]))  # k = 1
    assert math.isnan(consistency_score([set(), set()]))  # empty union
    assert math.isnan(consistency_score([]))
    with pytest.raises(InvalidInputError, match="mode"):
        consistency_score([{A}, {A}], mode="jaccard")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="Neuron"):
        consistency_score([{(0, 1)}, {A}])


def test_split_and_thresholds():
    labels, tau = split_facts([0.3, 0.29, 1.0, float("nan")])
    assert tau == 0.3 and labels.tolist() == ["K_C", "K_I", "K_C", "excluded"]
    labels, tau = split_facts([0.05, 0.1, 0.12, 0.8, 0.85, 0.9], "otsu")
    assert 0.12 < tau < 0.8 and labels.tolist() == ["K_I"] * 3 + ["K_C"] * 3
    assert cs_threshold([0.1], 0.5) == 0.5
    with pytest.raises(InvalidInputError):
        cs_threshold([0.1], "median")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        cs_threshold([0.1], 1.5)


def test_class_statistics_match_scipy_and_hand_values():
    rng = np.random.default_rng(1)
    kc = rng.uniform(0.4, 1.0, 30)
    ki = rng.uniform(0.0, 0.35, 50)
    cs = np.concatenate([kc, ki, [np.nan]])
    labels = np.array(["K_C"] * 30 + ["K_I"] * 50 + ["excluded"], dtype=object)
    st = class_statistics(cs, labels, n_perm=500)
    ref = stats.ttest_ind(kc, ki, equal_var=False)
    assert st["welch_t"] == pytest.approx(ref.statistic) and st["welch_p"] == pytest.approx(ref.pvalue)
    assert st["n_facts"] == 80 and st["prop_KI"] == pytest.approx(50 / 80)
    assert st["mean_cs_KC"] == pytest.approx(kc.mean())
    sp = math.sqrt((29 * kc.var(ddof=1) + 49 * ki.var(ddof=1)) / 78)
    assert st["cohens_d"] == pytest.approx((kc.mean() - ki.mean()) / sp)
    assert st["perm_p"] == pytest.approx(1 / 501)  # separated groups: no permutation is as extreme
    assert st["prop_KI_ci_lo"] < 50 / 80 < st["prop_KI_ci_hi"]


def test_permutation_p_is_large_for_identical_groups():
    x = np.linspace(0, 1, 20)
    st = class_statistics(np.concatenate([x, x]), np.array(["K_C"] * 20 + ["K_I"] * 20, dtype=object), n_perm=300)
    assert st["perm_p"] > 0.9 and abs(st["welch_t"]) < 1e-9


def test_bootstrap_ci_degenerate():
    assert bootstrap_proportion_ci([True] * 10) == (1.0, 1.0)

