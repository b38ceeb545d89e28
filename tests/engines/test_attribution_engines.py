"""The fast execution engines of attribute_neurons (``fast_path=``) against ``implementation="reference"``
(full forward per layer per chunk) on GPT-2- and LLaMA-style tiny models (native and HF-loaded): every path,
right-padded batches, prompts sharing a pass, layer subsets, sites, objectives, float32; the MLP-out shortcut
and its probes; fallbacks and their warnings; hooks, parameters and modules restored, also on error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ANSWERS, MODELS, PROMPTS, cached_model, rel_diff

from qloc_tl.core.errors import CapabilityError, NumericalError
from qloc_tl.core.model import capabilities, tl_major
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines import ENGINE_CACHE
from qloc_tl.methods.attribution.engines import base as base_mod
from qloc_tl.methods.attribution.engines import blockwise as blockwise_mod
from qloc_tl.methods.attribution.engines import clean as clean_mod
from qloc_tl.methods.attribution.engines import dispatch as dispatch_mod
from qloc_tl.methods.attribution.engines import grouped as grouped_mod
from qloc_tl.methods.attribution.engines import hooked_blockwise as hooked_rows_mod
from qloc_tl.zoo.tiny import tiny_model

# ------------------------------------------------------------------------------------------------
# fast == reference on tiny transformers
# ------------------------------------------------------------------------------------------------


def _expected_path(source: str) -> str:
    if tl_major() < 4:
        return "kv-hooked"
    return "blockwise"  # HF and native bridges alike (native: rows within n_ctx, its own mask convention)


def _fast_kw(source: str) -> dict:
    # require the prefix-reusing path under test: a silent fallback would fail the path assertions anyway,
    # this makes it an error with the reason
    return {} if _expected_path(source) == "full" else {"fast_path": "kv"}


_PACKED = [("gpt2", "hf", "packed"), ("llama", "hf", "packed")] if tl_major() >= 4 else []
# TL 3 HookedTransformers with learned absolute positions also run "blockwise" (the default for them; asked
# for by name here, as _fast_kw asks for "kv-hooked"; chunks are capped to fit the tiny models' n_ctx of 32)
_ROWS3 = [("gpt2", "native", "blockwise"), ("gpt2", "hf", "blockwise")] if tl_major() < 4 else []


@pytest.mark.parametrize("arch, source, path", [(a, s, None) for a, s in MODELS] + _PACKED + _ROWS3)
@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_fast_equals_reference_float64(arch, source, path, method):
    model = cached_model(arch, source)
    steps = 20 if method != "sig" else 6
    kw = dict(method=method, steps=steps)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, implementation="reference", **kw)
    fast = attribute_neurons(model, PROMPTS, ANSWERS, **kw, **({"fast_path": path} if path else _fast_kw(source)))
    assert ref.path == "reference" and fast.path == (path or _expected_path(source))
    assert fast.scores.shape == (3, model.cfg.n_layers, model.cfg.d_mlp)
    assert rel_diff(fast.scores, ref.scores) <= 1e-5
    for f in ("clean_prob", "baseline_prob", "completeness_delta", "activations"):
        assert torch.allclose(getattr(fast, f), getattr(ref, f), rtol=1e-6, atol=1e-9), f
    assert torch.equal(fast.answer_ids, ref.answer_ids)
    assert fast.positions.tolist() == [len(model.to_tokens(p)[0]) - 1 for p in PROMPTS]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compat_processing_fast_equals_reference(arch):
    # TL 3 from_pretrained defaults ≡ TL 4 enable_compatibility_mode(): folded/centred weights
    model = tiny_model(arch, source="hf", processing="compat", dtype=torch.float64)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=6, implementation="reference")
    fast = attribute_neurons(model, PROMPTS, ANSWERS, steps=6, **_fast_kw("hf"))
    assert fast.path == _expected_path("hf") and rel_diff(fast.scores, ref.scores) <= 1e-5


@pytest.mark.parametrize(
    "limit, value, passes",
    [("CLEAN_CHUNK", 2, (len(PROMPTS) + 1) // 2), ("CLEAN_ELEMENTS", {"cpu": 1, "other": 1}, len(PROMPTS))],
)
def test_many_prompts_clean_pass_is_chunked(monkeypatch, limit, value, passes):
    # the clean pass is split by the prompt cap and by the element budget; the split changes nothing
    model = cached_model("gpt2", "native")
    whole = attribute_neurons(model, PROMPTS, ANSWERS, steps=3)  # also runs the model's one-time probes
    calls = []
    real = type(model).run_with_cache

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(type(model), "run_with_cache", counting)
    monkeypatch.setattr(clean_mod, limit, value)
    chunked = attribute_neurons(model, PROMPTS, ANSWERS, steps=3)
    assert len(calls) == passes
    assert rel_diff(chunked.scores, whole.scores) <= 1e-12
    assert torch.allclose(chunked.activations, whole.activations, rtol=0, atol=1e-14)


@pytest.mark.parametrize("arch, source", MODELS)
def test_padded_batch_rows_equal_single_runs(arch, source):
    model = cached_model(arch, source)
    batch = attribute_neurons(model, PROMPTS, ANSWERS, steps=8, rule="midpoint", **_fast_kw(source))
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        alone = attribute_neurons(model, p, a, steps=8, rule="midpoint", **_fast_kw(source))
        assert alone.scores.shape == (model.cfg.n_layers, model.cfg.d_mlp)
        assert rel_diff(batch.scores[i], alone.scores) <= 1e-6
        assert torch.allclose(batch.clean_prob[i], alone.clean_prob[0], rtol=1e-9)


@pytest.mark.parametrize(
    "arch, source, site, objective",
    [
        ("gpt2", "hf", "pre", "prob"),
        ("gpt2", "native", "post", "logprob"),
        ("llama", "hf", "pre_linear", "logprob"),
        ("llama", "native", "pre", "prob"),
    ],
)
def test_sites_and_objectives_fast_equals_reference(arch, source, site, objective):
    model = cached_model(arch, source)
    kw = dict(site=site, objective=objective, steps=10, rule="trapezoid")
    ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], implementation="reference", **kw)
    fast = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw, **_fast_kw(source))
    assert rel_diff(fast.scores, ref.scores) <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_float32_fast_equals_reference(arch):
    model = cached_model(arch, "hf", torch.float32)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, implementation="reference")
    auto = attribute_neurons(model, PROMPTS, ANSWERS)
    assert auto.path == ("kv-hooked" if tl_major() < 4 else "blockwise")  # TL 3: 3 x 21 samples do not fit n_ctx
    assert auto.scores.dtype == torch.float32
    assert rel_diff(auto.scores, ref.scores) <= 1e-3
    if tl_major() >= 4:
        packed = attribute_neurons(model, PROMPTS, ANSWERS, fast_path="packed")
        assert packed.path == "packed" and rel_diff(packed.scores, ref.scores) <= 1e-3


@pytest.mark.skipif(tl_major() < 4, reason="blockwise and packing are TL 4 bridge paths")
def test_rows_longer_than_n_ctx_and_packing_without_room_equal_reference():
    """A prompt one token short of n_ctx: the blockwise row (prompt + 3 x 5 copies) is longer than n_ctx,
    which the explicit position ids allow; packing has room for 2 copies per row ("auto" would not pack
    then: the fallback after blockwise is the full path) and gives one row per two samples. All equal the
    reference."""
    model = cached_model("gpt2", "hf")
    n_ctx = model.cfg.n_ctx
    long_prompt = torch.arange(3, 3 + n_ctx - 1) % model.cfg.d_vocab  # n_ctx - 1 tokens: t = n_ctx - 2
    kw = dict(steps=4, prepend_bos=False)
    ref = attribute_neurons(model, long_prompt, 5, implementation="reference", **kw)
    auto = attribute_neurons(model, long_prompt, 5, **kw)
    packed = attribute_neurons(model, long_prompt, 5, fast_path="packed", **kw)
    assert auto.path == "blockwise" and packed.path == "packed"
    assert rel_diff(auto.scores, ref.scores) <= 1e-5 and rel_diff(packed.scores, ref.scores) <= 1e-5
    assert dispatch_mod.fast_kind(model, AttributionConfig(), n_ctx - 1) == "blockwise"
    ENGINE_CACHE.mark_failed(model, "blockwise")
    try:  # after blockwise failed on this model: no room to pack -> full; room -> packed
        assert dispatch_mod.fast_kind(model, AttributionConfig(), n_ctx - 1) == "full"
        assert dispatch_mod.fast_kind(model, AttributionConfig(), 10) == "packed"
    finally:
        ENGINE_CACHE.clear(model)


@pytest.mark.parametrize("arch, source", MODELS)
@pytest.mark.parametrize("batch_size", [7, 1000])
def test_layer_subsets_and_odd_chunks_equal_reference(arch, source, batch_size):
    """Chunks that start above layer 0, mix layers, split a layer, or hold every sample (the blockwise paths
    add each layer's samples at that layer's block), on a non-contiguous layer subset."""
    model = cached_model(arch, source)
    kw = dict(steps=5, rule="midpoint", layers=[2, 0])
    ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], implementation="reference", **kw)
    fast = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], batch_size=batch_size, **kw, **_fast_kw(source))
    assert fast.path == _expected_path(source)
    assert bool(fast.scores[:, 1].isnan().all()) and rel_diff(fast.scores[:, [0, 2]], ref.scores[:, [0, 2]]) <= 1e-6


@pytest.mark.skipif(tl_major() < 4, reason="blockwise is a TL 4 bridge path")
def test_blockwise_validation_sees_the_farthest_copy(monkeypatch, caplog):
    """Sabotage the rotary angles of the blockwise rows from position P on (as a backend that cared about the
    sequence index would), P = the prefix + the 5 copies of layer 0 (4 samples and its validation copy).
    With the MLP-out shortcut, the farthest entry at block 2 is the probe of layer 2: it fails, and the call
    runs again without the shortcut (and the next call does not try it). There the copies of layer 2 join at block 2 from position P on; the
    validation copy at the chunk's highest layer is the last of them, so "blockwise" is refused and "auto"
    falls back to the packed path, which equals the reference. (A validation copy at the lowest layer only,
    at position P - 1, would miss it.)"""
    model = tiny_model("llama", source="hf", dtype=torch.float64)  # fresh: the fallback memo is per model
    real_at = blockwise_mod.BlockCall.at
    P = len(model.to_tokens(PROMPTS[0])[0]) - 1 + 5

    def at(self, length):
        args, kwargs = real_at(self, length)
        cos, sin = kwargs["position_embeddings"]
        cos = cos.clone()
        cos[:, P:] = cos[:, :1]
        kwargs["position_embeddings"] = (cos, sin)
        return args, kwargs

    monkeypatch.setattr(blockwise_mod.BlockCall, "at", at)
    kw = dict(steps=4, layers=[0, 2])
    ref = attribute_neurons(model, PROMPTS[0], ANSWERS[0], implementation="reference", **kw)
    with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
        with pytest.raises(CapabilityError, match="blockwise path does not reproduce"):
            attribute_neurons(model, PROMPTS[0], ANSWERS[0], fast_path="blockwise", **kw)
        auto = attribute_neurons(model, PROMPTS[0], ANSWERS[0], **kw)  # the shortcut's refusal is remembered
    assert auto.path == "packed" and rel_diff(auto.scores[[0, 2]], ref.scores[[0, 2]]) <= 1e-6
    assert any("blockwise fast path does not reproduce" in m for m in caplog.messages)
    assert any("MLP-out shortcut does not reproduce" in m for m in caplog.messages)


@pytest.mark.parametrize("arch, source", MODELS)
@pytest.mark.parametrize("method", ["ig", "amig"])
def test_prompts_sharing_a_blockwise_pass_equal_reference(arch, source, method):
    """Several prompts of different lengths in one call share blockwise passes (TL 4: rows left-padded to
    the longest prefix; TL 3: one KV cache of left-padded prefixes): the call runs block 0 fewer times than
    one call per prompt, and its scores equal the reference and the one-prompt calls."""
    model = cached_model(arch, source)
    prompts, answers = PROMPTS + ["paris"], ANSWERS + ["france"]  # 1-token prompt: an empty prefix
    kw = dict(method=method, steps=4, rule="trapezoid", fast_path="kv")
    ref = attribute_neurons(model, prompts, answers, implementation="reference", method=method, steps=4, rule="trapezoid")
    attribute_neurons(model, prompts, answers, **kw)  # one-time probes, outside the count below
    runs = {"n": 0}
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: runs.__setitem__("n", runs["n"] + 1))
    try:
        shared = attribute_neurons(model, prompts, answers, **kw)
        n_shared, runs["n"] = runs["n"], 0
        alone = [attribute_neurons(model, p, a, **kw) for p, a in zip(prompts, answers)]
        n_alone = runs["n"]
    finally:
        handle.remove()
    assert shared.path == _expected_path(source) and all(r.path == shared.path for r in alone)
    assert n_shared < n_alone, (n_shared, n_alone)
    alone_scores = torch.stack([r.scores for r in alone])
    # HF LLaMA's RMSNorm computes in float32 even in a float64 model: rows of another length round differently
    tol = 1e-9 if (arch, source) != ("llama", "hf") else 1e-6
    assert rel_diff(shared.scores, ref.scores) <= 1e-6 and rel_diff(shared.scores, alone_scores) <= tol
    for f in ("baseline_prob", "completeness_delta"):
        assert torch.allclose(getattr(shared, f), getattr(ref, f), rtol=1e-6, atol=1e-9), f


class _FakeModel(SimpleNamespace):
    """A stand-in for a TL model with only the attributes it is given, shaped like the ``TLModel`` protocol
    (``hook_dict``, ``hooks`` ...; none of which the tests below use) for run-time type checks."""

    hook_dict: dict = {}

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    hooks = run_with_hooks = run_with_cache = __call__

    def __getattr__(self, name):
        raise AttributeError(name)


def _no_prompts() -> clean_mod.CleanPass:
    """The clean pass of no prompts (for engines whose sizing reads none of it)."""
    z = torch.zeros(0, dtype=torch.long)
    e = torch.zeros(0)
    return clean_mod.CleanPass(z.reshape(0, 0), z, z, [], {}, e.reshape(0, 0, 0), e.reshape(0, 0), e, e, {}, None, {})


def _group_size(model, config, kind, samples, left):
    """Prompts per pass of the engine of path ``kind`` (``samples`` per prompt, ``left`` prompts to go)."""
    from qloc_tl.methods.attribution.engines import full, kv_hooked, packed

    engines = {
        "blockwise": blockwise_mod.BlockwiseEngine,
        "kv-hooked": kv_hooked.HookedKVEngine,
        "packed": packed.PackedEngine,
        "full": full.FullEngine,
    }
    return engines[kind](model, _no_prompts(), config).group_size(samples, left)


def _assert_largest_that_fits(size: int, left: int, cap: int, per_prompt: int, budget: float) -> None:
    """``size`` is the largest group ``g`` in ``[1, min(left, cap)]`` with ``g * per_prompt <= budget`` (1 when
    none fits): the policy's contract, checked without restating its formula or the values of its budgets."""
    top = max(1, min(left, cap))
    assert 1 <= size <= top, (size, top)
    assert size == 1 or size * per_prompt <= budget, size
    assert size == top or (size + 1) * per_prompt > budget, size


