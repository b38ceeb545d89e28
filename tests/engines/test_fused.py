"""The fused tanh-GELU and layer norms of the fast attribution paths (``qloc_tl.methods.attribution.engines.fused``).

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

from qloc_tl.core.model import tl_major
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.attribution.engines import fused as fused_module
from qloc_tl.methods.attribution.engines.fused import (
    FusedGELUTanh,
    fused_activations,
    fused_gelu_tanh,
    fused_layer_norms,
)
from qloc_tl.zoo.tiny import tiny_model

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


# ------------------------------------------------------------------------------------------------
# TL 3 layer norms computed by F.layer_norm for the call (fused_layer_norms)
# ------------------------------------------------------------------------------------------------

_TL3 = pytest.mark.skipif(tl_major() >= 4, reason="TL 3 LayerNorm / LayerNormPre components")


def _ln_np(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
    c = x - x.mean(-1, keepdims=True)
    y = c / np.sqrt((c**2).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w + b


@_TL3
@pytest.mark.parametrize("kind", ["LayerNorm", "LayerNormPre"])
def test_fused_layer_norm_is_tl_layer_norm_values_and_gradient(kind):
    """Against the formula in NumPy (values) and TL's own component under autograd (input gradient), float64,
    on [batch, pos, d] and [batch, pos, head, d] inputs."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens import components as C_

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=10, act_fn="relu", dtype=torch.float64,
        eps=1e-3,
    )  # fmt: skip
    torch.manual_seed(0)
    ln = getattr(C_, kind)(cfg)
    if kind == "LayerNorm":
        with torch.no_grad():
            ln.w.copy_(torch.randn(16, dtype=torch.float64))
            ln.b.copy_(torch.randn(16, dtype=torch.float64))
    fused = fused_module.FusedLayerNorm(ln)
    up = None
    for shape in [(3, 5, 16), (2, 3, 4, 16)]:
        x = (3 * torch.randn(*shape, dtype=torch.float64) + 1).requires_grad_(True)
        up = torch.randn(*shape, dtype=torch.float64)
        y, y_tl = fused(x), ln(x)
        w = ln.w.detach().numpy() if kind == "LayerNorm" else None
        b = ln.b.detach().numpy() if kind == "LayerNorm" else None
        np.testing.assert_allclose(y.detach().numpy(), _ln_np(x.detach().numpy(), w, b, 1e-3), rtol=1e-12, atol=1e-13)
        (g,) = torch.autograd.grad(y, x, up)
        (g_tl,) = torch.autograd.grad(y_tl, x, up)
        np.testing.assert_allclose(g.numpy(), g_tl.numpy(), rtol=1e-10, atol=1e-12)
    assert list(fused.parameters()) == []  # the original is referenced, not registered


@_TL3
def test_fused_layer_norms_swap_unhooked_components_only_and_restore():
    model = tiny_model("gpt2", source="native", dtype=torch.float64)
    before = _snapshot(model)
    model.blocks[1].ln2.hook_normalized.add_hook(lambda t, hook: t)
    try:
        with fused_layer_norms(model) as n:
            assert n == 2 * model.cfg.n_layers  # ln1, ln2 of every block and ln_final, less the hooked one
            assert type(model.blocks[1].ln2).__name__ == "LayerNorm"
            assert isinstance(model.blocks[0].ln1, fused_module.FusedLayerNorm)
            assert isinstance(model.ln_final, fused_module.FusedLayerNorm)
    finally:
        model.blocks[1].ln2.hook_normalized.remove_hooks()
    assert _snapshot(model) == before
    with pytest.raises(RuntimeError, match="inside"), fused_layer_norms(model):
        raise RuntimeError("inside")
    assert _snapshot(model) == before


@_TL3
def test_fast_path_with_fused_layer_norms_equals_reference(monkeypatch):
    """The fast path runs F.layer_norm (counted), the reference does not; scores agree to 1e-10 (float64)."""
    model = tiny_model("gpt2", source="native", dtype=torch.float64)
    calls = {"n": 0}
    real = fused_module.FusedLayerNorm.forward

    def spy(self, x):
        calls["n"] += 1
        return real(self, x)

    monkeypatch.setattr(fused_module.FusedLayerNorm, "forward", spy)
    prompts, answers = ["alice was born in", "bob speaks"], ["paris", "french"]
    fast = attribute_neurons(model, prompts, answers, steps=5)
    assert calls["n"] > 0
    calls["n"] = 0
    ref = attribute_neurons(model, prompts, answers, steps=5, implementation="reference")
    assert calls["n"] == 0
    err = (fast.scores_batched - ref.scores_batched).abs().max() / ref.scores_batched.abs().max()
    assert float(err) <= 1e-10


_TL4 = pytest.mark.skipif(tl_major() < 4, reason="TL 4 NormalizationBridge")


@_TL4
def test_fused_bridge_layer_norms_equal_the_bridge_and_restore():
    """TL 4: within the context every LayerNorm bridge of an HF GPT-2 bridge (4 per 2 blocks + ln_final) has an
    instance-level forward; on float64 inputs it equals the bridge's own op-by-op forward (values 1e-12, input
    gradient 1e-10); the bridge's own pre-hooks stay; a bridge with a hook on hook_normalized is left alone;
    nothing is left behind on exit, also on error."""
    model = tiny_model("gpt2", source="hf", dtype=torch.float64)
    model(model.to_tokens("alice was born in"))  # a first forward wires the bridge's own capture hooks
    norms = [m for m in model.modules() if type(m).__name__ == "NormalizationBridge"]
    pre = [dict(m._forward_pre_hooks) for m in norms]
    x = (3 * torch.randn(2, 5, model.cfg.d_model, dtype=torch.float64) + 1).requires_grad_(True)
    up = torch.randn_like(x)
    own = [m(x) for m in norms]
    own_g = [torch.autograd.grad(y, x, up)[0] for y in own]
    with fused_layer_norms(model) as n:
        assert n == len(norms) == 2 * model.cfg.n_layers + 1
        for m, y0, g0, p in zip(norms, own, own_g, pre):
            assert "forward" in vars(m) and dict(m._forward_pre_hooks) == p
            y = m(x)
            np.testing.assert_allclose(y.detach().numpy(), y0.detach().numpy(), rtol=1e-12, atol=1e-13)
            (g,) = torch.autograd.grad(y, x, up)
            np.testing.assert_allclose(g.numpy(), g0.numpy(), rtol=1e-10, atol=1e-12)
    assert not any("forward" in vars(m) for m in norms)
    norms[1].hook_normalized.add_hook(lambda t, hook: t)
    try:
        with fused_layer_norms(model) as n:
            assert n == len(norms) - 1 and "forward" not in vars(norms[1])
    finally:
        norms[1].hook_normalized.remove_hooks()
    with pytest.raises(RuntimeError, match="inside"), fused_layer_norms(model):
        raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in norms)
