"""float16 and bfloat16 models work: the methods run on them and agree with float32 arithmetic on the very same
(rounded) weights, results come back in float32, and weight edits restore the half-precision rows bit-exactly.

The oracle is the same model cast to float32 after rounding, so only the arithmetic's precision differs; the
bounds are a few units of the half format's resolution relative to the largest value. Overflow to inf/NaN is
refused with a NumericalError (tests/integration/test_bad_inputs.py, ``fp16-overflow``).
"""

from __future__ import annotations

import functools

import pytest
import torch

import qloc_tl as q
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.known import next_token_probs
from qloc_tl.zoo.tiny import tiny_model

HALF = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 0.01, torch.bfloat16: 0.05}  # relative to the largest |value| (bf16: 8 mantissa bits)
PROMPTS = ["alice was born in", "bob speaks"]


@functools.cache
def pair(arch: str, dtype: torch.dtype):
    """``(half model, float32 model with the half model's weights)``."""
    half = tiny_model(arch, dtype=dtype)
    full = tiny_model(arch, dtype=torch.float32)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    return half, full


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0)
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_attribution_in_half_precision_matches_float32(arch, dtype):
    half, full = pair(arch, dtype)
    a = attribute_neurons(half, PROMPTS, ["paris", "french"], steps=4)
    b = attribute_neurons(full, PROMPTS, ["paris", "french"], steps=4)
    assert a.scores.dtype == torch.float32 and bool(torch.isfinite(a.scores).all())
    assert rel(a.scores, b.scores) < TOL[dtype]
    assert rel(a.clean_prob, b.clean_prob) < TOL[dtype]


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_synapses_probs_and_trace_in_half_precision(dtype):
    from qloc_tl.methods.synapses import find_synapses
    from qloc_tl.methods.tracing import causal_trace

    half, full = pair("gpt2", dtype)
    p_h, p_f = next_token_probs(half, PROMPTS), next_token_probs(full, PROMPTS)
    assert p_h.dtype == torch.float32 and float((p_h - p_f).abs().max()) < TOL[dtype] * float(p_f.max())
    s_h = find_synapses(half, PROMPTS[0], "paris", steps=4)
    s_f = find_synapses(full, PROMPTS[0], "paris", steps=4)
    assert rel(s_h.scores, s_f.scores) < TOL[dtype]
    t_h = causal_trace(half, PROMPTS[0], "paris", subject="alice", kinds=("resid",), samples=2)
    t_f = causal_trace(full, PROMPTS[0], "paris", subject="alice", kinds=("resid",), samples=2)
    assert abs(t_h.p_clean - t_f.p_clean) < TOL[dtype] * t_f.p_clean


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_weight_edits_restore_half_precision_rows_bit_exactly(dtype):
    half, _ = pair("llama", dtype)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    with q.erase(half, [q.Neuron(1, 3)]):
        pass
    with q.update(half, [q.Neuron(2, 5)], 10, 11):
        pass
    assert half.W_out.dtype == dtype
    for k, v in half.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
