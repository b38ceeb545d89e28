"""Knowledge synapses (attattr / raw) and dynamic KN selection.

Oracles: the plain reference engine (one full forward + backward per (layer, step), its own splice hook —
no qloc_tl factory, no batching); the IG completeness identity Σ score = P(A) − P(0); the cached pattern for
``raw``; hand thresholds; and, for dynamic KN selection, hand-written pattern / activation hooks run on one
unpadded prompt. The fast engine's tests are in ``tests/engines/test_synapses_fast.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TL_MAJOR, assert_params_identical, param_snapshot, registered_hooks

import qloc_tl.core.hooks as hooks_mod
import qloc_tl.methods.attribution.engines.synapses as fast_syn
import qloc_tl.methods.synapses as syn_mod
from qloc_tl import Fact, Head, Neuron, Synapse
from qloc_tl.core.errors import CapabilityError, InvalidInputError
from qloc_tl.core.stats import derive_seed
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.experiments.dynamic import (
    dynamic_kn_selection,
    enh_vs_sup,
    irrelevant_synapses,
    measure_dynamic_selection,
    summarize_dynamic,
)
from qloc_tl.experiments.mapping import random_matched_neurons
from qloc_tl.methods.synapses import find_synapses, select_synapses, synapse_columns
from qloc_tl.zoo.tiny import tiny_model

PROMPT = "alice was born in the city of"
ANSWER = " paris"

# backends that honour pattern edits (TL 3: HookedTransformer; TL 4: HF-backed bridges and boot_native)
EDITABLE = [("gpt2", "native"), ("llama", "hf"), ("gpt2", "hf")]


@pytest.fixture(scope="module", params=EDITABLE, ids=["-".join(p) for p in EDITABLE])
def model64(request):
    arch, source = request.param
    return tiny_model(arch, source=source, dtype=torch.float64)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", source="hf")


# -------------------------------------------------------------------------------------------- attattr


def test_batched_attattr_equals_reference(model64):
    # chunks cut across layers
    fast = find_synapses(model64, PROMPT, ANSWER, steps=3, batch_size=5, implementation="batched")
    ref = find_synapses(model64, PROMPT, ANSWER, steps=3, implementation="reference")
    assert fast.scores.shape == (3, 4, 8)
    torch.testing.assert_close(fast.scores, ref.scores, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(fast.prob_zero, ref.prob_zero, rtol=1e-9, atol=1e-15)
    assert fast.synapses == ref.synapses
    assert float(fast.scores.abs().max()) > 0


def test_batched_attattr_equals_reference_float32():
    m = tiny_model("llama", source="hf")
    fast = find_synapses(m, PROMPT, ANSWER, steps=4, rule="midpoint", batch_size=7, implementation="batched")
    ref = find_synapses(m, PROMPT, ANSWER, steps=4, rule="midpoint", implementation="reference")
    scale = float(ref.scores.abs().max())
    assert float((fast.scores - ref.scores).abs().max()) <= 1e-4 * scale


def test_completeness_improves_with_steps(model64):
    deltas = {}
    for m in (2, 8, 32):
        r = find_synapses(model64, PROMPT, ANSWER, steps=m, batch_size=128)
        deltas[m] = r.completeness_delta.abs()
        gap = (r.prob - r.prob_zero).abs()
        # the completeness delta is Σ scores − (P(A) − P(0)), computed independently here
        want = r.scores.sum(dim=(1, 2)) - (r.prob - r.prob_zero)
        torch.testing.assert_close(r.completeness_delta, want)
    # total over layers falls with m (one layer's error can cancel by chance at small m)
    assert float(deltas[2].sum()) > 1e-10
    assert float(deltas[32].sum()) < float(deltas[8].sum()) < float(deltas[2].sum())
    assert float(deltas[32].sum()) <= 0.35 * float(deltas[8].sum())  # the left rule's O(1/m): ratio ≈ 1/4
    assert float(deltas[32].sum()) <= 0.1 * float(gap.sum())
    gl = find_synapses(model64, PROMPT, ANSWER, steps=8, rule="gauss_legendre", batch_size=128)
    assert float(gl.completeness_delta.abs().sum()) <= float(deltas[32].sum())


def test_raw_scores_are_the_clean_answer_row(gpt2):
    r = find_synapses(gpt2, PROMPT, ANSWER, method="raw")
    toks = gpt2.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = gpt2.run_with_cache(toks)
    for layer in range(3):
        torch.testing.assert_close(r.scores[layer], cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1, :])
    assert torch.isnan(r.prob_zero).all()
    aid = answer_token_id(gpt2, PROMPT, ANSWER)
    with torch.no_grad():
        assert r.prob == pytest.approx(float(gpt2(toks)[0, -1].softmax(-1)[aid]), rel=1e-5)


def test_layers_subset_is_nan_elsewhere(gpt2):
    full = find_synapses(gpt2, PROMPT, ANSWER, steps=2)
    part = find_synapses(gpt2, PROMPT, ANSWER, steps=2, layers=[1])
    assert torch.isnan(part.scores[0]).all() and torch.isnan(part.scores[2]).all()
    torch.testing.assert_close(part.scores[1], full.scores[1], rtol=1e-5, atol=1e-8)
    assert all(s.layer == 1 for s in part.synapses)


def test_attattr_leaves_model_unchanged_on_error(gpt2, monkeypatch):
    snap = param_snapshot(gpt2)
    flags = [p.requires_grad for p in gpt2.parameters()]
    toks = gpt2.to_tokens(PROMPT)
    with torch.no_grad():
        clean = gpt2(toks)
    real = syn_mod.answer_probability
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) > 1:  # the first call is the clean run; fail inside the IG pass
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(syn_mod, "answer_probability", boom)
    monkeypatch.setattr(fast_syn, "answer_probability", boom)
    with pytest.raises(RuntimeError, match="injected"):
        find_synapses(gpt2, PROMPT, ANSWER, steps=2)
    assert registered_hooks(gpt2) == 0
    assert [p.requires_grad for p in gpt2.parameters()] == flags
    assert_params_identical(gpt2, snap)
    with torch.no_grad():
        assert torch.equal(gpt2(toks), clean)


def test_refuses_backend_that_ignores_pattern_edits(gpt2, monkeypatch):
    caps = hooks_mod.capabilities(gpt2)
    fake = SimpleNamespace(**{**caps.__dict__, "pattern_editable": False})
    monkeypatch.setattr(hooks_mod, "capabilities", lambda model: fake)
    with pytest.raises(CapabilityError):
        find_synapses(gpt2, PROMPT, ANSWER, steps=2)
    assert registered_hooks(gpt2) == 0


def test_find_synapses_validation(gpt2):
    with pytest.raises(InvalidInputError, match="method"):
        find_synapses(gpt2, PROMPT, ANSWER, method="grad")
    with pytest.raises(InvalidInputError, match="steps"):
        find_synapses(gpt2, PROMPT, ANSWER, steps=0)
    with pytest.raises(InvalidInputError, match="out of range"):
        find_synapses(gpt2, PROMPT, ANSWER, layers=[7])


# ---------------------------------------------------------------------------------------------- selection


def test_select_synapses_hand_thresholds():
    s = torch.tensor(
        [[[0.0, 1.0, 0.5, 0.1], [0.3, 0.0, 0.07, -1.0]], [[0.05, 0.0, 0.0, 0.0], [-0.2, -0.1, -0.3, -0.4]]]
    )
    # per head: >= 0.2 * head max; heads with max <= 0 select nothing
    assert set(select_synapses(s, per_head=True)) == {
        Synapse(0, 0, 1), Synapse(0, 0, 2), Synapse(0, 1, 0), Synapse(0, 1, 2), Synapse(1, 0, 0)
    }  # fmt: skip
    # default, over all entries: >= 0.2 * global max (1.0)
    assert set(select_synapses(s)) == {Synapse(0, 0, 1), Synapse(0, 0, 2), Synapse(0, 1, 0)}
    assert set(select_synapses(s, per_head=False)) == set(select_synapses(s))
    # head filter: heads whose max reaches 0.4 of the global max
    assert {x.as_head() for x in select_synapses(s, head_threshold=0.4, per_head=True)} == {Head(0, 0)}
    # excluded keys never selected
    assert all(x.key_position != 0 for x in select_synapses(s, exclude_keys=(0,)))
    assert all(x.key_position != 0 for x in select_synapses(s, exclude_keys=(0,), per_head=True))
    assert set(select_synapses(s, threshold_method="topk", threshold=1, per_head=True)) == {
        Synapse(0, 0, 1), Synapse(0, 1, 0), Synapse(1, 0, 0), Synapse(1, 1, 1)
    }  # fmt: skip
    assert set(select_synapses(s, threshold_method="topk", threshold=1)) == {Synapse(0, 0, 1)}
    with pytest.raises(InvalidInputError):
        select_synapses(s[0])


def test_global_selection_is_the_default_and_ignores_weak_heads():
    """One strong head among many weak ones (the shape seen on a 30-layer model): per-head fraction-of-max
    keeps a column in every head, global selection only the strong head's large entries.

    Hand computation: global τ = 0.2 · 2.0 = 0.4, so only 2.0 and 0.6 of head L2H1 pass; per head, every head's
    own max passes (0.05 ≥ 0.2 · 0.05), and in L2H1 2.0 and 0.6 (≥ 0.4), not 0.1.
    """
    s = torch.zeros(3, 3, 4)
    for layer in range(3):
        for h in range(3):
            s[layer, h, (layer + h) % 4] = 0.05  # one weak positive entry in every head
    s[2, 1] = torch.tensor([0.0, 2.0, 0.6, 0.1])
    weak = {Synapse(layer, h, (layer + h) % 4) for layer in range(3) for h in range(3) if (layer, h) != (2, 1)}
    assert set(select_synapses(s)) == {Synapse(2, 1, 1), Synapse(2, 1, 2)}
    assert set(select_synapses(s, per_head=True)) == weak | {Synapse(2, 1, 1), Synapse(2, 1, 2)}
    assert len({x.as_head() for x in select_synapses(s, per_head=True)}) == 9
    # QLConfig and find_synapses use the same default
    from qloc_tl.experiments.query_localization import QLConfig

    assert QLConfig().ks_per_head is False


def test_find_synapses_selects_globally_by_default(gpt2):
    r = find_synapses(gpt2, PROMPT, ANSWER, steps=2)
    assert r.per_head is False
    assert set(r.synapses) == set(select_synapses(r.scores, per_head=False))
    # the per-head option selects from every head with a positive best score
    ph = r.reselect(per_head=True)
    heads_pos = {Head(layer, h) for layer in range(3) for h in range(4) if float(r.scores[layer, h].max()) > 0}
    assert {x.as_head() for x in ph.synapses} == heads_pos
    assert set(r.synapses) <= set(ph.synapses)


def test_result_views(gpt2):
    r = find_synapses(gpt2, PROMPT, ANSWER, steps=2)
    df = r.to_dataframe()
    assert len(df) == 3 * 4 * 8
    sel = df[df.selected]
    assert {Synapse(int(a), int(b), int(c)) for a, b, c in zip(sel["layer"], sel["head"], sel["key_position"])} == set(r.synapses)
    assert np.allclose(df["score"].to_numpy(), r.scores.reshape(-1).numpy())
    assert r.heads == tuple(sorted(synapse_columns(r.synapses)))
    top = r.top_k(3)
    assert [v for _, v in top] == sorted(r.scores.reshape(-1).tolist(), reverse=True)[:3]
    strict = r.reselect(threshold=0.9, per_head=False)
    assert set(strict.synapses) <= set(r.synapses) or len(strict.synapses) <= len(r.synapses)
    assert set(strict.synapses) == set(select_synapses(r.scores, threshold=0.9, per_head=False))


# --------------------------------------------------------------------------------------- dynamic selection

SYN = (Synapse(0, 1, 0), Synapse(0, 1, 2), Synapse(1, 0, 3), Synapse(2, 3, 1), Synapse(2, 2, 1))
QKN = (Neuron(2, 5), Neuron(1, 7), Neuron(0, 3))
NKN = (Neuron(2, 9), Neuron(1, 7), Neuron(0, 11))


def _manual(model, prompt, aid, synapses, factor, renormalize=False, set_values=None):
    """P(answer) and every layer's neuron values at the answer position with hand-written hooks."""
    toks = model.to_tokens(prompt)
    q = toks.shape[1] - 1
    cols = synapse_columns(synapses)
    hooks = []
    for layer in sorted({h.layer for h in cols}):

        def pat(act, hook, layer=layer):
            act = act.clone()
            for h, keys in cols.items():
                if h.layer == layer:
                    act[:, h.head, q, list(keys)] = act[:, h.head, q, list(keys)] * factor
                    if renormalize:
                        act[:, h.head, q] = act[:, h.head, q] / act[:, h.head, q].sum()
            return act

        hooks.append((f"blocks.{layer}.attn.hook_pattern", pat))
    store = {}
    for layer in range(model.cfg.n_layers):

        def rec(act, hook, layer=layer):
            if set_values is not None:
                act = act.clone()
                for n, v in set_values.items():
                    if n.layer == layer:
                        act[:, q, n.index] = v
            store[layer] = act[0, q].detach().clone()
            return act

        hooks.append((f"blocks.{layer}.mlp.hook_post", rec))
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
    return float(logits[0, -1].float().softmax(-1)[aid]), store


