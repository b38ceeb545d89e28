"""Crash-safe, resumable persistence for experiment runners.

A run directory holds:

* ``config.json`` — the run's configuration and its fingerprint. Reopening the directory with a different
  configuration raises :class:`~qloc_tl.core.errors.ResumeMismatchError` naming the keys that differ, instead of
  silently mixing results of two configurations;
* ``parts/<table>/<digest>.parquet`` — results of one unit of work (usually a chunk of facts), each with a
  ``fact_key`` column. Parts are written to a temporary file and renamed into place (``os.replace`` is
  atomic on POSIX), so a run killed at any point leaves only complete parts. Writing the same unit again
  replaces its part, so no fact is ever stored twice;
* final tables ``<name>.parquet`` and ``<name>.csv``, also written atomically.

A directory that cannot be written (read-only, no permission, disk full) raises
:class:`~qloc_tl.core.errors.OutputError` naming the path and the cause; the temporary file of the failed write
is removed, so no half-written file is left and the parts stored before it stay valid for a resumed run.

Examples:
    >>> import pandas as pd, tempfile
    >>> d = tempfile.mkdtemp()
    >>> store = RunStore.open(d, {"method": "ig"})
    >>> store.write_part("scores", ["f1", "f2"], pd.DataFrame({"fact_key": ["f1", "f2"], "x": [1, 2]}))
    >>> sorted(store.done("scores"))
    ['f1', 'f2']
    >>> RunStore.open(d, {"method": "sig"})
    Traceback (most recent call last):
    ...
    qloc_tl.core.errors.ResumeMismatchError: ...
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qloc_tl.core.errors import InvalidInputError, OutputError, ResumeMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "RunStore",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_table",
    "atomic_save_figure",
    "config_fingerprint",
    "ensure_directory",
    "remove_stale_temporaries",
]

_CAUSES = {
    errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
}  # fmt: skip


def _output_error(path: Path, exc: OSError) -> OutputError:
    cause = _CAUSES.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return OutputError(
        f"cannot write {str(path)!r}: {cause}; free space or pick a writable --out / out_dir (no half-written "
        f"file was left; rerun with --resume to continue from what was stored)"
    )


def ensure_directory(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory (created with its parents), or :class:`~qloc_tl.core.errors.OutputError` when it
    cannot be created."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot use {str(p)!r} as an output directory: a file of that name exists") from None
    except OSError as exc:
        raise _output_error(p, exc) from None
    return p


def _canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (key order does not matter)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete the temporary files (``.<name>.<random>.tmp``) that writes of a killed process left under
    ``directory``; returns how many. A SIGKILL cannot be caught, so a write cut short leaves its temporary
    file, never the target: removing it on the next open tidies up without losing a result. A directory is
    written by one process at a time, so no temporary file of a live write is touched."""
    root = Path(directory)
    n = 0
    if root.is_dir():
        for p in root.rglob(".*.tmp"):
            with _suppress():
                p.unlink()
                n += 1
    return n


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and an atomic rename: ``path`` holds
    either its old content or all of ``data``, never a part. A failed write (read-only directory, full disk)
    removes the temporary file and raises :class:`~qloc_tl.core.errors.OutputError`."""
    path = Path(path)
    ensure_directory(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with _suppress():
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise _output_error(path, exc) from None
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_table(path_stem: str | os.PathLike[str], df: pd.DataFrame, *, csv: bool = True) -> None:
    """Write ``df`` as ``<stem>.parquet`` (and ``<stem>.csv``) atomically."""
    import io

    stem = Path(path_stem)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(stem.with_suffix(".parquet"), buf.getvalue())
    if csv:
        atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))


def atomic_save_figure(fig: Any, path: str | os.PathLike[str], **savefig_kwargs: Any) -> None:
    """``fig.savefig(path, **savefig_kwargs)`` written atomically: the figure is drawn into memory, in the format
    ``savefig_kwargs["format"]`` or that of ``path``'s suffix (matplotlib's default without one), then written
    by :func:`atomic_write_bytes`. A figure that fails to draw leaves nothing on disk; a failed write raises
    :class:`~qloc_tl.core.errors.OutputError` and leaves ``path`` as it was, with no temporary file."""
    import io

    path = Path(path)
    fmt = savefig_kwargs.pop("format", None) or (path.suffix[1:].lower() or None)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return True


@dataclass(frozen=True)
class RunStore:
    """A run directory opened for a given configuration (see module docstring)."""

    root: Path
    config: Mapping[str, Any]

    @classmethod
    def open(cls, directory: str | os.PathLike[str], config: Mapping[str, Any], *, resume: bool = True) -> RunStore:
        """Create or reopen ``directory`` for ``config``.

        Args:
            resume: when False, a directory that already holds parts is refused (choose a new directory
                or pass ``resume=True``); when True, matching earlier results are kept and reused.

        Raises:
            ResumeMismatchError: the directory was written by a different configuration.
        """
        root = ensure_directory(directory)
        remove_stale_temporaries(root)
        cfg_path = root / "config.json"
        config = json.loads(_canonical(config))
        fp = config_fingerprint(config)
        if cfg_path.is_file():
            try:
                old = json.loads(cfg_path.read_text())
            except json.JSONDecodeError:
                raise ResumeMismatchError(f"{cfg_path} is not valid JSON; this is not a qloc_tl run directory") from None
            old_cfg = old.get("config", {})
            if old.get("fingerprint") != fp:
                keys = sorted(
                    k for k in set(old_cfg) | set(config) if old_cfg.get(k, "<missing>") != config.get(k, "<missing>")
                )
                detail = ", ".join(f"{k}: {old_cfg.get(k, '<missing>')!r} -> {config.get(k, '<missing>')!r}" for k in keys[:8])
                raise ResumeMismatchError(
                    f"{root} holds results of another configuration ({detail}); refusing to mix them. "
                    f"Use a new output directory, or rerun with the original settings"
                )
            store = cls(root, config)
            if not resume and store.has_parts():
                raise InvalidInputError(
                    f"{root} already holds results; pass resume=True (CLI: --resume) to continue, or pick a new directory"
                )
            return store
        atomic_write_text(cfg_path, json.dumps({"fingerprint": fp, "config": config}, indent=2, sort_keys=True))
        return cls(root, config)

    def has_parts(self) -> bool:
        parts = self.root / "parts"
        return parts.is_dir() and any(parts.rglob("*.parquet"))

    def _part_dir(self, table: str) -> Path:
        if not table or "/" in table or table.startswith("."):
            raise InvalidInputError(f"bad table name {table!r}")
        return self.root / "parts" / table

    def write_part(self, table: str, keys: Sequence[str], df: pd.DataFrame) -> None:
        """Store the results of the unit of work covering ``keys`` (atomically; replaces an earlier copy)."""
        import io

        if "fact_key" not in df.columns:
            raise InvalidInputError("a part must have a 'fact_key' column")
        keys = list(keys)
        extra = set(df["fact_key"]) - set(keys)
        if extra:
            raise InvalidInputError(f"part rows name facts outside its keys: {sorted(extra)[:3]}")
        digest = hashlib.sha1("\x1f".join(sorted(keys)).encode()).hexdigest()[:20]
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        # the key list rides along so facts with no rows still count as done
        atomic_write_text(self._part_dir(table) / f"{digest}.keys.json", json.dumps(sorted(keys)))
        atomic_write_bytes(self._part_dir(table) / f"{digest}.parquet", buf.getvalue())

    def _parts(self, table: str) -> list[tuple[Path, list[str]]]:
        d = self._part_dir(table)
        if not d.is_dir():
            return []
        out = []
        for p in sorted(d.glob("*.parquet")):
            kp = p.with_name(p.name[: -len(".parquet")] + ".keys.json")
            if not kp.is_file():
                continue  # a part is complete only once both files exist (keys are written first)
            out.append((p, json.loads(kp.read_text())))
        return out

    def done(self, table: str) -> set[str]:
        """Fact keys whose results are stored in ``table``."""
        keys: set[str] = set()
        for _, ks in self._parts(table):
            keys.update(ks)
        return keys

    def read(self, table: str) -> pd.DataFrame:
        """All stored rows of ``table`` (parts concatenated; empty frame when none)."""
        frames = [pd.read_parquet(p) for p, _ in self._parts(table)]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    def write_table(self, name: str, df: pd.DataFrame, *, csv: bool = True) -> Path:
        """Write a final table as ``<root>/<name>.parquet`` (+ ``.csv``) atomically; returns the parquet path."""
        atomic_write_table(self.root / name, df, csv=csv)
        return (self.root / name).with_suffix(".parquet")
