"""Causal tracing (ROME) as TL hooks.

Oracles: zero noise must give zero effect; restoring every corrupted state (or a whole residual layer) must
give back the clean probability; a hand-written implementation (plain ``run_with_hooks``, one sample per
forward, noise drawn with the documented recipe) for individual IE entries; literal token positions.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_identical, param_snapshot, registered_hooks

import qloc_tl.methods.tracing as tr
from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.methods.tracing import causal_trace, restore_states, subject_token_positions, trace_window
from qloc_tl.zoo.tiny import tiny_model

PROMPT = "the capital of france is the city of"
SUBJECT = "france"
ANSWER = " paris"


@pytest.fixture(scope="module", params=[("gpt2", "native"), ("llama", "hf")], ids=["gpt2-native", "llama-hf"])
def model(request):
    arch, source = request.param
    return tiny_model(arch, source=source)


def _noise(model, n_subj, samples, seed, nu):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_subj, model.cfg.d_model, generator=gen, dtype=torch.float64) * nu


def _manual_restored_prob(model, prompt, aid, subj, eps, states):
    """Mean P(answer) over samples, one forward per sample, hand-written noise and restore hooks."""
    toks = model.to_tokens(prompt)
    names = sorted({f"blocks.{layer}.{tr.KINDS[k]}" for k, layer, _ in states})
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    ps = []
    for s in range(eps.shape[0]):

        def noise(act, hook, s=s):
            act = act.clone()
            act[0, list(subj)] = act[0, list(subj)] + eps[s].to(act.dtype)
            return act

        hooks = [("hook_embed", noise)]
        for name in names:
            pos = [p for k, layer, p in states if f"blocks.{layer}.{tr.KINDS[k]}" == name]

            def restore(act, hook, name=name, pos=pos):
                act = act.clone()
                act[0, pos] = cache[name][0, pos]
                return act

            hooks.append((name, restore))
        with torch.no_grad():
            logits = model.run_with_hooks(toks, fwd_hooks=hooks)
        ps.append(float(logits[0, -1].double().softmax(-1)[aid]))
    return sum(ps) / len(ps)


def test_zero_noise_gives_zero_effect(model):
    res = causal_trace(model, PROMPT, ANSWER, subject=SUBJECT, noise_std=0.0, samples=2)
    assert res.te == pytest.approx(0.0, abs=1e-6)
    for kind, ie in res.ie.items():
        assert ie.shape == (3, 9)
        assert float(ie.abs().max()) < 1e-6, kind


def test_restoring_every_state_restores_clean_probability(model):
    res = causal_trace(model, PROMPT, ANSWER, subject=SUBJECT, kinds=("resid",), samples=3, noise_std=2.0)
    assert abs(res.te) > 1e-5  # the corruption does something (random toys are nearly flat)
    toks = model.to_tokens(PROMPT)
    P = toks.shape[1]
    eps = _noise(model, len(res.subject_positions), 3, res.seed, res.noise_std)
    whole_layers = [[("resid", layer, i) for i in range(P)] for layer in range(3)]
    p = restore_states(model, toks, res.answer_id, whole_layers, noise=eps, subject_positions=res.subject_positions)
    assert torch.allclose(p, torch.full_like(p, res.p_clean), atol=2e-6)
    # the subject is one token: restoring resid_pre[0] there restores every corrupted state
    (s,) = res.subject_positions
    assert float(res.p_restored["resid"][0, s]) == pytest.approx(res.p_clean, abs=2e-6)
    assert float(res.ie["resid"][0, s]) == pytest.approx(res.te, abs=2e-6)


@pytest.mark.parametrize("kind,layer,pos", [("mlp", 1, 4), ("attn", 2, 8), ("resid", 1, 4)])
def test_ie_entries_equal_hand_implementation(model, kind, layer, pos):
    res = causal_trace(model, PROMPT, ANSWER, subject=SUBJECT, kinds=(kind,), samples=3, window=3, seed=7)
    aid = answer_token_id(model, PROMPT, ANSWER)
    eps = _noise(model, 1, 3, 7, res.noise_std)
    base = _manual_restored_prob(model, PROMPT, aid, res.subject_positions, eps, [])
    assert res.p_corrupt == pytest.approx(base, abs=2e-6)
    states = [(kind, lay, pos) for lay in trace_window(layer, 3, 3)]
    want = _manual_restored_prob(model, PROMPT, aid, res.subject_positions, eps, states)
    assert float(res.p_restored[kind][layer, pos]) == pytest.approx(want, abs=2e-6)
    assert float(res.ie[kind][layer, pos]) == pytest.approx(want - base, abs=3e-6)


def test_default_noise_is_three_embedding_stds_and_seeded():
    m = tiny_model("gpt2")
    a = causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, kinds=("resid",), samples=2)
    assert a.noise_std == pytest.approx(3.0 * float(m.W_E.detach().double().std()))
    b = causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, kinds=("resid",), samples=2)
    c = causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, kinds=("resid",), samples=2, seed=2)
    assert torch.equal(a.ie["resid"], b.ie["resid"]) and a.p_corrupt == b.p_corrupt
    assert a.p_corrupt != c.p_corrupt
    df = a.to_dataframe()
    assert len(df) == 3 * 9 and df["subject"].sum() == 3


def test_corrupting_resid_pre0_with_zero_noise_is_also_clean():
    m = tiny_model("llama")
    res = causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, kinds=("mlp",), noise_std=0.0, samples=2,
                       corrupt_hook="blocks.0.hook_resid_pre")  # fmt: skip
    assert float(res.ie["mlp"].abs().max()) < 1e-6 and abs(res.te) < 1e-6


def test_subject_token_positions():
    m = tiny_model("gpt2")
    assert subject_token_positions(m, PROMPT, "capital of france") == (2, 3, 4)
    assert subject_token_positions(m, "alice was born in", "alice") == (1,)  # after BOS
    assert subject_token_positions(m, "alice was born in", "alice", prepend_bos=False) == (0,)
    with pytest.raises(InvalidInputError, match="does not occur"):
        subject_token_positions(m, PROMPT, "germany")
    with pytest.raises(InvalidInputError, match="subject"):
        causal_trace(m, PROMPT, ANSWER)


def test_window_rule_matches_rome():
    # ROME: range(max(0, l - w // 2), min(L, l - (-w // 2)))
    for L in (3, 12):
        for w in (1, 2, 3, 10):
            for layer in range(L):
                want = list(range(max(0, layer - w // 2), min(L, layer - (-w // 2))))
                assert list(trace_window(layer, w, L)) == want
    assert list(trace_window(5, 10, 12)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_tracing_leaves_model_unchanged_on_error(monkeypatch):
    m = tiny_model("gpt2")
    snap = param_snapshot(m)
    toks = m.to_tokens(PROMPT)
    with torch.no_grad():
        clean = m(toks)
    real = tr.answer_probability
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(tr, "answer_probability", boom)
    with pytest.raises(RuntimeError, match="injected"):
        causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, samples=2)
    assert registered_hooks(m) == 0
    assert_params_identical(m, snap)
    with torch.no_grad():
        assert torch.equal(m(toks), clean)


def test_validation():
    m = tiny_model("gpt2")
    with pytest.raises(InvalidInputError, match="kind"):
        causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, kinds=("mlp_in",))
    with pytest.raises(InvalidInputError, match="samples"):
        causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, samples=0)
    with pytest.raises(InvalidInputError, match="subject_positions"):
        causal_trace(m, PROMPT, ANSWER, subject_positions=[42])
    with pytest.raises(InvalidInputError, match="hook"):
        causal_trace(m, PROMPT, ANSWER, subject=SUBJECT, corrupt_hook="nope")