def _vals(store, neurons):
    return torch.stack([store[n.layer][n.index] for n in neurons]).double()


@pytest.mark.parametrize("renormalize", [False, True])
def test_dynamic_rows_equal_manual_hooks(gpt2, renormalize):
    seed = 5
    rows = dynamic_kn_selection(
        gpt2, PROMPT, ANSWER, SYN, query_kns=QKN, neighbor_kns=NKN, seed=seed, renormalize=renormalize
    )
    assert len(rows) == 2 * 2 * 3
    aid = answer_token_id(gpt2, PROMPT, ANSWER)
    p0, v0 = _manual(gpt2, PROMPT, aid, (), 1.0)
    q = gpt2.to_tokens(PROMPT).shape[1] - 1
    ctrl, _ = irrelevant_synapses(SYN, query_position=q, seed=derive_seed(seed, "", 0, "irrelevant"))
    groups = {
        "query": tuple(sorted(QKN)),
        "neighbor": tuple(sorted(set(NKN) - set(QKN))),
        "random": random_matched_neurons(QKN, d_mlp=128, exclude=set(QKN) | set(NKN), seed=derive_seed(seed, "", 0, "random")),
    }
    for _, r in rows.iterrows():
        syn = SYN if r.intervention == "KS" else ctrl
        p1, v1 = _manual(gpt2, PROMPT, aid, syn, r.factor, renormalize)
        assert r.p_before == pytest.approx(p0, rel=1e-4, abs=1e-7)
        assert r.p_after == pytest.approx(p1, rel=1e-4, abs=1e-7)
        g = groups[r.group]
        b, a = _vals(v0, g), _vals(v1, g)
        assert r.n_neurons == len(g)
        assert r.dvalue_abs == pytest.approx(float((a - b).mean()), rel=1e-4, abs=1e-6)
        assert r.dvalue_mag == pytest.approx(float((a - b).abs().mean()), rel=1e-4, abs=1e-6)
        assert r.dvalue_rel == pytest.approx(float(((a - b) / b.abs()).mean()), rel=1e-3, abs=1e-5)
        assert r.dvalue_rel_agg == pytest.approx(float((a - b).sum() / b.abs().sum()), rel=1e-3, abs=1e-6)
        # dprob_via: only the group's neurons set to their post-edit values, no attention edit
        pv, _ = _manual(gpt2, PROMPT, aid, (), 1.0, set_values={n: float(x) for n, x in zip(g, a)})
        assert r.dprob_via == pytest.approx(pv - p0, rel=1e-3, abs=1e-7)


