"""The query-localization runner end to end (experiments.query_localization, reporting claims).

Oracles: ``classify_facts`` for the class split; a hand-written hook (plain ``run_with_hooks`` on one unpadded
prompt) for Δprob rows; ``attribute_neurons`` + ``select_neurons`` called directly for localized KNs; an
uninterrupted run for a resumed one; the built-in model in one call.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import MAPPING_FACTS as FACTS
from conftest import MAPPING_KNS as KNS
from conftest import manual_prob, registered_hooks

import qloc_tl.experiments.query_localization as ql_mod
from qloc_tl import Neuron
from qloc_tl.core.errors import InvalidInputError, ResumeMismatchError
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.experiments.mapping import (
    SET_NAMES,
    measure_query_kn_mapping,
    summarize_mapping,
)
from qloc_tl.experiments.query_localization import QLConfig, run_query_localization
from qloc_tl.methods.consistency_score import classify_facts
from qloc_tl.zoo.tiny import tiny_model

N = Neuron


@pytest.fixture(scope="module", params=[("gpt2", "native"), ("llama", "hf")], ids=["gpt2-native", "llama-hf"])
def model(request):
    arch, source = request.param
    return tiny_model(arch, source=source)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")



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
    assert r.p_before == pytest.approx(manual_prob(model, q, aid, [], 1.0), abs=2e-6)
    assert r.p_after == pytest.approx(manual_prob(model, q, aid, kns, 0.0), abs=2e-6)


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
