"""Knowledge editing (qloc_tl.core.edits, methods.cas / edit_metrics, experiments.editing) against independent oracles, on every backend of the installed TL major.

Oracles used:
* weight edits: TL's own ``blocks[l].mlp.W_out`` accessor and full ``state_dict`` / parameter comparisons;
* erase ≡ zeroing the neuron's activation at every position (``scale_neurons(..., 0.0, positions=None)``);
* update ≡ adding ``post[..., i] · Δv_i`` to ``hook_mlp_out`` by a hand-written hook; the new row by hand;
* metrics: hand-made logits with hand-counted answers; PPL by an unbatched per-text loop;
* CAS: a naive numpy loop.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_params_identical, param_snapshot

from qloc_tl import (
    CapabilityError,
    Fact,
    InvalidInputError,
    Neuron,
    ResumeMismatchError,
    run_with_interventions,
    scale_neurons,
)
from qloc_tl.core.edits import apply_erase, apply_update, erase, token_vector, update, value_rows
from qloc_tl.experiments.editing import (
    EditingConfig,
    EditingResult,
    fact_attributions,
    kn_sets_from_attributions,
    run_editing_experiment,
)
from qloc_tl.methods.cas import cas_scores, fact_neuron_sets, select_by_cas, select_cas
from qloc_tl.methods.consistency_score import classify_facts
from qloc_tl.methods.edit_metrics import edit_metrics, last_token_logprobs, perplexity
from qloc_tl.reporting.claims import editing_claims
from qloc_tl.reporting.editing_plots import plot_editing
from qloc_tl.zoo.tiny import tiny_model

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


# --------------------------------------------------------------------------------------------------
# runner on a tiny model with hand-made facts
# --------------------------------------------------------------------------------------------------

CAPITALS = [
    ("france", "paris"),
    ("england", "london"),
    ("italy", "rome"),
    ("germany", "berlin"),
    ("spain", "madrid"),
]
LANGS = [
    ("alice", "french"),
    ("bob", "english"),
    ("carol", "italian"),
    ("dave", "german"),
    ("eve", "spanish"),
]


def _facts():
    facts = [Fact(c, "P36", o, [f"the capital of {c} is", f"{c} capital city is the city of", f"the capital city of {c} is"])
             for c, o in CAPITALS]  # fmt: skip
    facts += [
        Fact(p, "P37", o, [f"{p} speaks", f"the language of {p} is", f"{p} speaks the language"])
        for p, o in LANGS
    ]
    return facts


def _attributions(model, facts, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, D = model.cfg.n_layers, model.cfg.d_mlp
    out = {}
    for n, f in enumerate(facts):
        s = torch.rand(len(f.queries), L, D, generator=g) * 0.1
        s[:, 1, n] = 1.0  # a shared neuron per fact
        if n % 2:  # odd facts: per-query neurons only -> inconsistent
            s[:, 1, n] = 0.0
            for j in range(len(f.queries)):
                s[j, 2, 10 * j + n] = 1.0
        out[f.key] = s
    return out


def _small_cfg(**kw):
    base = dict(require_known=False, n_unrelated=4, chunk_size=3, seed=1)
    base.update(kw)
    return EditingConfig(**base)


def test_runner_rows_match_direct_recomputation(gpt2_model, tmp_path):
    model = gpt2_model
    facts = _facts()
    attrs = _attributions(model, facts)
    texts = ["alice was born in paris", "bob plays the guitar", "the river is blue"]
    res = run_editing_experiment(
        model, facts, config=_small_cfg(), attributions=attrs, ppl_texts=texts, out_dir=tmp_path, known_only=False
    )
    assert isinstance(res, EditingResult)
    assert (
        len(res.rows) == len(facts) * 3 * 2
        and res.rows.groupby(["fact_key", "method", "edit"]).size().max() == 1
    )
    # class split = consistency_score of the per-query sets vs 0.3 (independent: select by hand here)
    from qloc_tl.methods.consistency_score import consistency_score

    for f in facts:
        s = attrs[f.key]
        per_q = [
            {Neuron(int(l), int(i)) for l, i in (s[j] >= 0.2 * s[j].max()).nonzero().tolist()}
            for j in range(len(s))
        ]
        cls = "K_C" if consistency_score(per_q) >= 0.3 else "K_I"
        assert set(res.rows[res.rows.fact_key == f.key]["class"]) == {cls}
    assert set(res.rows["class"]) == {"K_C", "K_I"}
    # recompute one erase row and one update row with raw W_out edits and plain forwards
    for edit in ("erase", "update"):
        row = res.rows[(res.rows.method == "N_u") & (res.rows.edit == edit)].iloc[0]
        fact = next(f for f in facts if f.key == row.fact_key)
        s = attrs[fact.key]
        neurons = sorted(
            {
                (int(l), int(i))
                for j in range(len(s))
                for l, i in (s[j] >= 0.2 * s[j].max()).nonzero().tolist()
            }
        )
        assert row.n_neurons == len(neurons)
        prompts = list(fact.prompts)
        i = prompts.index(row.edited_query)
        o = int(row.old_token)
        before = [int(_logits(model, model.to_tokens(p))[0, -1].argmax()) for p in prompts]
        assert before[i] == o
        saved = {l: model.blocks[l].mlp.W_out.detach().clone() for l in range(3)}
        try:
            with torch.no_grad():
                for l, idx in neurons:
                    W = model.blocks[l].mlp.W_out
                    if edit == "erase":
                        W[idx] = 0.0
                    else:
                        v = saved[l][idx]
                        eo, en = model.W_U[:, o], model.W_U[:, int(row.new_token)]
                        W[idx] = v - (v.norm() / eo.norm()) * eo + 8 * (v.norm() / en.norm()) * en
                after = [int(_logits(model, model.to_tokens(p))[0, -1].argmax()) for p in prompts]
                nll, cnt = 0.0, 0
                for t in texts:
                    toks = model.to_tokens(t)
                    lp = model(toks)[0].double().log_softmax(-1)
                    nll -= float(sum(lp[p, toks[0, p + 1]] for p in range(toks.shape[1] - 1)))
                    cnt += toks.shape[1] - 1
        finally:
            with torch.no_grad():
                for l, W in saved.items():
                    model.blocks[l].mlp.W_out[:] = W
        nb = [j for j in range(len(prompts)) if j != i]
        if edit == "erase":
            assert row.rel == float(after[i] != o)
            counted = [j for j in nb if before[j] == o]
            gen = np.mean([after[j] != o for j in counted]) if counted else math.nan
        else:
            assert row.rel == float(after[i] == int(row.new_token))
            gen = np.mean([after[j] == int(row.new_token) for j in nb])
        assert (math.isnan(gen) and math.isnan(row.gen)) or row.gen == pytest.approx(gen)
        assert row.ppl_after == pytest.approx(math.exp(nll / cnt), rel=1e-5)
        if edit == "update":
            assert row.new_object in {o for _, o in CAPITALS + LANGS} and row.new_object != fact.object
    # table = means of the rows
    t = res.table
    sel = res.rows[(res.rows.edit == "erase") & (res.rows["class"] == "K_C") & (res.rows.method == "CAS")]
    trow = t[(t.edit == "erase") & (t["class"] == "K_C") & (t.method == "CAS")].iloc[0]
    assert trow["n_facts"] == len(sel) and trow["loc"] == pytest.approx(sel["loc"].mean())
    assert trow["avg"] == pytest.approx((trow["rel"] + trow["gen"] + trow["loc"]) / 3, nan_ok=True)
    assert (tmp_path / "editing_table.csv").is_file() and (tmp_path / "editing_rows.parquet").is_file()
    # the model is untouched after the run
    assert torch.equal(_logits(model), _logits(tiny_model()))


def test_runner_resume_no_duplicates_and_mismatch(gpt2_model, tmp_path):
    model = gpt2_model
    facts = _facts()
    attrs = _attributions(model, facts)
    cfg = _small_cfg(methods=("N_i", "CAS"), edits=("erase",))
    kw = dict(config=cfg, attributions=attrs, unrelated_facts=facts)
    first = run_editing_experiment(model, facts[:4], out_dir=tmp_path, **kw, known_only=False)
    full = run_editing_experiment(model, facts, out_dir=tmp_path, **kw, known_only=False)
    again = run_editing_experiment(model, facts, out_dir=tmp_path, **kw, known_only=False)
    assert len(full.rows) == len(facts) * 2 and full.rows.groupby(["fact_key", "method"]).size().max() == 1
    key = ["fact_key", "method", "edit"]
    pd.testing.assert_frame_equal(
        full.rows.sort_values(key).reset_index(drop=True), again.rows.sort_values(key).reset_index(drop=True)
    )
    fresh = run_editing_experiment(model, facts, **kw, known_only=False)  # no store: the same numbers
    pd.testing.assert_frame_equal(
        full.rows.sort_values(key).reset_index(drop=True), fresh.rows.sort_values(key).reset_index(drop=True)
    )
    assert set(first.rows.fact_key) <= set(full.rows.fact_key)
    with pytest.raises(ResumeMismatchError):
        run_editing_experiment(model, facts, config=_small_cfg(seed=2), attributions=attrs, unrelated_facts=facts,
                               out_dir=tmp_path, known_only=False)  # fmt: skip


def test_runner_given_classes_max_per_class_and_skips(gpt2_model):
    model = gpt2_model
    facts = _facts() + [Fact("alice", "P37", "zebra", ["alice speaks", "alice speaks the language"]),
                        Fact("bob", "P37", "french", ["bob speaks"])]  # fmt: skip
    attrs = _attributions(model, facts)
    classes = {f.key: ("K_C" if n < 6 else "K_I") for n, f in enumerate(facts)}
    cfg = _small_cfg(max_facts_per_class=2, edits=("erase",))
    res = run_editing_experiment(model, facts, config=cfg, attributions=attrs, classes=classes, known_only=False)
    counts = res.rows.drop_duplicates("fact_key")["class"].value_counts().to_dict()
    assert counts == {"K_C": 2, "K_I": 2}
    for f in facts:
        if f.key in set(res.rows.fact_key):
            assert set(res.rows[res.rows.fact_key == f.key]["class"]) == {classes[f.key]}
    reasons = dict(zip(res.skipped.fact_key, res.skipped.reason))
    assert reasons.get(facts[-2].key) in (None, "object_not_single_token")
    assert all(r in {"class_full", "object_not_single_token", "too_few_queries"} for r in reasons.values())


def test_runner_with_attribute_neurons(gpt2_model):
    pytest.importorskip("qloc_tl.methods.attribution")
    model = gpt2_model
    facts = _facts()[:2] + _facts()[5:7]
    cfg = _small_cfg(steps=3, edits=("update",), methods=("N_i", "CAS"))
    res = run_editing_experiment(model, facts, config=cfg, known_only=False)
    assert len(res.rows) + len(res.skipped) >= len(facts)
    assert (res.rows["n_neurons"] >= 0).all()


def test_classify_facts_matches_consistency_split(gpt2_model):
    from qloc_tl.methods.attribution.selection import otsu_threshold
    from qloc_tl.methods.consistency_score import consistency_score

    facts = _facts()
    attrs = _attributions(gpt2_model, facts)
    cs = []
    for f in facts:
        s = attrs[f.key]
        sets = [
            {Neuron(int(l), int(i)) for l, i in (s[j] >= 0.2 * s[j].max()).nonzero().tolist()}
            for j in range(len(s))
        ]
        cs.append(consistency_score(sets))
    static = classify_facts(kn_sets_from_attributions(attrs))
    assert static.tau == 0.3
    assert static.classes == {f.key: ("K_C" if c >= 0.3 else "K_I") for f, c in zip(facts, cs)}
    assert static.cs == pytest.approx(dict(zip([f.key for f in facts], cs)))
    otsu = classify_facts(kn_sets_from_attributions(attrs), threshold="otsu")
    tau = otsu_threshold(np.array(cs))
    assert otsu.tau == pytest.approx(tau)
    assert otsu.classes == {f.key: ("K_C" if c >= tau else "K_I") for f, c in zip(facts, cs)}
    # fact_attributions -> the runner uses them as given, with no second attribution
    pytest.importorskip("qloc_tl.methods.attribution")
    small = facts[:2]
    cfg = _small_cfg(steps=2, edits=("erase",), methods=("N_i",))
    got = fact_attributions(gpt2_model, small, config=cfg)
    assert set(got) == {f.key for f in small} and got[small[0].key].shape == (3, 3, 128)
    res = run_editing_experiment(
        gpt2_model, small, config=cfg, attributions=got, known_only=False,
        classes=classify_facts(kn_sets_from_attributions(got)).classes,
    )
    assert len(res.rows) == 2


def test_claims_from_a_hand_made_table(tmp_path):
    rows = []
    # erase: K_I generalises worse everywhere; N_i Gen < Rel and < N_u Gen; N_u worst Loc; CAS best Avg
    for cls, gshift in (("K_C", 0.0), ("K_I", -0.2)):
        for m, rel, gen, loc in (("N_i", 0.8, 0.4, 0.95), ("N_u", 0.9, 0.8, 0.6), ("CAS", 0.9, 0.8, 0.95)):
            rows.append(dict(edit="erase", **{"class": cls}, method=m, n_facts=10, rel=rel, gen=gen + gshift, loc=loc,
                             avg=(rel + gen + gshift + loc) / 3, ppl_rel_delta=0.5 if m == "N_u" else 0.1))  # fmt: skip
    pd.DataFrame(rows).to_parquet(tmp_path / "editing_table.parquet")
    # 10 facts per class is below the default minimum (20): no verdict, the counts are given
    low = editing_claims(tmp_path)
    assert {st for _, st, _ in low} == {"too few facts"}
    assert "erase/N_i K_I n=10, K_C n=10" in low[0][2] and "≥ 20 facts" in low[0][2]
    got = {c: (st, ev) for c, st, ev in editing_claims(tmp_path, min_facts=10)}
    assert [st for st, _ in got.values()] == ["supported"] * 4
    assert all("CI n/a" in ev for _, ev in got.values())  # no editing_rows: no CI
    # CAS no longer best in K_I -> partial; no table -> not run
    rows[5]["avg"] = 0.1
    pd.DataFrame(rows).to_parquet(tmp_path / "editing_table.parquet")
    assert editing_claims(tmp_path, min_facts=10)[3][1] == "partial"
    assert {st for _, st, _ in editing_claims(tmp_path / "missing")} == {"not run"}


def test_claims_give_n_and_bootstrap_ci_from_fact_rows(tmp_path):
    """Per-fact rows (25 K_C, 22 K_I facts) summarised by the library's ``summarize``: real verdicts whose
    evidence gives each cell's n and a 95 % bootstrap CI over facts. Oracle for the CI: Gen of K_C alternates
    0.5 / 0.7 (13 / 12 facts), so the mean's sampling sd is sd/√n and the CI ≈ mean ± 1.96·sd/√n."""
    import re

    from qloc_tl.experiments.editing import summarize

    rows = []
    for cls, n, gens in (("K_C", 25, (0.5, 0.7)), ("K_I", 22, (0.2, 0.2))):
        for f in range(n):
            for m, rel, loc in (("N_i", 0.9, 0.95), ("N_u", 0.95, 0.6), ("CAS", 0.95, 0.95)):
                gen = gens[f % 2] - (0.3 if m == "N_i" else 0.0)
                rows.append(dict(fact_key=f"{cls}{f}", status="ok", edit="erase", method=m, rel=rel, gen=gen, loc=loc,
                                 ppl_delta=0.1, ppl_rel_delta=0.5 if m == "N_u" else 0.1, n_neurons=3,
                                 dprob_old_edited=-0.5, dprob_new_edited=0.0, dprob_old_neighbors=-0.2,
                                 dprob_new_neighbors=0.0, **{"class": cls}))  # fmt: skip
    rows = pd.DataFrame(rows)
    rows.to_parquet(tmp_path / "editing_rows.parquet")
    summarize(rows, EditingConfig(edits=("erase",))).to_parquet(tmp_path / "editing_table.parquet")
    got = editing_claims(tmp_path)
    assert [st for _, st, _ in got] == ["supported"] * 4
    ev = got[0][2]  # Gen K_I < Gen K_C per method
    m = re.search(r"erase/CAS Gen K_I 0\.20 \(n=22, 95% CI \[0\.20, 0\.20\]\) vs K_C 0\.60 \(n=25, 95% CI \[([0-9.]+), ([0-9.]+)\]\)", ev)
    assert m, ev
    g = np.array([0.5, 0.7] * 12 + [0.5])
    half = 1.96 * g.std() / math.sqrt(len(g))
    assert float(m.group(1)) == pytest.approx(g.mean() - half, abs=0.011)
    assert float(m.group(2)) == pytest.approx(g.mean() + half, abs=0.011)
    # one class below the minimum: that claim's cells are named, no verdict from them
    few = rows[~rows["fact_key"].isin([f"K_I{f}" for f in range(5, 22)])]  # 5 K_I facts left
    few.to_parquet(tmp_path / "editing_rows.parquet")
    summarize(few, EditingConfig(edits=("erase",))).to_parquet(tmp_path / "editing_table.parquet")
    got = editing_claims(tmp_path)
    assert got[0][1] == "too few facts" and "K_I n=5, K_C n=25" in got[0][2]
    assert got[1][1] == "supported" and "too few facts (< 20) in: erase/K_I n=5" in got[1][2]


