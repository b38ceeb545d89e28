"""The fast knowledge-synapse engine (``qloc_tl.methods.attribution.engines.synapses``) driven through
``find_synapses(implementation=...)``.

Oracle: the full-sequence engines (``implementation="batched"`` and the plain ``"reference"`` loop), which
run every prompt position per sample; fallbacks are checked to equal ``"batched"`` exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TL_MAJOR, assert_params_identical, param_snapshot, registered_hooks

import qloc_tl.methods.attribution.engines.synapses as fast_syn
import qloc_tl.methods.synapses as synapses_mod
from qloc_tl.core.errors import InvalidInputError
from qloc_tl.methods.synapses import find_synapses
from qloc_tl.zoo.tiny import tiny_model

PROMPT = "alice was born in the city of"
ANSWER = " paris"

@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", source="hf")


# ------------------------------------------------------------------------------------- fast attattr engine
#
# Oracle: the full-sequence engines ("batched", and the plain "reference" loop), which run every prompt
# position per sample. The fast engine recomputes only the answer token on top of the clean prefix (TL 3: KV
# cache; TL 4 bridges, HF-backed and boot_native: packed rows with a 4-D mask in the bridge's convention).

# (arch, source) with a fast path on the installed TL major, and the path expected
FAST = (
    [("gpt2", "native", "kv-hooked"), ("llama", "native", "kv-hooked"), ("gpt2", "hf", "kv-hooked"),
     ("llama", "hf", "kv-hooked")]
    if TL_MAJOR < 4
    else [("gpt2", "hf", "packed"), ("llama", "hf", "packed"), ("gpt2", "native", "packed"),
          ("llama", "native", "packed")]
)  # fmt: skip
FAST_PROMPTS = ["alice", "alice was born", PROMPT, "alice was born in the city of paris and she lived in the"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b| over the scored entries."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=FAST, ids=["-".join(p[:2]) for p in FAST])
def fast_model64(request):
    arch, source, path = request.param
    return tiny_model(arch, source=source, dtype=torch.float64), path


@pytest.mark.parametrize("prompt", FAST_PROMPTS, ids=lambda p: f"{len(p.split())}w")
def test_fast_attattr_equals_batched_float64(fast_model64, prompt):
    model, path = fast_model64
    fast = find_synapses(model, prompt, ANSWER, steps=4, batch_size=1)  # several passes, layers split
    ref = find_synapses(model, prompt, ANSWER, steps=4, implementation="batched")
    assert (fast.implementation, fast.fast_path) == ("fast", path)
    assert (ref.implementation, ref.fast_path) == ("batched", None)
    assert fast.scores.shape == ref.scores.shape
    assert _rel(fast.scores, ref.scores) <= 1e-5
    assert float(ref.scores.abs().max()) > 0
    # HF LLaMA computes rotary angles and RMSNorm statistics in float32 even in a float64 model, so a
    # different sequence layout rounds differently there: P agrees to ~1e-8 relative, not to 1e-15
    torch.testing.assert_close(fast.prob_zero, ref.prob_zero, rtol=1e-6, atol=1e-12)
    assert fast.prob == ref.prob
    assert fast.synapses == ref.synapses


def test_fast_attattr_equals_plain_reference(fast_model64):
    model, _ = fast_model64
    fast = find_synapses(model, PROMPT, ANSWER, steps=3, rule="midpoint")
    ref = find_synapses(model, PROMPT, ANSWER, steps=3, rule="midpoint", implementation="reference")
    assert _rel(fast.scores, ref.scores) <= 1e-5
    torch.testing.assert_close(fast.prob_zero, ref.prob_zero, rtol=1e-6, atol=1e-12)


def test_fast_attattr_one_token_prompt_and_layer_subset(fast_model64):
    model, path = fast_model64
    tok = torch.tensor([5])  # q = 0: no prefix, the answer row is the token's own column
    fast = find_synapses(model, tok, 7, steps=3)
    ref = find_synapses(model, tok, 7, steps=3, implementation="batched")
    assert fast.fast_path == path and fast.scores.shape[-1] == 1
    assert _rel(fast.scores, ref.scores) <= 1e-5
    torch.testing.assert_close(fast.prob_zero, ref.prob_zero, rtol=1e-6, atol=1e-12)
    part = find_synapses(model, PROMPT, ANSWER, steps=3, layers=[2, 1])
    full = find_synapses(model, PROMPT, ANSWER, steps=3, implementation="batched")
    assert torch.isnan(part.scores[0]).all() and torch.isnan(part.prob_zero[0])
    assert _rel(part.scores[1:], full.scores[1:]) <= 1e-5


@pytest.mark.parametrize("arch,source,path", FAST, ids=["-".join(p[:2]) for p in FAST])
def test_fast_attattr_equals_batched_float32(arch, source, path):
    model = tiny_model(arch, source=source)
    for prompt in (FAST_PROMPTS[1], FAST_PROMPTS[3]):
        fast = find_synapses(model, prompt, ANSWER, steps=5, rule="midpoint")
        ref = find_synapses(model, prompt, ANSWER, steps=5, rule="midpoint", implementation="batched")
        assert fast.fast_path == path
        assert _rel(fast.scores, ref.scores) <= 1e-4
        torch.testing.assert_close(fast.prob_zero, ref.prob_zero, rtol=1e-4, atol=1e-7)


def _fallback_records(caplog) -> list:
    return [r for r in caplog.records if r.name == "qloc_tl.methods.synapses" and r.levelname == "WARNING"]


def _assert_fallback_equals_batched(model, caplog, reason: str) -> None:
    import logging

    flags = [p.requires_grad for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="qloc_tl.methods.synapses"):
        first = find_synapses(model, PROMPT, ANSWER, steps=3)
        second = find_synapses(model, FAST_PROMPTS[1], ANSWER, steps=3)
    ref = find_synapses(model, PROMPT, ANSWER, steps=3, implementation="batched")
    assert (first.implementation, first.fast_path) == ("batched", None)
    assert second.implementation == "batched"
    torch.testing.assert_close(first.scores, ref.scores, rtol=0, atol=0)
    torch.testing.assert_close(first.prob_zero, ref.prob_zero, rtol=0, atol=0)
    recs = _fallback_records(caplog)
    assert len(recs) == 1, [r.getMessage() for r in recs]  # once per model
    assert reason in recs[0].getMessage()
    assert registered_hooks(model) == 0
    assert [p.requires_grad for p in model.parameters()] == flags


def test_fast_attattr_falls_back_without_kv_path(caplog, monkeypatch):
    """A HookedTransformer-style backend whose KV-cache probe failed has no fast path: the batched engine
    runs, with one warning that names the probe's reason."""
    model = tiny_model("llama", source="hf")
    caps = fast_syn.capabilities(model)
    fake = SimpleNamespace(
        **{**caps.__dict__, "backend": "hooked", "kv_cache": None, "notes": ("kv_cache: probe refused",)}
    )
    monkeypatch.setattr(fast_syn, "capabilities", lambda model: fake)
    _assert_fallback_equals_batched(model, caplog, "kv_cache: probe refused")


