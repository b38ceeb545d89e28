"""Passes sized by the free memory, and the back-off after an out-of-memory error: with an injected
out-of-memory error above a pass size the chunks halve and the scores equal an undisturbed run's; one sample per
pass that does not fit raises ResourceError and leaves no hook, parameter flag or swapped module behind; the
budgets against a hand computation for a faked free memory.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import ANSWERS, MODELS, PROMPTS, cached_model, registered_hooks, rel_diff

from qloc_tl.core import memory as memory_mod
from qloc_tl.core.errors import QlocError, ResourceError
from qloc_tl.core.model import tl_major
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.attribution import ig as ig_mod
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines import base as base_mod
from qloc_tl.methods.attribution.engines import blockwise as blockwise_mod
from qloc_tl.methods.attribution.engines import clean as clean_mod
from qloc_tl.methods.attribution.engines import dispatch as dispatch_mod
from qloc_tl.methods.attribution.engines import grouped as grouped_mod
from qloc_tl.methods.attribution.engines import kv_hooked as kv_mod

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes. Error code 12"


def _fast_kw() -> dict:
    return {"fast_path": "kv"}  # the prefix-reusing path of either major (no silent fallback)


def _limited_engines(monkeypatch, most: int, seen: list[int]) -> None:
    """Every engine the dispatcher makes raises an out-of-memory error on a pass of more than ``most`` rows
    (prompts × samples, validation samples included); ``seen`` gets the rows of every pass tried."""
    real = dispatch_mod.make_engine

    def make(*a, **k):
        engine = real(*a, **k)
        evaluate = engine.evaluate

        def limited(layer_of, x, check):
            rows = x.shape[0] * x.shape[1]
            seen.append(rows)
            if rows > most:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return evaluate(layer_of, x, check)

        engine.evaluate = limited
        return engine

    monkeypatch.setattr(dispatch_mod, "make_engine", make)


def _spy_chunks(monkeypatch) -> list[list[tuple[int, int, bool]]]:
    """Per call of the attribution's chunk loop, the chunks it tried: ``(start, stop, fitted)``."""
    calls: list[list[tuple[int, int, bool]]] = []
    real = ig_mod.run_chunked

    def spy(total, size, step, **kw):
        tried: list[tuple[int, int, bool]] = []
        calls.append(tried)

        def recording(s0, s1):
            try:
                step(s0, s1)
            except BaseException:
                tried.append((s0, s1, False))
                raise
            tried.append((s0, s1, True))

        return real(total, size, recording, **kw)

    monkeypatch.setattr(ig_mod, "run_chunked", spy)
    return calls


def _assert_halved(calls, log: str) -> int:
    """After each chunk that ran out of memory the same samples run again in chunks at most half as long, and a
    WARNING says the new size; returns the number of such back-offs."""
    n = 0
    for tried in calls:
        for (a0, a1, ok), (b0, b1, _) in zip(tried, tried[1:]):
            if not ok:
                n += 1
                assert b0 == a0 and 1 <= b1 - b0 <= (a1 - a0) // 2, tried
                assert f"out of memory with {a1 - a0} samples per pass; retrying with {(a1 - a0) // 2}" in log
    return n


@pytest.mark.parametrize("arch, source", MODELS)
@pytest.mark.parametrize("method", ["ig", "sig"])
def test_out_of_memory_halves_the_chunk_and_changes_no_score(arch, source, method, monkeypatch, caplog):
    model = cached_model(arch, source)
    kw = dict(method=method, steps=20 if method == "ig" else 4, **_fast_kw())
    whole = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    normal: list[int] = []
    _limited_engines(monkeypatch, 10**9, normal)
    attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    most = 5
    assert max(normal) > 4 * most  # the limit below cuts the passes at least twice
    seen: list[int] = []
    _limited_engines(monkeypatch, most, seen)
    calls = _spy_chunks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="qloc_tl.core.memory"):
        backed = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert backed.path == whole.path
    assert rel_diff(backed.scores, whole.scores) <= 1e-6
    for f in ("baseline_prob", "completeness_delta", "clean_prob"):
        assert torch.allclose(getattr(backed, f), getattr(whole, f), rtol=1e-6, atol=1e-9), f
    assert seen[0] == normal[0] and seen[-1] <= most
    assert _assert_halved(calls, caplog.text) >= 2
    # one WARNING per back-off (samples, or prompts per pass after one sample did not fit), none per pass
    failed = sum(r > most for r in seen)
    assert len(re.findall("retrying with", caplog.text)) <= failed < len(seen)


