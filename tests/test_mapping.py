"""Query-KN mapping and the query-localization runner.

Oracles: hand-computed set algebra; a hand-written hook (plain ``run_with_hooks`` on one unpadded prompt, no
qloc_tl factory, no batching) for every Δprob row; numpy for the aggregates; ``consistency_score`` for the
class split; ``attribute_neurons`` + ``select_neurons`` called directly for localized KNs; an uninterrupted
run for a resumed one.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_params_identical, param_snapshot, registered_hooks

import qloc_tl.experiments.mapping as mapping_mod
import qloc_tl.experiments.query_localization as ql_mod
from qloc_tl import Fact, Neuron
from qloc_tl.core.errors import InvalidInputError, ResumeMismatchError
from qloc_tl.core.model import answer_token_id
from qloc_tl.experiments.mapping import (
    SET_NAMES,
    measure_query_kn_mapping,
    query_neuron_sets,
    random_matched_neurons,
    set_order,
    summarize_mapping,
)
from qloc_tl.experiments.query_localization import QLConfig, run_query_localization
from qloc_tl.methods.consistency_score import classify_facts, consistency_score
from qloc_tl.zoo.tiny import tiny_model

N = Neuron

FACTS = [
    Fact("alice", "P19", "paris", ["alice was born in", "alice was born in the city of", "the city alice was born in is"]),
    Fact("bob", "P37", "french", ["bob speaks", "the language of bob is", "bob speaks the language"]),
]
KNS = {
    FACTS[0].key: [{N(0, 1), N(2, 5), N(1, 7)}, {N(2, 5), N(1, 7)}, {N(2, 5), N(0, 9)}],
    FACTS[1].key: [{N(1, 3)}, {N(2, 8), N(0, 4)}, {N(1, 3), N(2, 8)}],  # empty intersection
}


@pytest.fixture(scope="module", params=[("gpt2", "native"), ("llama", "hf")], ids=["gpt2-native", "llama-hf"])
def model(request):
    arch, source = request.param
    return tiny_model(arch, source=source)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


def _manual_prob(model, prompt, answer_id, neurons, factor):
    """P(answer) with ``neurons`` scaled by ``factor`` at the last position: a plain hand-written hook."""
    toks = model.to_tokens(prompt)
    by_layer: dict[int, list[int]] = {}
    for n in neurons:
        by_layer.setdefault(n.layer, []).append(n.index)
    hooks = []
    for layer, idx in by_layer.items():

        def hook(act, hook, idx=idx):
            act = act.clone()
            act[:, -1, idx] = act[:, -1, idx] * factor
            return act

        hooks.append((f"blocks.{layer}.mlp.hook_post", hook))
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
    return float(logits[0, -1].float().softmax(-1)[answer_id])


# ----------------------------------------------------------------------------------------------- sets


def test_neighbor_sets_default_to_the_other_queries():
    """The paper's reading (j != i) is the default: a hand-built fact where query 0's own KNs are private."""
    a, b, c, d, e = N(0, 1), N(0, 2), N(1, 3), N(2, 4), N(3, 5)
    kn = [{a, e}, {b, c}, {b, c, d}]  # query 0 (a K_I-like query) shares nothing with its neighbors
    sets = query_neuron_sets(kn, d_mlp=16)
    assert sets[0]["Union"] == (b, c, d)  # {b,c} ∪ {b,c,d}: not containing query 0's own a, e
    assert sets[0]["Intersection"] == (b, c)
    assert sets[0]["Refine"] == (b, c)  # in both other queries
    assert not set(sets[0]["Union"]) & set(sets[0]["Self"])
    assert sets[2]["Intersection"] == ()  # {a,e} ∩ {b,c} = ∅
    assert sets[2]["Union"] == (a, b, c, e)
    # with the query included, Intersection ⊆ Self ⊆ Union holds by construction for every query
    incl = query_neuron_sets(kn, d_mlp=16, include_self=True)
    for s in incl:
        assert set(s["Intersection"]) <= set(s["Self"]) <= set(s["Union"])
    assert QLConfig().include_self is False


def test_query_neuron_sets_match_hand_algebra():
    a, b, c, d = N(0, 1), N(0, 2), N(1, 3), N(2, 4)
    sets = query_neuron_sets([{a, b}, {a, c}, {a, d, b}], d_mlp=16, seed=3, key="f", include_self=True)
    assert sets[0]["Self"] == (a, b)
    assert sets[1]["Union"] == (a, b, c, d)
    assert sets[2]["Intersection"] == (a,)
    assert sets[0]["Refine"] == (a, b)  # a in 3 sets, b in 2
    others = query_neuron_sets([{a, b}, {a, c}, {a, d, b}], d_mlp=16, include_self=False, refine_min_count=2)
    assert others[0]["Union"] == (a, b, c, d)  # {a,c} ∪ {a,d,b}
    assert others[0]["Intersection"] == (a,)
    assert others[1]["Refine"] == (a, b)
    assert others[2]["Intersection"] == (a,)
    # Unrelated: same per-layer counts as Self, outside the fact's union, seeded (include_self=True above)
    for i, s in enumerate(sets):
        assert Counter(n.layer for n in s["Unrelated"]) == Counter(n.layer for n in s["Self"])
        assert not set(s["Unrelated"]) & {a, b, c, d}
        again = query_neuron_sets([{a, b}, {a, c}, {a, d, b}], d_mlp=16, seed=3, key="f")[i]["Unrelated"]
        assert again == s["Unrelated"]
    other_seed = [s["Unrelated"] for s in query_neuron_sets([{a, b}, {a, c}, {a, d, b}], d_mlp=4096, seed=4, key="f")]
    same_seed = [s["Unrelated"] for s in query_neuron_sets([{a, b}, {a, c}, {a, d, b}], d_mlp=4096, seed=3, key="f")]
    assert other_seed != same_seed


def test_random_matched_neurons_counts_and_exclusion():
    like = [N(0, 1), N(0, 2), N(3, 0)]
    excl = [N(0, i) for i in range(6)]
    out = random_matched_neurons(like, d_mlp=8, exclude=excl, seed=0)
    assert Counter(n.layer for n in out) == Counter({0: 2, 3: 1})
    assert all(n.index >= 6 for n in out if n.layer == 0)
    # not enough free neurons: takes what is there
    assert len(random_matched_neurons(like, d_mlp=7, exclude=excl, seed=0)) == 2


def test_classify_facts_matches_consistency_score():
    classes, cs, tau = classify_facts(KNS, threshold=0.3)
    for key, sets in KNS.items():
        want = consistency_score([set(s) for s in sets])
        assert cs[key] == pytest.approx(want)
        assert classes[key] == ("K_C" if want >= 0.3 else "K_I")
    assert tau == 0.3
    cls, _, _ = classify_facts({"one": [{N(0, 1)}], "none": [set(), set()]})
    assert cls == {"one": "excluded", "none": "excluded"}


# ----------------------------------------------------------------------------------------- measurement


def test_table_dprob_equals_manual_hook(model):
    """Every set × op row of one query per fact (the batch holds all queries) against a hand-written hook."""
    rows = measure_query_kn_mapping(model, FACTS, KNS, seed=1)
    assert len(rows) == sum(len(f.queries) for f in FACTS) * len(SET_NAMES) * 2
    for fact, i in ((FACTS[0], 1), (FACTS[1], 2)):
        for q in [fact.prompts[i]]:
            aid = answer_token_id(model, q, fact.answer, multi_token="first")
            clean = _manual_prob(model, q, aid, [], 1.0)
            sub = rows[(rows.fact_key == fact.key) & (rows.query_index == i)]
            assert np.allclose(sub["p_before"], clean, atol=2e-6, rtol=1e-4)
            for _, r in sub.iterrows():
                neurons = [N(int(x[1:].split("N")[0]), int(x.split("N")[1])) for x in r["neurons"].split(";") if x]
                want = _manual_prob(model, q, aid, neurons, r["factor"])
                assert r["p_after"] == pytest.approx(want, abs=2e-6, rel=1e-4), (fact.key, i, r["set"], r["op"])
                assert r["dprob"] == pytest.approx(r["p_after"] - r["p_before"], abs=1e-12)
                assert r["dprob_ratio"] == pytest.approx(r["dprob"] / r["p_before"])


def test_empty_sets_are_recorded_not_dropped(gpt2):
    rows = measure_query_kn_mapping(gpt2, [FACTS[1]], {FACTS[1].key: KNS[FACTS[1].key]}, include_self=True)
    inter = rows[rows["set"] == "Intersection"]
    assert len(inter) == 3 * 2
    assert (inter["n_neurons"] == 0).all() and inter["empty"].all()
    assert (inter["dprob"] == 0).all() and (inter["p_after"] == inter["p_before"]).all()
    summ = summarize_mapping(rows, by=("set", "op"), n_bootstrap=20)
    assert int(summ.loc[(summ["set"] == "Intersection") & (summ.op == "suppress"), "n_empty"].iloc[0]) == 3


def test_suppressing_nothing_by_hand_equals_self_with_factor_one(gpt2):
    rows = measure_query_kn_mapping(gpt2, FACTS[:1], {FACTS[0].key: KNS[FACTS[0].key]}, ops={"noop": 1.0})
    assert np.allclose(rows["dprob"], 0.0, atol=2e-6)


def test_mapping_leaves_model_unchanged_on_error(gpt2, monkeypatch):
    snap = param_snapshot(gpt2)
    toks = gpt2.to_tokens(FACTS[0].prompts[0])
    with torch.no_grad():
        clean = gpt2(toks)

    def boom(self, logits):
        raise RuntimeError("injected failure mid-run")

    monkeypatch.setattr(mapping_mod.RowBatch, "probs", boom)
    with pytest.raises(RuntimeError, match="injected"):
        measure_query_kn_mapping(gpt2, FACTS, KNS)
    monkeypatch.undo()
    assert registered_hooks(gpt2) == 0
    assert_params_identical(gpt2, snap)
    with torch.no_grad():
        assert torch.equal(gpt2(toks), clean)


def test_measure_validation(gpt2):
    with pytest.raises(InvalidInputError, match="no KN sets"):
        measure_query_kn_mapping(gpt2, FACTS, {})
    with pytest.raises(InvalidInputError, match="one set per query"):
        measure_query_kn_mapping(gpt2, FACTS[:1], {FACTS[0].key: [{N(0, 1)}]})
    with pytest.raises(InvalidInputError, match="outside the model"):
        measure_query_kn_mapping(gpt2, FACTS[:1], {FACTS[0].key: [{N(9, 1)}, set(), set()]})


# ----------------------------------------------------------------------------------------- aggregation


def _synthetic_rows():
    rng = np.random.default_rng(0)
    recs = []
    for f in range(6):
        for q in range(3):
            pb = float(rng.uniform(0.1, 0.9))
            for s in ("Self", "Union"):
                for op in ("suppress", "enhance"):
                    d = float(rng.normal(-0.2 if s == "Self" else -0.05, 0.01)) * pb
                    recs.append(dict(fact_key=f"f{f}", query_index=q, **{"class": "K_I"}, set=s, op=op,
                                     n_neurons=2, empty=False, p_before=pb, p_after=pb + d, dprob=d, dprob_ratio=d / pb))  # fmt: skip
    return pd.DataFrame(recs)


def test_summary_matches_numpy_and_ci_brackets_estimate():
    rows = _synthetic_rows()
    summ = summarize_mapping(rows, n_bootstrap=300, seed=0)
    for _, r in summ.iterrows():
        g = rows[(rows["set"] == r["set"]) & (rows.op == r.op)]
        assert r["mean_of_ratios"] == pytest.approx(float(np.mean(g.dprob / g.p_before)))
        assert r["ratio_of_means"] == pytest.approx(float(g.dprob.sum() / g.p_before.sum()))
        assert r["mean_dprob"] == pytest.approx(float(g.dprob.mean()))
        assert r["mean_abs_dprob"] == pytest.approx(float(g.dprob.abs().mean()))
        assert r["n_facts"] == 6 and r["n_rows"] == 18
        for m in ("mean_of_ratios", "ratio_of_means", "mean_dprob"):
            assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"]
    assert summ["set"].tolist()[:2] == ["Self", "Union"]  # SET_NAMES order
    order = set_order(summ)
    assert order["order"].tolist() == ["Self > Union", "Self > Union"]
    one = summarize_mapping(rows[rows.fact_key == "f0"], n_bootstrap=50)
    assert one["mean_of_ratios_lo"].isna().all()


def test_bootstrap_resamples_facts_not_rows():
    # two facts with very different means: the CI must reflect 2 clusters, not 200 rows
    rows = pd.DataFrame({"fact_key": ["a"] * 100 + ["b"] * 100, "x": [0.0] * 100 + [1.0] * 100})
    out = mapping_mod.bootstrap_summary(rows, ratios={"m": ("x", None)}, n_bootstrap=500, seed=0)
    assert out["m"] == pytest.approx(0.5)
    assert out["m_lo"] == pytest.approx(0.0) and out["m_hi"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- runner

CFG = QLConfig(ks_steps=2, n_bootstrap=20, chunk_size=1, kn_steps=2)


def test_runner_tables_and_classes(gpt2, tmp_path):
    res = run_query_localization(gpt2, FACTS, config=CFG, kn_sets=KNS, out_dir=tmp_path / "run", known_only=False)
    classes, cs, _ = classify_facts(KNS, threshold=CFG.cs_threshold)
    assert res.classes == classes
    assert res.facts["cs"].tolist() == pytest.approx([cs[f.key] for f in FACTS])
    assert set(res.mapping.columns) >= {"class", "set", "op", "mean_of_ratios", "ratio_of_means", "mean_dprob"}
    assert set(res.mapping["set"]) == set(SET_NAMES) and set(res.mapping["op"]) == {"suppress", "enhance"}
    assert set(res.dynamic["group"]) == {"query", "neighbor", "random"}
    assert set(res.dynamic["intervention"]) == {"KS", "irrelevant"}
    # the mapping rows are exactly what measure_query_kn_mapping gives
    direct = measure_query_kn_mapping(gpt2, FACTS, KNS, seed=CFG.seed)
    key = ["fact_key", "query_index", "set", "op"]
    a = res.mapping_rows.sort_values(key).reset_index(drop=True)
    b = direct.sort_values(key).reset_index(drop=True)
    assert np.allclose(a["dprob"], b["dprob"], atol=1e-7)
    assert not a.duplicated(key).any()
    for name in ("mapping_summary", "dynamic_summary", "mapping_order", "facts", "dynamic_enh_vs_sup"):
        assert (tmp_path / "run" / f"{name}.parquet").is_file()
    assert {k: tuple(map(frozenset, v)) for k, v in KNS.items()} == res.kn_sets


def test_runner_resume_after_crash_equals_uninterrupted_run(gpt2, tmp_path, monkeypatch):
    full = run_query_localization(gpt2, FACTS, config=CFG, kn_sets=KNS, classes={f.key: "K_I" for f in FACTS}, known_only=False)
    real = ql_mod._chunk_tables
    calls = []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ql_mod, "_chunk_tables", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_query_localization(gpt2, FACTS, config=CFG, kn_sets=KNS, out_dir=tmp_path, classes={f.key: "K_I" for f in FACTS}, known_only=False)
    assert registered_hooks(gpt2) == 0
    counted = []

    def counting(*a, **k):
        counted.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(ql_mod, "_chunk_tables", counting)
    res = run_query_localization(gpt2, FACTS, config=CFG, kn_sets=KNS, out_dir=tmp_path, classes={f.key: "K_I" for f in FACTS}, known_only=False)
    assert [f.key for chunk in counted for f in chunk] == [FACTS[1].key]  # only the missing fact
    key = ["fact_key", "query_index", "set", "op"]
    a = res.mapping_rows.sort_values(key).reset_index(drop=True)
    b = full.mapping_rows.sort_values(key).reset_index(drop=True)
    assert not a.duplicated(key).any()
    assert np.allclose(a["dprob"], b["dprob"], atol=1e-7)
    dkey = ["fact_key", "query_index", "intervention", "op", "group"]
    da = res.dynamic_rows.sort_values(dkey).reset_index(drop=True)
    db = full.dynamic_rows.sort_values(dkey).reset_index(drop=True)
    assert np.allclose(da["dprob"], db["dprob"], atol=1e-7)
    # complete directory: nothing recomputed; another configuration is refused
    counted.clear()
    run_query_localization(gpt2, FACTS, config=CFG, kn_sets=KNS, out_dir=tmp_path, classes={f.key: "K_I" for f in FACTS}, known_only=False)
    assert counted == []
    with pytest.raises(ResumeMismatchError):
        run_query_localization(gpt2, FACTS, config=QLConfig(ks_steps=3, chunk_size=1), kn_sets=KNS, out_dir=tmp_path, known_only=False)


def test_runner_localizes_kns_with_attribution(gpt2):
    from qloc_tl.methods.attribution import attribute_neurons, select_neurons

    cfg = QLConfig(kn_steps=2, dynamic=False, n_bootstrap=10, max_queries_per_fact=2, kn_threshold=0.5)
    res = run_query_localization(gpt2, FACTS, config=cfg, known_only=False)
    prompts = [q for f in FACTS for q in f.prompts[:2]]
    answers = [f.answer for f in FACTS for _ in f.prompts[:2]]
    attr = attribute_neurons(gpt2, prompts, answers, steps=2, multi_token="first")
    sets = select_neurons(attr.scores_batched, value=0.5)
    assert res.kn_sets[FACTS[0].key] == tuple(frozenset(s) for s in sets[:2])
    assert res.kn_sets[FACTS[1].key] == tuple(frozenset(s) for s in sets[2:])
    assert res.dynamic_rows.empty and (res.facts["n_queries"] == 2).all()


def test_config_validation():
    with pytest.raises(InvalidInputError, match="cs_threshold"):
        QLConfig(cs_threshold=1.5)
    with pytest.raises(InvalidInputError, match="ks_method"):
        QLConfig(ks_method="grad")
    with pytest.raises(InvalidInputError, match="chunk_size"):
        QLConfig(chunk_size=0)
    assert QLConfig(cs_threshold="otsu").cs_threshold == "otsu"
    assert QLConfig(ks_exclude_keys=[0]).ks_exclude_keys == (0,)


def test_runner_input_validation(gpt2):
    with pytest.raises(InvalidInputError, match="duplicate"):
        run_query_localization(gpt2, [FACTS[0], FACTS[0]], config=CFG, kn_sets=KNS, known_only=False)
    with pytest.raises(InvalidInputError, match="classes has no entry"):
        run_query_localization(gpt2, FACTS, config=CFG, kn_sets=KNS, classes={}, known_only=False)
    with pytest.raises(InvalidInputError, match="kn_sets has no entry"):
        run_query_localization(gpt2, FACTS, config=CFG, kn_sets={}, known_only=False)


def test_builtin_model_one_call_tables():
    """The built-in fact model: one call gives both tables; a Self-suppression row equals a manual hook."""
    zoo = pytest.importorskip("qloc_tl.zoo")
    if not (zoo.builtin_model_dir() / "model.safetensors").is_file():
        pytest.skip("the built-in model is not shipped in this checkout")
    from qloc_tl.data.datasets import builtin_facts

    model = zoo.load_builtin_model()
    facts = list(builtin_facts())[:1]
    cfg = QLConfig(kn_steps=2, ks_steps=2, n_bootstrap=20, max_queries_per_fact=3)
    res = run_query_localization(model, facts, config=cfg, known_only=False)
    assert set(res.mapping["set"]) == set(SET_NAMES) and len(res.dynamic) > 0
    assert len(res.mapping_rows) == 3 * len(SET_NAMES) * 2
    r = res.mapping_rows[(res.mapping_rows["set"] == "Self") & (res.mapping_rows.op == "suppress")].iloc[0]
    fact = facts[0]
    q = fact.prompts[int(r.query_index)]
    kns = sorted(res.kn_sets[r.fact_key][int(r.query_index)])
    aid = answer_token_id(model, q, fact.answer, multi_token="first")
    assert r.p_before == pytest.approx(_manual_prob(model, q, aid, [], 1.0), abs=2e-6)
    assert r.p_after == pytest.approx(_manual_prob(model, q, aid, kns, 0.0), abs=2e-6)


# ------------------------------------------------------------------------------------- claim verdicts


def _write_ql_tables(ql, n_kc, n_ki, seed=0):
    """Synthetic ``ql`` stage tables (2 queries per fact) summarised with the library's own functions.
    Mapping: Self −0.8 / Intersection −0.2 Δp/p for K_I, −0.5 / −0.4 for K_C under suppression. Dynamic: KS
    suppression moves P(answer) by −0.5 (enhance +0.1), the query KNs' ΔValue −0.6 vs neighbor −0.2 / random
    −0.05, Δp via query KNs −0.3 vs neighbor −0.05; irrelevant-KS edits move everything ten times less."""
    from qloc_tl.experiments.dynamic import enh_vs_sup, summarize_dynamic

    rng = np.random.default_rng(seed)
    mrows, drows = [], []
    for cls, n in (("K_C", n_kc), ("K_I", n_ki)):
        for f in range(n):
            key = f"{cls}|{f}"
            for qi in range(2):
                for name, base in (("Self", -0.8 if cls == "K_I" else -0.5), ("Intersection", -0.2 if cls == "K_I" else -0.4)):
                    for op, factor in (("suppress", 1.0), ("enhance", -0.2)):
                        r = base * factor + rng.normal(0, 0.05)
                        mrows.append({"class": cls, "set": name, "op": op, "fact_key": key, "query_index": qi,
                                      "empty": False, "n_neurons": 3, "p_before": 0.6, "dprob": 0.6 * r, "dprob_ratio": r})  # fmt: skip
                for inter in ("KS", "irrelevant"):
                    for op in ("suppress", "enhance"):
                        scale = (1.0 if inter == "KS" else 0.1) * (1.0 if op == "suppress" else -0.2)
                        dp = -0.5 * scale + rng.normal(0, 0.02)
                        for g, dv, via in (("query", -0.6, -0.3), ("neighbor", -0.2, -0.05), ("random", -0.05, -0.01)):
                            v = dv * scale + rng.normal(0, 0.02)
                            drows.append({"fact_key": key, "class": cls, "query_index": qi, "intervention": inter, "op": op,
                                          "group": g, "n_synapses": 2, "empty_ks": False, "n_neurons": 3, "empty_group": False,
                                          "p_before": 0.6, "dprob": dp, "dprob_ratio": dp / 0.6,
                                          "dprob_via": via * scale + rng.normal(0, 0.01), "dvalue_rel": v, "dvalue_rel_agg": v,
                                          "dvalue_abs": v, "dvalue_mag": abs(v)})  # fmt: skip
    m, d = pd.DataFrame(mrows), pd.DataFrame(drows)
    ql.mkdir(parents=True, exist_ok=True)
    summ = summarize_mapping(m, n_bootstrap=200)
    summ.to_parquet(ql / "mapping_summary.parquet")
    d.to_parquet(ql / "dynamic_rows.parquet")
    dsum = summarize_dynamic(d, n_bootstrap=200)
    dsum.to_parquet(ql / "dynamic_summary.parquet")
    enh_vs_sup(d).to_parquet(ql / "dynamic_enh_vs_sup.parquet")
    return summ, d, dsum


def _ql_verdicts(out, **kw):
    from qloc_tl.reporting.report import claim_verdicts

    return {c.split(":")[0]: v for c, v in claim_verdicts(out, **kw) if c.startswith(("QL", "Enh"))}


def test_ql_claims_need_enough_facts_per_class(tmp_path):
    import re

    # K_I below the minimum (20): the mapping claim (K_I vs K_C) is "too few facts"; the pooled dynamic claim
    # (33 facts) gets a verdict; Enh < Sup is judged on K_C only and names K_I as left out
    _write_ql_tables(tmp_path / "ql", 25, 8)
    v = _ql_verdicts(tmp_path)
    mp, dyn, es = v["QL (Query-KN mapping)"], v["QL (dynamic KN selection)"], v["Enh < Sup"]
    assert mp["status"] == "too few facts" and "K_I n=8" in mp["evidence"] and "K_C n=25" in mp["evidence"]
    assert dyn["status"] == "supported" and "n = 33 facts (K_C 25, K_I 8)" in dyn["evidence"]
    assert es["status"] == "supported" and "K_C (n=25)" in es["evidence"] and "too few facts for a verdict: K_I n=8" in es["evidence"]
    # 15 facts in all: every QL claim is "too few facts"
    _write_ql_tables(tmp_path / "small" / "ql", 10, 5)
    assert {x["status"] for x in _ql_verdicts(tmp_path / "small").values()} == {"too few facts"}
    assert _ql_verdicts(tmp_path / "small", min_facts=5)["QL (Query-KN mapping)"]["status"] == "supported"
    # enough facts in both classes: real verdicts with n and CIs
    summ, rows, dsum = _write_ql_tables(tmp_path / "big" / "ql", 25, 22, seed=1)
    v = _ql_verdicts(tmp_path / "big")
    mp, dyn, es = v["QL (Query-KN mapping)"], v["QL (dynamic KN selection)"], v["Enh < Sup"]
    assert mp["status"] == "supported"  # K_I gap 0.6 > 0.1 and > K_C gap 0.1
    ki_self = summ[(summ["class"] == "K_I") & (summ["set"] == "Self") & (summ["op"] == "suppress")].iloc[0]
    assert f"K_I (n=22): Self {ki_self.mean_of_ratios:+.2f} (95% CI [{ki_self.mean_of_ratios_lo:+.2f}, {ki_self.mean_of_ratios_hi:+.2f}])" in mp["evidence"]
    assert dyn["status"] == "supported" and "n = 47 facts (K_C 25, K_I 22)" in dyn["evidence"]
    q = rows[(rows["intervention"] == "KS") & (rows["op"] == "suppress") & (rows["group"] == "query")]
    got = re.search(r"ΔValue query ([-+0-9.]+) \(95% CI \[([-+0-9.]+), ([-+0-9.]+)\]\)", dyn["evidence"])
    assert got and float(got.group(1)) == pytest.approx(q["dvalue_rel_agg"].mean(), abs=0.006)  # pooled mean (numpy)
    assert float(got.group(2)) < q["dvalue_rel_agg"].mean() < float(got.group(3))
    assert es["status"] == "supported" and "K_I (n=22)" in es["evidence"] and "too few" not in es["evidence"]
    ki_sup = dsum[(dsum["class"] == "K_I") & (dsum["intervention"] == "KS") & (dsum["op"] == "suppress") & (dsum["group"] == "query")].iloc[0]
    assert f"sup 95% CI [{ki_sup.dprob_lo:+.2f}, {ki_sup.dprob_hi:+.2f}]" in es["evidence"]
