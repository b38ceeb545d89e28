"""Property tests (hypothesis, bounded for CI speed) on CS, hook composition, IG completeness and edits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qloc_tl import Neuron, intervene, scale_neurons
from qloc_tl.methods.consistency_score import consistency_score
from qloc_tl.zoo.tiny import tiny_model

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


@pytest.fixture(scope="module")
def hf_model64():
    return tiny_model("gpt2", source="hf", dtype=torch.float64)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10_000))
def test_ig_completeness_delta_shrinks_with_steps_on_average(model64, seed):
    """|completeness delta| averaged over layers does not grow as m grows (trapezoid rule, zero baseline)."""
    from qloc_tl.methods.attribution import attribute_neurons

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 90, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
    answer = int(torch.randint(3, 90, (1,), generator=g))
    deltas = []
    for m in (4, 16, 64):
        res = attribute_neurons(model64, prompt, answer, steps=m, rule="trapezoid")
        deltas.append(float(res.completeness_delta.abs().mean()))
    assert deltas[1] <= deltas[0] + 1e-12 and deltas[2] <= deltas[1] + 1e-12, deltas


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 127)), min_size=1, max_size=6, unique=True),
       st.sampled_from(["erase", "update"]))
def test_edits_are_exact_inverses(hf_model64, idx, kind):
    from qloc_tl.core.edits import apply_erase, apply_update

    model = hf_model64
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ns = [Neuron(l, i) for l, i in idx]
    edit = apply_erase(model, ns) if kind == "erase" else apply_update(model, ns, " paris", " london")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the edit changed nothing"
    edit.undo()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