def test_out_of_memory_inside_the_validation_pass_is_not_a_path_mismatch(monkeypatch, caplog):
    """An allocation failure inside the blockwise engine's validated forward backs off like any other; it is
    not taken for a backend that cannot run the path (which would fall back, or here, with the path asked
    for by name, raise CapabilityError)."""
    model = cached_model("gpt2", "native")
    whole = attribute_neurons(model, PROMPTS, ANSWERS, steps=8, fast_path="blockwise")
    real = blockwise_mod.BlockwiseEngine._final

    def limited(self, order, counts, x, check):
        if x.shape[0] * x.shape[1] > 6:
            raise RuntimeError(CPU_OOM)
        return real(self, order, counts, x, check)

    monkeypatch.setattr(blockwise_mod.BlockwiseEngine, "_final", limited)
    calls = _spy_chunks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="qloc_tl.core.memory"):
        backed = attribute_neurons(model, PROMPTS, ANSWERS, steps=8, fast_path="blockwise")
    assert backed.path == "blockwise" and rel_diff(backed.scores, whole.scores) <= 1e-6
    assert _assert_halved(calls, caplog.text) >= 1


def test_out_of_memory_at_one_sample_is_a_resource_error_and_leaves_nothing_behind(monkeypatch):
    arch, source = MODELS[1]
    model = cached_model(arch, source)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    own = [id(m) for m in model.modules()] + [id(vars(m).get("act_fn")) for m in model.modules()]
    seen: list[int] = []
    _limited_engines(monkeypatch, 0, seen)
    with pytest.raises(ResourceError) as info:
        attribute_neurons(model, PROMPTS, ANSWERS, steps=6, **_fast_kw())
    err = info.value
    assert isinstance(err, QlocError) and isinstance(err, MemoryError)
    assert "samples per pass down to 1" in str(err) and "shorten the prompt" in str(err)
    assert "layers=" in str(err) and "bfloat16" in str(err)
    assert isinstance(err.__cause__, torch.OutOfMemoryError)
    assert min(seen) in (1, 2, 3)  # down to one sample of one prompt (plus its validation samples)
    assert registered_hooks(model) == 0
    assert [p.requires_grad for p in params] == flags
    assert [id(m) for m in model.modules()] + [id(vars(m).get("act_fn")) for m in model.modules()] == own
    monkeypatch.undo()
    again = attribute_neurons(model, PROMPTS[:1], ANSWERS[:1], steps=3, **_fast_kw())  # the model still works
    assert torch.isfinite(again.scores).all()


@pytest.mark.parametrize("message", [CPU_OOM, "not enough memory: you tried to allocate 8 bytes"])
def test_clean_pass_backs_off_on_cpu_allocator_errors(message, monkeypatch):
    model = cached_model("gpt2", "native")
    whole = attribute_neurons(model, PROMPTS, ANSWERS, steps=3)
    batches: list[int] = []
    real = type(model).run_with_cache

    def limited(self, toks, *a, **k):
        batches.append(toks.shape[0])
        if toks.shape[0] > 1:
            raise RuntimeError(message)
        return real(self, toks, *a, **k)

    monkeypatch.setattr(type(model), "run_with_cache", limited)
    backed = attribute_neurons(model, PROMPTS, ANSWERS, steps=3)
    assert batches[:2] == [3, 1] and batches.count(1) >= 3  # 3 prompts → halved to 1 (3 // 2), then one by one
    assert rel_diff(backed.scores, whole.scores) <= 1e-12
    assert torch.allclose(backed.activations, whole.activations, rtol=0, atol=1e-14)

    def never(self, toks, *a, **k):
        raise RuntimeError(message)

    monkeypatch.setattr(type(model), "run_with_cache", never)
    with pytest.raises(ResourceError, match="clean forward pass of one prompt"):
        attribute_neurons(model, PROMPTS, ANSWERS, steps=3)
    assert registered_hooks(model) == 0


