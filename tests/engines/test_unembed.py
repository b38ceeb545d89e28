"""answer_objective (the blocked sweep over the vocabulary) against the plain formula and finite differences,
and linear_unembedding against the models' own logits."""

from __future__ import annotations

import pytest
import torch

from qloc_tl.core.model import tl_major
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.attribution.engines import grouped as grouped_mod
from qloc_tl.methods.attribution.engines.unembed import (
    answer_objective,
    answer_objective_and_logits,
    linear_unembedding,
)
from qloc_tl.zoo.tiny import tiny_model


def _plain(r, W, b, a, objective):
    """The textbook computation: materialised logits, log_softmax, autograd."""
    r = r.detach().clone().requires_grad_(True)
    z = r @ W if b is None else r @ W + b
    lp = torch.log_softmax(z, -1).gather(-1, a[:, None]).squeeze(-1)
    obj = lp if objective == "logprob" else lp.exp()
    (g,) = torch.autograd.grad((obj * torch.arange(1.0, len(a) + 1, dtype=r.dtype)).sum(), r)
    return obj.detach(), lp.exp().detach(), g


def _ours(r, W, b, a, objective):
    r = r.detach().clone().requires_grad_(True)
    obj, prob = answer_objective(r, W, b, a, objective)
    assert not prob.requires_grad
    (g,) = torch.autograd.grad((obj * torch.arange(1.0, len(a) + 1, dtype=r.dtype)).sum(), r)
    return obj.detach(), prob, g


# Sizes that span several of the sweep's blocks (256 rows x 1024 columns by default) in both directions, with
# ragged last blocks: the sweep is driven through its public functions at its own block sizes.
ROWS, COLS = 2 * 256 + 3, 2 * 1024 + 7


