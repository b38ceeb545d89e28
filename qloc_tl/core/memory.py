"""Free memory of a device, and out-of-memory errors: what the attribution engines size their passes by and how
they back off.

* :func:`free_memory` — bytes a new allocation can still take on a device: on CUDA the driver's free memory
  plus what PyTorch's caching allocator holds unused; on the CPU the least of ``MemAvailable``
  (``/proc/meminfo``; psutil where that file is missing) and the room left under the process's cgroup memory
  limit, when one is set. ``None`` where it cannot be told (other devices, no readable source).
* :func:`memory_cap` — the most items of a given size that fit in a fraction of it, within a fixed cap
  (the cap alone when the free memory is unknown).
* :func:`is_out_of_memory` — whether an exception is an allocation failure: ``torch.OutOfMemoryError``
  (CUDA), a ``RuntimeError`` of the CPU allocator (``DefaultCPUAllocator: can't allocate memory``,
  ``not enough memory``), a ``MemoryError``.
* :func:`run_chunked` — a loop over ``[0, total)`` in chunks that halves the chunk after an out-of-memory
  error (:func:`halve_after_oom`: one WARNING with the new size) and retries it, and raises
  :class:`~qloc_tl.core.errors.ResourceError`, saying what to lower, when one item per chunk does not fit.

Examples:
    >>> memory_cap(512, 1 << 20, "meta", 0.5)  # the free memory of a meta tensor is unknown: the cap
    512
    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    True
    >>> is_out_of_memory(RuntimeError("shape mismatch"))
    False
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from qloc_tl.core.errors import ResourceError

logger = logging.getLogger(__name__)

__all__ = ["free_memory", "memory_cap", "is_out_of_memory", "halve_after_oom", "run_chunked"]

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or ``None``."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * 1024 if len(parts) > 1 and parts[1].isdigit() else None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under the process's cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; of
    its own group as ``/proc/self/cgroup`` names it, else of the root), page cache it may reclaim
    (``inactive_file``) counted as free; ``None`` without a limit."""
    v2, v1 = ("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
    places = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "":
                places.append((root / group.lstrip("/"), *v2))
            elif "memory" in controllers.split(","):
                places.append((root / "memory" / group.lstrip("/"), *v1))
    except (OSError, ValueError):
        pass
    places += [(root, *v2), (root / "memory", *v1)]
    for d, limit_file, usage_file in places:
        limit, usage = _read_int(d / limit_file), _read_int(d / usage_file)
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        reclaimable = 0
        try:
            for line in (d / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                    reclaimable = int(value)
                    break
        except OSError:
            pass
        return max(0, limit - max(0, usage - reclaimable))
    return None


def _cpu_free() -> int | None:
    available = _meminfo_available()
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - psutil missing or unable to tell: unknown
            available = None
    room = _cgroup_room()
    known = [v for v in (available, room) if v is not None]
    return min(known) if known else None


def free_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation can still take on ``device`` (see the module docstring), or ``None`` when it
    cannot be told."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return _cpu_free()
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
            cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        except Exception:  # noqa: BLE001 - no driver / device: unknown
            return None
        return int(free) + max(0, int(cached))
    return None


def memory_cap(cap: int, item_bytes: int, device: torch.device | str, fraction: float) -> int:
    """``min(cap, fraction × free memory // item_bytes)``, at least 1: the most items of ``item_bytes`` bytes
    that fit in ``fraction`` of the free memory of ``device``; ``cap`` when the free memory is unknown."""
    free = free_memory(device)
    if free is None:
        return max(1, cap)
    return max(1, min(cap, int(fraction * free) // max(1, item_bytes)))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (``torch.OutOfMemoryError``, a ``MemoryError`` — which
    :class:`~qloc_tl.core.errors.ResourceError` is — or an allocator's ``RuntimeError``)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def halve_after_oom(exc: BaseException, size: int, what: str, advice: str) -> int:
    """The next, halved chunk size after the out-of-memory error ``exc`` at ``size`` ``what`` per pass (one
    WARNING with the new size); at 1, :class:`~qloc_tl.core.errors.ResourceError` saying ``advice`` (what to
    lower), or ``exc`` itself when it is one already. An exception that is not an out-of-memory error is
    raised again unchanged."""
    if not is_out_of_memory(exc):
        raise exc
    if size <= 1:
        if isinstance(exc, ResourceError):
            raise exc
        raise ResourceError(f"out of memory even with {what} per pass down to 1 ({exc}); {advice}") from exc
    new = size // 2
    logger.warning("out of memory with %d %s per pass; retrying with %d", size, what, new)
    return new


def _release(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the failed pass's blocks back to the driver


def run_chunked(
    total: int,
    size: int,
    step: Callable[[int, int], None],
    *,
    what: str,
    advice: str,
    next_stop: Callable[[int, int], int] | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Call ``step(start, stop)`` over ``[0, total)`` in chunks of up to ``size``; after an out-of-memory error
    the chunk is halved (:func:`halve_after_oom`) and ``step`` is called again from the same ``start``. Returns
    the size the loop ended with.

    ``step`` must leave no trace when it raises: it stores its results only after everything that allocates
    (a chunk that failed is run again). ``next_stop(start, size)`` gives the end of the chunk starting at
    ``start`` (default ``min(total, start + size)``).

    Examples:
        >>> seen = []
        >>> def step(a, b):
        ...     if b - a > 2:
        ...         raise MemoryError("fake")
        ...     seen.append((a, b))
        >>> run_chunked(8, 8, step, what="rows", advice="use fewer rows")
        2
        >>> seen
        [(0, 2), (2, 4), (4, 6), (6, 8)]
    """
    start = 0
    while start < total:
        stop = next_stop(start, size) if next_stop is not None else min(total, start + size)
        try:
            step(start, stop)
        except Exception as exc:
            size = halve_after_oom(exc, max(1, min(size, stop - start)), what, advice)  # anything else: raised
            _release(device)
        else:
            start = stop
    return size
