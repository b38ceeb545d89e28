"""qloc_tl.core.memory: free memory from /proc/meminfo and cgroup files, out-of-memory recognition, the
back-off loop."""

from __future__ import annotations

import logging

import pytest
import torch

from qloc_tl.core import memory as memory_mod
from qloc_tl.core.errors import QlocError, ResourceError


def test_meminfo_available(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24683520 kB\nMemFree:        1000 kB\nMemAvailable:   20447232 kB\n")
    assert memory_mod._meminfo_available(f) == 20447232 * 1024
    f.write_text("MemTotal:       24683520 kB\n")  # a kernel without MemAvailable: unknown
    assert memory_mod._meminfo_available(f) is None
    assert memory_mod._meminfo_available(tmp_path / "missing") is None


def test_cgroup_room(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_mod.Path, "read_text", _no_proc_self(memory_mod.Path.read_text))
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit
    (tmp_path / "memory.current").write_text("5000\n")
    assert memory_mod._cgroup_room(tmp_path) is None
    (tmp_path / "memory.max").write_text("10000\n")
    assert memory_mod._cgroup_room(tmp_path) == 5000
    (tmp_path / "memory.stat").write_text("anon 3000\ninactive_file 1500\nactive_file 500\n")
    assert memory_mod._cgroup_room(tmp_path) == 6500  # reclaimable page cache counts as free
    (tmp_path / "memory.current").write_text("20000\n")
    assert memory_mod._cgroup_room(tmp_path) == 0  # over the limit: nothing left
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1 "no limit"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("100")
    assert memory_mod._cgroup_room(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("1100")
    assert memory_mod._cgroup_room(v1) == 1000


def _no_proc_self(real):
    def read_text(self, *a, **k):
        if str(self) == "/proc/self/cgroup":
            raise OSError("no /proc here")
        return real(self, *a, **k)

    return read_text


def test_free_memory_of_devices(monkeypatch):
    free = memory_mod.free_memory("cpu")
    assert free is None or free > 0
    assert memory_mod.free_memory("meta") is None
    # the least of MemAvailable and the cgroup room; psutil only without /proc/meminfo
    monkeypatch.setattr(memory_mod, "_meminfo_available", lambda: 8000)
    monkeypatch.setattr(memory_mod, "_cgroup_room", lambda: 3000)
    assert memory_mod.free_memory("cpu") == 3000
    monkeypatch.setattr(memory_mod, "_cgroup_room", lambda: None)
    assert memory_mod.free_memory(torch.device("cpu")) == 8000
    monkeypatch.setattr(memory_mod, "_meminfo_available", lambda: None)
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)  # not installed
    assert memory_mod.free_memory("cpu") is None


@pytest.mark.parametrize(
    "exc, oom",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"), True),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes."), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)"), True),
        (MemoryError(), True),
        (ResourceError("x"), True),
        (RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), False),
        (ValueError("out of memory"), False),  # only allocator errors (RuntimeError, MemoryError) count
        (KeyError("blocks.0.mlp.hook_post"), False),
    ],
)
def test_is_out_of_memory(exc, oom):
    assert memory_mod.is_out_of_memory(exc) is oom


def test_run_chunked_halves_warns_and_gives_up_at_one(caplog):
    done: list[tuple[int, int]] = []

    def step(a, b):
        if b - a > 3:
            raise RuntimeError("CUDA out of memory (fake)")
        done.append((a, b))

    with caplog.at_level(logging.WARNING, logger="qloc_tl.core.memory"):
        size = memory_mod.run_chunked(10, 16, step, what="rows", advice="fewer rows")
    assert done == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)] and size == 2
    # one warning per halving, with the new size: 10 (the first chunk: all the rows) -> 5 -> 2
    assert [r.getMessage() for r in caplog.records] == [
        "out of memory with 10 rows per pass; retrying with 5",
        "out of memory with 5 rows per pass; retrying with 2",
    ]

    def never(a, b):
        raise MemoryError("fake")

    with pytest.raises(ResourceError, match="rows per pass down to 1.*fewer rows") as info:
        memory_mod.run_chunked(4, 4, never, what="rows", advice="fewer rows")
    assert isinstance(info.value, QlocError) and isinstance(info.value.__cause__, MemoryError)

    def broken(a, b):
        raise ValueError("not a memory problem")

    calls = []
    with pytest.raises(ValueError, match="not a memory problem"):
        memory_mod.run_chunked(4, 4, lambda a, b: (calls.append(1), broken(a, b)), what="rows", advice="")
    assert calls == [1]  # raised at once, not retried


def test_run_chunked_with_uneven_chunks():
    """``next_stop`` gives the chunks their shape; after a back-off the same start runs in a chunk half as long
    as the one that failed (not half the nominal size)."""
    done: list[tuple[int, int]] = []

    def step(a, b):
        if b - a > 2:
            raise MemoryError
        done.append((a, b))

    blocks = 3  # chunks end on multiples of 3 or after size samples, whichever comes first

    def stop(a, size):
        return min(a + size, (a // blocks + 1) * blocks, 9)

    assert memory_mod.run_chunked(9, 8, step, what="samples", advice="", next_stop=stop) == 1
    assert done == [(i, i + 1) for i in range(9)]


def test_cgroup_room_of_the_process_group(tmp_path, monkeypatch):
    """The limit of the group /proc/self/cgroup names (v1 memory controller, v2 unified), before the root's."""
    real = memory_mod.Path.read_text
    own = {"text": "4:memory:/jobs/a\n0::/\n"}

    def read_text(self, *a, **k):
        return own["text"] if str(self) == "/proc/self/cgroup" else real(self, *a, **k)

    monkeypatch.setattr(memory_mod.Path, "read_text", read_text)
    group = tmp_path / "memory" / "jobs" / "a"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text("4096")
    (group / "memory.usage_in_bytes").write_text("1024")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("1")
    assert memory_mod._cgroup_room(tmp_path) == 3072
    own["text"] = "0::/slice/b\n"
    (tmp_path / "slice" / "b").mkdir(parents=True)
    (tmp_path / "slice" / "b" / "memory.max").write_text("2048")
    (tmp_path / "slice" / "b" / "memory.current").write_text("48")
    assert memory_mod._cgroup_room(tmp_path) == 2000
