"""Models and facts for a command: the model named by ``--model``, the facts of ``--facts`` (screened for the
ones the model knows), their order and cap, and the ``qloc-tl known`` screening."""


from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qloc_tl.core.model import TLModel
from qloc_tl.core.store import ensure_directory

logger = logging.getLogger("qloc_tl.cli")


def model_from_spec(spec: str, device: str = "cpu") -> Any:
    """``builtin``, ``smollm2-135m`` or a local directory → :func:`qloc_tl.zoo.load_model`; otherwise a
    TransformerLens model name (downloads need network access, which this environment may not have)."""
    import torch

    from qloc_tl.core.errors import InvalidInputError
    from qloc_tl.core.model import tl_major
    from qloc_tl.zoo import MODEL_NAMES
    from qloc_tl.zoo import load_model as zoo_load_model

    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda was given but no CUDA device is available")
    if spec.lower() in MODEL_NAMES or os.path.isdir(spec):
        return zoo_load_model(spec, device=device)
    if os.path.sep in spec or spec.startswith("."):
        raise InvalidInputError(f"--model {spec!r}: no such directory")
    try:
        if tl_major() >= 4:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(spec, device=device)
        else:
            from transformer_lens import HookedTransformer

            model = HookedTransformer.from_pretrained(spec, device=device)
    except Exception as exc:  # hub / name errors come in many types
        raise InvalidInputError(
            f"--model {spec!r} could not be loaded ({type(exc).__name__}: {str(exc)[:200]}); offline, use one of "
            f"{', '.join(MODEL_NAMES)} or a local Hugging Face directory"
        ) from exc
    model.eval()
    return model


def load_facts(settings: dict[str, Any], model: TLModel | None = None, out: Path | None = None, progress: bool = False) -> list[Any]:
    """Facts for the run: the built-in facts or ParaRel (bundled or a directory), restricted to what the
    model knows (``settings["known"]``), capped and sharded.

    With the known-filter on, candidates are screened in round-robin order over relations, a chunk at a time,
    until ``max_facts`` known facts are found (screening every ParaRel fact would take an hour on a CPU); the
    chosen facts and the screening tables are written to ``out/known/`` and reused on ``--resume``.
    """
    from qloc_tl.core.errors import InvalidInputError

    spec, relations = settings["facts"], settings["relations"]
    screened = os.path.isfile(os.path.join(spec, "known_facts.json"))  # a 'qloc-tl known' output directory
    if spec == "builtin":
        from qloc_tl.data.datasets import builtin_facts

        facts = list(builtin_facts())
        if relations:
            have = {f.relation for f in facts}
            unknown = sorted(set(relations) - have)
            if unknown:
                raise InvalidInputError(f"--relations: {unknown} not in the built-in facts ({', '.join(sorted(have))})")
            facts = [f for f in facts if f.relation in set(relations)]
    elif screened:
        facts = screened_facts(Path(spec), settings["model"], relations)
    else:
        from qloc_tl.data.facts import load_pararel

        path = None if spec == "pararel" else spec
        if path is not None and not os.path.isdir(path):
            raise InvalidInputError(
                f"--facts {spec!r}: give 'auto', 'builtin', 'pararel', a ParaRel directory or a 'qloc-tl known' output directory"
            )
        facts = list(load_pararel(path, relations=relations, min_queries=2).facts)
    facts = [f for f in facts if len(f.queries) >= 2]
    if settings.get("known", "off") != "off" and not screened:
        if model is None:
            raise InvalidInputError("screening the facts for known ones needs the model: pass model=")
        facts = screen_known(model, facts, settings["max_facts"], out, progress)
    facts = cap_facts(facts, settings["max_facts"])
    if settings["shard"]:
        i, n = settings["shard"]
        facts = facts[i::n]
    if not facts:
        raise InvalidInputError("no facts left after filtering (check --relations / --max-facts / --shard)")
    return facts


def pararel_dir(spec: str) -> str | None:
    """The ParaRel directory behind ``--facts`` (``None``: the bundled copy); for a ``qloc-tl known`` output
    directory, the ParaRel source it screened."""
    if spec == "pararel":
        return None
    known = Path(spec) / "settings.json"
    if (Path(spec) / "known_facts.json").is_file() and known.is_file():
        return pararel_dir(json.loads(known.read_text()).get("facts", "pararel"))
    return spec


