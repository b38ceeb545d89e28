"""``qloc-tl run --ray``: one run spread over a Ray cluster, with Ray as the scheduler.

The run's facts are split into ``n`` shards (``--shard i/n``, facts ``i, i+n, ...``). Each shard is one Ray
task that runs the consistency stage (the per-query attribution with every method, the dominant cost) in its
own directory ``OUT/shards/i`` through the same code as a local run, persisting its parts in the resumable
store. A task that dies (worker killed, node lost, out of memory) or raises is retried by Ray
(``max_retries``, ``retry_exceptions``); the retry resumes from the parts already written, so nothing is
computed twice and nothing is lost. When every shard has finished, one more task merges the shards into
``OUT`` with :func:`qloc_tl.cli.stages.merge` and finishes the run there: the query-localization and editing
stages (whose inputs depend on the whole fact set) and the report, exactly as a local run writes them.

Scheduling, queueing and retries are Ray's; this module only describes the tasks. ``ray`` is imported
lazily, so the package works without it (``pip install 'qloc-tl[ray]'``). Every node must be able to import
``qloc_tl`` and read and write ``OUT`` (a shared file system); see ``docs/scale_out.md``.
"""


from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from qloc_tl.cli.parser import DEFAULTS, STAGES, run_settings
from qloc_tl.cli.stages import execute, merge
from qloc_tl.core.errors import InvalidInputError, QlocError

logger = logging.getLogger("qloc_tl.cli")

SHARDS_DIR = "shards"
"""Subdirectory of ``--out`` holding one output directory per shard (``shards/0``, ``shards/1``, ...)."""

ATTEMPTS_FILE = "ray_attempts.jsonl"
"""Per-shard log of task attempts (one JSON line each: attempt, pid, node, start time), written by the task."""

MAX_RETRIES = 3
"""Ray retries of a shard task after a failure (a dead worker or an exception other than a QlocError)."""


class ShardFailedError(QlocError, RuntimeError):
    """A shard task (or the merge task) still failed after Ray's retries."""