def test_config_validation():
    with pytest.raises(InvalidInputError, match="methods"):
        EditingConfig(methods=("N_x",))
    with pytest.raises(InvalidInputError, match="cs_threshold"):
        EditingConfig(cs_threshold=1.5)
    with pytest.raises(InvalidInputError, match="rule"):
        EditingConfig(rule="rome")
    with pytest.raises(InvalidInputError, match="cas_value"):
        EditingConfig(cas_method="topk", cas_value=0.5)
    with pytest.raises(InvalidInputError, match="max_facts_per_class"):
        EditingConfig(max_facts_per_class=0)
    assert EditingConfig(methods="CAS").methods == ("CAS",)


def test_plot_editing(gpt2_model, tmp_path):
    pytest.importorskip("matplotlib")
    facts = _facts()
    res = run_editing_experiment(
        gpt2_model, facts, config=_small_cfg(), attributions=_attributions(gpt2_model, facts), known_only=False
    )
    fig = plot_editing(res, tmp_path / "edit.png")
    assert (tmp_path / "edit.png").stat().st_size > 1000
    assert len(fig.axes) == 2 * 6  # Rel, Gen, Loc other / same relation, Avg, PPL
    # the bars are the table's numbers
    ax = fig.axes[0]  # erase: Rel
    heights = sorted(round(b.get_height(), 6) for b in ax.patches if not math.isnan(b.get_height()))
    t = res.table[res.table.edit == "erase"]["rel"].dropna()
    assert heights == sorted(round(v, 6) for v in t)


