"""The editing experiment end to end (experiments.editing, reporting.claims / editing_plots): the runner on a tiny
model with hand-made facts against direct recomputation, resume, classes, claims, plots; and edits of the built-in
model by hand.

The unit tests of the edits, metrics and CAS themselves are in ``tests/unit/test_editing.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from qloc_tl import (
    Fact,
    InvalidInputError,
    Neuron,
    ResumeMismatchError,
)
from qloc_tl.core.edits import update
from qloc_tl.experiments.editing import (
    EditingConfig,
    fact_attributions,
    kn_sets_from_attributions,
    run_editing_experiment,
)
from qloc_tl.methods.consistency_score import classify_facts
from qloc_tl.methods.edit_metrics import last_token_logprobs
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


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


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
    # every fact is either edited or skipped with a reason
    assert set(res.rows.fact_key) | set(res.skipped.fact_key) == {f.key for f in facts} and len(res.rows)
    # the runner's own attribution equals fact_attributions passed in (one attribute_neurons call per fact)
    attrs = fact_attributions(model, facts, config=cfg)
    given = run_editing_experiment(model, facts, config=cfg, attributions=attrs, known_only=False)
    pd.testing.assert_frame_equal(res.rows, given.rows)
    # |N_i| is the size of the edited query's KN set, selected here from those attributions directly
    kn = kn_sets_from_attributions(attrs, cfg.kn_threshold)
    by_key = {f.key: f for f in facts}
    for row in res.rows[res.rows["method"] == "N_i"].itertuples():
        qi = list(by_key[row.fact_key].prompts).index(row.edited_query)
        assert row.n_neurons == len(kn[row.fact_key][qi]) > 0


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
    from qloc_tl.core.tokens import answer_token_id
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
