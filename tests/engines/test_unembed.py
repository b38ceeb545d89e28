"""linear_unembedding (the map TL 3's prefix-reusing paths compute the clean logits by) against the models'
own logits, and its refusals."""

from __future__ import annotations

import pytest
import torch

from qloc_tl.methods.attribution.engines.unembed import linear_unembedding
from qloc_tl.zoo.tiny import tiny_model


@pytest.mark.parametrize("arch, source", [("gpt2", "native"), ("gpt2", "hf"), ("llama", "hf")])
def test_linear_unembedding_reproduces_the_models_logits(arch, source):
    """ln_final(final residual) @ W_U + b_U is the model's own last-position logits."""
    model = tiny_model(arch, source=source, dtype=torch.float64)
    lin = linear_unembedding(model)
    assert lin is not None
    W_U, b_U = lin
    tokens = model.to_tokens("alice was born in")
    logits, cache = model.run_with_cache(tokens)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    mine = model.ln_final(final.view(1, 1, -1)).view(-1) @ W_U
    if b_U is not None:
        mine = mine + b_U
    assert torch.allclose(mine, logits[0, -1], rtol=1e-9, atol=1e-9)


def test_linear_unembedding_declines_low_precision_and_soft_caps():
    model = tiny_model("gpt2", source="native", dtype=torch.float32)
    assert linear_unembedding(model) is not None
    old = getattr(model.cfg, "output_logits_soft_cap", None)
    model.cfg.output_logits_soft_cap = 30.0
    try:
        assert linear_unembedding(model) is None
    finally:
        model.cfg.output_logits_soft_cap = old
    assert linear_unembedding(tiny_model("gpt2", source="native", dtype=torch.bfloat16)) is None
