"""The consistency runner end to end on a tiny model (experiments.consistency, reporting plots and claims):
tables against direct attribution and selection, kill-and-resume equivalence, figures, claims."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from qloc_tl import Fact, InvalidInputError, Neuron, ResumeMismatchError
from qloc_tl.experiments.consistency import ConsistencyConfig, run_consistency
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.methods.consistency_score import class_statistics, consistency_score
from qloc_tl.reporting.consistency_plots import (
    plot_cs_histogram,
    plot_fact_heatmap,
    plot_relation_ki,
    plot_threshold_sweep,
)
from qloc_tl.zoo.tiny import tiny_model

A, B, C, D, E = (Neuron(0, 1), Neuron(0, 2), Neuron(1, 3), Neuron(2, 4), Neuron(2, 5))

FACTS = [
    Fact("alice", "P19", "paris", ["alice was born in", "alice is from", "alice was born in the city of"]),
    Fact("bob", "P19", "london", ["bob was born in", "bob is from", "bob was born in the city of"]),
    Fact("carol", "P19", "rome", ["carol was born in", "carol is from", "carol was born in the city of"]),
    Fact("dave", "P1412", "french", ["dave speaks", "dave works in", "dave speaks the language"]),
    Fact("eve", "P1412", "german", ["eve speaks", "eve works in", "eve speaks the language"]),
    Fact("frank", "P1412", "spanish", ["frank speaks", "frank works in", "frank speaks the language"]),
]
CFG = ConsistencyConfig(methods=("ig", "amig"), steps=4, chunk_facts=2, n_boot=50, n_perm=50, sweep=(0.1, 0.5))


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def full_result(model):
    return run_consistency(model, FACTS, CFG, model_name="tiny", known_only=False)


def test_runner_tables_are_consistent(model, full_result):
    res = full_result
    f = res.facts
    assert set(f["method"]) == {"ig", "amig", "∩"}
    assert len(f[f["method"] == "ig"]) == len(FACTS)
    # CS recomputed from the kept KN sets equals the table (independent path: consistency_score)
    for (m, key), sets in res.kn_sets.items():
        row = f[(f["method"] == m) & (f["fact_key"] == key)].iloc[0]
        cs = consistency_score([s.to_frozenset() for s in sets])
        assert (math.isnan(cs) and math.isnan(row["cs"])) or cs == pytest.approx(row["cs"])
    # the ∩ class is K_I iff every method says K_I
    for key in f["fact_key"].unique():
        sub = f[f["fact_key"] == key].set_index("method")["class_static"]
        if (sub[["ig", "amig"]] != "excluded").all():
            assert (sub["∩"] == "K_I") == ((sub["ig"] == "K_I") and (sub["amig"] == "K_I"))
    assert set(res.summary["threshold"]) == {"static", "otsu"}
    assert len(res.queries) == 2 * sum(len(x.queries) for x in FACTS)
    assert set(res.sweep["kn_fraction"]) == {0.1, 0.5}
    assert res.classes("ig").keys() == {x.key for x in FACTS}


def test_runner_kn_sets_match_direct_selection(model, full_result):
    from qloc_tl.methods.attribution import attribute_neurons, select_neurons

    fact = FACTS[3]
    att = attribute_neurons(model, list(fact.prompts), [fact.answer] * 3, method="ig", steps=4)
    direct = select_neurons(att.scores, method="fraction_of_max", value=0.2)
    assert [set(s) for s in full_result.kn_sets[("ig", fact.key)]] == [set(s) for s in direct]


def test_dense_scores_are_the_attributions_above_keep_fraction(model, full_result):
    """dense_scores rebuilds each query's map: the direct attribution where it is ≥ keep_fraction · max, 0 below."""
    import torch

    from qloc_tl.methods.attribution import attribute_neurons

    fact = FACTS[1]
    att = attribute_neurons(model, list(fact.prompts), [fact.answer] * 3, method="ig", steps=4).scores.double()
    L, D = att.shape[1:]
    dense = full_result.dense_scores("ig", fact.key, 3, L, D)
    for j in range(3):
        keep = att[j] >= CFG.keep_fraction * att[j].max()
        # float32 scores: the run attributes a chunk of facts per call, whose prompts share passes differently
        torch.testing.assert_close(dense[j][keep], att[j][keep], rtol=1e-5, atol=1e-8)
        assert bool((dense[j][~keep] == 0).all())


def _tables(res):
    return {k: getattr(res, k) for k in ("facts", "summary", "per_relation", "sweep")}


