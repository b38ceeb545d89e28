"""Knowledge editing (qloc_tl.core.edits, methods.cas / edit_metrics) against independent oracles, on every backend of the installed TL major.

Oracles used:
* weight edits: TL's own ``blocks[l].mlp.W_out`` accessor and full ``state_dict`` / parameter comparisons;
* erase ≡ zeroing the neuron's activation at every position (``scale_neurons(..., 0.0, positions=None)``);
* update ≡ adding ``post[..., i] · Δv_i`` to ``hook_mlp_out`` by a hand-written hook; the new row by hand;
* metrics: hand-made logits with hand-counted answers; PPL by an unbatched per-text loop;
* CAS: a naive numpy loop.

The editing runner end to end is in ``tests/integration/test_editing_runner.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_params_identical, param_snapshot

from qloc_tl import (
    CapabilityError,
    InvalidInputError,
    Neuron,
    run_with_interventions,
    scale_neurons,
)
from qloc_tl.core.edits import apply_erase, apply_update, erase, token_vector, update, value_rows
from qloc_tl.methods.cas import cas_scores, fact_neuron_sets, select_by_cas, select_cas
from qloc_tl.methods.edit_metrics import edit_metrics, last_token_logprobs, perplexity

TOKENS = torch.tensor([[0, 17, 9, 10, 25, 4]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run ~20x faster on one intra-op thread than on two busy shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NEURONS = [Neuron(0, 3), Neuron(2, 5), Neuron(2, 1), Neuron(1, 7)]


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


def _w_out(model):
    return {l: model.blocks[l].mlp.W_out.detach().clone() for l in range(model.cfg.n_layers)}


def _param_snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _n_changed(model, snap):
    return sum(int((p.detach() != snap[k]).sum()) for k, p in model.named_parameters())


# --------------------------------------------------------------------------------------------------
# weight edits: exact rows, exact restore
# --------------------------------------------------------------------------------------------------


def test_erase_changes_exactly_the_rows_and_restores(any_model):
    model = any_model
    snap_sd, snap_p, W0 = param_snapshot(model), _param_snapshot(model), _w_out(model)
    clean = _logits(model)
    with erase(model, NEURONS) as edit:
        W1 = _w_out(model)
        for l in range(model.cfg.n_layers):
            expected = W0[l].clone()
            for n in NEURONS:
                if n.layer == l:
                    expected[n.index] = 0.0
            assert torch.equal(W1[l], expected), f"W_out of layer {l} is not the expected erase"
        expected_changes = sum(int((W0[n.layer][n.index] != 0).sum()) for n in NEURONS)
        assert _n_changed(model, snap_p) == expected_changes  # nothing else in any parameter moved
        changed_keys = [k for k, v in model.state_dict().items() if not torch.equal(v, snap_sd[k])]
        assert 1 <= len(changed_keys) <= 3 and all(
            "mlp" in k or "W_out" in k or "out" in k for k in changed_keys
        )
        assert (_logits(model) - clean).abs().max() > 1e-6
        assert edit.active
    assert not edit.active
    assert_params_identical(model, snap_sd)
    assert torch.equal(_logits(model), clean)


def test_update_changes_exactly_the_rows_and_restores(any_model):
    model = any_model
    snap_sd, snap_p, W0 = param_snapshot(model), _param_snapshot(model), _w_out(model)
    clean = _logits(model)
    with update(model, NEURONS, 20, 21):
        W1 = _w_out(model)
        in_w_out = 0
        for l in W1:
            rows = [n.index for n in NEURONS if n.layer == l]
            other = [r for r in range(W1[l].shape[0]) if r not in rows]
            assert torch.equal(W1[l][other], W0[l][other]), f"an unedited row of layer {l} moved"
            assert all(not torch.equal(W1[l][r], W0[l][r]) for r in rows)
            in_w_out += int((W1[l] != W0[l]).sum())
        assert _n_changed(model, snap_p) == in_w_out > 0  # no other parameter element moved
        assert (_logits(model) - clean).abs().max() > 1e-6
    assert_params_identical(model, snap_sd)
    assert torch.equal(_logits(model), clean)


@pytest.mark.parametrize("kind", ["erase", "update"])
def test_restored_bit_exactly_on_exception(any_model, kind):
    model = any_model
    snap = param_snapshot(model)
    clean = _logits(model)
    ctx = erase(model, NEURONS) if kind == "erase" else update(model, NEURONS, 20, 21, rule="eleuther")
    with pytest.raises(RuntimeError, match="boom"), ctx:
        assert not torch.equal(_logits(model), clean)
        raise RuntimeError("boom")
    assert_params_identical(model, snap)
    assert torch.equal(_logits(model), clean)


def test_erase_equals_zeroing_the_activation_everywhere(any_model64):
    model = any_model64
    oracle = run_with_interventions(model, TOKENS, scale_neurons(NEURONS, 0.0, positions=None))
    with erase(model, NEURONS):
        edited = _logits(model)
    assert (edited - _logits(model)).abs().max() > 1e-6
    torch.testing.assert_close(edited, oracle, atol=1e-10, rtol=1e-9)


def test_update_row_matches_hand_computation(any_model64):
    model = any_model64
    n, o, t = Neuron(1, 7), 20, 21
    v = model.blocks[1].mlp.W_out[7].detach().clone()
    for embedding, E in (("unembed", lambda k: model.W_U[:, k]), ("embed", lambda k: model.W_E[k])):
        eo, en = E(o).detach().clone(), E(t).detach().clone()
        dai = v - 1.0 * (v.norm() / eo.norm()) * eo + 8.0 * (v.norm() / en.norm()) * en
        with update(model, [n], o, t, embedding=embedding):
            torch.testing.assert_close(model.blocks[1].mlp.W_out[7], dai, atol=1e-12, rtol=1e-12)
        with update(model, [n], o, t, embedding=embedding, rule="eleuther"):
            torch.testing.assert_close(
                model.blocks[1].mlp.W_out[7], v - 2 * eo + 2 * en, atol=1e-12, rtol=1e-12
            )
        with update(model, [n], o, t, embedding=embedding, lambda1=0.5, lambda2=3.0):
            exp = v - 0.5 * (v.norm() / eo.norm()) * eo + 3.0 * (v.norm() / en.norm()) * en
            torch.testing.assert_close(model.blocks[1].mlp.W_out[7], exp, atol=1e-12, rtol=1e-12)


def test_update_effect_equals_hand_hook_on_mlp_out(any_model64):
    """Oracle: the forward pass with Δv added through a hook on hook_mlp_out (post[..., i] · Δv_i)."""
    model = any_model64
    neurons = [Neuron(1, 7), Neuron(1, 2)]
    with update(model, neurons, 20, 21) as edit:
        edited = _logits(model)
        delta = (edit.new_rows - edit.old_rows).detach()
    store = {}

    def rec(act, hook):
        store["post"] = act
        return act

    def add(act, hook):
        return act + store["post"][..., [7]] * delta[0] + store["post"][..., [2]] * delta[1]

    with torch.no_grad():
        oracle = model.run_with_hooks(
            TOKENS, fwd_hooks=[("blocks.1.mlp.hook_post", rec), ("blocks.1.hook_mlp_out", add)]
        )
    assert (oracle - _logits(model)).abs().max() > 1e-6
    torch.testing.assert_close(edited, oracle, atol=1e-10, rtol=1e-9)


def test_string_and_multi_token_targets(gpt2_model):
    model = gpt2_model
    paris, rome = model.to_single_token("paris"), model.to_single_token("rome")
    with update(model, [Neuron(0, 1)], "paris", "rome") as a:
        rows_a = a.new_rows.clone()
    with update(model, [Neuron(0, 1)], paris, rome) as b:
        torch.testing.assert_close(b.new_rows, rows_a, atol=0, rtol=0)
    e = token_vector(model, [paris, rome])
    torch.testing.assert_close(e, (model.W_U[:, paris] + model.W_U[:, rome]).double())
    with pytest.raises(InvalidInputError, match="vocabulary|unknown"):
        token_vector(model, "zebra")


def test_permanent_apply_and_undo(gpt2_model):
    model = gpt2_model
    snap, clean = param_snapshot(model), _logits(model)
    edit = apply_erase(model, NEURONS)
    assert (_logits(model) - clean).abs().max() > 1e-6  # stays after the call
    assert edit.undo() is True
    assert edit.undo() is False  # idempotent
    assert_params_identical(model, snap)
    edit2 = apply_update(model, NEURONS, 20, 21)
    with edit2:
        pass
    assert not edit2.active
    assert_params_identical(model, snap)


def test_nested_edits_restore_in_order(gpt2_model):
    model = gpt2_model
    snap = param_snapshot(model)
    with update(model, NEURONS[:2], 20, 21):
        mid = param_snapshot(model)
        with erase(model, NEURONS[1:]):
            pass
        assert_params_identical(model, mid)
    assert_params_identical(model, snap)


def test_value_rows_and_erase_vector(gpt2_model):
    model = gpt2_model
    vec = torch.linspace(-1, 1, model.cfg.d_model)
    with erase(model, [Neuron(2, 5), Neuron(0, 1)], value=vec):
        rows = value_rows(model, [Neuron(2, 5), Neuron(0, 1)])
        torch.testing.assert_close(rows, torch.stack([vec, vec]))
        torch.testing.assert_close(model.blocks[2].mlp.W_out[5], vec)


def test_edit_that_does_not_reach_the_forward_pass_is_refused(gpt2_model):
    model = gpt2_model
    snap = param_snapshot(model)
    # a persistent hook that overwrites mlp_out: the edited row can no longer change the forward pass
    zero_out = [("blocks.1.hook_mlp_out", lambda act, hook: torch.zeros_like(act))]
    with model.hooks(fwd_hooks=zero_out), pytest.raises(CapabilityError, match="did not take effect"):
        apply_erase(model, [Neuron(1, 4)])
    assert_params_identical(model, snap)  # and the failed edit was undone
    apply_erase(model, [Neuron(1, 4)], verify=False).undo()
    assert_params_identical(model, snap)


def test_edit_validation(gpt2_model):
    model = gpt2_model
    with pytest.raises(InvalidInputError, match="out of range"):
        apply_erase(model, [Neuron(0, 10_000)])
    with pytest.raises(InvalidInputError, match="listed twice"):
        apply_erase(model, [Neuron(0, 1), Neuron(0, 1)])
    with pytest.raises(InvalidInputError, match="erase value"):
        apply_erase(model, [Neuron(0, 1)], value="unk")
    with pytest.raises(InvalidInputError, match="shape"):
        apply_erase(model, [Neuron(0, 1)], value=torch.zeros(5))
    with pytest.raises(InvalidInputError, match="rule"):
        apply_update(model, [Neuron(0, 1)], 3, 4, rule="rome")
    with pytest.raises(InvalidInputError, match="embedding"):
        apply_update(model, [Neuron(0, 1)], 3, 4, embedding="wpe")
    with pytest.raises(InvalidInputError, match="out of range"):
        apply_update(model, [Neuron(0, 1)], 3, 10_000)
    with pytest.raises(InvalidInputError, match="empty"):
        apply_erase(model, [])


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def _onehot(rows, V=5, hi=4.0):
    out = torch.zeros(len(rows), V)
    for r, t in enumerate(rows):
        out[r, t] = hi
    return out


def test_erase_metrics_by_hand():
    o = 1
    eb, ea = _onehot([1])[0], _onehot([3])[0]
    nb = _onehot([1, 1, 2, 1])  # neighbor 2 never predicted o: excluded from Gen
    na = _onehot([0, 1, 0, 4])  # successes on the counted neighbors: yes, no, yes -> 2/3
    ub = _onehot([0, 2, 3, 4])
    ua = _onehot([0, 2, 1, 1])  # 2 of 4 unchanged
    m = edit_metrics("erase", edited_before=eb, edited_after=ea, neighbors_before=nb, neighbors_after=na,
                     unrelated_before=ub, unrelated_after=ua, old_token=o, ppl_before=10.0, ppl_after=12.5)  # fmt: skip
    assert m.reliability == 1.0
    assert m.generalization == pytest.approx(2 / 3)
    assert m.n_neighbors == 3
    assert m.locality == 0.5
    assert m.avg == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert m.ppl_delta == pytest.approx(2.5) and m.ppl_rel_delta == pytest.approx(0.25)
    p_hi = math.exp(4) / (math.exp(4) + 4)  # softmax of a one-hot 4.0 over 5 tokens
    p_lo = 1 / (math.exp(4) + 4)
    assert m.dprob_old_edited == pytest.approx(p_lo - p_hi)
    assert math.isnan(m.dprob_new_edited)
    # no neighbor knew o: Gen is nan; no unrelated queries: Loc is nan
    m2 = edit_metrics("erase", edited_before=eb, edited_after=eb, neighbors_before=_onehot([2]), neighbors_after=_onehot([2]),
                      unrelated_before=None, unrelated_after=None, old_token=o)  # fmt: skip
    assert m2.reliability == 0.0 and math.isnan(m2.generalization) and math.isnan(m2.locality)


def test_update_metrics_by_hand():
    o, t = 1, 3
    m = edit_metrics("update", edited_before=_onehot([1])[0], edited_after=_onehot([3])[0],
                     neighbors_before=_onehot([1, 2, 1]), neighbors_after=_onehot([3, 3, 1]),
                     unrelated_before=_onehot([0, 2]), unrelated_after=_onehot([0, 2]), old_token=o, new_token=t)  # fmt: skip
    assert (m.reliability, m.generalization, m.locality, m.n_neighbors) == (1.0, pytest.approx(2 / 3), 1.0, 3)
    p_hi, p_lo = math.exp(4) / (math.exp(4) + 4), 1 / (math.exp(4) + 4)
    assert m.dprob_new_edited == pytest.approx(p_hi - p_lo)
    assert m.dprob_new_neighbors == pytest.approx(2 / 3 * (p_hi - p_lo))
    with pytest.raises(InvalidInputError, match="new_token"):
        edit_metrics("update", edited_before=_onehot([1])[0], edited_after=_onehot([1])[0], neighbors_before=None,
                     neighbors_after=None, unrelated_before=None, unrelated_after=None, old_token=o)  # fmt: skip


def test_perplexity_matches_unbatched_loop(any_model):
    model = any_model
    texts = ["alice was born in paris", "the cat", "bob speaks french and english to carol"]
    nll, count = 0.0, 0
    for text in texts:
        toks = model.to_tokens(text)
        with torch.no_grad():
            lp = model(toks)[0].double().log_softmax(-1)
        for p in range(toks.shape[1] - 1):
            nll -= float(lp[p, toks[0, p + 1]])
            count += 1
    assert perplexity(model, texts, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_last_token_logprobs_matches_single_runs(gpt2_model):
    model = gpt2_model
    prompts = ["alice was born in", "the capital of france is the city of"]
    lp = last_token_logprobs(model, prompts)
    for i, p in enumerate(prompts):
        ref = _logits(model, model.to_tokens(p))[0, -1].float().log_softmax(-1)
        torch.testing.assert_close(lp[i], ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# CAS
# --------------------------------------------------------------------------------------------------


def _naive_cas(s, beta1, beta2, spread, normalize):
    k, L, D = s.shape
    s = s.astype(np.float64).copy()
    if normalize == "max":
        for j in range(k):
            mx = s[j].max()
            if mx <= 0:
                mx = np.abs(s[j]).max()
            if mx > 0:
                s[j] = s[j] / mx
    out = np.zeros((L, D))
    for l in range(L):
        for i in range(D):
            vals = [s[j, l, i] for j in range(k)]
            mu = sum(vals) / k
            var = sum((v - mu) ** 2 for v in vals) / k
            out[l, i] = beta1 * mu - beta2 * (math.sqrt(var) if spread == "std" else var)
    return out


@pytest.mark.parametrize(
    "beta1,beta2,spread,normalize",
    [(1.0, 1.0, "std", "max"), (2.0, 0.5, "var", "max"), (1.0, 3.0, "std", "none"), (1.0, 0.0, "std", "max")],
)
def test_cas_equals_naive_numpy(beta1, beta2, spread, normalize):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 3, 10, generator=g) * torch.tensor([1.0, 5.0, 0.2, 2.0]).view(4, 1, 1)
    s[2] = -s[2].abs()  # a query with no positive score
    ours = cas_scores(s, beta1=beta1, beta2=beta2, spread=spread, normalize=normalize).numpy()
    np.testing.assert_allclose(
        ours, _naive_cas(s.numpy(), beta1, beta2, spread, normalize), rtol=1e-12, atol=1e-12
    )
    # selection: fraction of max among positive CAS, and top-k of the positive ones
    naive = _naive_cas(s.numpy(), beta1, beta2, spread, normalize)
    mx = naive.max()
    want = (
        {(l, i) for l in range(3) for i in range(10) if naive[l, i] > 0 and naive[l, i] >= 0.2 * mx}
        if mx > 0
        else set()
    )
    got = select_cas(s, beta1=beta1, beta2=beta2, spread=spread, normalize=normalize)
    assert {(n.layer, n.index) for n in got} == want
    order = sorted(
        ((naive[l, i], l, i) for l in range(3) for i in range(10) if naive[l, i] > 0), reverse=True
    )[:3]
    got_k = select_cas(
        s, beta1=beta1, beta2=beta2, spread=spread, normalize=normalize, method="topk", value=3
    )
    assert {(n.layer, n.index) for n in got_k} == {(l, i) for _, l, i in order}


def test_cas_never_selects_non_positive():
    assert len(select_by_cas(-torch.rand(2, 5))) == 0
    assert len(select_by_cas(torch.zeros(2, 5), method="topk", value=3)) == 0
    with pytest.raises(InvalidInputError, match="k_queries"):
        cas_scores(torch.zeros(3, 4))


def test_fact_neuron_sets_by_construction():
    s = torch.zeros(3, 2, 6)
    s[0, 0, 1], s[1, 0, 1], s[2, 0, 1] = 1.0, 1.0, 1.0  # shared by all queries
    s[0, 1, 4] = 0.9  # only query 0
    s[1, 1, 5] = 0.8  # only query 1
    sets, per_query = fact_neuron_sets(s, 0)
    assert set(sets["N_i"]) == {Neuron(0, 1), Neuron(1, 4)}
    assert set(sets["N_u"]) == {Neuron(0, 1), Neuron(1, 4), Neuron(1, 5)}
    assert set(sets["CAS"]) == {Neuron(0, 1)}  # CAS 1 (mean 1, var 0); L1N4 0.3-0.18=0.12 < 0.2·max
    # top-|N_i| = 2 by CAS (variance, the default): L0N1 1.0, then L1N5 0.267-0.142=0.124 > L1N4 0.12
    assert set(sets["CAS_k"]) == {Neuron(0, 1), Neuron(1, 5)}
    std_sets, _ = fact_neuron_sets(s, 0, spread="std")  # std penalises harder: 0.3-0.42 < 0, only L0N1 > 0
    assert set(std_sets["CAS_k"]) == {Neuron(0, 1)}
    s[:, 0, 2] = 0.5  # a second consistent neuron (CAS 0.5) that also joins N_i, so |N_i| = 3
    assert set(fact_neuron_sets(s, 0)[0]["CAS_k"]) == {Neuron(0, 1), Neuron(0, 2), Neuron(1, 5)}
    assert set(fact_neuron_sets(s, 0, spread="std")[0]["CAS_k"]) == {Neuron(0, 1), Neuron(0, 2)}
    assert [len(q) for q in per_query] == [2, 2, 1]


