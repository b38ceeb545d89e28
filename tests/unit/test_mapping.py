"""Query-KN mapping (experiments.mapping).

Oracles: hand-computed set algebra; a hand-written hook (plain ``run_with_hooks`` on one unpadded prompt, no
qloc_tl factory, no batching) for every Δprob row; numpy for the aggregates; ``consistency_score`` for the
class split. The query-localization runner is in ``tests/integration/test_mapping_runner.py``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MAPPING_FACTS as FACTS
from conftest import MAPPING_KNS as KNS
from conftest import assert_params_identical, manual_prob, param_snapshot, registered_hooks

import qloc_tl.experiments.mapping as mapping_mod
from qloc_tl import Neuron
from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.experiments.mapping import (
    SET_NAMES,
    measure_query_kn_mapping,
    query_neuron_sets,
    random_matched_neurons,
    set_order,
    summarize_mapping,
)
from qloc_tl.experiments.query_localization import QLConfig
from qloc_tl.methods.consistency_score import classify_facts, consistency_score
from qloc_tl.zoo.tiny import tiny_model

N = Neuron


@pytest.fixture(scope="module", params=[("gpt2", "native"), ("llama", "hf")], ids=["gpt2-native", "llama-hf"])
def model(request):
    arch, source = request.param
    return tiny_model(arch, source=source)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")



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
            clean = manual_prob(model, q, aid, [], 1.0)
            sub = rows[(rows.fact_key == fact.key) & (rows.query_index == i)]
            assert np.allclose(sub["p_before"], clean, atol=2e-6, rtol=1e-4)
            for _, r in sub.iterrows():
                neurons = [N(int(x[1:].split("N")[0]), int(x.split("N")[1])) for x in r["neurons"].split(";") if x]
                want = manual_prob(model, q, aid, neurons, r["factor"])
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

