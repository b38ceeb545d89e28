"""The backend-neutral model layer: protocol checks, sites, probes, tokenisation (tiny models; the SmolLM2
probe test is in ``tests/integration/test_smollm2_model.py``)."""

from __future__ import annotations

import pytest
import torch
from conftest import TL_MAJOR

from qloc_tl import InvalidInputError, UnsupportedModelError, capabilities, neuron_hook_name
from qloc_tl.core.model import check_model, require_eval
from qloc_tl.core.tokens import answer_token_id, tokenize_prompts
from qloc_tl.zoo.tiny import tiny_model


def test_sites_resolve_on_every_backend(any_model):
    assert neuron_hook_name(any_model, 2) == "blocks.2.mlp.hook_post"
    assert neuron_hook_name(any_model, 0, site="pre") == "blocks.0.mlp.hook_pre"
    gated = bool(getattr(any_model.cfg, "gated_mlp", False))
    if gated:
        assert neuron_hook_name(any_model, 1, "pre_linear") == "blocks.1.mlp.hook_pre_linear"
    else:
        with pytest.raises(UnsupportedModelError, match="hook_pre_linear"):
            neuron_hook_name(any_model, 1, "pre_linear")
    with pytest.raises(InvalidInputError, match="out of range"):
        neuron_hook_name(any_model, 3)
    with pytest.raises(InvalidInputError, match="unknown neuron site"):
        neuron_hook_name(any_model, 0, "mid")


def test_capabilities_match_measured_backend_behaviour(any_model):
    caps = capabilities(any_model)
    assert caps.pattern_editable
    if caps.backend == "hooked":
        assert caps.scores_editable and caps.start_at_layer == "fast" and caps.kv_cache == "hooked"
    else:
        assert caps.start_at_layer in ("no_saving", "unsupported")
    assert capabilities(any_model) is caps  # cached


def test_check_model_and_eval_mode():
    with pytest.raises(UnsupportedModelError, match="lacks"):
        check_model(torch.nn.Linear(2, 2))
    m = tiny_model()
    m.train()
    with pytest.raises(InvalidInputError, match="model.eval"):
        require_eval(m)
    m.eval()
    require_eval(m)


def test_tokenize_prompts_right_pads_and_reports_last_index(gpt2_model):
    toks, last = tokenize_prompts(gpt2_model, ["alice was born in", "bob plays"])
    assert toks.shape == (2, 5)
    assert last.tolist() == [4, 2]
    assert toks[1, 3:].tolist() == [2, 2]  # pad id
    assert toks[0, 0] == 0  # BOS prepended by TL convention
    t2, l2 = tokenize_prompts(gpt2_model, "bob plays", prepend_bos=False)
    assert t2.shape == (1, 2) and l2.tolist() == [1]
    with pytest.raises(InvalidInputError, match="empty prompt"):
        tokenize_prompts(gpt2_model, ["  "])
    with pytest.raises(InvalidInputError, match="n_ctx"):
        tokenize_prompts(gpt2_model, " ".join(["the"] * 40))
    with pytest.raises(InvalidInputError, match="out of range"):
        tokenize_prompts(gpt2_model, torch.tensor([[1, 500]]))


def test_answer_tokenisation(gpt2_model):
    tok = gpt2_model.tokenizer
    paris = tok.convert_tokens_to_ids("paris")
    assert answer_token_id(gpt2_model, "alice was born in", "paris") == paris
    assert answer_token_id(gpt2_model, "alice was born in", " paris") == paris
    assert answer_token_id(gpt2_model, None, "paris") == paris
    assert answer_token_id(gpt2_model, "x", 5) == 5
    with pytest.raises(InvalidInputError, match="2 tokens"):
        answer_token_id(gpt2_model, "alice was born in", "paris london")
    assert answer_token_id(gpt2_model, "alice", "paris london", multi_token="first") == paris
    with pytest.raises(InvalidInputError, match="not in the model's vocabulary"):
        answer_token_id(gpt2_model, "alice was born in", "zanzibar")
    with pytest.raises(InvalidInputError, match="out of range"):
        answer_token_id(gpt2_model, "x", 10_000)


