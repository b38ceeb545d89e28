"""Property tests (hypothesis, bounded for CI speed) on CS, hook composition, IG completeness and edits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qloc_tl import Neuron, intervene, scale_neurons
from qloc_tl.consistency import consistency_score
from qloc_tl.testing import tiny_model

neurons = st.builds(Neuron, st.integers(0, 3), st.integers(0, 7))
neuron_sets = st.lists(st.frozensets(neurons, max_size=6), min_size=2, max_size=6)


@settings(max_examples=200, deadline=None)
@given(neuron_sets, st.randoms(use_true_random=False))
def test_cs_bounds_order_and_strict_le_relaxed(sets, rnd):
    strict, relaxed = consistency_score(sets, "strict"), consistency_score(sets, "relaxed")
    if not frozenset().union(*sets):
        assert math.isnan(strict) and math.isnan(relaxed)
        return
    assert 0.0 <= strict <= relaxed <= 1.0
    shuffled = list(sets)
    rnd.shuffle(shuffled)
    assert consistency_score(shuffled, "strict") == strict
    assert consistency_score(shuffled, "relaxed") == relaxed
    # identical sets are perfectly consistent
    assert consistency_score([sets[0] | {Neuron(0, 0)}] * 3) == 1.0


@pytest.fixture(scope="module")
def model64():
    return tiny_model("gpt2", dtype=torch.float64)


TOK = torch.tensor([[3, 17, 9, 10, 25]])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 127)), min_size=1, max_size=5, unique=True),
       st.floats(0.0, 3.0))
def test_suppress_then_enhance_composes_like_one_hand_hook(model64, idx, factor):
    """scale(0) composed with scale(f) on the same neurons equals one hand hook that zeroes them."""
    ns = [Neuron(l, i) for l, i in idx]
    with intervene(model64, scale_neurons(ns, 0.0) + scale_neurons(ns, factor)):
        composed = model64(TOK)

    def hand(layer):
        cols = [i for l, i in idx if l == layer]

        def fn(act, hook):
            out = act.clone()
            out[:, -1, cols] = 0.0
            return out

        return fn

    layers = sorted({l for l, _ in idx})
    with torch.no_grad():
        ref = model64.run_with_hooks(TOK, fwd_hooks=[(f"blocks.{l}.mlp.hook_post", hand(l)) for l in layers])
    torch.testing.assert_close(composed, ref, atol=1e-10, rtol=1e-10)