# (d_model, d_mlp, d_vocab, samples per prompt, prompts left): GPT-2-small, LLaMA-ish, small-vocabulary shapes
_SHAPES = [(768, 3072, 50257, 12 * 21, 100), (768, 3072, 50257, 4 * 20, 100), (512, 1408, 32000, 8 * 21, 100),
           (128, 512, 50257, 4 * 21, 100), (128, 512, 50257, 4 * 21, 7), (64, 128, 3607, 84, 100),
           (64, 128, 96, 63, 1000), (64, 128, 96, 63, 5)]  # fmt: skip


def _fake(d_model, mlp, V, device="cpu", W_U_dtype=None):
    kw = {} if W_U_dtype is None else {"W_U": torch.zeros(1, 1, dtype=W_U_dtype).expand(d_model, V), "b_U": None}
    return _FakeModel(
        cfg=SimpleNamespace(d_vocab=V, d_model=d_model, d_mlp=mlp), parameters=lambda: iter([torch.zeros(1, device=device)]), **kw
    )  # fmt: skip


def test_prompts_per_pass_policy():
    """Prompts join a pass while their ``[prompts, samples, d_vocab]`` logits fit the device's budget (:data:`GROUP_LOGITS`, larger off the CPU),
    up to :data:`GROUP_MAX`; SIG and the packed and full paths: one prompt per pass."""
    for kind in ("blockwise", "kv-hooked"):  # TL 3's blockwise path groups too
        ig_cfg, sig_cfg = AttributionConfig(), AttributionConfig(method="sig")
        for d_model, mlp, V, samples, left in _SHAPES:
            S = min(samples, grouped_mod.BLOCKWISE_BATCH)
            for device, budget in (("cpu", grouped_mod.GROUP_LOGITS["cpu"]), ("meta", grouped_mod.GROUP_LOGITS["other"])):
                fake = _fake(d_model, mlp, V, device)
                size = _group_size(fake, ig_cfg, kind, samples, left)
                _assert_largest_that_fits(size, left, grouped_mod.GROUP_MAX, S * V, budget)
                assert _group_size(fake, sig_cfg, kind, samples, left) == 1
            # a low-precision W_U: the same logits budget
            low = _fake(d_model, mlp, V, W_U_dtype=torch.bfloat16)
            assert _group_size(low, ig_cfg, kind, samples, left) == _group_size(_fake(d_model, mlp, V), ig_cfg, kind, samples, left)
        fake = _fake(64, 128, 96)
        assert _group_size(fake, ig_cfg, "packed", 63, 1000) == _group_size(fake, ig_cfg, "full", 63, 1000) == 1
        # more samples per prompt or a larger vocabulary never put more prompts in a pass
        sizes = [_group_size(_fake(64, 128, V), ig_cfg, kind, s, 1000) for V, s in ((96, 20), (96, 200), (50257, 200))]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_full_fast_path_and_token_inputs_equal_reference():
    model = cached_model("gpt2", "hf")
    toks = [model.to_tokens(p)[0] for p in PROMPTS]
    ids = [int(model.to_single_token(a)) for a in ANSWERS]
    ref = attribute_neurons(model, toks, ids, steps=5, implementation="reference", batch_size=2)
    full = attribute_neurons(model, toks, ids, steps=5, fast_path="full", batch_size=7)
    by_str = attribute_neurons(model, PROMPTS, ANSWERS, steps=5)
    assert full.path == "full"
    assert rel_diff(full.scores, ref.scores) <= 1e-8 and rel_diff(by_str.scores, ref.scores) <= 1e-8


