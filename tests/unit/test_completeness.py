"""Completeness per layer: the gap against a finite-difference oracle of the path P(α), and the adaptive-steps
remedy against direct attributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.completeness import adaptive_steps, completeness_by_layer, path_probabilities
from qloc_tl.zoo.tiny import tiny_model

PROMPT, ANSWER = "alice was born in", "paris"


@pytest.fixture(scope="module")
def model64():
    return tiny_model("gpt2", dtype=torch.float64)


def test_path_endpoints_are_clean_and_baseline(model64):
    res = attribute_neurons(model64, PROMPT, ANSWER, steps=4)
    curve = path_probabilities(model64, PROMPT, ANSWER, layer=1, alphas=[0.0, 1.0])
    assert curve["prob"].iloc[1] == pytest.approx(float(res.clean_prob[0]), rel=1e-9)
    assert curve["prob"].iloc[0] == pytest.approx(float(res.baseline_prob[0, 1]), rel=1e-9)


def test_score_sum_is_the_riemann_sum_of_the_path_derivative(model64):
    """Σ_i IG_i of a layer = (1/m) Σ_k P'(k/m) (left rule): P' by central differences of the path."""
    m, h = 5, 1e-4
    table = completeness_by_layer(model64, [PROMPT], [ANSWER], steps=(m,), layers=[0, 1])
    for layer in (0, 1):
        nodes = np.arange(m) / m
        lo, hi = np.maximum(nodes - h, 0.0), nodes + h
        p = path_probabilities(model64, PROMPT, ANSWER, layer=layer, alphas=[*lo, *hi])["prob"].to_numpy()
        deriv = (p[m:] - p[:m]) / (hi - lo)
        row = table[table.layer == layer].iloc[0]
        assert row.score_sum == pytest.approx(np.mean(deriv), rel=1e-4)
        assert row.gap == pytest.approx(row.score_sum - row.target, abs=1e-15)


def test_adaptive_steps_matches_direct_attribution_at_the_steps_it_used(model64):
    res = adaptive_steps(model64, PROMPT, ANSWER, steps=2, tol=0.01, atol=0.0, max_steps=64)
    t = res.table.set_index("layer")
    assert (t["steps"] >= 2).all() and (t["steps"] <= 64).all()
    for layer, row in t.iterrows():
        direct = attribute_neurons(model64, PROMPT, ANSWER, steps=int(row.steps), layers=[int(layer)])
        torch.testing.assert_close(res.result.scores[layer], direct.scores[layer])
        assert row.converged == (row.rel_gap <= 0.01)
    assert t["steps"].max() > 2  # at 2 steps every layer misses 1 % completeness on this model (8-57 %)


def test_bad_alphas_are_refused(model64):
    with pytest.raises(InvalidInputError):
        path_probabilities(model64, PROMPT, ANSWER, layer=0, alphas=[1.5])