def screened_facts(directory: Path, model: str, relations: Sequence[str] | None) -> list[Any]:
    """The known facts of a ``qloc-tl known`` output directory, each with only its known queries (templates
    as in ParaRel, file order), so a run on them needs no second screening. The screening must be of ``model``."""
    from qloc_tl.core.errors import InvalidInputError
    from qloc_tl.data.facts import Fact, load_pararel

    info = json.loads((directory / "settings.json").read_text()) if (directory / "settings.json").is_file() else {}
    if info.get("model") != model:
        raise InvalidInputError(f"--facts {str(directory)!r} screened model {info.get('model')!r}, not --model {model!r}")
    known = json.loads((directory / "known_facts.json").read_text())
    if info.get("facts") == "builtin":
        from qloc_tl.data.datasets import builtin_facts

        pool: list[Any] = [f for f in builtin_facts() if not relations or f.relation in relations]
    else:
        pool = list(load_pararel(pararel_dir(str(directory)), relations=relations, min_queries=1).facts)
    out = []
    for f in pool:
        k = known.get(f.key)
        if k is None:
            continue
        texts = set(k["queries"])
        out.append(Fact(f.subject, f.relation, f.object, tuple(q for q in f.queries if q.text in texts), f.uuid))
    return out


def round_robin(facts: Sequence[Any]) -> list[Any]:
    """Facts interleaved over relations (first fact of each relation, then the second, ...), file order
    within a relation."""
    by_rel: dict[str, list[Any]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    out: list[Any] = []
    queues = list(by_rel.values())
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def screen_known(model: TLModel, facts: Sequence[Any], want: int | None, out: Path | None, progress: bool, chunk: int = 96) -> list[Any]:
    """The known facts among ``facts`` (:func:`qloc_tl.methods.known.filter_known`), screened in round-robin order
    until ``want`` are found; the screening tables go to ``out/known/``."""
    import pandas as pd

    from qloc_tl.core.errors import InvalidInputError
    from qloc_tl.core.store import atomic_write_text
    from qloc_tl.data.facts import Fact, Query
    from qloc_tl.methods.known import filter_known

    cache = out / "known" / "facts.json" if out is not None else None
    if cache is not None and cache.is_file():
        rows = json.loads(cache.read_text())
        return [Fact(r["subject"], r["relation"], r["object"], tuple(Query(t, p) for t, p in r["queries"]), r["uuid"]) for r in rows]
    order = round_robin(facts)
    kept: list[Any] = []
    tables: list[Any] = []
    for start in range(0, len(order), chunk):
        res = filter_known(model, order[start : start + chunk], show_progress=progress)
        kept.extend(res.facts)
        tables.append(res)
        if want is not None and len(kept) >= want:
            break
    if not kept:
        raise InvalidInputError(
            f"the model answers none of the {len(order)} candidate facts top-1 on 2 or more queries; "
            "pass --all-queries to use them anyway"
        )
    logger.info("known facts: %d of %d screened", len(kept), sum(len(t.queries["fact_key"].unique()) for t in tables))
    if out is not None:
        ensure_directory(out / "known")
        queries = pd.concat([t.queries for t in tables], ignore_index=True)
        dropped = pd.concat([t.dropped for t in tables], ignore_index=True)
        atomic_write_text(out / "known" / "queries.csv", queries.to_csv(index=False))
        atomic_write_text(out / "known" / "dropped_facts.csv", dropped.to_csv(index=False))
        rows = [{"subject": f.subject, "relation": f.relation, "object": f.object, "uuid": f.uuid,
                 "queries": [[q.text, q.template] for q in f.queries]} for f in kept]  # fmt: skip
        atomic_write_text(cache, json.dumps(rows, indent=1))  # type: ignore[arg-type]
    return kept


def cap_facts(facts: Sequence[Any], max_facts: int | None) -> list[Any]:
    """At most ``max_facts`` facts, spread evenly over relations (round robin in file order; deterministic)."""
    facts = list(facts)
    if max_facts is None or len(facts) <= max_facts:
        return facts
    by_rel: dict[str, list[Any]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    out: list[Any] = []
    queues = [list(v) for v in by_rel.values()]
    while len(out) < max_facts and any(queues):
        for q in queues:
            if q and len(out) < max_facts:
                out.append(q.pop(0))
    order = {id(f): i for i, f in enumerate(facts)}
    return sorted(out, key=lambda f: order[id(f)])


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on (written to run.json)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("qloc-tl", "transformer-lens", "torch", "transformers", "numpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def screen_all(args: argparse.Namespace) -> Path:
    """``qloc-tl known``: :func:`qloc_tl.methods.known.filter_known` over every fact of every relation, one relation
    at a time (a finished relation's table is kept, so an interrupted screening resumes), then
    ``per_relation.csv`` (facts and queries known per relation) and ``known_facts.json``."""
    import pandas as pd
    import torch

    from qloc_tl.core.errors import ResumeMismatchError
    from qloc_tl.core.store import atomic_write_text
    from qloc_tl.data.facts import load_pararel
    from qloc_tl.methods.known import filter_known

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ensure_directory(out / "relations")
    settings = {"model": args.model, "facts": args.facts, "per_relation": args.per_relation, "criterion": "top1",
                "min_queries": 2, "multi_token": "whole"}  # fmt: skip
    if (out / "settings.json").is_file():
        old = json.loads((out / "settings.json").read_text())
        if old != settings:
            raise ResumeMismatchError(f"{out} holds a screening with other settings ({old}); use another --out")
    else:
        atomic_write_text(out / "settings.json", json.dumps(settings, indent=1))
    model = model_from_spec(args.model, args.device)
    if args.facts == "builtin":
        from qloc_tl.data.datasets import builtin_facts

        facts = [f for f in builtin_facts() if not args.relations or f.relation in args.relations]
    else:
        facts = list(load_pararel(None if args.facts == "pararel" else args.facts, relations=args.relations, min_queries=2).facts)
    by_rel: dict[str, list[Any]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    if args.per_relation:
        by_rel = {r: fs[: args.per_relation] for r, fs in by_rel.items()}
    rels = sorted(by_rel)
    if args.shard:
        i, n = args.shard
        rels = rels[i::n]
    for rel in rels:
        path = out / "relations" / f"{rel}.csv"
        if path.is_file():
            continue
        t = time.perf_counter()
        res = filter_known(model, by_rel[rel], show_progress=not args.no_progress)
        q = res.queries.assign(fact_kept=res.queries["fact_key"].isin({f.key for f in res.facts}))
        atomic_write_text(path, q.to_csv(index=False))
        logger.info("%s: %d of %d facts known (%.0f s)", rel, len(res.facts), len(by_rel[rel]), time.perf_counter() - t)
    done = sorted(p.stem for p in (out / "relations").glob("*.csv"))
    tables = [pd.read_csv(out / "relations" / f"{r}.csv") for r in done]
    if tables:
        q = pd.concat(tables, ignore_index=True)
        g = q.groupby("relation")
        summary = pd.DataFrame({
            "facts": g["fact_key"].nunique(),
            "facts_known": q[q["fact_kept"]].groupby("relation")["fact_key"].nunique().reindex(g.size().index).fillna(0).astype(int),
            "queries": g.size(),
            "queries_known": g["known"].sum().astype(int),
            "multi_token_objects": q.drop_duplicates("fact_key").assign(m=lambda d: d["n_object_tokens"] > 1).groupby("relation")["m"].sum(),
        }).reset_index()  # fmt: skip
        summary["known_query_share"] = (summary["queries_known"] / summary["queries"]).round(4)
        atomic_write_text(out / "per_relation.csv", summary.to_csv(index=False))
        kept = q[q["fact_kept"] & q["known"]]
        blob = {k: {"relation": d["relation"].iloc[0], "subject": d["subject"].iloc[0], "object": d["object"].iloc[0],
                    "queries": d["text"].tolist()} for k, d in kept.groupby("fact_key", sort=False)}  # fmt: skip
        atomic_write_text(out / "known_facts.json", json.dumps(blob, indent=1))
    return out