# --------------------------------------------------------------------------------------------------
# the built-in model
# --------------------------------------------------------------------------------------------------


def _builtin():
    try:
        from qloc_tl.data.datasets import builtin_facts
        from qloc_tl.zoo import load_builtin_model
    except ImportError as exc:
        pytest.skip(f"qloc_tl.zoo / qloc_tl.data.datasets have not landed yet ({exc})")
    return load_builtin_model(), builtin_facts()


def test_update_on_builtin_model_makes_new_object_top1():
    """Hand-picked fact: <Lou Reed, P19 place of birth, Brooklyn>; update its KNs (N_i of the LAMA query) to
    the first other P19 object of the built-in facts; the edited query must then answer it, and the model is
    restored afterwards."""
    model, facts = _builtin()
    from qloc_tl.core.model import answer_token_id
    from qloc_tl.methods.attribution import attribute_neurons, select_neurons

    fact = next(f for f in facts if f.subject == "Lou Reed" and f.relation == "P19")
    q = fact.queries[0].text  # "Lou Reed was born in"
    o = answer_token_id(model, q, fact.object)
    assert int(last_token_logprobs(model, [q])[0].argmax()) == o, "the built-in model does not know the fact"
    new_obj = next(g.object for g in facts if g.relation == "P19" and g.object != fact.object)
    new = answer_token_id(model, q, new_obj)
    kns = select_neurons(attribute_neurons(model, q, fact.object, steps=20).scores)
    assert len(kns) > 0
    with update(model, kns, o, new):
        top = int(last_token_logprobs(model, [q])[0].argmax())
    assert top == new, f"updating {len(kns)} KNs of {q!r} did not make {new_obj!r} top-1"
    assert int(last_token_logprobs(model, [q])[0].argmax()) == o  # restored