@pytest.mark.parametrize("objective", ["prob", "logprob"])
@pytest.mark.parametrize("bias", [True, False])
def test_answer_objective_equals_the_plain_formula(objective, bias):
    g = torch.Generator().manual_seed(0)
    R, d, V = ROWS, 6, COLS
    r = torch.randn(R, d, generator=g, dtype=torch.float64)
    W = torch.randn(d, V, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    a = torch.randint(0, V, (R,), generator=g)
    for want, got in zip(_plain(r, W, b, a, objective), _ours(r, W, b, a, objective)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_answer_objective_when_the_max_logit_is_late_and_huge():
    """The running max grows in a later block, by far more than exp's range: the rescaling must be exact
    (a sweep that kept the first block's max would overflow to inf/NaN)."""
    d, V = 3, COLS
    W = torch.zeros(d, V, dtype=torch.float64)
    W[0] = torch.linspace(-2.0, 2.0, V, dtype=torch.float64)  # the max logit is the last column (last block)
    W[1, 7] = 1.0
    r = torch.tensor([[900.0, 0, 0], [-900.0, 0, 0], [400.0, 50.0, 0], [0.0, 0, 1]], dtype=torch.float64)
    a = torch.tensor([V - 1, 0, 7, 3])
    for objective in ("prob", "logprob"):
        for want, got in zip(_plain(r, W, None, a, objective), _ours(r, W, None, a, objective)):
            assert bool(torch.isfinite(got).all())
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_answer_objective_gradient_against_finite_differences():
    g = torch.Generator().manual_seed(1)
    R, d, V = 5, 4, COLS  # several column blocks (the row blocks: test_answer_objective_equals_the_plain_formula)
    r = torch.randn(R, d, generator=g, dtype=torch.float64)
    W = torch.randn(d, V, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    a = torch.randint(0, V, (R,), generator=g)
    _, _, grad = _ours(r, W, b, a, "prob")
    weights = torch.arange(1.0, R + 1, dtype=torch.float64)
    eps = 1e-6
    fd = torch.zeros_like(r)
    for i in range(R):
        for j in range(d):
            hi, lo = r.clone(), r.clone()
            hi[i, j] += eps
            lo[i, j] -= eps
            p_hi = torch.softmax(hi @ W + b, -1).gather(-1, a[:, None]).squeeze(-1)
            p_lo = torch.softmax(lo @ W + b, -1).gather(-1, a[:, None]).squeeze(-1)
            fd[i, j] = ((p_hi - p_lo) * weights).sum() / (2 * eps)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_answer_objective_float32_matches_float64():
    g = torch.Generator().manual_seed(2)
    R, d, V = 300, 16, 2500  # more than one block of the default size in both directions
    r = torch.randn(R, d, generator=g, dtype=torch.float64)
    W = torch.randn(d, V, generator=g, dtype=torch.float64) * 0.5
    a = torch.randint(0, V, (R,), generator=g)
    want = _plain(r, W, None, a, "prob")
    got = _ours(r.float(), W.float(), None, a, "prob")
    for w, o in zip(want, got):
        assert o.dtype == torch.float32
        assert float((o.double() - w).abs().max() / w.abs().max()) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_kept_logits_are_the_plain_logits_of_those_rows(bias):
    """The logits copied out of the sweep (rows in several row blocks, repeated, out of order, none) equal
    ``r[rows] @ W + b``; asking for them changes neither the objective nor its gradient."""
    g = torch.Generator().manual_seed(3)
    R, d, V = ROWS, 6, COLS
    r = torch.randn(R, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d, V, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    a = torch.randint(0, V, (R,), generator=g)
    plain_obj, _, plain_grad = _plain(r, W, b, a, "prob")
    for rows in ([R - 1, 0, 260, 260, 3], [], [2]):
        keep = torch.tensor(rows, dtype=torch.long).view(-1, 1) if rows else torch.zeros(0, dtype=torch.long)
        obj, prob, kept = answer_objective_and_logits(r, W, b, a, "prob", keep)
        want = r.detach()[keep.view(-1)] @ W + (b if b is not None else 0)
        assert kept.shape == (len(rows), V) and not kept.requires_grad
        assert torch.allclose(kept, want, rtol=1e-12, atol=1e-13)
        (grad,) = torch.autograd.grad((obj * torch.arange(1.0, R + 1, dtype=r.dtype)).sum(), r)
        assert torch.allclose(obj.detach(), plain_obj, rtol=1e-12, atol=1e-14)
        assert torch.allclose(grad, plain_grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="logits_of"):
        answer_objective_and_logits(r, W, b, a, "prob", torch.tensor([R]))


def test_answer_objective_rejects_bad_input():
    W = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="objective"):
        answer_objective(torch.zeros(2, 4), W, None, torch.zeros(2, dtype=torch.long), "logit")
    with pytest.raises(ValueError, match="d_model"):
        answer_objective(torch.zeros(2, 5), W, None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="answers"):
        answer_objective(torch.zeros(2, 4), W, None, torch.zeros(3, dtype=torch.long))


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


def test_grouped_fast_path_uses_the_sweep_on_cpu_and_equals_reference(monkeypatch):
    """The blockwise paths on CPU go through the sweep (so the equality tests of test_attribution exercise
    it) and still equal the reference."""
    source = "native" if tl_major() < 4 else "hf"
    model = tiny_model("gpt2", source=source, dtype=torch.float64)
    calls = []
    real = grouped_mod.answer_objective_and_logits
    monkeypatch.setattr(grouped_mod, "answer_objective_and_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts, answers = ["alice was born in", "bob speaks"], ["paris", "french"]
    for objective in ("prob", "logprob"):
        ref = attribute_neurons(model, prompts, answers, steps=4, objective=objective, implementation="reference")
        fast = attribute_neurons(model, prompts, answers, steps=4, objective=objective)
        assert fast.path in ("blockwise", "kv-hooked") and calls
        assert float((fast.scores - ref.scores).abs().max() / ref.scores.abs().max()) <= 1e-9
        calls.clear()