def test_fast_attattr_validation_failure_falls_back_and_is_remembered(caplog, monkeypatch):
    """A fast layout that computes something else (here: the copies / the KV-cached token one position
    off) is caught by the first pass's validation; the call and later calls run the batched engine."""
    model = tiny_model("gpt2", source="hf")
    if TL_MAJOR < 4:
        real = fast_syn.KVRows.__init__

        def shifted(self, *args, **kwargs):  # the cached prefix's keys and values without their first position
            real(self, *args, **kwargs)
            for e in self.prefix.entries:
                e.past_keys, e.past_values = e.past_keys[:, 1:], e.past_values[:, 1:]

        monkeypatch.setattr(fast_syn.KVRows, "__init__", shifted)
    else:
        real = fast_syn.PackedRows.layout

        def shifted(self, B, r):
            seq, mask, pos = real(self, B, r)
            return seq, mask, pos + 1

        monkeypatch.setattr(fast_syn.PackedRows, "layout", shifted)
    runs = []
    orig_run = synapses_mod.attattr_fast
    monkeypatch.setattr(synapses_mod, "attattr_fast", lambda *a, **k: runs.append(1) or orig_run(*a, **k))
    _assert_fallback_equals_batched(model, caplog, "differ from the full forward")
    assert len(runs) == 1  # the second call went straight to the batched engine


