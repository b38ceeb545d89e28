"""A TL 3 ``HookedTransformer`` or a TL 4 ``TransformerBridge.boot_native`` model built from a config without a
tokenizer (tests, toy models, notebooks) gets the prefix-reusing fast paths, not the batched full-sequence one.

TL 3's KV-cache forward derives its ``attention_mask`` from the tokenizer and, without one, raises "Cannot
compute attention mask without a tokenizer"; the capability probe and the TL 3 engines pass an explicit
all-ones mask there (what TL's own ``get_attention_mask`` returns without a tokenizer). Oracle: the plain
per-layer full-sequence loop (``implementation="reference"``) and, for synapses, the batched engine.

TL 4's native bridge reads a 4-D boolean ``attention_mask`` as True = masked (Hugging Face: True = keep) and
refuses rows longer than ``n_ctx``; the packed layouts pass the mask in the probed convention
(:func:`~qloc_tl.core.model.bridge_mask_convention`) and the blockwise rows stay within ``n_ctx``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TL_MAJOR

from qloc_tl.core.model import bridge_mask_convention, capabilities, hooked_kv_mask
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.synapses import find_synapses

tl3 = pytest.mark.skipif(TL_MAJOR >= 4, reason="TL 4 removed HookedTransformer")
tl4 = pytest.mark.skipif(TL_MAJOR < 4, reason="boot_native only exists on TL 4")

LOGGER = "qloc_tl.methods.attribution"


def _model(n_ctx: int, dtype: torch.dtype = torch.float32):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=n_ctx, d_vocab=50, act_fn="gelu",
        normalization_type="LN", seed=0, dtype=dtype, device="cpu",
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    assert model.tokenizer is None
    return model


def _prompts(n: int, n_tok: int) -> tuple[list[torch.Tensor], list[int]]:
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 50, (n, n_tok), generator=g)
    return list(toks), [int(a) for a in torch.randint(0, 50, (n,), generator=g)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@tl3
def test_tokenizerless_model_has_a_kv_cache():
    caps = capabilities(_model(16))
    assert caps.kv_cache == "hooked" and caps.start_at_layer == "fast", caps.notes
    assert not any("tokenizer" in n for n in caps.notes)


# n_ctx 16: too little room after 8-token prompts for the rows, "auto" takes kv-hooked; n_ctx 64: blockwise
@tl3
@pytest.mark.parametrize(
    "n_ctx, fast_path, path",
    [(16, "auto", "kv-hooked"), (64, "auto", "blockwise"), (64, "kv", "kv-hooked")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_tokenizerless_ig_takes_a_prefix_path_and_equals_the_reference(n_ctx, fast_path, path, dtype, caplog):
    model = _model(n_ctx, dtype)
    prompts, answers = _prompts(3, 8)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fast = attribute_neurons(model, prompts, answers, steps=6, fast_path=fast_path)
    assert fast.path == path
    # no fallback, no "slower path" warning, nothing about a tokenizer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("does not reproduce" in m or "tokenizer" in m for m in caplog.messages)
    ref = attribute_neurons(model, prompts, answers, steps=6, implementation="reference")
    assert _rel(fast.scores_batched, ref.scores_batched) <= (1e-4 if dtype == torch.float32 else 1e-10)
    assert torch.allclose(fast.clean_prob.double(), ref.clean_prob.double(), rtol=1e-4, atol=1e-7)


@tl3
def test_tokenizerless_amig_takes_a_prefix_path_and_equals_the_reference():
    model = _model(64, torch.float64)
    prompts, answers = _prompts(2, 6)
    kw = dict(method="amig", steps=4, replacement_id=0)
    fast = attribute_neurons(model, prompts, answers, **kw)
    ref = attribute_neurons(model, prompts, answers, implementation="reference", **kw)
    assert fast.path == "blockwise" and _rel(fast.scores_batched, ref.scores_batched) <= 1e-10


@tl3
def test_tokenizerless_synapses_take_the_kv_path_and_equal_batched():
    model = _model(32, torch.float64)
    (prompt,), (answer,) = _prompts(1, 7)
    fast = find_synapses(model, prompt, answer, steps=4)
    ref = find_synapses(model, prompt, answer, steps=4, implementation="batched")
    assert fast.implementation == "fast" and fast.fast_path == "kv-hooked"
    assert _rel(fast.scores, ref.scores) <= 1e-10


@tl3
def test_kv_mask_is_left_to_tl_where_the_model_has_a_tokenizer():
    """With a tokenizer TL computes the mask from its pad token, as before; without one: all ones."""
    from qloc_tl.zoo.tiny import tiny_model

    toks = torch.tensor([[3, 4, 5]])
    assert hooked_kv_mask(tiny_model("gpt2"), toks) is None
    mask = hooked_kv_mask(_model(16), toks)
    assert mask is not None and torch.equal(mask, torch.ones_like(toks))


# --------------------------------------------------------------------------------------------------
# TL 4: TransformerBridge.boot_native


def _native(n_ctx: int, dtype: torch.dtype = torch.float32):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=n_ctx, d_vocab=50, act_fn="gelu",
        normalization_type="LN", seed=0,
    )  # fmt: skip
    model = TransformerBridge.boot_native(cfg, dtype=dtype).eval()
    assert model.tokenizer is None
    return model


@tl4
def test_native_bridge_reads_4d_masks_as_masked_and_hf_bridges_as_keep():
    from qloc_tl.zoo.tiny import tiny_model

    assert bridge_mask_convention(_native(16)) == "mask"
    assert bridge_mask_convention(tiny_model("gpt2", source="hf")) == "keep"  # HF-backed: the layout as before


# n_ctx 12: rows capped to n_ctx (2 samples a chunk after 8-token prompts); 64: uncapped chunks
@tl4
@pytest.mark.parametrize(
    "n_ctx, fast_path, path",
    [(12, "auto", "blockwise"), (64, "auto", "blockwise"), (64, "packed", "packed")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_native_bridge_ig_takes_a_packed_path_and_equals_the_reference(n_ctx, fast_path, path, dtype, caplog):
    model = _native(n_ctx, dtype)
    prompts, answers = _prompts(3, 8)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fast = attribute_neurons(model, prompts, answers, steps=6, fast_path=fast_path)
    assert fast.path == path
    # no fallback, no "slower path" warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("does not reproduce the clean logits" in m for m in caplog.messages)
    ref = attribute_neurons(model, prompts, answers, steps=6, implementation="reference")
    assert _rel(fast.scores_batched, ref.scores_batched) <= (1e-4 if dtype == torch.float32 else 1e-10)
    assert torch.allclose(fast.clean_prob.double(), ref.clean_prob.double(), rtol=1e-4, atol=1e-7)


@tl4
def test_native_bridge_amig_takes_blockwise_and_equals_the_reference():
    model = _native(64, torch.float64)
    prompts, answers = _prompts(2, 6)
    kw = dict(method="amig", steps=4, replacement_id=0)
    fast = attribute_neurons(model, prompts, answers, **kw)
    ref = attribute_neurons(model, prompts, answers, implementation="reference", **kw)
    assert fast.path == "blockwise" and _rel(fast.scores_batched, ref.scores_batched) <= 1e-10
