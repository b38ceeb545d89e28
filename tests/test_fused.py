"""The fused tanh-GELU of the fast attribution paths (``qloc_tl.attribution.fused``).

Oracles: the GELU formula written out in NumPy (values) and its hand-derived derivative (gradients); the
identity of the model's own activation objects before and after (restoration, also on error); the number
of fused calls seen by a spy (what the fast path and the reference actually ran).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qloc_tl.attribution import attribute_neurons
from qloc_tl.attribution import fused as fused_module
from qloc_tl.attribution.fused import FusedGELUTanh, fused_activations, fused_gelu_tanh
from qloc_tl.model import tl_major
from qloc_tl.testing import tiny_model

NewGELU = pytest.importorskip("transformers.activations").NewGELUActivation
C = math.sqrt(2.0 / math.pi)


def _gelu_np(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(C * (x + 0.044715 * x**3)))


def _dgelu_np(x: np.ndarray) -> np.ndarray:
    u = C * (x + 0.044715 * x**3)
    du = C * (1.0 + 3 * 0.044715 * x**2)
    return 0.5 * (1.0 + np.tanh(u)) + 0.5 * x * (1.0 - np.tanh(u) ** 2) * du


def test_fused_gelu_is_the_gelu_new_formula_values_and_gradient():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64, requires_grad=True)
    y = fused_gelu_tanh(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    xn = x.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), _gelu_np(xn), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(g.numpy(), _dgelu_np(xn), rtol=1e-13, atol=1e-14)
    # and HF's op-by-op module computes the same function
    np.testing.assert_allclose(NewGELU()(x).detach().numpy(), _gelu_np(xn), rtol=1e-14, atol=1e-15)


def _snapshot(model: nn.Module) -> list:
    """Every submodule object and every ``act_fn`` attribute, by identity."""
    mods = list(model.modules())
    return [id(m) for m in mods] + [id(vars(m).get("act_fn")) for m in mods]


def test_swaps_exact_matches_only_and_restores():
    hooked = NewGELU()
    hooked.register_forward_hook(lambda m, i, o: None)

    class Sub(NewGELU):
        pass

    net = nn.Sequential(nn.Linear(3, 5), NewGELU(), nn.Sequential(NewGELU(), hooked, Sub(), nn.GELU()))
    before = _snapshot(net)
    with fused_activations(net) as n:
        assert n == 2  # the two plain NewGELUActivation modules; not the hooked one, the subclass or nn.GELU
        assert isinstance(net[1], FusedGELUTanh) and isinstance(net[2][0], FusedGELUTanh)
        assert net[2][1] is hooked and type(net[2][2]) is Sub
    assert _snapshot(net) == before


def test_restores_on_error():
    net = nn.Sequential(nn.Linear(3, 5), NewGELU())
    before = _snapshot(net)
    with pytest.raises(RuntimeError, match="inside"), fused_activations(net):
        assert isinstance(net[1], FusedGELUTanh)
        raise RuntimeError("inside")
    assert _snapshot(net) == before and type(net[1]) is NewGELU


def _count_fused(monkeypatch) -> dict:
    calls = {"n": 0}
    real = fused_module.fused_gelu_tanh

    def spy(x):
        calls["n"] += 1
        return real(x)

    monkeypatch.setattr(fused_module, "fused_gelu_tanh", spy)
    return calls


# TL 4 native bridges already compute gelu_new with F.gelu (nothing to swap); TL 3 native HookedTransformers
# and HF-backed models use the op-by-op form
_SOURCES = ["native", "hf"] if tl_major() < 4 else ["hf"]


@pytest.mark.parametrize("source", _SOURCES)
def test_fast_path_runs_fused_reference_does_not_and_both_agree(source, monkeypatch):
    model = tiny_model("gpt2", source=source, dtype=torch.float64)
    before = _snapshot(model)
    with fused_activations(model) as n:
        assert n == model.cfg.n_layers
    calls = _count_fused(monkeypatch)
    prompts, answers = ["alice was born in", "bob speaks"], ["paris", "french"]
    fast = attribute_neurons(model, prompts, answers, steps=5)
    assert calls["n"] > 0 and _snapshot(model) == before
    calls["n"] = 0
    ref = attribute_neurons(model, prompts, answers, steps=5, implementation="reference")
    assert calls["n"] == 0 and _snapshot(model) == before
    err = (fast.scores_batched - ref.scores_batched).abs().max() / ref.scores_batched.abs().max()
    assert float(err) <= 1e-10
    # the clean probability of the fast call equals the model's own (unfused) forward
    with torch.no_grad():
        own = model(model.to_tokens(prompts[0]))[0, -1].softmax(-1)
    assert float(fast.clean_prob[0]) == pytest.approx(float(own[int(fast.answer_ids[0])]), rel=1e-12)


def test_llama_has_nothing_to_swap():
    model = tiny_model("llama", dtype=torch.float64)
    with fused_activations(model) as n:
        assert n == 0
