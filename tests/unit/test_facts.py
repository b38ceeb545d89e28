"""Facts, templates and the ParaRel loader against independent counts."""

from __future__ import annotations

import csv
import json

import pytest

from qloc_tl import DataError, Fact, InvalidInputError, Query, Template, load_pararel
from qloc_tl.data.facts import packaged_pararel_dir


def test_template_fill_and_validation():
    assert Template("[X] was born in [Y].").fill("Ada") == "Ada was born in"
    assert not Template.is_usable("[X] is [Y] citizen .")
    assert Template("The capital of [X] is [Y] .").fill("France") == "The capital of France is"
    assert Template("[X],  a subclass of [Y].").pattern == "[X], a subclass of [Y]."  # whitespace normalised
    for bad, msg in [
        ("[X] was born.", r"\[Y\] exactly once"),
        ("[Y] was born in [X].", "does not end with"),
        ("was born in [Y].", r"\[X\] exactly once"),
        ("[X] is a [Y]-language work.", "does not end with"),
        ("[X] [X] in [Y].", "exactly once"),
    ]:
        with pytest.raises(InvalidInputError, match=msg):
            Template(bad)


def test_fact_construction_and_errors():
    f = Fact("Ada", "P19", "London", ["Ada was born in", Query("Ada is from", "[X] is from [Y].", True)])
    assert f.prompts == ("Ada was born in", "Ada is from")
    assert f.queries[1].held_out and f.answer == " London"
    assert f.key == "P19|Ada|London"
    with pytest.raises(InvalidInputError, match="no queries"):
        Fact("Ada", "P19", "London", [])
    with pytest.raises(InvalidInputError, match="single query"):
        Fact("Ada", "P19", "London", "Ada was born in")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="object"):
        Fact("Ada", "P19", " ", ["Ada was born in"])
    with pytest.raises(InvalidInputError, match="at least 2"):
        Fact("Ada", "P19", "London", ["Ada was born in"]).require_neighbors(2)


def test_loader_counts_match_the_files():
    root = packaged_pararel_dir()
    data = load_pararel()
    summary = {r["relation"]: r for r in csv.DictReader(open(root / "relations_summary.tsv"), delimiter="\t")}
    assert len(data.templates) == 39
    per_rel: dict[str, int] = {}
    for f in data.facts:
        per_rel[f.relation] = per_rel.get(f.relation, 0) + 1
    for rel, usable in data.templates.items():
        lines = [ln for ln in open(root / "trex_lms_vocab" / f"{rel}.jsonl") if ln.strip()]
        assert data.n_facts_in_files[rel] == len(lines)
        # the independent per-relation summary counts [Y]-final patterns
        assert len(usable) == int(summary[rel]["n_patterns_y_final"]), rel
        # every fact has at least one query unless article agreement removed all of them
        assert per_rel.get(rel, 0) <= len(lines)
    assert sum(per_rel.values()) == 27610


def test_loader_builds_queries_from_final_y_templates_only():
    data = load_pararel(relations=["P19"], max_facts_per_relation=2)
    f = data.facts[0]
    raw = [json.loads(x)["pattern"] for x in open(packaged_pararel_dir() / "pattern_data/graphs_json/P19.jsonl")]
    final = [p for p in raw if p.rstrip(" .").endswith("[Y]")]
    assert len(f.queries) == len(final)
    assert f.queries[0].text == final[0].split("[Y]")[0].replace("[X]", f.subject).rstrip()
    assert all(not q.text.endswith(" ") for q in f.queries)
    assert len(data.excluded_templates["P19"]) == len(raw) - len(final)


def _write_pararel(root, patterns, facts, rel="P1"):
    (root / "pattern_data/graphs_json").mkdir(parents=True)
    (root / "trex_lms_vocab").mkdir()
    (root / f"pattern_data/graphs_json/{rel}.jsonl").write_text("\n".join(json.dumps({"pattern": p}) for p in patterns))
    (root / f"trex_lms_vocab/{rel}.jsonl").write_text(
        "\n".join(json.dumps({"sub_label": s, "obj_label": o, "uuid": f"u{i}"}) for i, (s, o) in enumerate(facts))
    )


def test_loader_excludes_non_final_templates_and_checks_articles(tmp_path):
    _write_pararel(
        tmp_path,
        ["[X] plays [Y].", "[Y] is played by [X].", "[X] is a [Y].", "[X] is an [Y]."],
        [("Bob", "piano"), ("Eve", "oboe")],
    )
    data = load_pararel(tmp_path)
    assert data.templates["P1"] == ("[X] plays [Y].", "[X] is a [Y].", "[X] is an [Y].")
    assert data.excluded_templates["P1"] == ("[Y] is played by [X].",)
    bob, eve = data.facts
    assert bob.prompts == ("Bob plays", "Bob is a")
    assert eve.prompts == ("Eve plays", "Eve is an")
    assert load_pararel(tmp_path, min_queries=3).facts == ()


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pararel(tmp_path / "nope")
    with pytest.raises(DataError, match="not a ParaRel directory"):
        load_pararel(tmp_path)
    _write_pararel(tmp_path / "bad", ["[X] plays [Y]."], [("Bob", "piano")])
    (tmp_path / "bad/trex_lms_vocab/P1.jsonl").write_text('{"sub_label": "Bob", "obj_label": "piano"}\n{oops\n')
    with pytest.raises(DataError, match="malformed JSON"):
        load_pararel(tmp_path / "bad")
    with pytest.raises(InvalidInputError, match="unknown relation"):
        load_pararel(relations=["P99999"])