@pytest.mark.parametrize("arch, source", MODELS)
def test_nonfinite_clean_activations_name_their_first_layer(arch, source):
    """inf in one neuron of layer 1's clean activations, the MLP's output made finite again by a second hook so
    that the logits stay finite: the clean pass still refuses it, naming layer 1 and its hook."""
    model = cached_model(arch, source)
    post = "blocks.1.mlp.hook_post"

    def put_inf(act, hook):
        act = act.clone()
        act[..., 3] = float("inf")
        return act

    def finite_again(act, hook):
        return torch.nan_to_num(act, nan=0.0, posinf=0.0, neginf=0.0)

    hooks = [(post, put_inf), ("blocks.1.hook_mlp_out", finite_again)]
    with model.hooks(fwd_hooks=hooks), torch.no_grad():
        logits = model(PROMPTS[0])
    assert torch.isfinite(logits).all()  # what the logits check alone would let through
    with model.hooks(fwd_hooks=hooks), pytest.raises(NumericalError) as info:
        attribute_neurons(model, PROMPTS, ANSWERS, steps=3)
    msg = str(info.value)
    assert f"clean activations became inf/NaN at layer 1 ({post!r}" in msg and "non-finite layers: [1]" in msg
    assert _live_hooks(model) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finite_check_agrees_with_isfinite(dtype):
    # the check sums first; a sum that overflows from finite values must not raise, one inf/NaN must
    model = cached_model("gpt2", "native", torch.float32)
    big = torch.finfo(dtype).max
    cases = [
        torch.randn(7, 5, dtype=dtype),
        torch.full((4, 3), big, dtype=dtype),  # finite, the sum overflows
        torch.tensor([big, -big, big], dtype=dtype),
    ]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(7, 5, dtype=dtype)
        t[3, 2] = bad
        cases.append(t)
    both = torch.full((2, 2), big, dtype=dtype)
    both[0, 0], both[1, 1] = float("inf"), -float("inf")  # inf + -inf: the sum is NaN
    cases.append(both)
    for t in cases:
        if bool(torch.isfinite(t).all()):
            base_mod.check_finite(t, "t", model)
        else:
            with pytest.raises(NumericalError):
                base_mod.check_finite(t, "t", model)