def test_other_errors_are_not_retried(monkeypatch):
    model = cached_model("gpt2", "native")
    calls = []
    real = dispatch_mod.make_engine

    def make(*a, **k):
        engine = real(*a, **k)

        def broken(layer_of, x, check):
            calls.append(1)
            raise RuntimeError("shape mismatch (injected)")

        engine.evaluate = broken
        return engine

    monkeypatch.setattr(dispatch_mod, "make_engine", make)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        attribute_neurons(model, PROMPTS[:1], ANSWERS[:1], steps=3, fast_path="full")
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------
# budgets against a faked free memory
# ------------------------------------------------------------------------------------------------


def _free(monkeypatch, nbytes):
    monkeypatch.setattr(memory_mod, "free_memory", lambda device: nbytes)


def test_memory_cap_by_hand(monkeypatch):
    _free(monkeypatch, 1_000_000)
    assert memory_mod.memory_cap(512, 1000, "cpu", 0.5) == 500  # 0.5 × 1e6 // 1000
    assert memory_mod.memory_cap(100, 1000, "cpu", 0.5) == 100  # the constant is smaller
    assert memory_mod.memory_cap(512, 10**9, "cpu", 1.0) == 1  # never below one
    assert memory_mod.memory_cap(512, 3, "cpu", 0.25) == 512
    _free(monkeypatch, None)
    assert memory_mod.memory_cap(512, 10**12, "cpu", 0.5) == 512  # unknown: the constant


def test_sample_chunk_by_hand(monkeypatch):
    """An engine's samples per pass: the constant chunk, or as many samples as fit in the fraction of the free
    memory at the documented per-sample estimate (float64 model: 8 bytes per element)."""
    model = cached_model("gpt2", "hf")
    cfg = model.cfg
    prep = _prep(model)
    config = AttributionConfig(memory_fraction=0.25)
    engine = dispatch_mod.make_engine(model, "full", prep, config)
    n_tok, samples = 6, 3 * 21
    # full rows: n_tok positions attending to n_tok keys, the logits of every position
    per_block = 12 * cfg.d_model + 4 * cfg.d_mlp + 2 * cfg.n_heads * n_tok
    per_sample = n_tok * (cfg.n_layers * per_block + 3 * cfg.d_vocab) * 8
    const = 2048 // n_tok  # the full path's constant
    assert min(samples, const) == samples
    for free, want in [(10**12, samples), (per_sample * 4 * 10, 10), (per_sample * 4 * 10 + per_sample * 3, 10), (1, 1)]:
        _free(monkeypatch, free)
        assert engine.chunk_size(n_tok, samples) == want, free
    # two prompts per pass share the room
    _free(monkeypatch, per_sample * 4 * 10)
    assert engine.chunk_size(n_tok, samples, prompts=2) == 5
    # one answer-position copy per sample, attending to the prompt and the pass's copies (blockwise engines)
    grouped = kv_mod.HookedKVEngine if tl_major() < 4 else blockwise_mod.BlockwiseEngine
    engine = grouped(model, prep, config)
    room = engine.max_chunk(n_tok)
    top = min(samples, grouped_mod.BLOCKWISE_BATCH, *([] if room is None else [room]))
    per_block = 12 * cfg.d_model + 4 * cfg.d_mlp + 2 * cfg.n_heads * (n_tok + top)
    per_sample = (cfg.n_layers * per_block + 3 * cfg.d_vocab) * 8
    assert base_mod.sample_elements(model, 1, n_tok + top) * 8 == per_sample
    for fit in (top, 7, 1):
        _free(monkeypatch, per_sample * 4 * fit + per_sample)
        assert engine.chunk_size(n_tok, samples) == fit


def _prep(model):
    config = AttributionConfig()
    return clean_mod.clean_pass(model, PROMPTS, [int(model.to_single_token(a)) for a in ANSWERS], config)


