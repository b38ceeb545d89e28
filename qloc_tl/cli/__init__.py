"""The ``qloc-tl`` command line: run the paper's experiments on a model and write an HTML report.

::

    qloc-tl run [--model builtin|smollm2-135m|<local HF dir>|<TL model name>]
                [--facts auto|builtin|pararel|<ParaRel dir>] [--all-queries]
                [--relations P19,P36] [--max-facts N] [--methods ig,sig,amig] [--device cpu|cuda]
                [--out DIR] [--quick] [--resume] [--shard i/n]
                [--ray [--ray-address ADDR] [--ray-shards N]]   (a Ray cluster; see docs/scale_out.md)
    qloc-tl consistency|ql|edit ...     one experiment (same options)
    qloc-tl known [--model M] [--facts F] screen facts for the ones the model knows (per-relation tables)
    qloc-tl report DIR                   rebuild report.html from a finished output directory
    qloc-tl report RUN_A RUN_B [--html P]  one page with both runs' claims and headline tables side by side
    qloc-tl merge OUT SHARD_DIR...       combine the results of sharded runs (see docs/scale_out.md)

Every stage persists its results incrementally: rerunning with ``--resume`` continues an interrupted run
without redoing finished facts. ``--resume`` with more ``--methods`` (the same first one) extends a run: only
the new methods' attributions are computed. Bad arguments print a one-line error and exit with status 2.
"""


from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qloc_tl.cli.facts import (
    cap_facts,
    load_facts,
    model_from_spec,
    round_robin,
    screen_all,
    screen_known,
    screened_facts,
)
from qloc_tl.cli.parser import DEFAULTS, STAGES, build_parser, run_settings
from qloc_tl.cli.stages import execute, merge, summary_lines

_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qloc-tl`` console script."""
    from qloc_tl.core.errors import QlocError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "report":
            if len(args.out) == 1 and args.html is None:
                from qloc_tl.reporting.report import write_report

                path = write_report(Path(args.out[0]), min_facts=args.min_facts)
            else:
                from qloc_tl.reporting.compare import write_comparison

                path = write_comparison([Path(o) for o in args.out], args.html, min_facts=args.min_facts)
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
            if getattr(args, "ray", False):
                from qloc_tl.cli.ray_run import run_on_ray  # imports ray only here

                run_on_ray(args, stages)
            else:
                execute(args, stages)
            out = Path(args.out)
        print("\n".join(summary_lines(out, getattr(args, "min_facts", None))))
        return 0
    except QlocError as exc:
        sys.stderr.write(f"qloc-tl: error: {exc}\n")
        return 2
    except OSError as exc:
        # a figure or page written by a plotting library into a read-only or full output directory
        if exc.errno not in _WRITE_ERRNOS:
            raise
        sys.stderr.write(f"qloc-tl: error: cannot write {exc.filename or 'to the output directory'}: {exc.strerror}; "
                         "free space or pick a writable --out, then rerun with --resume\n")  # fmt: skip
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("qloc-tl: interrupted; rerun the same command with --resume to continue\n")
        return 130


__all__ = [
    "main", "build_parser", "run_settings", "model_from_spec", "load_facts", "screened_facts", "cap_facts",
    "round_robin", "screen_known", "screen_all", "execute", "merge", "summary_lines", "DEFAULTS", "STAGES",
]  # fmt: skip