def _live_hooks(model) -> int:
    n = 0
    for hp in model.hook_dict.values():
        n += len(hp._forward_hooks) + len(hp._backward_hooks) + len(getattr(hp, "fwd_hooks", []))
    return n


@pytest.mark.parametrize("arch, source, path", [(a, s, None) for a, s in MODELS] + _ROWS3)
def test_no_hooks_leak_and_param_flags_restored_even_on_error(arch, source, path, monkeypatch):
    model = cached_model(arch, source)
    kw = {"fast_path": path} if path else _fast_kw(source)
    params = list(model.parameters())
    params[0].requires_grad_(False)
    flags = [p.requires_grad for p in params]
    # the model's own modules and activation functions (the fast paths swap in a fused tanh-GELU)
    own = [id(m) for m in model.modules()] + [id(vars(m).get("act_fn")) for m in model.modules()]
    # and its parameter objects and their storage (the TL 3 fast paths re-lay out some weights)
    own_params = [(n, id(p), p.data_ptr(), p.stride()) for n, p in model.named_parameters()]
    attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3, **kw)
    assert _live_hooks(model) == 0 and [p.requires_grad for p in params] == flags
    assert [(n, id(p), p.data_ptr(), p.stride()) for n, p in model.named_parameters()] == own_params
    calls = {"n": 0}

    def boom(real):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] > 1:  # the clean pass succeeds, the first attribution chunk fails
                raise RuntimeError("injected failure")
            return real(*a, **k)

        return f

    # the objective of the samples, from their logits
    for mod in (clean_mod, base_mod, grouped_mod):
        monkeypatch.setattr(mod, "objective_of_logits", boom(mod.objective_of_logits))
    with pytest.raises(RuntimeError, match="injected"):
        attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3, **kw)
    assert _live_hooks(model) == 0 and [p.requires_grad for p in params] == flags
    assert [id(m) for m in model.modules()] + [id(vars(m).get("act_fn")) for m in model.modules()] == own
    assert [(n, id(p), p.data_ptr(), p.stride()) for n, p in model.named_parameters()] == own_params
    params[0].requires_grad_(True)


@pytest.mark.skipif(tl_major() < 4, reason="TL 3 native models are HookedTransformers (KV path)")
def test_native_bridge_takes_the_blockwise_path_without_a_warning(caplog):
    """A TL 4 boot_native bridge reads a 4-D boolean mask as True = masked (HF: True = keep); the engines use
    the probed convention, so the bridge gets the prefix-reusing path, warns nothing and equals the reference."""
    model = tiny_model("gpt2", dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="qloc_tl.methods.attribution"):
        r1 = attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=3)
        r2 = attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=3, fast_path="kv")
    assert r1.path == r2.path == "blockwise"
    assert not [m for m in caplog.messages if "falls back" in m or "full-sequence" in m]
    ref = attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=3, implementation="reference")
    assert rel_diff(r1.scores, ref.scores) <= 1e-9 and torch.equal(r1.scores, r2.scores)


def _spy_run_with_cache(model, monkeypatch) -> list:
    seen: list = []
    real = model.run_with_cache

    def spy(*a, **k):
        seen.append(k.get("return_type", "logits"))
        return real(*a, **k)

    monkeypatch.setattr(model, "run_with_cache", spy)
    return seen


@pytest.mark.skipif(tl_major() >= 4, reason="the kv-hooked path is TL 3 HookedTransformer's")
def test_kv_hooked_clean_pass_skips_the_own_unembedding_only_after_checking_it(monkeypatch):
    model = tiny_model("gpt2", dtype=torch.float64)  # fresh: the check is remembered per unembed module
    capabilities(model)  # the one-time backend probe runs the model too
    seen = _spy_run_with_cache(model, monkeypatch)
    first = attribute_neurons(model, PROMPTS, ANSWERS, steps=3)
    assert seen == ["logits"] and ENGINE_CACHE.affine_unembed(model.unembed) is True
    seen.clear()
    res = attribute_neurons(model, PROMPTS, ANSWERS, steps=3)
    assert seen == [None] and res.path == "blockwise"  # no logits: the answer position's by the map
    seen.clear()
    kv = attribute_neurons(model, PROMPTS, ANSWERS, steps=3, fast_path="kv")
    assert seen == [None] and kv.path == "kv-hooked"  # TL 3's other prefix-reusing path too
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=3, implementation="reference")
    assert rel_diff(res.scores_batched, ref.scores_batched) <= 1e-10 and rel_diff(kv.scores_batched, ref.scores_batched) <= 1e-10
    assert rel_diff(res.scores_batched, first.scores_batched) <= 1e-12
    # the clean probability against the model's own forward
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            own = model(model.to_tokens(p))[0, -1].softmax(-1)[int(res.answer_ids[i])]
        assert float(res.clean_prob[i]) == pytest.approx(float(own), rel=1e-12)