@pytest.mark.skipif(TL_MAJOR < 4, reason="TL 4 only")
def test_compat_mode_keeps_probabilities():
    raw = tiny_model("gpt2", source="hf")
    compat = tiny_model("gpt2", source="hf", processing="compat")
    t = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(raw(t).log_softmax(-1), compat(t).log_softmax(-1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# capability probes: comparisons relative to the logits' scale
# ------------------------------------------------------------------------------------------------


def test_logits_mismatch_is_relative_to_the_logit_scale():
    """Hand-computed: max|Δ| / (1 + max|want|) per row, the worst row. Float-reordering noise on large
    logits (what a 30-layer float32 model shows through a KV cache: 1.2e-3 on logits of magnitude ~31) is
    accepted although an absolute tolerance refuses it; a wrong logit is refused."""
    from qloc_tl.core.model import logit_tolerance, logits_mismatch

    want = torch.tensor([[31.0, -4.0, 0.0, 2.5], [1.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    noise = torch.tensor([[1.2e-3, -1.2e-3, 1.0e-3, 0.0], [0.0, 1e-5, 0.0, 0.0]], dtype=torch.float64)
    assert logits_mismatch(want + noise, want) == pytest.approx(1.2e-3 / 32.0, rel=1e-9)
    assert logits_mismatch(want + noise, want) <= logit_tolerance(torch.float32)
    assert not torch.allclose(want + noise, want, atol=1e-5, rtol=1e-4)  # an absolute test refuses it
    wrong = want.clone()
    wrong[1, 2] += 0.05  # one logit of the small-scale row off by 0.05: 0.05 / (1 + 1) = 2.5e-2
    assert logits_mismatch(wrong, want) == pytest.approx(0.025, rel=1e-9)
    assert logits_mismatch(wrong, want) > logit_tolerance(torch.float32)
    assert logits_mismatch(wrong, want) > logit_tolerance(torch.bfloat16) * 0.5
    nan = want.clone()
    nan[0, 0] = float("nan")
    assert logits_mismatch(nan, want) == float("inf")
    assert logits_mismatch(want[:, :3], want) == float("inf")
    assert logit_tolerance(torch.float64) < logit_tolerance(torch.float32) < logit_tolerance(torch.float16)


@pytest.mark.skipif(TL_MAJOR >= 4, reason="the KV-cache probe is TL 3 HookedTransformer's")
def test_kv_probe_refuses_a_cache_holding_a_stale_prefix(monkeypatch):
    """A cache that already holds two tokens of another prefix gives the last token wrong keys, values and
    position: the probe must refuse it (kv_cache None, with the reason in notes); the real cache passes."""
    import qloc_tl.core.model as model_mod

    m = tiny_model("llama", dtype=torch.float32)
    ok = capabilities(m, refresh=True)
    assert ok.kv_cache == "hooked" and ok.notes == ()
    real = model_mod.hooked_kv_cache

    def stale(model, batch):
        cache = real(model, batch)
        model(torch.tensor([[7, 8]]), past_kv_cache=cache)
        return cache

    monkeypatch.setattr(model_mod, "hooked_kv_cache", stale)
    bad = capabilities(m, refresh=True)
    assert bad.kv_cache is None and bad.start_at_layer == "fast"
    assert len(bad.notes) == 1 and bad.notes[0].startswith("kv_cache:") and "relative" in bad.notes[0]
    assert bad == ok.__class__(ok.backend, ok.pattern_editable, ok.scores_editable, ok.start_at_layer, None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_start_probe_accepts_rounding_noise_and_refuses_a_wrong_result(arch, monkeypatch):
    """``model(resid, start_at_layer=1)`` made to return the right logits plus noise at 2e-5 of the logits'
    scale (accepted) or plus an error at 1e-2 of it (refused, with the reason in notes)."""
    m = tiny_model(arch, dtype=torch.float32)
    plain = capabilities(m, refresh=True).start_at_layer
    assert plain == ("fast" if TL_MAJOR < 4 else "no_saving")
    real = m.forward

    def skewed(rel):
        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            if kwargs.get("start_at_layer") is None:
                return out
            scale = 1.0 + out.detach().abs().amax(-1, keepdim=True)
            bump = torch.zeros_like(out)
            bump[..., 3] = rel * scale[..., 0]
            return out + bump

        return forward

    monkeypatch.setattr(m, "forward", skewed(2e-5))
    assert capabilities(m, refresh=True).start_at_layer == plain
    monkeypatch.setattr(m, "forward", skewed(1e-2))
    caps = capabilities(m, refresh=True)
    assert caps.start_at_layer == "unsupported"
    assert any(n.startswith("start_at_layer:") for n in caps.notes)