def test_fast_attattr_leaves_model_unchanged_when_the_fast_forward_raises(monkeypatch, caplog):
    """An exception of the fast layout's forward on the validation pass → fallback; hooks removed and
    parameter flags restored."""
    model = tiny_model("llama", source="hf")
    next(iter(model.parameters())).requires_grad_(False)  # a mixed set of flags, restored as it was
    flags = [p.requires_grad for p in model.parameters()]
    snap = param_snapshot(model)
    cls = fast_syn.KVRows if TL_MAJOR < 4 else fast_syn.PackedRows
    real = cls.run

    def boom(self, layer_of, factors, check):
        def hook(act, hook):
            raise RuntimeError("backend refuses the layout")

        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", hook)]):
            return real(self, layer_of, factors, check)

    monkeypatch.setattr(cls, "run", boom)
    r = find_synapses(model, PROMPT, ANSWER, steps=2)
    assert r.implementation == "batched"
    assert "backend refuses the layout" in _fallback_records(caplog)[0].getMessage()
    assert registered_hooks(model) == 0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert_params_identical(model, snap)


def test_fast_attattr_rejects_unknown_implementation(gpt2):
    with pytest.raises(InvalidInputError, match="implementation"):
        find_synapses(gpt2, PROMPT, ANSWER, implementation="packed")


# ------------------------------------------------------------------------------------- out of memory

OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes. Error code 12"


@pytest.mark.parametrize("implementation", ["fast", "batched"])
def test_out_of_memory_halves_batch_size_and_changes_no_score(fast_model64, implementation, monkeypatch, caplog):
    """Passes above 3 rows (batched), 3 · n_tokens samples (fast, KV path) or 6 samples (fast, packed rows: 2 per
    unit of batch_size) raise the CPU allocator's error: the query
    runs again with half the batch_size until it fits, on the same path (an out-of-memory error is no reason to
    fall back), with one WARNING per halving, and the scores equal an undisturbed run's."""
    model, path = fast_model64
    whole = find_synapses(model, PROMPT, ANSWER, steps=4, batch_size=16, implementation=implementation)
    P = whole.tokens.shape[0]
    sizes: list[int] = []
    real_fast, real_batched = synapses_mod.attattr_fast, synapses_mod._attattr_batched

    def fast(model, path, tokens, answer, layers, alphas, weights, per_pass, *rest):
        sizes.append(per_pass)
        if per_pass > (3 * P if path == "kv-hooked" else 6):
            with fast_syn._forward_guard(path, True):  # as inside the engine's validation pass
                raise RuntimeError(OOM)
        return real_fast(model, path, tokens, answer, layers, alphas, weights, per_pass, *rest)

    def batched(model, tokens, answer, layers, A, alphas, weights, batch_size, *rest):
        sizes.append(batch_size)
        if batch_size > 3:
            raise RuntimeError(OOM)
        return real_batched(model, tokens, answer, layers, A, alphas, weights, batch_size, *rest)

    monkeypatch.setattr(synapses_mod, "attattr_fast", fast)
    monkeypatch.setattr(synapses_mod, "_attattr_batched", batched)
    with caplog.at_level("WARNING"):
        got = find_synapses(model, PROMPT, ANSWER, steps=4, batch_size=16, implementation=implementation)
    expected = [16 * P, 8 * P, 4 * P, 2 * P] if implementation == "fast" and path == "kv-hooked" else (
        [32, 16, 8, 4] if implementation == "fast" else [16, 8, 4, 2]
    )
    assert sizes == expected
    assert got.implementation == implementation and got.fast_path == whole.fast_path
    assert len(_fallback_records(caplog)) == 0
    assert caplog.text.count("retrying with") == 3
    scored = ~torch.isnan(whole.scores)
    assert _rel(got.scores[scored], whole.scores[scored]) <= 1e-6  # other pass shapes, other rounding (HF LLaMA)
    assert registered_hooks(model) == 0


def test_out_of_memory_at_one_sample_raises_resource_error(gpt2, monkeypatch):
    """Every pass out of memory: halved down to batch_size 1, then ResourceError (a QlocError and a
    MemoryError) naming what to lower; no hook left on the model."""
    from qloc_tl.core.errors import ResourceError

    def boom(*a, **k):
        raise RuntimeError(OOM)

    monkeypatch.setattr(synapses_mod, "_attattr_batched", boom)
    with pytest.raises(ResourceError, match="shorten the prompt"):
        find_synapses(gpt2, PROMPT, ANSWER, steps=4, batch_size=4, implementation="batched")
    assert registered_hooks(gpt2) == 0
