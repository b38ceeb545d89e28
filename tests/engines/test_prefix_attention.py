"""The shared-prefix attention of TL 3's kv-hooked path (``engines.prefix_attention``) against TL's own
attention and the reference implementation: rotary GQA models (tiny LLaMA, native and HF-loaded) in float64
with prompts of different lengths sharing a pass; refused while a skipped hook point has a hook; the swap
undone after the call and on error; a wrong result caught by the validation and retried with TL's attention.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ANSWERS, PROMPTS, rel_diff

from qloc_tl.core.model import tl_major
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.attribution.engines import ENGINE_CACHE
from qloc_tl.methods.attribution.engines import kv_hooked as kv_mod
from qloc_tl.methods.attribution.engines import prefix_attention as pa_mod
from qloc_tl.zoo.tiny import tiny_model

pytestmark = pytest.mark.skipif(tl_major() >= 4, reason="the kv-hooked path is TL 3 HookedTransformer's")


def _count_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = pa_mod.PrefixAttention.__call__

    def spy(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(pa_mod.PrefixAttention, "__call__", spy)
    return calls


def _no_instance_forward(model) -> bool:
    return all("forward" not in vars(b.attn) for b in model.blocks)


@pytest.mark.parametrize("source", ["native", "hf"])
@pytest.mark.parametrize("method", ["ig", "sig"])
def test_prefix_attention_equals_tl_attention_and_reference(source, method, monkeypatch):
    model = tiny_model("llama", source=source, dtype=torch.float64)
    assert model.cfg.positional_embedding_type == "rotary" and model.cfg.n_key_value_heads < model.cfg.n_heads
    assert pa_mod.prefix_attention_applies(model)
    kw = dict(method=method, steps=6, fast_path="kv")
    ref = attribute_neurons(model, PROMPTS, ANSWERS, implementation="reference", method=method, steps=6)
    calls = _count_calls(monkeypatch)
    fast = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert fast.path == "kv-hooked" and calls[0] > 0 and _no_instance_forward(model)
    monkeypatch.setattr(pa_mod, "prefix_attention_applies", lambda m: False)
    monkeypatch.setattr(kv_mod, "prefix_attention_applies", lambda m: False)
    before = calls[0]
    tl_own = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert calls[0] == before  # TL's own attention this time
    assert rel_diff(fast.scores_batched, ref.scores_batched) <= 1e-10
    assert rel_diff(fast.scores_batched, tl_own.scores_batched) <= 1e-10
    assert rel_diff(fast.completeness_delta, ref.completeness_delta) <= 1e-8


def test_prefix_attention_refused_while_a_skipped_hook_point_is_hooked(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    seen = []
    handle = model.blocks[1].attn.hook_pattern.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert not pa_mod.prefix_attention_applies(model)
        calls = _count_calls(monkeypatch)
        res = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3, fast_path="kv")
        assert calls[0] == 0 and seen  # TL's attention ran, and with it the user's hook
    finally:
        handle.remove()
    ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3, implementation="reference")
    assert rel_diff(res.scores_batched, ref.scores_batched) <= 1e-10


def test_prefix_attention_swap_undone_on_error(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)

    def boom(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pa_mod.PrefixAttention, "__call__", boom)
    with pytest.raises(RuntimeError, match="boom"):
        attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3, fast_path="kv")
    assert _no_instance_forward(model)


def test_wrong_prefix_attention_is_caught_and_retried_with_tl_attention(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    real = pa_mod.PrefixAttention.__call__

    def off(self, *a, **k):  # a subtly wrong attention output
        return real(self, *a, **k) * 1.01

    monkeypatch.setattr(pa_mod.PrefixAttention, "__call__", off)
    res = attribute_neurons(model, PROMPTS, ANSWERS, steps=4)
    assert res.path == "kv-hooked" and ENGINE_CACHE.failed(model, "prefix-attention")
    assert _no_instance_forward(model)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=4, implementation="reference")
    assert rel_diff(res.scores_batched, ref.scores_batched) <= 1e-10