@pytest.mark.skipif(tl_major() >= 4, reason="the kv-hooked path is TL 3 HookedTransformer's")
def test_kv_hooked_clean_pass_keeps_an_unembedding_that_is_not_the_affine_map(monkeypatch, caplog):
    model = tiny_model("gpt2", dtype=torch.float64)
    base = type(model.unembed)

    class Doubled(base):  # logits 2·(r @ W_U + b_U): not the map the fast path computes
        def forward(self, residual):
            return 2 * super().forward(residual)

    model.unembed.__class__ = Doubled
    seen = _spy_run_with_cache(model, monkeypatch)
    with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
        res = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3)
    assert ENGINE_CACHE.affine_unembed(model.unembed) is False
    assert res.path == "full"  # the kv-hooked path cannot reproduce these logits: fell back
    seen.clear()
    attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3)
    assert None not in seen  # never skipped for this module
    ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3, implementation="reference")
    assert rel_diff(res.scores_batched, ref.scores_batched) <= 1e-10
    # and an unembedding with a PyTorch hook is never checked nor skipped
    model2 = tiny_model("gpt2", dtype=torch.float64)
    model2.unembed.register_forward_hook(lambda m, i, o: None)
    seen2 = _spy_run_with_cache(model2, monkeypatch)
    attribute_neurons(model2, PROMPTS[:2], ANSWERS[:2], steps=3)
    attribute_neurons(model2, PROMPTS[:2], ANSWERS[:2], steps=3)
    assert None not in seen2 and ENGINE_CACHE.affine_unembed(model2.unembed) is None
    # a TL hook on unembed.hook_out added after the check: the clean pass goes back to the model's own logits,
    # so the kv-hooked path (which cannot see that hook) fails validation and falls back
    model3 = tiny_model("gpt2", dtype=torch.float64)
    attribute_neurons(model3, PROMPTS[:2], ANSWERS[:2], steps=3)
    assert ENGINE_CACHE.affine_unembed(model3.unembed) is True
    seen3 = _spy_run_with_cache(model3, monkeypatch)
    model3.add_hook("unembed.hook_out", lambda logits, hook: logits * 2)
    try:
        res3 = attribute_neurons(model3, PROMPTS[:2], ANSWERS[:2], steps=3)
        ref3 = attribute_neurons(model3, PROMPTS[:2], ANSWERS[:2], steps=3, implementation="reference")
    finally:
        model3.reset_hooks()
    assert None not in seen3 and res3.path == "full"
    assert rel_diff(res3.scores_batched, ref3.scores_batched) <= 1e-10


# ------------------------------------------------------------------------------------------------
# the MLP-out shortcut of the blockwise paths (samples of layer l join after block l)
# ------------------------------------------------------------------------------------------------

_BLOCKWISE_MODELS = [(a, s, None) for a, s in MODELS if _expected_path(s) != "full"] + _ROWS3


# a hook that changes nothing, on a hook point the MLP-out shortcut would skip: the public way to turn it off
_IDENTITY_HOOK = [("blocks.0.hook_mlp_out", lambda t, hook: t)]


def _count_shortcut_passes(monkeypatch) -> dict:
    """Counts the passes that let the samples of layer l join after block l (the shortcut on)."""
    calls = {"n": 0}
    real = grouped_mod.GroupedEngine.joins

    def spy(self, *a, **k):
        calls["n"] += bool(self.shortcut)
        return real(self, *a, **k)

    monkeypatch.setattr(grouped_mod.GroupedEngine, "joins", spy)
    return calls


@pytest.mark.parametrize("arch, source, path", _BLOCKWISE_MODELS)
def test_mlp_out_shortcut_is_taken_and_equals_running_block_l(arch, source, path, monkeypatch):
    """With the shortcut the samples of layer l never run block l; the scores equal both the reference and
    the same path with the shortcut off (which runs block l with the hook_post replacement)."""
    model = cached_model(arch, source)
    kw = dict(steps=7, rule="trapezoid", **({"fast_path": path} if path else _fast_kw(source)))
    calls = _count_shortcut_passes(monkeypatch)
    short = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert calls["n"] > 0
    sub = attribute_neurons(model, PROMPTS, ANSWERS, layers=[model.cfg.n_layers - 1], **kw)  # no sample runs a block
    calls["n"] = 0
    with model.hooks(fwd_hooks=_IDENTITY_HOOK):  # a user's hook keeps the shortcut off (a WARNING says so)
        full = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert calls["n"] == 0
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=7, rule="trapezoid", implementation="reference")
    # 1e-6: HF LLaMA's RMSNorm computes in float32 even in a float64 model (else ~1e-15)
    assert rel_diff(short.scores_batched, full.scores_batched) <= 1e-6
    assert rel_diff(short.scores_batched, ref.scores_batched) <= 1e-5
    last = model.cfg.n_layers - 1
    assert rel_diff(sub.scores_batched[:, last], ref.scores_batched[:, last]) <= 1e-5
    assert torch.allclose(short.completeness_delta, ref.completeness_delta, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch, source, path", _BLOCKWISE_MODELS)
def test_mlp_out_shortcut_that_is_wrong_is_caught_by_its_probes(arch, source, path, monkeypatch, caplog):
    """A shortcut that does not reproduce block l (here: W_out scaled by 1.5) fails the probes on the first
    pass; the call runs again without it and equals the reference. With the probes' check disabled, the same
    wrong shortcut does change the scores — so the probes are what protects them."""
    model = cached_model(arch, source)
    real_init = grouped_mod.GroupedEngine.__init__

    def wrong(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.shortcut:
            self.W_out = {l: 1.5 * w for l, w in self.W_out.items()}

    monkeypatch.setattr(grouped_mod.GroupedEngine, "__init__", wrong)
    # the cached model passed the probes in earlier tests: forget that (the sabotage is ours, not the model's),
    # and forget the sabotage's verdicts afterwards
    ENGINE_CACHE.clear(model)
    try:
        kw = {"fast_path": path} if path else _fast_kw(source)
        ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, implementation="reference")
        with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
            res = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, **kw)
        assert any("MLP-out shortcut does not reproduce" in m for m in caplog.messages)
        assert res.path == (path or _expected_path(source)) and rel_diff(res.scores_batched, ref.scores_batched) <= 1e-5
        monkeypatch.setattr(grouped_mod.GroupedEngine, "check_shortcut", lambda self, got, want: None)
        ENGINE_CACHE.clear(model)  # it remembers the refusal
        unchecked = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, **kw)
        assert rel_diff(unchecked.scores_batched, ref.scores_batched) > 1e-3
    finally:
        ENGINE_CACHE.clear(model)


