"""Hook factories against independent oracles, on every backend of the installed TL major."""

from __future__ import annotations

import pytest
import torch
from conftest import TL_MAJOR, assert_params_identical, param_snapshot, registered_hooks

from qloc_tl import (
    CapabilityError,
    Head,
    HookNotFiredError,
    InvalidInputError,
    Neuron,
    UnsupportedModelError,
    capabilities,
    intervene,
    record_neurons,
    run_with_interventions,
    scale_attention,
    scale_neurons,
    set_neurons,
)
from qloc_tl.zoo.tiny import tiny_model

TOKENS = torch.tensor([[3, 17, 9, 10, 25, 4]])


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


def test_suppress_equals_zeroing_wout_row_single_token(any_model64):
    model = any_model64
    tok = torch.tensor([[11]])
    layer, idx = 1, 7
    hooked = run_with_interventions(model, tok, scale_neurons([Neuron(layer, idx)], 0.0))
    W = model.blocks[layer].mlp.W_out  # [d_mlp, d_model]; shares storage with the weight used in forward
    saved = W[idx].detach().clone()
    try:
        with torch.no_grad():
            W[idx] = 0.0
            oracle = model(tok)
    finally:
        with torch.no_grad():
            W[idx] = saved
    assert (oracle - _logits(model, tok)).abs().max() > 1e-6, "oracle edit had no effect"
    torch.testing.assert_close(hooked, oracle, atol=1e-10, rtol=1e-9)


def test_scaling_pattern_by_one_is_noop(any_model):
    model = any_model
    clean = _logits(model)
    heads = [Head(0, 1), Head(2, 3)]
    out = run_with_interventions(model, TOKENS, scale_attention(heads, 1.0, query_positions=None))
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-6)


def test_enhance_matches_hand_built_hook(any_model):
    model = any_model
    neurons = [Neuron(0, 3), Neuron(2, 5), Neuron(2, 1)]
    ours = run_with_interventions(model, TOKENS, scale_neurons(neurons, 2.0))

    def hand(layer, idx):
        def fn(act, hook):
            out = act.clone()
            out[:, -1, idx] = out[:, -1, idx] * 2.0
            return out

        return fn

    with torch.no_grad():
        ref = model.run_with_hooks(
            TOKENS,
            fwd_hooks=[("blocks.0.mlp.hook_post", hand(0, [3])), ("blocks.2.mlp.hook_post", hand(2, [5, 1]))],
        )
    assert (ref - _logits(model)).abs().max() > 1e-6
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_set_neurons_writes_values(gpt2_model):
    model = gpt2_model
    store: dict[int, torch.Tensor] = {}
    vals = torch.tensor([0.25, -1.5])
    hooks = set_neurons([Neuron(1, 4), Neuron(1, 9)], vals, positions=[1, -1]) + record_neurons([1], store)
    with intervene(model, hooks):
        model(TOKENS)
    post = store[1][0]
    torch.testing.assert_close(post[1, [4, 9]], vals)
    torch.testing.assert_close(post[-1, [4, 9]], vals)
    assert not torch.allclose(post[2, [4, 9]], vals)


def _logprob(model, hooks, target=7):
    with intervene(model, hooks):
        return model(TOKENS).log_softmax(-1)[0, -1, target]


