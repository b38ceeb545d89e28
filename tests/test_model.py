"""The backend-neutral model layer: protocol checks, sites, probes, tokenisation."""

from __future__ import annotations

import pytest
import torch
from conftest import TL_MAJOR

from qloc_tl import InvalidInputError, UnsupportedModelError, capabilities, neuron_hook_name
from qloc_tl.model import answer_token_id, check_model, require_eval, tokenize_prompts
from qloc_tl.testing import tiny_model


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