@pytest.mark.parametrize("arch, source, path", _BLOCKWISE_MODELS)
def test_mlp_out_shortcut_is_not_used_under_user_hooks(arch, source, path, monkeypatch):
    """A user's hook on hook_mlp_out of layer 1 (active around the call) must act on the samples of layer
    1 too: the shortcut would skip it, so it is not used, and the scores equal the reference's under the
    same hook (and differ from the unhooked scores)."""
    model = cached_model(arch, source)
    calls = _count_shortcut_passes(monkeypatch)
    kw = {"fast_path": path} if path else _fast_kw(source)
    hook = [("blocks.1.hook_mlp_out", lambda t, hook: 0.5 * t)]
    with model.hooks(fwd_hooks=hook):
        res = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, **kw)
        ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, implementation="reference")
    assert calls["n"] == 0 and _live_hooks(model) == 0
    plain = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, implementation="reference")
    assert rel_diff(res.scores_batched, ref.scores_batched) <= 1e-5
    assert rel_diff(res.scores_batched[:, 1], plain.scores_batched[:, 1]) > 1e-2


@pytest.mark.skipif(tl_major() >= 4, reason="a TL 3 HookedTransformerConfig option")
def test_mlp_out_shortcut_declines_a_post_mlp_norm(caplog, monkeypatch):
    """Gemma-2-style blocks normalise the MLP's output before adding it (use_normalization_before_and_after):
    block l's output is not affine in hook_post, the probes see it, and the result equals the reference."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from qloc_tl.zoo.tiny import tiny_tokenizer

    cfg = HookedTransformerConfig(
        n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=128, d_vocab=len(tiny_tokenizer()), n_ctx=32,
        act_fn="gelu_new", normalization_type="RMS", use_normalization_before_and_after=True, seed=0,
        dtype=torch.float64, device="cpu",
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer()).eval()
    with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
        res = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, fast_path="kv")
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, implementation="reference")
    assert any("MLP-out shortcut does not reproduce" in m for m in caplog.messages)
    assert res.path == "kv-hooked" and rel_diff(res.scores_batched, ref.scores_batched) <= 1e-5
    # the refusal is remembered for these blocks: the next call does not try the shortcut at all
    caplog.clear()
    calls = _count_shortcut_passes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
        again = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, fast_path="kv")
    assert calls["n"] == 0 and not any("MLP-out shortcut" in m for m in caplog.messages)
    assert rel_diff(again.scores_batched, ref.scores_batched) <= 1e-5


def test_samples_put_in_layer_order_get_the_index_gradient():
    """``_in_order`` (a permutation with a gather as its backward) against ``x[:, order]`` and autograd's own
    index backward, and a finite-difference gradcheck; the identity order returns ``x`` itself."""
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    order = torch.tensor([0, 1, 4, 5, 2, 6, 3])
    up = torch.randn(3, 7, 5, dtype=torch.float64)
    got = grouped_mod.in_order(x, order)
    (g_got,) = torch.autograd.grad(got, x, up)
    (g_idx,) = torch.autograd.grad(x[:, order], x, up)
    assert torch.equal(got, x[:, order]) and torch.equal(g_got, g_idx)
    assert torch.autograd.gradcheck(lambda t: grouped_mod.in_order(t, order), (x,))
    assert grouped_mod.in_order(x, torch.arange(7)) is x

@pytest.mark.parametrize("arch, source, path", _BLOCKWISE_MODELS)
def test_mlp_out_shortcut_probes_once_per_model_until_its_blocks_change(arch, source, path, monkeypatch, caplog):
    """The probes' verdict is remembered per model: a second call runs none and gives the same scores. A
    plain PyTorch hook put on ``blocks[1].mlp`` afterwards (not a TL hook point, so not seen by the eligibility
    test) halves that MLP's output, which the shortcut would skip for the samples of layer 1: the blocks
    changed, the probes run again, refuse it, and the scores equal the reference's under the same hook. With
    the hook gone the probes run once more and pass."""
    model = cached_model(arch, source)
    kw = dict(steps=5, **({"fast_path": path} if path else _fast_kw(source)))
    attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)  # a TL 4 bridge adds hooks of its own on a first call
    ENGINE_CACHE.clear(model)  # the probes run again on the next call
    checks = {"n": 0}
    real = grouped_mod.GroupedEngine.check_shortcut

    def spy(self, got, want):
        checks["n"] += 1
        return real(self, got, want)

    monkeypatch.setattr(grouped_mod.GroupedEngine, "check_shortcut", spy)
    first = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
    second = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
    assert checks["n"] == 1 and rel_diff(second.scores_batched, first.scores_batched) <= 1e-12
    handle = model.blocks[1].mlp.register_forward_hook(lambda mod, args, out: 0.5 * out)
    try:
        with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
            hooked = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
        ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, implementation="reference")
    finally:
        handle.remove()
    assert checks["n"] == 2 and any("MLP-out shortcut does not reproduce" in m for m in caplog.messages)
    assert rel_diff(hooked.scores_batched, ref.scores_batched) <= 1e-5
    assert rel_diff(hooked.scores_batched[:, 1], first.scores_batched[:, 1]) > 1e-2
    third = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
    assert checks["n"] == 3 and rel_diff(third.scores_batched, first.scores_batched) <= 1e-12


# ------------------------------------------------------------------------------------------------
# TL 3 "blockwise": a prompt's copies of the answer token as one sequence after its cached prefix
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(tl_major() >= 4, reason="the rows of TL 3 HookedTransformers")
@pytest.mark.parametrize("source", ["native", "hf"])
@pytest.mark.parametrize("shortcut", [True, False])
def test_hooked_rows_fit_n_ctx_and_equal_reference(source, shortcut, monkeypatch):
    """Prompts of different lengths, one of a single token (an empty prefix), share passes; the chunks are
    capped so that no pass (cached prefix + samples + validation copies + probe) is longer than n_ctx (32
    here, so several passes per prompt); every attention block got the layout mask. The scores equal the reference and
    the kv-hooked path's."""
    model = cached_model("gpt2", source)
    # without the shortcut: a user's hook keeps it off (the public route)
    stack = contextlib.ExitStack()
    if not shortcut:
        stack.enter_context(model.hooks(fwd_hooks=_IDENTITY_HOOK))
    prompts, answers = PROMPTS + ["paris"], ANSWERS + ["france"]
    with stack:
        kw = dict(method="amig", steps=20, rule="trapezoid")
        ref = attribute_neurons(model, prompts, answers, implementation="reference", **kw)
        kv = attribute_neurons(model, prompts, answers, fast_path="kv", **kw)
        widths = []
        real = hooked_rows_mod.MaskHook.__call__

        def spy(self, act, hook):
            widths.append(act.shape[-1])
            return real(self, act, hook)

        monkeypatch.setattr(hooked_rows_mod.MaskHook, "__call__", spy)
        passes = []
        real_eval = hooked_rows_mod.HookedBlockwiseEngine.evaluate
        monkeypatch.setattr(
            hooked_rows_mod.HookedBlockwiseEngine,
            "evaluate",
            lambda ev, lay, x, check: passes.append(1) or real_eval(ev, lay, x, check),
        )
        rows = attribute_neurons(model, prompts, answers, fast_path="blockwise", **kw)
    assert rows.path == "blockwise" and kv.path == "kv-hooked"
    longest = max(len(model.to_tokens(p)[0]) for p in prompts)
    # 3 layers x 20 samples per prompt do not fit one row: several passes, each within n_ctx (the scores'
    # keys: the cached prefix, then the copies)
    room = model.cfg.n_ctx - longest - 2
    assert 20 * model.cfg.n_layers > room and len(passes) >= math.ceil(20 * model.cfg.n_layers / room)
    assert max(widths) <= model.cfg.n_ctx
    assert rel_diff(rows.scores_batched, ref.scores_batched) <= 1e-5
    assert rel_diff(rows.scores_batched, kv.scores_batched) <= 1e-9
    assert torch.allclose(rows.completeness_delta, ref.completeness_delta, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(tl_major() >= 4, reason="TL 3 HookedTransformer prefix caches")
@pytest.mark.parametrize("path", ["kv", "blockwise"])
def test_hooked_prefix_caches_from_the_clean_pass_equal_their_own_forward(path, monkeypatch):
    """The prefix caches built from the keys and values of the clean pass (right-padded) and those of a forward
    pass of the prefixes (left-padded) give the same scores (1e-12, float64), with every prompt's kept, with
    none kept, and with a budget that keeps the first three only (two prompts per pass: the second pass then
    runs a forward of its own); all equal the reference. Forward passes from tokens are counted
    on the embedding: one clean pass, plus one per pass whose prefixes were not kept."""
    model = cached_model("gpt2", "native")
    prompts, answers = PROMPTS + ["paris"], ANSWERS + ["france"]  # different lengths, one a single token
    kw = dict(steps=6, rule="trapezoid", fast_path=path)
    monkeypatch.setattr(grouped_mod, "GROUP_MAX", 2)
    preps, embeds = [], {"n": 0}
    real_prepare = dispatch_mod.clean_pass

    def prepare(*args, **kwargs):
        preps.append(real_prepare(*args, **kwargs))
        return preps[-1]

    def count(mod, args):
        embeds["n"] += 1

    attribute_neurons(model, prompts, answers, **kw)  # a first call on a model probes its capabilities
    monkeypatch.setattr(dispatch_mod, "clean_pass", prepare)
    handle = model.embed.register_forward_pre_hook(count)
    try:
        kept = attribute_neurons(model, prompts, answers, **kw)
        n_all = (embeds["n"], preps[-1].prefix_kv[0][0].shape[0])
        L, pos = model.cfg.n_layers, preps[-1].tokens.shape[1]
        per = 2 * L * pos * model.cfg.n_heads * model.cfg.d_head
        embeds["n"] = 0
        monkeypatch.setattr(clean_mod, "PREFIX_KV_ELEMENTS", 3 * per)
        some = attribute_neurons(model, prompts, answers, **kw)
        n_some = (embeds["n"], preps[-1].prefix_kv[0][0].shape[0])
        embeds["n"] = 0
        monkeypatch.setattr(clean_mod, "PREFIX_KV_ELEMENTS", 0)
        none = attribute_neurons(model, prompts, answers, **kw)
        n_none = (embeds["n"], preps[-1].prefix_kv)
    finally:
        handle.remove()
    ref = attribute_neurons(model, prompts, answers, steps=6, rule="trapezoid", implementation="reference")
    assert kept.path == none.path == ("kv-hooked" if path == "kv" else "blockwise")
    assert len(prompts) == 4  # passes: prompts 0-1, kept by the budget of three, and 2-3, not kept
    assert n_all == (1, 4) and n_some == (1 + 1, 3) and n_none == (1 + 2, None)
    assert rel_diff(kept.scores_batched, none.scores_batched) <= 1e-12
    assert rel_diff(some.scores_batched, none.scores_batched) <= 1e-12
    assert rel_diff(kept.scores_batched, ref.scores_batched) <= 1e-5


@pytest.mark.skipif(tl_major() >= 4, reason="the rows of TL 3 HookedTransformers")
def test_hooked_rows_without_the_layout_mask_are_refused(monkeypatch, caplog):
    """The layout mask is what keeps the copies of a row from seeing each other: with it disabled, the
    validation copies (the last of their rows) no longer reproduce the clean logits, so fast_path='blockwise'
    is refused and "auto" falls back to kv-hooked, which equals the reference."""
    model = tiny_model("gpt2", dtype=torch.float64)  # fresh: the fallback memo is per model

    def unmasked(self, act, hook):
        self.calls += 1
        return act

    monkeypatch.setattr(hooked_rows_mod.MaskHook, "__call__", unmasked)
    kw = dict(steps=4)  # 3 x 5 samples per prompt: "auto" tries the rows first (n_ctx 32 leaves room for 20)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, implementation="reference", **kw)
    with pytest.raises(CapabilityError, match="blockwise path does not reproduce"):
        attribute_neurons(model, PROMPTS, ANSWERS, fast_path="blockwise", **kw)
    with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
        auto = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert auto.path == "kv-hooked" and rel_diff(auto.scores_batched, ref.scores_batched) <= 1e-5
    assert any("blockwise fast path does not reproduce" in m for m in caplog.messages)
    assert _live_hooks(model) == 0


@pytest.mark.skipif(tl_major() >= 4, reason="the rows of TL 3 HookedTransformers")
def test_hooked_rows_are_taken_only_where_a_block_cannot_see_positions():
    """ "auto" takes the rows for learned absolute positions with room in n_ctx; rotary models (positions
    inside attention) stay on kv-hooked and refuse fast_path='blockwise', as do local attention windows and
    bidirectional attention (checked on the config, before any probe of the model)."""
    gpt2, llama = cached_model("gpt2", "native"), cached_model("llama", "native")
    assert attribute_neurons(gpt2, PROMPTS[0], ANSWERS[0], steps=3).path == "blockwise"
    assert attribute_neurons(gpt2, PROMPTS[0], ANSWERS[0], steps=3, fast_path="kv").path == "kv-hooked"
    # "auto" wants room for all 3 layers x (3 + 1) nodes of a prompt in one pass, as kv-hooked takes them
    want = gpt2.cfg.n_layers * (3 + 1)
    assert hooked_rows_mod.rows_chunk_wanted(gpt2, AttributionConfig(steps=3), 20) == want
    assert hooked_rows_mod.rows_chunk_wanted(gpt2, AttributionConfig(method="sig", steps=3), 20) == 20 * want
    tight = torch.arange(gpt2.cfg.n_ctx - 2 - want) % (gpt2.cfg.d_vocab - 3) + 3  # room for exactly that
    assert attribute_neurons(gpt2, tight, 5, steps=3).path == "blockwise"
    assert attribute_neurons(gpt2, torch.cat([tight, tight[:1]]), 5, steps=3).path == "kv-hooked"  # one less
    assert attribute_neurons(gpt2, PROMPTS[0], ANSWERS[0]).path == "kv-hooked"  # 3 x 21 samples: no room
    assert attribute_neurons(llama, PROMPTS[0], ANSWERS[0], steps=3).path == "kv-hooked"
    with pytest.raises(CapabilityError, match="learned absolute positions"):
        attribute_neurons(llama, PROMPTS[0], ANSWERS[0], steps=3, fast_path="blockwise")
    long = torch.arange(gpt2.cfg.n_ctx - 2) % (gpt2.cfg.d_vocab - 3) + 3  # room for no copy in n_ctx
    with pytest.raises(CapabilityError, match="room for a copy"):
        attribute_neurons(gpt2, long, 5, steps=3, fast_path="blockwise")
    edge = attribute_neurons(gpt2, long[1:], 5, steps=3, fast_path="blockwise")  # room for 1: rows of n_ctx
    assert edge.path == "blockwise"
    assert rel_diff(edge.scores, attribute_neurons(gpt2, long[1:], 5, steps=3, fast_path="kv").scores) <= 1e-9
    assert hooked_rows_mod.rows_layout_ok(gpt2)

    def fake(**over):
        cfg = dict(positional_embedding_type="standard", attention_dir="causal", attn_types=None) | over
        return _FakeModel(cfg=SimpleNamespace(**cfg))  # no model to probe: decided by the config

    for over in (
        {"positional_embedding_type": "rotary"},
        {"positional_embedding_type": "alibi"},
        {"positional_embedding_type": "shortformer"},
        {"attn_types": ["global", "local"]},
        {"attention_dir": "bidirectional"},
    ):
        assert not hooked_rows_mod.rows_layout_ok(fake(**over)), over


# ------------------------------------------------------------------------------------------------
# a slower path than the model's normal one: one warning per model
# ------------------------------------------------------------------------------------------------


def _slow_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name.startswith("qloc_tl.methods.attribution")
        and "runs the slower" in r.getMessage()
    ]


