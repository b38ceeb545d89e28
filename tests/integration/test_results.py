"""The committed SmolLM2 results reproduce: per-fact consistency scores of a slice of the run's facts, rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qloc_tl import Fact
from qloc_tl.data.facts import Query
from qloc_tl.experiments.consistency import ConsistencyConfig, run_consistency

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "smollm2-135m"


def _facts(n: int) -> list[Fact]:
    blob = json.loads((RESULTS / "facts.json").read_text())
    cheap = [r for r in blob if len(r["queries"]) == 2][:n]  # two-query facts: the cheapest to rerun
    return [Fact(r["subject"], r["relation"], r["object"], tuple(Query(t, tp) for t, tp in r["queries"]), r["key"]) for r in cheap]


def test_committed_cs_values_reproduce_on_a_slice(smollm2_model):
    """IG consistency of 2 of the run's facts, rerun as the CLI runs it (m = 20, KNs at 0.2 · max): the same
    relaxed and strict CS as the committed table, exactly (ratios of neuron counts)."""
    facts = _facts(2)
    res = run_consistency(
        smollm2_model, facts, ConsistencyConfig(methods=("ig",), steps=20, n_boot=10, n_perm=10), known_only=False
    )
    committed = pd.read_csv(RESULTS / "consistency_facts.csv")
    committed = committed[committed["method"] == "ig"].set_index("fact_key")
    got = res.facts[res.facts["method"] == "ig"].set_index("fact_key")
    for f in facts:
        assert got.loc[f.key, "cs_relaxed"] == committed.loc[f.key, "cs_relaxed"]
        assert got.loc[f.key, "cs_strict"] == committed.loc[f.key, "cs_strict"]
        assert got.loc[f.key, "n_union"] == committed.loc[f.key, "n_union"]


def test_committed_summary_agrees_with_its_tables():
    summary = json.loads((RESULTS / "summary.json").read_text())
    assert all((RESULTS / name).is_file() for name in summary["tables"])
    facts = pd.read_csv(RESULTS / "consistency_facts.csv")
    assert summary["n_facts"] == facts.loc[facts["method"] == summary["methods"][0], "fact_key"].nunique()
    assert len(json.loads((RESULTS / "facts.json").read_text())) == summary["n_facts"]
    assert sorted(facts["relation"].unique()) == summary["relations"]