def test_locality_same_relation_by_hand(gpt2_model):
    """``loc_same`` is the share of other same-relation facts' queries whose top-1 survives the edit; facts
    sharing the edited object are not used (checked with raw W_out edits and plain forwards)."""
    model = gpt2_model
    facts = _facts()
    fact = facts[0]
    attrs = _attributions(model, facts)
    same = [Fact(c, "P36", o, [f"the capital of {c} is"]) for c, o in [("peru", "lima"), ("chile", "santiago"), ("japan", "tokyo")]]
    twin = Fact("gaul", "P36", fact.object, ["the capital of gaul is"])  # same object: not a Locality query
    other = [Fact(p, "P37", o, [f"{p} speaks"]) for p, o in LANGS]
    cfg = _small_cfg(methods=("N_u",), edits=("erase",), n_same_relation=10)
    res = run_editing_experiment(
        model, [fact], config=cfg, attributions={fact.key: attrs[fact.key]}, unrelated_facts=[fact, *same, twin, *other],
        known_only=False,
    )  # fmt: skip
    row = res.rows.iloc[0]
    assert row.n_same_relation == 3
    s = attrs[fact.key]
    neurons = sorted({(int(l), int(i)) for j in range(len(s)) for l, i in (s[j] >= 0.2 * s[j].max()).nonzero().tolist()})
    prompts = [f.prompts[0] for f in same]
    before = [int(_logits(model, model.to_tokens(p))[0, -1].argmax()) for p in prompts]
    saved = {l: model.blocks[l].mlp.W_out.detach().clone() for l in {l for l, _ in neurons}}
    try:
        with torch.no_grad():
            for l, idx in neurons:
                model.blocks[l].mlp.W_out[idx] = 0.0
            after = [int(_logits(model, model.to_tokens(p))[0, -1].argmax()) for p in prompts]
    finally:
        with torch.no_grad():
            for l, W in saved.items():
                model.blocks[l].mlp.W_out[:] = W
    assert row.loc_same == pytest.approx(np.mean([a == b for a, b in zip(before, after)]))
    off = run_editing_experiment(
        model, [fact], config=_small_cfg(methods=("N_u",), edits=("erase",), n_same_relation=0),
        attributions={fact.key: attrs[fact.key]}, unrelated_facts=[fact, *same, *other], known_only=False,
    )  # fmt: skip
    assert math.isnan(off.rows.iloc[0].loc_same) and off.table["loc_same"].isna().all()