@pytest.mark.skipif(tl_major() >= 4, reason="the KV-cache probe is TL 3 HookedTransformer's")
def test_failed_kv_probe_falls_back_with_one_warning_per_model(monkeypatch, caplog):
    """A HookedTransformer whose KV-cache probe fails (here: a cache holding a stale prefix) runs the "full"
    path: equal to the reference, with one WARNING over two calls that names the path and the probe's
    reason; fast_path="kv" raises with that reason. A healthy model of the same shape warns nothing."""
    import qloc_tl.core.model as model_mod

    model = tiny_model("llama", dtype=torch.float64)  # fresh: probes and warnings are per model
    real = model_mod.hooked_kv_cache

    def stale(m, batch):
        cache = real(m, batch)
        m(torch.tensor([[7, 8]]), past_kv_cache=cache)
        return cache

    with monkeypatch.context() as mp:
        mp.setattr(model_mod, "hooked_kv_cache", stale)
        assert capabilities(model).kv_cache is None  # probed once, remembered for the model
    with caplog.at_level(logging.WARNING, logger="qloc_tl.methods.attribution"):
        r1 = attribute_neurons(model, PROMPTS, ANSWERS, steps=4)
        r2 = attribute_neurons(model, PROMPTS[:1], ANSWERS[:1], steps=4)
    assert r1.path == r2.path == "full"
    (msg,) = _slow_warnings(caplog)
    assert "'full'" in msg and "kv_cache:" in msg and "HookedTransformer" in msg
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=4, implementation="reference")
    assert rel_diff(r1.scores_batched, ref.scores_batched) <= 1e-9
    with pytest.raises(CapabilityError, match="kv_cache:"):
        attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=3, fast_path="kv")
    caplog.clear()
    healthy = tiny_model("llama", dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="qloc_tl.methods.attribution"):
        assert attribute_neurons(healthy, PROMPTS, ANSWERS, steps=4).path == "kv-hooked"
    assert _slow_warnings(caplog) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_user_hooks_slower_path_is_warned_once_per_model(arch, caplog):
    """A user's hook on a hook point keeps the MLP-out shortcut off (it would skip the hook): two calls under
    the hook give one WARNING naming the hook point and the path taken without the shortcut; the call before
    the hook, on the normal path, gives none."""
    model = tiny_model(arch, source="hf", dtype=torch.float64)  # fresh: warnings are once per model
    hook = [("blocks.1.hook_mlp_out", lambda t, hook: 0.5 * t)]
    with caplog.at_level(logging.WARNING, logger="qloc_tl.methods.attribution"):
        plain = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3)
        assert _slow_warnings(caplog) == []
        with model.hooks(fwd_hooks=hook):
            a = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3)
            b = attribute_neurons(model, PROMPTS[:1], ANSWERS[:1], steps=3)
    assert a.path == b.path == plain.path != "full"
    (msg,) = _slow_warnings(caplog)
    assert "without the MLP-out shortcut" in msg and "blocks.1.hook_mlp_out" in msg and f"'{a.path}'" in msg


# ------------------------------------------------------------------------------------------------
