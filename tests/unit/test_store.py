"""RunStore: atomic parts, resume semantics, refusal of foreign configurations."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from qloc_tl import InvalidInputError, ResumeMismatchError
from qloc_tl.core.store import RunStore, atomic_write_text, config_fingerprint


def test_fingerprint_ignores_key_order():
    assert config_fingerprint({"a": 1, "b": [1, 2]}) == config_fingerprint({"b": [1, 2], "a": 1})
    assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 2})


def test_parts_roundtrip_and_replacement(tmp_path):
    s = RunStore.open(tmp_path, {"x": 1})
    s.write_part("t", ["a", "b"], pd.DataFrame({"fact_key": ["a", "b"], "v": [1.0, 2.0]}))
    s.write_part("t", ["c"], pd.DataFrame({"fact_key": [], "v": []}))  # a unit with no rows still counts
    assert s.done("t") == {"a", "b", "c"}
    s.write_part("t", ["a", "b"], pd.DataFrame({"fact_key": ["a", "b"], "v": [3.0, 4.0]}))  # rewrite: no duplicates
    df = s.read("t").sort_values("fact_key")
    assert df["v"].tolist() == [3.0, 4.0]
    with pytest.raises(InvalidInputError, match="outside its keys"):
        s.write_part("t", ["a"], pd.DataFrame({"fact_key": ["z"], "v": [1]}))


def test_incomplete_part_is_ignored(tmp_path):
    s = RunStore.open(tmp_path, {"x": 1})
    s.write_part("t", ["a"], pd.DataFrame({"fact_key": ["a"], "v": [1]}))
    # simulate a kill between the keys file and the data file of a second part
    (tmp_path / "parts/t/deadbeef.keys.json").write_text(json.dumps(["b"]))
    # and a stray temp file of an interrupted atomic write
    (tmp_path / "parts/t/.x.parquet.tmp").write_bytes(b"garbage")
    assert s.done("t") == {"a"}
    assert s.read("t")["fact_key"].tolist() == ["a"]


def test_reopen_with_other_config_is_refused(tmp_path):
    RunStore.open(tmp_path, {"method": "ig", "steps": 20})
    with pytest.raises(ResumeMismatchError, match=r"steps: 20 -> 10"):
        RunStore.open(tmp_path, {"method": "ig", "steps": 10})
    s = RunStore.open(tmp_path, {"steps": 20, "method": "ig"})
    s.write_part("t", ["a"], pd.DataFrame({"fact_key": ["a"]}))
    with pytest.raises(InvalidInputError, match="resume"):
        RunStore.open(tmp_path, {"steps": 20, "method": "ig"}, resume=False)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_final_tables(tmp_path):
    s = RunStore.open(tmp_path, {})
    path = s.write_table("summary", pd.DataFrame({"a": [1, 2]}))
    assert pd.read_parquet(path)["a"].tolist() == [1, 2]
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "a"