def test_irrelevant_synapses_control():
    ctrl, short = irrelevant_synapses(SYN, query_position=7, seed=1, exclude_keys=(0,))
    ks, cc = synapse_columns(SYN), synapse_columns(ctrl)
    assert set(cc) == set(ks)  # same heads
    for h in ks:
        assert len(cc[h]) == len(ks[h])
        assert not set(cc[h]) & set(ks[h]) and all(0 < j <= 7 for j in cc[h])
    assert not short
    assert irrelevant_synapses(SYN, query_position=7, seed=1, exclude_keys=(0,))[0] == ctrl
    few, short = irrelevant_synapses([Synapse(0, 0, 0), Synapse(0, 0, 1)], query_position=2, seed=0)
    assert short and [s.key_position for s in few] == [2]


def test_dynamic_empty_groups_and_no_synapses_are_recorded(gpt2):
    rows = dynamic_kn_selection(gpt2, PROMPT, ANSWER, (), query_kns=QKN, neighbor_kns=())
    assert len(rows) == 12
    assert (rows.n_synapses == 0).all() and rows.empty_ks.all() and (rows.dprob == 0).all()
    nb = rows[rows.group == "neighbor"]
    assert (nb.n_neurons == 0).all() and nb.empty_group.all() and nb.dvalue_rel.isna().all()
    assert (nb.dprob_via == 0).all()
    q = rows[rows.group == "query"]
    assert (q.dvalue_abs == 0).all()