@pytest.mark.parametrize("kind", ["neuron", "attention"])
def test_factor_gradient_matches_finite_difference(kind):
    model = tiny_model("gpt2", dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)

    def make(f):
        if kind == "neuron":
            return scale_neurons([Neuron(1, 2), Neuron(1, 30), Neuron(2, 7)], f)
        return scale_attention([Head(1, 0), Head(1, 2)], f, key_positions=[0, 2])

    factor = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_logprob(model, make(factor)), factor)
    eps = 1e-5
    with torch.no_grad():
        fd = (_logprob(model, make(0.7 + eps)) - _logprob(model, make(0.7 - eps))) / (2 * eps)
    assert abs(float(fd)) > 1e-6
    assert abs(float(grad) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_hooks_removed_and_params_untouched_on_exception(any_model):
    model = any_model
    clean = _logits(model)
    snap = param_snapshot(model)
    hooks = scale_neurons([Neuron(1, 3)], 0.0) + scale_attention([Head(0, 0)], 0.0)
    with pytest.raises(RuntimeError, match="boom"), intervene(model, hooks):
        model(TOKENS)
        raise RuntimeError("boom")
    assert registered_hooks(model) == 0
    assert_params_identical(model, snap)
    torch.testing.assert_close(_logits(model), clean, atol=0, rtol=0)


def test_exception_inside_hook_leaves_no_hooks(gpt2_model):
    model = gpt2_model
    clean = _logits(model)
    with pytest.raises(InvalidInputError, match="out of range"), intervene(
        model, scale_neurons([Neuron(0, 1)], 0.0, positions=[40])
    ):
        model(TOKENS)
    assert registered_hooks(model) == 0
    torch.testing.assert_close(_logits(model), clean, atol=0, rtol=0)


def test_hook_that_never_fired_is_an_error(gpt2_model):
    model = gpt2_model
    with pytest.raises(HookNotFiredError), intervene(model, scale_neurons([Neuron(2, 1)], 0.0)):
        pass
    with pytest.raises(HookNotFiredError, match="blocks.2"), intervene(model, scale_neurons([Neuron(2, 1)], 0.0)):
        model(TOKENS, stop_at_layer=1)
    assert registered_hooks(model) == 0


def test_hooks_do_not_mutate_their_input():
    (name, fn), = scale_neurons([Neuron(0, 1)], 0.0, positions=None)
    act = torch.randn(2, 4, 8)
    before = act.clone()
    out = fn(act, None)
    assert torch.equal(act, before)
    assert torch.all(out[..., 1] == 0) and torch.equal(out[..., 0], act[..., 0])
    (name, afn), = scale_attention([Head(0, 1)], 0.0, query_positions=None)
    pat = torch.rand(1, 2, 3, 3)
    pbefore = pat.clone()
    afn(pat, None)
    assert torch.equal(pat, pbefore)


def test_row_positions_match_single_prompt_runs(gpt2_model):
    model = gpt2_model
    rows = [torch.tensor([3, 17, 9, 10]), torch.tensor([5, 6, 7, 8, 12, 13])]
    batch = torch.full((2, 6), 2)
    batch[0, :4] = rows[0]
    batch[1] = rows[1]
    last = torch.tensor([3, 5])
    neurons = [Neuron(0, 3), Neuron(1, 8)]
    out = run_with_interventions(model, batch, scale_neurons(neurons, 0.0, row_positions=last))
    for i, r in enumerate(rows):
        single = run_with_interventions(model, r.unsqueeze(0), scale_neurons(neurons, 0.0))
        torch.testing.assert_close(out[i, last[i]], single[0, -1], atol=1e-5, rtol=1e-5)


def test_scores_scaled_by_zero_keep_future_masked(llama_hf_model):
    model = llama_hf_model
    if not capabilities(model).scores_editable:
        pytest.skip("backend ignores score edits")
    seen = {}

    def grab(act, hook):
        seen["pattern"] = act.detach()
        return act

    hooks = scale_attention([Head(1, 0)], 0.0, query_positions=None, target="scores")
    with intervene(model, list(hooks) + [("blocks.1.attn.hook_pattern", grab)]):
        out = model(TOKENS)
    assert torch.isfinite(out).all()
    pat = seen["pattern"][0, 0]
    upper = torch.triu(torch.ones_like(pat, dtype=torch.bool), diagonal=1)
    assert torch.all(pat[upper] == 0), "future positions became visible"
    # scores all 0 on causal entries -> uniform attention over the visible prefix
    q = pat.shape[0]
    expected = torch.tril(torch.ones(q, q)) / torch.arange(1, q + 1).unsqueeze(1)
    torch.testing.assert_close(pat, expected.to(pat.dtype), atol=1e-6, rtol=1e-5)


def test_renormalized_pattern_edit_matches_hand_computation(gpt2_model):
    model = gpt2_model
    before, after = {}, {}

    def grab(store):
        def fn(act, hook):
            store["p"] = act.detach().clone()
            return act

        return fn

    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_pattern", grab(before))])
    hooks = scale_attention([Head(1, 2)], 0.0, key_positions=[0], renormalize=True)
    with intervene(model, list(hooks) + [("blocks.1.attn.hook_pattern", grab(after))]):
        model(TOKENS)
    row = before["p"][0, 2, -1].clone()
    row[0] = 0
    row = row / row.sum()
    torch.testing.assert_close(after["p"][0, 2, -1], row, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(after["p"][0, 2, :-1], before["p"][0, 2, :-1])
    torch.testing.assert_close(after["p"][0, 1], before["p"][0, 1])


@pytest.mark.skipif(TL_MAJOR < 4, reason="TL 4 boot_native is the backend that discards score edits")
def test_attention_edit_refused_where_backend_ignores_it():
    model = tiny_model("llama", source="native")
    assert not capabilities(model).scores_editable
    with pytest.raises(CapabilityError, match="hook_attn_scores"), intervene(
        model, scale_attention([Head(0, 0)], 0.0, target="scores")
    ):
        model(TOKENS)
    assert registered_hooks(model) == 0


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda m: scale_neurons([Neuron(5, 0)], 0.0), InvalidInputError, "no hook point"),
        (lambda m: scale_neurons([Neuron(0, 10_000)], 0.0), InvalidInputError, "out of range"),
        (lambda m: scale_neurons([Neuron(0, 1)], 0.0, site="postt"), InvalidInputError, "unknown neuron site"),
        (lambda m: scale_neurons([], 0.0), InvalidInputError, "empty neuron list"),
        (lambda m: scale_neurons([Neuron(0, 1)], "2"), InvalidInputError, "factor must be a number"),
        (lambda m: scale_attention([Head(0, 9)], 0.0), InvalidInputError, "head index"),
        (lambda m: scale_attention([], 0.0), InvalidInputError, "empty head list"),
        (lambda m: scale_attention([Head(0, 0)], 0.0, target="values"), InvalidInputError, "target must be"),
        (lambda m: scale_neurons([Neuron(0, 1)], 0.0, site="pre_linear"), InvalidInputError, "no hook"),
    ],
)
def test_bad_input_gives_clear_errors(gpt2_model, make, exc, match):
    with pytest.raises(exc, match=match):
        hooks = make(gpt2_model)
        with intervene(gpt2_model, hooks):
            gpt2_model(TOKENS)
    assert registered_hooks(gpt2_model) == 0


def test_factory_validates_against_model_when_given(gpt2_model):
    with pytest.raises(InvalidInputError, match="out of range"):
        scale_neurons([Neuron(0, 500)], 0.0, model=gpt2_model)
    with pytest.raises(InvalidInputError, match="layer"):
        scale_attention([Head(7, 0)], 0.0, model=gpt2_model)


def test_non_tl_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="TransformerLens"), intervene(
        torch.nn.Linear(3, 3), scale_neurons([Neuron(0, 0)], 0.0)
    ):
        pass
    with pytest.raises(TypeError):
        capabilities(torch.nn.Linear(3, 3))


def test_identities_are_frozen_hashable_ordered():
    a, b = Neuron(1, 2), Neuron(0, 5)
    assert sorted([a, b]) == [b, a]
    assert len({a, Neuron(1, 2)}) == 1
    with pytest.raises(AttributeError):
        a.layer = 3  # type: ignore[misc]
    assert Head(2, 1) < Head(2, 3) and str(Head(2, 1)) == "L2H1"
    with pytest.raises(ValueError):
        Neuron(-1, 0)
    with pytest.raises(ValueError):
        Neuron(0, 1.5)  # type: ignore[arg-type]
