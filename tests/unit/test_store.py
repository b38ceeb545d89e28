"""RunStore: atomic parts, resume semantics, refusal of foreign configurations."""

from __future__ import annotations

import errno
import json
import os

import pandas as pd
import pytest

from qloc_tl import InvalidInputError, OutputError, ResumeMismatchError
from qloc_tl.core.store import (
    RunStore,
    atomic_save_figure,
    atomic_write_text,
    config_fingerprint,
    ensure_directory,
)


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


def _raise(code: int):
    """A stand-in for an OS call that fails with ``code``."""

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    return fail


def test_full_disk_mid_run_gives_output_error_and_keeps_earlier_parts(tmp_path, monkeypatch):
    """ENOSPC while a part is written: a typed error naming the cause, no temporary or partial file, and the
    parts stored before stay readable (what --resume continues from)."""
    s = RunStore.open(tmp_path / "run", {"x": 1})
    s.write_part("t", ["a"], pd.DataFrame({"fact_key": ["a"], "v": [1.0]}))
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    fail = _raise(errno.ENOSPC)
    monkeypatch.setattr(os, "fsync", fail)  # the data cannot be made durable: the disk is full
    with pytest.raises(OutputError, match="no space left on device") as info:
        s.write_part("t", ["b"], pd.DataFrame({"fact_key": ["b"], "v": [2.0]}))
    assert isinstance(info.value, OSError)  # `except OSError` keeps working
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before  # nothing half-written
    assert s.done("t") == {"a"} and s.read("t")["v"].tolist() == [1.0]


@pytest.mark.parametrize("code, cause", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")])
def test_unwritable_directory_gives_output_error(tmp_path, monkeypatch, code, cause):
    """A directory that refuses new files (simulated: root ignores permission bits, so chmod cannot show it)."""
    import tempfile

    fail = _raise(code)
    monkeypatch.setattr(tempfile, "mkstemp", fail)
    with pytest.raises(OutputError, match=cause):
        RunStore.open(tmp_path / "run", {"x": 1})
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no config.json, no temporary file


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            RunStore.open(ro / "run", {"x": 1})
        with pytest.raises(OutputError, match="permission denied"):
            atomic_write_text(ro / "f.txt", "x")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputError, match="a file of that name exists"):
        ensure_directory(tmp_path / "taken")
    with pytest.raises(OutputError):
        RunStore.open(tmp_path / "taken", {})
    assert (tmp_path / "taken").read_text() == "x"


def test_reopening_removes_the_temporaries_of_a_killed_write(tmp_path):
    """A SIGKILL during a write leaves its temporary file (never the target); the next open deletes it."""
    s = RunStore.open(tmp_path, {"x": 1})
    s.write_part("t", ["a"], pd.DataFrame({"fact_key": ["a"], "v": [1.0]}))
    stale = [tmp_path / "parts" / "t" / ".abc.parquet.k2j4.tmp", tmp_path / ".config.json.zz.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    again = RunStore.open(tmp_path, {"x": 1})
    assert not any(p.exists() for p in stale)
    assert again.done("t") == {"a"} and again.read("t")["v"].tolist() == [1.0]


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------


def _figure():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_atomic_save_figure_writes_the_format_of_the_path(tmp_path):
    fig = _figure()
    atomic_save_figure(fig, tmp_path / "a.png", dpi=50)
    atomic_save_figure(fig, str(tmp_path / "b.SVG"))
    atomic_save_figure(fig, tmp_path / "c.bin", format="pdf")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "b.SVG").read_bytes()[:400]
    assert (tmp_path / "c.bin").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.SVG", "c.bin"]  # no temporary file


def test_a_failing_savefig_leaves_no_partial_file(tmp_path, monkeypatch):
    """A figure that fails half-way through drawing (the Agg renderer, and any object whose ``savefig`` writes
    part of its output and raises): the old file stays whole, no new or temporary file."""
    from matplotlib.backends import backend_agg

    fig = _figure()
    (tmp_path / "old.png").write_bytes(b"old")

    def half(self, fh, *a, **k):
        fh.write(b"\x89PNG\r\n\x1a\n half an image")
        raise RuntimeError("renderer died (injected)")

    class HalfFigure:
        def savefig(self, fh, **kw):
            half(None, fh)

    monkeypatch.setattr(backend_agg.FigureCanvasAgg, "print_png", half)
    for f in (fig, HalfFigure()):
        for name in ("old.png", "new.png"):
            with pytest.raises(RuntimeError, match="injected"):
                atomic_save_figure(f, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"old"


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_failing_figure_write_is_an_output_error(tmp_path, monkeypatch, where):
    """A full disk while a figure is written, through the figure functions' ``path=``: OutputError, and neither
    a partial image nor a temporary file."""
    import pandas as pd

    from qloc_tl.methods.completeness import plot_path_probabilities
    from qloc_tl.reporting.editing_plots import plot_strength_sweep

    pytest.importorskip("matplotlib")
    curves = pd.DataFrame({"layer": [0, 0, 1, 1], "alpha": [0.0, 1.0, 0.0, 1.0], "prob": [0.1, 0.5, 0.2, 0.4]})
    sweep = pd.DataFrame({"lambda2": [1.0, 2.0], "method": ["ig", "ig"], "n_facts": [3, 3], "rel": [0.1, 0.2],
                          "gen": [0.1, 0.3], "loc": [0.9, 0.8]})  # fmt: skip
    monkeypatch.setattr(os, where, _raise(errno.ENOSPC))
    with pytest.raises(OutputError, match="no space left on device"):
        plot_path_probabilities(curves, path=tmp_path / "curves.png")
    with pytest.raises(OutputError, match="no space left on device"):
        plot_strength_sweep(sweep, path=tmp_path / "sweep.pdf")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    plot_path_probabilities(curves, path=tmp_path / "curves.png")  # and once the disk has room
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