def test_clean_and_group_budgets_by_hand(monkeypatch):
    model = cached_model("gpt2", "native")
    cfg = model.cfg
    tokens = model.to_tokens(PROMPTS)  # right-padded to the longest
    per_prompt = tokens.shape[1] * (cfg.d_vocab + cfg.n_layers * (cfg.d_mlp + 3 * cfg.d_model))
    free = per_prompt * 8 * 2 * 2  # fraction 0.5 of it holds 2 prompts of float64 elements
    _free(monkeypatch, free)
    assert min(clean_mod.CLEAN_ELEMENTS["cpu"], int(0.5 * free) // 8) // per_prompt == 2
    calls: list[int] = []
    real = type(model).run_with_cache

    def counting(self, toks, *a, **k):
        calls.append(toks.shape[0])
        return real(self, toks, *a, **k)

    monkeypatch.setattr(type(model), "run_with_cache", counting)
    clean_mod.clean_pass(model, PROMPTS, [0, 0, 0], AttributionConfig())
    assert calls == [2, 1]
    # prompts per pass of the grouped engines: the logits budget min(GROUP_LOGITS, 0.5 × free // 8)
    prep = _prep(model)
    cls = kv_mod.HookedKVEngine if tl_major() < 4 else blockwise_mod.BlockwiseEngine
    engine = cls(model, prep, AttributionConfig())
    samples = 2 * 21
    for n_groups in (1, 3, 5):
        free = samples * cfg.d_vocab * 8 * 2 * n_groups
        _free(monkeypatch, free)
        want = min(100, min(grouped_mod.GROUP_LOGITS["cpu"], int(0.5 * free) // 8) // (samples * cfg.d_vocab), grouped_mod.GROUP_MAX)
        assert want == min(n_groups, grouped_mod.GROUP_LOGITS["cpu"] // (samples * cfg.d_vocab))
        assert engine.group_size(samples, 100) == want


def test_memory_fraction_is_validated_and_changes_no_score(monkeypatch):
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(QlocError, match="memory_fraction"):
            AttributionConfig(memory_fraction=bad)
    model = cached_model("llama", "native")
    whole = attribute_neurons(model, PROMPTS, ANSWERS, steps=6)
    _free(monkeypatch, 2_000_000)  # a small free memory: one prompt, a few samples per pass
    small = attribute_neurons(model, PROMPTS, ANSWERS, steps=6, memory_fraction=0.1)
    assert rel_diff(small.scores, whole.scores) <= 1e-6


def _greedy_chunks(nl: int, block: int, bs: int, single_layer: bool) -> list[tuple[int, int]]:
    """The oracle: whole layer blocks grouped greedily up to ``bs`` samples, a block larger than ``bs`` split on
    its own, ``single_layer`` never mixing layers — written as one pass over the layers."""
    out: list[tuple[int, int]] = []
    cur0 = cur1 = 0
    for li in range(nl):
        b0, b1 = li * block, (li + 1) * block
        if block > bs or single_layer:
            if cur1 > cur0:
                out.append((cur0, cur1))
            out.extend((s, min(s + bs, b1)) for s in range(b0, b1, bs))
            cur0 = cur1 = b1
        elif cur1 - cur0 + block > bs:
            out.append((cur0, cur1))
            cur0, cur1 = b0, b1
        else:
            cur1 = b1
    if cur1 > cur0:
        out.append((cur0, cur1))
    return out


@pytest.mark.parametrize("single_layer", [False, True])
def test_chunk_ends_walk_the_greedy_layer_blocks(single_layer):
    """Walking ``_chunk_end`` from 0 gives the greedy chunks of the oracle for every shape, and a walk resumed
    with a halved size inside a block stays inside that block (no layer mixing after a back-off)."""
    for nl in range(1, 6):
        for block in range(1, 14):
            for bs in range(1, 40):
                walk, s = [], 0
                while s < nl * block:
                    e = ig_mod._chunk_end(s, nl, block, bs, single_layer)
                    walk.append((s, e))
                    s = e
                assert walk == _greedy_chunks(nl, block, bs, single_layer), (nl, block, bs)
                for s0 in range(1, nl * block):
                    if s0 % block:
                        assert ig_mod._chunk_end(s0, nl, block, bs, single_layer) <= (s0 // block + 1) * block