def import_ray() -> Any:
    """The ``ray`` module, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise InvalidInputError(f"--ray needs the ray package ({exc}); install it with: pip install 'qloc-tl[ray]'") from None
    return ray


def connect(ray: Any, address: str | None) -> bool:
    """Connect to the Ray cluster at ``address`` (``None``: an already initialized Ray, else a new local
    instance); returns whether this call started the connection (and so should shut it down)."""
    if ray.is_initialized():
        if address:
            logger.warning("Ray is already initialized in this process; --ray-address %s is ignored", address)
        return False
    if address:
        check_reachable(address)
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # ConnectionError, or RuntimeError/ValueError for a malformed or dead address
        where = f"the Ray cluster at --ray-address {address!r}" if address else "a local Ray instance"
        hint = "; start one with 'ray start --head' or check the address (host:port, or 'auto')" if address else ""
        raise InvalidInputError(f"cannot connect to {where}: {exc}{hint}") from None
    return True


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) address that accepts no TCP connection within
    ``timeout_s``: ``ray.init`` would wait for it indefinitely. ``auto`` and other forms are left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InvalidInputError(
            f"--ray-address {address!r} is unreachable ({exc}); start the cluster with 'ray start --head' "
            "and pass its address (host:port), or omit --ray-address for a local Ray instance"
        ) from None


def task_resources(ray: Any, args: argparse.Namespace, settings: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Ray options of one shard task and how many such tasks the cluster runs at once.

    ``--device cuda``: one GPU per task (Ray sets ``CUDA_VISIBLE_DEVICES``, so ``cuda`` is the task's GPU).
    ``--device cpu``: ``--threads`` CPUs per task (default per model kind), capped at the largest node.
    """
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if settings["device"] == "cuda":
        if gpus < 1:
            raise InvalidInputError("--device cuda with --ray: the Ray cluster has no GPU; use --device cpu or add GPU nodes")
        return {"num_gpus": 1, "num_cpus": 1}, gpus
    if gpus:
        logger.warning("the Ray cluster has %d GPU(s) but --device is cpu: the tasks use CPUs only; pass --device cuda to use them", gpus)
    kind = "builtin" if settings["model"] == "builtin" else "pretrained"
    threads = getattr(args, "threads", None) or DEFAULTS[kind]["threads"]
    node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    biggest = max(node_cpus, default=int(total.get("CPU", 1))) or 1
    per_task = max(1, min(threads, biggest))
    return {"num_cpus": per_task}, max(1, int(total.get("CPU", 1)) // per_task)


def shard_count(args: argparse.Namespace, settings: dict[str, Any], slots: int) -> int:
    """Shards of the run: ``--ray-shards`` or one per task slot of the cluster, never more than the run's facts
    (an empty shard would be an error)."""
    n = getattr(args, "ray_shards", None) or slots
    cap = settings["max_facts"]
    screened = (Path(settings["facts"]) / "known_facts.json").is_file()  # a 'qloc-tl known' output directory
    if settings.get("known", "off") == "off" or screened:
        from qloc_tl.cli.facts import load_facts

        cap = min(cap, len(load_facts({**settings, "shard": None})))  # no model needed: nothing to screen
    else:
        logger.warning("every shard screens the candidate facts for known ones itself (and the merge task once more); "
                       "for a large run, screen once with 'qloc-tl known' (--shard i/n splits it) and pass its output "
                       "directory as --facts")  # fmt: skip
    if n > cap:
        logger.info("%d shards requested but the run has %d facts: using %d shards", n, cap, cap)
    return max(1, min(n, cap))


def shard_namespace(args: argparse.Namespace, i: int, n: int, out: Path, threads: int | None) -> argparse.Namespace:
    """The arguments of shard ``i`` of ``n``: the run's own, in ``out/shards/i``, always resumable (so a
    retried task continues), without figures (the merged run draws them) or progress bars."""
    ns = argparse.Namespace(**vars(args))
    ns.shard, ns.out, ns.resume, ns.no_figures, ns.no_progress, ns.ray = (i, n), str(out / SHARDS_DIR / str(i)), True, True, True, False
    if threads is not None:
        ns.threads = threads
    return ns


def record_attempt(directory: Path) -> int:
    """Append this attempt (pid, node, time) to ``directory/ray_attempts.jsonl``; returns its number (1, 2, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ATTEMPTS_FILE
    attempt = 1 + (len(path.read_text().splitlines()) if path.is_file() else 0)
    try:
        import ray

        node = ray.util.get_node_ip_address()
    except Exception:  # outside a Ray worker (a direct call)
        node = None
    line = json.dumps({"attempt": attempt, "pid": os.getpid(), "node": node, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    with open(path, "a") as fh:  # one short line per attempt; appended, so a killed attempt's record stays
        fh.write(line + "\n")
    return attempt


def attempts(directory: Path) -> list[dict[str, Any]]:
    """The attempts recorded in a shard directory, oldest first."""
    path = directory / ATTEMPTS_FILE
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def run_shard(ns: argparse.Namespace) -> dict[str, Any]:
    """Body of a shard task: the consistency stage of shard ``ns.shard`` in ``ns.out``.

    A QlocError (bad input, a settings mismatch) is returned, not raised: it would fail again on every retry.
    Any other exception propagates, and Ray retries the task."""
    logging.basicConfig(level=logging.INFO if getattr(ns, "verbose", False) else logging.WARNING)
    attempt = record_attempt(Path(ns.out))
    t0 = time.perf_counter()
    try:
        execute(ns, ("consistency",))
    except QlocError as exc:
        return {"shard": list(ns.shard), "error": exc}
    info = json.loads((Path(ns.out) / "run.json").read_text())
    return {"shard": list(ns.shard), "n_facts": info.get("n_facts"), "seconds": time.perf_counter() - t0, "attempt": attempt}


def finish_run(final: argparse.Namespace, stages: tuple[str, ...], shard_dirs: list[str]) -> dict[str, Any]:
    """Body of the merge task: merge the shards into ``final.out`` (the existing ``qloc-tl merge``), then run
    ``stages`` there with the run's own arguments (figures included): the consistency parts are all present, so
    only the statistics, the figures and the stages that need the whole fact set (QL, editing) are computed."""
    logging.basicConfig(level=logging.INFO if getattr(final, "verbose", False) else logging.WARNING)
    try:
        merge(Path(final.out), shard_dirs)
        execute(final, stages)
    except QlocError as exc:
        return {"error": exc}
    return {}


def check_out(args: argparse.Namespace, out: Path) -> None:
    """A Ray run into a non-empty ``--out`` needs ``--resume``, as a local run does; ``--shard`` is refused
    (``--ray`` makes the shards itself)."""
    if getattr(args, "shard", None):
        raise InvalidInputError("--ray splits the run into shards itself; drop --shard (or use --ray-shards N)")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        raise InvalidInputError(f"--out {str(out)!r} is not empty; pass --resume to continue a run there, or pick another directory")


def run_on_ray(args: argparse.Namespace, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Run ``stages`` of the run described by ``args`` on a Ray cluster (``args.ray_address``; default a local
    instance, or the one already initialized in this process). Returns what ``run.json`` records under ``ray``."""
    ray = import_ray()
    out = Path(args.out)
    check_out(args, out)
    settings = run_settings(args)
    started = connect(ray, getattr(args, "ray_address", None))
    try:
        opts, slots = task_resources(ray, args, settings)
        n = shard_count(args, settings, slots)
        threads = opts.get("num_cpus") if settings["device"] == "cpu" else None
        retry = {"max_retries": MAX_RETRIES, "retry_exceptions": True}
        # max_calls=1: a fresh worker process per task, so a finished shard's model memory (host or GPU) is freed
        shard_task = ray.remote(max_calls=1)(run_shard).options(**opts, **retry)
        logger.info("Ray: %d shards, %s per task, %d at a time", n, opts, slots)
        t0 = time.perf_counter()
        pending = {shard_task.remote(shard_namespace(args, i, n, out, threads)): i for i in range(n)}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            res = get(ray, ready[0], f"shard {i}/{n}", out / SHARDS_DIR / str(i))
            done += 1
            logger.info("shard %d/%d finished: %s facts in %.0f s (attempt %s); %d/%d shards done",
                        i, n, res["n_facts"], res["seconds"], res["attempt"], done, n)  # fmt: skip
        shard_s = time.perf_counter() - t0
        final = argparse.Namespace(**vars(args))
        final.resume, final.shard, final.ray = True, None, False
        shard_dirs = [str(out / SHARDS_DIR / str(i)) for i in range(n)]
        finish_task = ray.remote(max_calls=1)(finish_run).options(**opts, **retry)
        get(ray, finish_task.remote(final, tuple(stages), shard_dirs), "merge", None)
    finally:
        if started:
            ray.shutdown()
    info = {
        "shards": n, "address": getattr(args, "ray_address", None), "task_resources": opts, "shard_wall_s": round(shard_s, 2),
        "total_wall_s": round(time.perf_counter() - t0, 2), "attempts": {str(i): len(attempts(Path(d))) for i, d in enumerate(shard_dirs)},
    }  # fmt: skip
    from qloc_tl.core.store import atomic_write_text
    from qloc_tl.reporting.report import write_report

    # run.json and the report: the stage timings are the merge task's (the attribution ran in the shards), the
    # total is the whole Ray run's wall time, and the "ray" block says how it was spread
    run_json = out / "run.json"
    record = json.loads(run_json.read_text())
    timings = {**record.get("timings_s", {}), "ray_shards": info["shard_wall_s"], "total": info["total_wall_s"]}
    atomic_write_text(run_json, json.dumps({**record, "timings_s": timings, "ray": info}, indent=2))
    write_report(out, min_facts=getattr(args, "min_facts", None))
    return info


def get(ray: Any, ref: Any, what: str, directory: Path | None) -> dict[str, Any]:
    """The result of a task; a QlocError it returned is raised here, a failure after Ray's retries becomes a
    :class:`ShardFailedError` that says how to continue."""
    try:
        res: dict[str, Any] = ray.get(ref)
    except Exception as exc:
        cause = getattr(exc, "cause", None)
        tries = f" after {len(attempts(directory))} attempt(s)" if directory is not None else ""
        reason = repr(cause) if cause is not None else str(exc)
        raise ShardFailedError(f"{what} failed{tries}: {reason}; rerun the same command with --resume to continue") from None
    if "error" in res:
        raise res["error"]
    return res
