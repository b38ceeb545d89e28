"""Matmul-ready weight layouts of the fast attribution paths (``qloc_tl.methods.attribution.engines.layout``).

Oracles: the model's own logits and attributions without the context (bitwise equality: the same numbers
multiplied in the same order); the parameters' values, shapes and strides read directly; the identity and
storage of every parameter before and after (restoration, also on error); what a TL hook inside the forward
sees of the weights (that the fast path really runs with the new layout and the reference does not).
"""

from __future__ import annotations

import contextlib

import einops
import pytest
import torch

from qloc_tl.core.model import tl_major
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.attribution import ig as ig_module
from qloc_tl.methods.attribution.engines import layout as layout_module
from qloc_tl.methods.attribution.engines.layout import matmul_ready_weights
from qloc_tl.zoo.tiny import tiny_model

TL3 = pytest.mark.skipif(tl_major() >= 4, reason="TL 4 bridges have none of TL 3's components")
TOKENS = torch.tensor([[1, 7, 12, 5, 9, 30, 4]])


def _params(model) -> dict:
    """name → (object id, storage pointer, stride, requires_grad) of every parameter."""
    return {n: (id(p), p.data_ptr(), p.stride(), p.requires_grad) for n, p in model.named_parameters()}


def _attn_weights_ready(attn) -> bool:
    """Whether the attention's own rearrangements of its weights are views (no copy needed)."""
    kv = ("_W_K", "_W_V") if "_W_K" in attn._parameters else ("W_K", "W_V")
    qkv = [attn._parameters[n] for n in ("W_Q", *kv)]
    o = einops.rearrange(attn.W_O, "h d m -> m (h d)")
    return all(einops.rearrange(w, "h m d -> (h d) m").is_contiguous() for w in qkv) and o.is_contiguous()


@TL3
@pytest.mark.parametrize("arch, source", [("gpt2", "native"), ("llama", "native"), ("llama", "hf")])
def test_same_values_matmul_layout_bitwise_equal_logits_and_restored(arch, source):
    model = tiny_model(arch, source=source)
    before, own = model(TOKENS), _params(model)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    attn = model.blocks[0].attn
    assert not _attn_weights_ready(attn)  # TL 3's standard layout: each call copies
    with matmul_ready_weights(model) as n:
        # per block: W_Q, W_K, W_V, W_O, plus W_gate, W_in, W_out of a gated MLP
        assert n == model.cfg.n_layers * (4 + (3 if arch == "llama" else 0))
        assert _attn_weights_ready(attn)
        if arch == "llama":
            mlp = model.blocks[0].mlp
            assert all(getattr(mlp, w).T.is_contiguous() for w in ("W_gate", "W_in", "W_out"))
        changed = [k for k, (i, *_rest) in _params(model).items() if i != own[k][0]]
        assert len(changed) == n
        for name, p in model.named_parameters():  # same shapes, same values
            assert p.shape == values[name].shape and torch.equal(p, values[name]), name
        inside = model(TOKENS)
    assert torch.equal(inside, before)
    assert _params(model) == own
    assert not _attn_weights_ready(attn)


@TL3
def test_restored_on_error_and_nothing_swapped_above_the_memory_cap(monkeypatch):
    model = tiny_model("llama")
    own = _params(model)
    with pytest.raises(RuntimeError, match="injected"), matmul_ready_weights(model) as n:
        assert n > 0 and _params(model) != own
        raise RuntimeError("injected")
    assert _params(model) == own
    monkeypatch.setattr(layout_module, "MAX_BYTES", 0)
    with matmul_ready_weights(model) as n:
        assert n == 0 and _params(model) == own


@TL3
def test_subclasses_and_modules_with_hooks_are_left_alone():
    from transformer_lens.components import Attention

    model = tiny_model("gpt2")

    class Sub(Attention):
        pass

    model.blocks[0].attn.__class__ = Sub
    handle = model.blocks[1].attn.register_forward_hook(lambda m, i, o: None)
    try:
        own = _params(model)
        with matmul_ready_weights(model) as n:
            assert n == 4 * (model.cfg.n_layers - 2)
            moved = {k.split(".")[1] for k, v in _params(model).items() if v != own[k]}
            assert moved == {str(i) for i in range(2, model.cfg.n_layers)}
    finally:
        handle.remove()


def test_does_nothing_on_tl4_bridges_and_tiny_modules():
    lin = torch.nn.Linear(3, 4)
    with matmul_ready_weights(lin) as n:
        assert n == 0
    if tl_major() >= 4:
        model = tiny_model("llama")
        own = _params(model)
        with matmul_ready_weights(model) as n:
            assert n == 0 and _params(model) == own


@TL3
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fast_path_runs_with_the_new_layout_and_its_scores_are_unchanged(arch, monkeypatch):
    model = tiny_model(arch, dtype=torch.float64)
    seen: list[tuple[str, bool]] = []
    impl = {"now": ""}

    def spy(act, hook):
        seen.append((impl["now"], _attn_weights_ready(model.blocks[0].attn)))

    model.blocks[0].attn.hook_q.add_hook(spy)
    own = _params(model)
    try:
        prompts, answers = ["alice was born in", "bob speaks"], ["paris", "french"]
        impl["now"] = "fast"
        fast = attribute_neurons(model, prompts, answers, steps=3)
        impl["now"] = "reference"
        attribute_neurons(model, prompts, answers, steps=3, implementation="reference")
        impl["now"] = "fast, standard layout"
        monkeypatch.setattr(ig_module, "matmul_ready_weights", lambda m: contextlib.nullcontext(0))
        plain = attribute_neurons(model, prompts, answers, steps=3)
    finally:
        model.blocks[0].attn.hook_q.remove_hooks()
    by = {k: {r for i, r in seen if i == k} for k, _ in seen}
    assert by == {"fast": {True}, "reference": {False}, "fast, standard layout": {False}}
    assert fast.path == plain.path == ("blockwise" if arch == "gpt2" else "kv-hooked")  # TL 3's two fast paths
    assert torch.equal(fast.scores_batched, plain.scores_batched)
    assert _params(model) == own