def test_kill_and_resume_gives_identical_tables(model, full_result, tmp_path, monkeypatch):
    import qloc_tl.methods.attribution as attr_mod

    real = attr_mod.attribute_neurons
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(attr_mod, "attribute_neurons", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_consistency(model, FACTS, CFG, model_name="tiny", out_dir=tmp_path, known_only=False)
    monkeypatch.setattr(attr_mod, "attribute_neurons", real)
    parts_before = len(list((tmp_path / "parts" / "scores").glob("*.parquet")))
    assert parts_before == 2
    resumed = run_consistency(model, FACTS, CFG, model_name="tiny", out_dir=tmp_path, known_only=False)
    for name, df in _tables(full_result).items():
        pd.testing.assert_frame_equal(_tables(resumed)[name].reset_index(drop=True), df.reset_index(drop=True), check_exact=False, rtol=1e-6)
    q = resumed.queries
    assert not q.duplicated(["method", "fact_key", "query_index"]).any()
    assert (tmp_path / "consistency_summary.parquet").is_file() and (tmp_path / "consistency_facts.csv").is_file()
    # a third run recomputes nothing
    monkeypatch.setattr(attr_mod, "attribute_neurons", lambda *a, **k: pytest.fail("recomputed a finished fact"))
    again = run_consistency(model, FACTS, CFG, model_name="tiny", out_dir=tmp_path, known_only=False)
    pd.testing.assert_frame_equal(again.facts, resumed.facts)


def test_resume_with_other_config_is_refused(model, tmp_path):
    small = ConsistencyConfig(methods=("ig",), steps=2, n_boot=10, n_perm=10, sweep=(0.2,))
    run_consistency(model, FACTS[:2], small, out_dir=tmp_path, known_only=False)
    with pytest.raises(ResumeMismatchError, match="steps"):
        run_consistency(model, FACTS[:2], ConsistencyConfig(methods=("ig",), steps=3, n_boot=10, n_perm=10, sweep=(0.2,)), out_dir=tmp_path, known_only=False)
    # more facts in the same directory: the first two are reused, only the third is computed
    import qloc_tl.methods.attribution as attr_mod

    real, seen = attr_mod.attribute_neurons, []

    def spy(model, prompts, *a, **k):
        seen.extend(prompts)
        return real(model, prompts, *a, **k)

    attr_mod.attribute_neurons = spy
    try:
        res = run_consistency(model, FACTS[:3], small, out_dir=tmp_path, known_only=False)
    finally:
        attr_mod.attribute_neurons = real
    assert seen == list(FACTS[2].prompts)
    assert set(res.facts["fact_key"]) == {f.key for f in FACTS[:3]}


def test_bad_inputs(model):
    with pytest.raises(InvalidInputError, match="at least 2"):
        run_consistency(model, [Fact("alice", "P19", "paris", ["alice was born in"])], CFG, known_only=False)
    with pytest.raises(InvalidInputError, match="twice"):
        run_consistency(model, [FACTS[0], FACTS[0]], CFG, known_only=False)
    with pytest.raises(InvalidInputError, match="unknown attribution method"):
        ConsistencyConfig(methods=("ig", "lrp"))
    with pytest.raises(InvalidInputError, match="keep_fraction"):
        ConsistencyConfig(sweep=(0.01,))


def test_figures(model, full_result, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    for fn, name in [(plot_cs_histogram, "h"), (plot_relation_ki, "r"), (plot_threshold_sweep, "s")]:
        fig = fn(full_result, path=tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and fig.axes
    fact = FACTS[0]
    attribution = attribute_neurons(model, list(fact.prompts), [fact.answer] * len(fact.queries), steps=4)
    fig = plot_fact_heatmap(attribution, fact, path=tmp_path / "heat.png")
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == 3 and (tmp_path / "heat.png").is_file()


def test_fact_heatmap_colour_scale_ignores_an_outlier_query():
    """8 queries × 40 union neurons; one query's normalised scores reach −5.8 and −4.0 at two neurons. The
    colour limits are ±(numpy's 99th percentile of |drawn cells|), which those two cells do not set."""
    from types import SimpleNamespace

    import matplotlib
    import torch

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    Q, L, D = 8, 2, 20
    scores = torch.tensor(rng.uniform(0.0, 0.1, size=(Q, L, D)))  # below 0.2·max: never KNs
    for q in range(Q):
        for j, v in enumerate((1.0, 0.8, 0.6, 0.5, 0.4)):
            scores[q, q % 2, (5 * (q // 2) + j) % D] = v  # 5 KNs per query; 40 neurons in the union
    scores[7, 0, 0], scores[7, 0, 1] = -5.8, -4.0  # query 7 (max 1.0) at two of query 0's KNs
    fact = SimpleNamespace(queries=[SimpleNamespace(text=f"q{i}") for i in range(Q)], subject="s", object="o",
                           relation="P0", prompts=[f"q{i}" for i in range(Q)], answer="o")  # fmt: skip
    fig = plot_fact_heatmap(SimpleNamespace(scores_batched=scores), fact, max_neurons=40)
    im = fig.axes[0].images[0]
    drawn = np.asarray(im.get_array())
    assert drawn.shape == (8, 40) and drawn.min() == pytest.approx(-5.8)
    want = np.percentile(np.abs(drawn), 99)
    assert im.get_clim() == pytest.approx((-want, want)) and want <= 1.0
    assert im.colorbar.extend == "both"
    full = plot_fact_heatmap(SimpleNamespace(scores_batched=scores), fact, percentile=None)
    assert full.axes[0].images[0].get_clim() == pytest.approx((-5.8, 5.8))


# ------------------------------------------------------------------------------------- claim verdicts


def _write_consistency_tables(out, kc, ki):
    """consistency_summary / consistency_facts of one method ("ig") whose facts have CS ``kc`` (K_C) and ``ki``
    (K_I), built with the library's own class_statistics (static τ = 0.3)."""
    cs = np.concatenate([kc, ki])
    labels = np.array(["K_C"] * len(kc) + ["K_I"] * len(ki), dtype=object)
    st = class_statistics(cs, labels, n_perm=50)
    summary = pd.DataFrame([{"model": "m", "method": "ig", "threshold": "static", "tau": 0.3, **st}])
    facts = pd.DataFrame({"method": "ig", "fact_key": [f"f{i}" for i in range(len(cs))], "cs": cs,
                          "class_static": labels})  # fmt: skip
    (out / "consistency").mkdir(parents=True, exist_ok=True)
    summary.to_parquet(out / "consistency" / "consistency_summary.parquet")
    facts.to_parquet(out / "consistency" / "consistency_facts.parquet")
    return st


def test_consistency_claims_need_enough_facts_per_class(tmp_path):
    import re

    from qloc_tl.reporting import claims

    rng = np.random.default_rng(3)
    # below the minimum (20): 25 K_C, 5 K_I
    kc, ki = rng.uniform(0.4, 1.0, 25), rng.uniform(0.0, 0.29, 5)
    _write_consistency_tables(tmp_path, kc, ki)
    (share, s1), (welch, s2) = claims.claim_verdicts(tmp_path)[:2]
    assert s1["status"] != claims.TOO_FEW  # 30 facts in all: the K_I share gets a verdict
    assert "n = 30 facts" in s1["evidence"]
    assert s2["status"] == "too few facts" and "K_I n=5" in s2["evidence"] and "K_C n=25" in s2["evidence"]
    # the minimum can be lowered per call and for the session
    assert claims.claim_verdicts(tmp_path, min_facts=5)[1][1]["status"] == "supported"
    old = claims.MIN_FACTS_PER_CLASS
    try:
        claims.MIN_FACTS_PER_CLASS = 31
        assert claims.claim_verdicts(tmp_path)[0][1]["status"] == "too few facts"
    finally:
        claims.MIN_FACTS_PER_CLASS = old
    # above the minimum: a real verdict, with n and the Welch CI of the mean-CS difference (oracle: scipy)
    kc, ki = rng.uniform(0.4, 1.0, 24), rng.uniform(0.0, 0.29, 21)
    st = _write_consistency_tables(tmp_path, kc, ki)
    share, welch = (v for _, v in claims.claim_verdicts(tmp_path)[:2])
    assert welch["status"] == "supported"
    assert "K_C n=24, K_I n=21" in welch["evidence"]
    lo, hi = stats.ttest_ind(kc, ki, equal_var=False).confidence_interval(0.95)
    m = re.search(r"95% CI \[([-+0-9.]+), ([-+0-9.]+)\]", welch["evidence"])
    assert m and float(m.group(1)) == pytest.approx(lo, abs=0.006) and float(m.group(2)) == pytest.approx(hi, abs=0.006)
    # the K_I share: 21/45 ≥ 20 % -> supported; its bootstrap CI from the summary is quoted
    assert share["status"] == "supported" and "n = 45 facts" in share["evidence"]
    assert f"{21 / 45:.0%} (95% CI [{st['prop_KI_ci_lo']:.0%}, {st['prop_KI_ci_hi']:.0%}])" in share["evidence"]


def test_tau_sweep_counts_facts_below_each_threshold(full_result):
    """K_I share at τ = #(CS < τ) / #(finite CS), by hand, per method; the CI brackets it."""
    taus = [0.0, 0.1, 0.3, 0.5, 1.0]
    df = full_result.tau_sweep(taus, n_boot=200)
    for m in ("ig", "amig"):
        cs = full_result.facts.loc[full_result.facts["method"] == m, "cs"].to_numpy(dtype=float)
        cs = cs[np.isfinite(cs)]
        got = df[df["method"] == m].set_index("tau")
        assert got["n_facts"].iloc[0] == len(cs)
        for tau in taus:
            want = sum(c < tau for c in cs) / len(cs)
            assert got.loc[tau, "prop_KI"] == pytest.approx(want)
            assert got.loc[tau, "ci_low"] - 1e-12 <= want <= got.loc[tau, "ci_high"] + 1e-12
    assert (df[df["tau"] == 0.0]["prop_KI"] == 0).all()  # nothing is below 0
    assert "∩" not in set(df["method"])
    with pytest.raises(InvalidInputError):
        full_result.tau_sweep([1.5])
