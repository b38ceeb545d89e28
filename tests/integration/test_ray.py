"""``qloc-tl run --ray`` on a local Ray instance (2 CPUs) with the built-in model: the Ray run's tables equal an
unsharded local run's; a shard task SIGKILLed mid-way is retried by Ray and resumes, losing and duplicating
nothing; and the Slurm job-array recipe of docs/scale_out.md, with a local loop standing in for the array,
gives the same tables.

Skipped when ray is not installed, unless QLOC_REQUIRE_RAY=1 (set by .ci/run for the suite whose venv has the
``ray`` extra), where a missing ray is a failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli import needs_builtin

from qloc_tl.cli import main

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--quick", "--max-facts", "4", "--no-progress"]  # 4 built-in facts, 2 per shard: about 20 s locally

# Per-query float diagnostics of consistency_queries: a shard batches other prompts together than the unsharded
# run, so these float32 values differ in the last bits (as between the shards of tests/integration/test_cli.py);
# the scores' thresholds, the KN sets and every fact-level table come out identical and are compared exactly.
QUERY_FLOATS = {"clean_prob": 1e-5, "max_score": 1e-5, "max_abs_completeness_delta": 1e-3}
KEYS = ("method", "fact_key", "query_index", "layer", "neuron", "relation", "kind", "split", "setting", "metric", "name")


def ray_or_skip():
    try:
        import ray
    except ImportError:
        if os.environ.get("QLOC_REQUIRE_RAY") == "1":
            pytest.fail("QLOC_REQUIRE_RAY=1 but ray is not installed (pip install 'qloc-tl[ray]')")
        pytest.skip("the Ray tests need ray (pip install 'qloc-tl[ray]')")
    return ray


pytestmark = needs_builtin


@pytest.fixture(scope="module")
def local_ray():
    ray = ray_or_skip()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qloc_tl.cli", *argv], capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The unsharded local run of the same command."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _cli("run", *RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _tables(out: Path) -> dict[str, object]:
    import pandas as pd

    return {str(p.relative_to(out)): pd.read_parquet(p) for p in sorted(out.glob("*/*.parquet"))}


def _sorted(df):
    keys = [k for k in KEYS if k in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True) if keys else df


def assert_same_tables(ref: Path, out: Path) -> None:
    """Every table of ``out`` equals the one of ``ref`` (rows sorted by their keys): exactly, but for the
    per-query float diagnostics (``QUERY_FLOATS``, relative tolerance)."""
    import pandas as pd

    a, b = _tables(ref), _tables(out)
    assert a.keys() == b.keys() and len(a) >= 10, (sorted(a), sorted(b))
    for name in a:
        x, y = _sorted(a[name]), _sorted(b[name])
        loose = [c for c in QUERY_FLOATS if c in x.columns] if name.endswith("consistency_queries.parquet") else []
        for c in loose:
            pd.testing.assert_series_equal(x[c], y[c], check_exact=False, rtol=QUERY_FLOATS[c], atol=1e-7, obj=f"{name}:{c}")
        pd.testing.assert_frame_equal(x.drop(columns=loose), y.drop(columns=loose), check_exact=True, obj=name)
    q = b["consistency/consistency_queries.parquet"]
    assert not q.duplicated(["method", "fact_key", "query_index"]).any()
    assert len(q) == len(a["consistency/consistency_queries.parquet"])


def _attempts(out: Path, i: int) -> list[dict]:
    from qloc_tl.cli.ray_run import attempts

    return attempts(out / "shards" / str(i))


def test_ray_run_tables_equal_local_run(local_ray, reference_run, tmp_path):
    out = tmp_path / "ray"
    assert main(["run", "--ray", *RUN, "--out", str(out)]) == 0
    assert_same_tables(reference_run, out)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["n_facts"] == 4 and info["stages"] == ["consistency", "ql", "edit"]
    assert info["ray"]["shards"] == 2 and info["ray"]["attempts"] == {"0": 1, "1": 1}
    assert info["ray"]["task_resources"] == {"num_cpus": 1}
    assert (out / "report.html").is_file() and list((out / "figures").glob("*.png"))


def test_killed_shard_task_is_retried_and_loses_nothing(local_ray, reference_run, tmp_path):
    """SIGKILL the worker of shard 0 once its first consistency part (method ig) is stored: Ray retries the task,
    the retry resumes (the stored part is not rewritten, only the missing method's part is added) and the merged
    tables equal the local run's, with no row twice."""
    out = tmp_path / "ray_killed"
    parts = out / "shards" / "0" / "consistency" / "parts" / "queries"
    seen: dict[str, object] = {}

    def killer() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            first = sorted(parts.glob("*.parquet")) if parts.is_dir() else []
            recs = _attempts(out, 0)
            if first and recs:
                seen["part"] = first[0]
                seen["mtime"] = first[0].stat().st_mtime_ns
                seen["n_parts"] = len(first)
                try:
                    os.kill(recs[0]["pid"], signal.SIGKILL)
                    seen["killed"] = recs[0]["pid"]
                except ProcessLookupError:
                    seen["killed"] = None
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    assert main(["run", "--ray", *RUN, "--out", str(out)]) == 0
    watcher.join(timeout=5)
    assert seen.get("killed"), f"the shard task was not killed mid-way: {seen}"
    assert seen["n_parts"] == 1  # killed with ig stored and amig still to do
    a0, a1 = _attempts(out, 0), _attempts(out, 1)
    assert [r["attempt"] for r in a0] == [1, 2] and a0[0]["pid"] != a0[1]["pid"] and len(a1) == 1
    assert json.loads((out / "run.json").read_text())["ray"]["attempts"] == {"0": 2, "1": 1}
    # the killed attempt's part survived unchanged (resumed, not recomputed); one part per method, none twice
    assert seen["part"].stat().st_mtime_ns == seen["mtime"]  # type: ignore[union-attr]
    assert len(list(parts.glob("*.parquet"))) == 2
    assert_same_tables(reference_run, out)


def test_slurm_array_recipe_with_a_local_loop(reference_run, tmp_path):
    """docs/scale_out.md's Slurm recipe, a loop over SLURM_ARRAY_TASK_ID standing in for the array: each task runs
    the consistency stage of its shard, then one job merges and finishes the run; the tables equal the local run's."""
    ray_free = " ".join(RUN)
    script = f"""
set -euo pipefail
N=2
for SLURM_ARRAY_TASK_ID in 0 1; do
  {sys.executable} -m qloc_tl.cli consistency {ray_free} --no-figures --shard $SLURM_ARRAY_TASK_ID/$N \\
      --out runs/shard$SLURM_ARRAY_TASK_ID --resume
done
{sys.executable} -m qloc_tl.cli merge runs/all runs/shard0 runs/shard1
{sys.executable} -m qloc_tl.cli run {ray_free} --resume --out runs/all
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tables(reference_run, tmp_path / "runs" / "all")
    info = json.loads((tmp_path / "runs" / "all" / "run.json").read_text())
    assert info["status"] == "finished" and info["n_facts"] == 4 and info["stages"] == ["consistency", "ql", "edit"]


def test_ray_flag_errors_are_one_line(tmp_path, capsys):
    """--ray with --shard, and --ray into a non-empty --out without --resume, are refused before Ray starts."""
    ray_or_skip()
    assert main(["run", "--ray", "--shard", "0/2", "--out", str(tmp_path / "a")]) == 2
    assert "drop --shard" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    assert main(["run", "--ray", "--out", str(tmp_path / "b")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_missing_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["run", "--ray", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'qloc-tl[ray]'" in err[0]


def test_unreachable_ray_address_is_a_one_line_error(tmp_path):
    """A dead --ray-address fails fast with one line (ray.init alone would wait for it indefinitely)."""
    ray_or_skip()
    proc = _cli("run", "--ray", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "o"))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "unreachable" in err[0], proc.stderr[-2000:]