def test_fact_level_batching_equals_single_query(gpt2):
    fact = Fact("alice", "P19", "paris", [PROMPT, "alice was born in", "the city alice was born in is"])
    kn = [set(QKN), set(NKN), {Neuron(0, 3), Neuron(2, 1)}]
    syns = [SYN, (Synapse(1, 1, 2),), ()]
    rows = measure_dynamic_selection(gpt2, [fact], {fact.key: syns}, {fact.key: kn}, seed=3)
    assert len(rows) == 3 * 12
    for i in range(3):
        others = set().union(*(kn[j] for j in range(3) if j != i))
        single = dynamic_kn_selection(gpt2, fact.prompts[i], fact.answer, syns[i], query_kns=kn[i], neighbor_kns=others)
        mine = rows[(rows.query_index == i) & (rows.intervention == "KS") & (rows.group != "random")]
        ref = single[(single.intervention == "KS") & (single.group != "random")]
        for col in ("p_before", "p_after", "dvalue_abs", "dvalue_rel_agg", "dprob_via", "n_neurons"):
            assert np.allclose(mine[col].to_numpy(float), ref[col].to_numpy(float), rtol=1e-4, atol=1e-6, equal_nan=True), col


def test_dynamic_leaves_model_unchanged_on_error(gpt2, monkeypatch):
    import qloc_tl.experiments.mapping as mapping_mod

    snap = param_snapshot(gpt2)
    monkeypatch.setattr(mapping_mod.RowBatch, "probs", lambda self, logits: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        dynamic_kn_selection(gpt2, PROMPT, ANSWER, SYN, query_kns=QKN)
    assert registered_hooks(gpt2) == 0
    assert_params_identical(gpt2, snap)


def test_enh_vs_sup_and_summary_on_synthetic_rows():
    recs = []
    for f in range(4):
        for op, d in (("suppress", -0.4), ("enhance", 0.1)):
            for g in ("query", "random"):
                scale = 1.0 if g == "query" else 0.1
                recs.append(dict(fact_key=f"f{f}", query_index=0, **{"class": "K_I"}, intervention="KS", op=op,
                                 group=g, dprob=d * scale, dvalue_rel=d * scale, dvalue_rel_agg=d * scale,
                                 dvalue_abs=d * scale, dvalue_mag=abs(d * scale), dprob_ratio=d, dprob_via=d * scale,
                                 n_neurons=2, empty_group=False, empty_ks=False))  # fmt: skip
    rows = pd.DataFrame(recs)
    es = enh_vs_sup(rows)
    assert es["dprob_enh_lt_sup"].all() and (es["dprob_frac_enh_lt_sup"] == 1.0).all()
    q = es[es.group == "query"].iloc[0]
    assert q["dprob_sup"] == pytest.approx(0.4) and q["dprob_enh"] == pytest.approx(0.1)
    summ = summarize_dynamic(rows, n_bootstrap=20)
    qs = summ[(summ.group == "query") & (summ.op == "suppress")].iloc[0]
    assert qs["dprob"] == pytest.approx(-0.4) and qs["n_facts"] == 4
    assert summ.group.tolist()[:2] == ["query", "random"]
    assert math.isfinite(qs["dprob_lo"])


@pytest.mark.skipif(TL_MAJOR < 4, reason="boot_native only exists on TL 4")
def test_boot_native_pattern_edits_work_for_dynamic():
    m = tiny_model("gpt2", source="native")
    rows = dynamic_kn_selection(m, PROMPT, ANSWER, SYN, query_kns=QKN)
    aid = answer_token_id(m, PROMPT, ANSWER)
    p1, _ = _manual(m, PROMPT, aid, SYN, 0.0)
    r = rows[(rows.intervention == "KS") & (rows.op == "suppress")].iloc[0]
    assert r.p_after == pytest.approx(p1, rel=1e-4)