def test_update_strength_sweep_by_hand(gpt2_model):
    """Each λ2 row of the sweep is the update at that strength: Rel recomputed with raw W_out edits for a
    one-fact run at λ2 = 2, and the λ2 = 8 rows equal the default runner's table."""
    from qloc_tl.experiments.strength import update_strength_sweep

    model = gpt2_model
    facts = _facts()
    attrs = _attributions(model, facts)
    cfg = _small_cfg(methods=("N_u",), n_same_relation=2)
    df = update_strength_sweep(model, facts, lambdas=(2, 8), config=cfg, attributions=attrs, known_only=False)
    default = run_editing_experiment(model, facts, config=replace(cfg, edits=("update",)), attributions=attrs, known_only=False)
    at8 = df[df.lambda2 == 8.0].drop(columns="lambda2").reset_index(drop=True)
    pd.testing.assert_frame_equal(at8, default.table[at8.columns].reset_index(drop=True))
    fact = facts[0]
    one = update_strength_sweep(
        model, [fact], lambdas=(2,), config=cfg, attributions={fact.key: attrs[fact.key]}, unrelated_facts=facts, known_only=False
    )  # fmt: skip
    row = run_editing_experiment(
        model, [fact], config=replace(cfg, edits=("update",), lambda2=2.0), attributions={fact.key: attrs[fact.key]},
        unrelated_facts=facts, known_only=False,
    ).rows.iloc[0]  # fmt: skip
    s = attrs[fact.key]
    neurons = sorted({(int(l), int(i)) for j in range(len(s)) for l, i in (s[j] >= 0.2 * s[j].max()).nonzero().tolist()})
    o, new = int(row.old_token), int(row.new_token)
    saved = {l: model.blocks[l].mlp.W_out.detach().clone() for l in {l for l, _ in neurons}}
    try:
        with torch.no_grad():
            for l, idx in neurons:
                v = saved[l][idx]
                eo, en = model.W_U[:, o], model.W_U[:, new]
                model.blocks[l].mlp.W_out[idx] = v - (v.norm() / eo.norm()) * eo + 2 * (v.norm() / en.norm()) * en
            top = int(_logits(model, model.to_tokens(row.edited_query))[0, -1].argmax())
    finally:
        with torch.no_grad():
            for l, W in saved.items():
                model.blocks[l].mlp.W_out[:] = W
    assert float(one[one["class"] == row["class"]]["rel"].iloc[0]) == float(top == new)
