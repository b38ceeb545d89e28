"""Two (or more) runs side by side: their headlines, their claims' verdicts in one table, and their
paper-style tables next to each other (``qloc-tl report RUN_A RUN_B``).

The page is written to ``RUN_A/compare_<name of RUN_B>.html`` unless a path is given; it links each run's own
``report.html`` and the CSV files of every table, relative to where the page is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.store import atomic_write_text
from qloc_tl.reporting.claims import claim_verdicts, facts_needed, run_model_name
from qloc_tl.reporting.html_page import esc, page_html, rel_link, side_by_side, slug, table_html
from qloc_tl.reporting.report import headline_html, tally_html, verdict_badge
from qloc_tl.reporting.run_tables import (
    Cell,
    Table,
    dynamic_table,
    editing_table,
    ki_share_table,
    mapping_table,
)

__all__ = ["COMPARED_TABLES", "run_labels", "comparison_path", "interleave", "write_comparison"]

_N = re.compile(r"\s*\(n=(\d+)\)")

COMPARED_TABLES: tuple[tuple[str, Callable[[Path], Table | None], int], ...] = (
    ("Inconsistent knowledge (K_I) per attribution method", ki_share_table, 1),
    ("Query-KN mapping", mapping_table, 1),
    ("Dynamic KN selection", dynamic_table, 2),
    ("Knowledge editing", editing_table, 3),
)
"""The headline tables shown side by side: ``(heading, builder, number of text columns)``."""


def run_labels(runs: Sequence[Path]) -> list[str]:
    """One label per run: its model name, with the directory name when two runs share a model."""
    models = [run_model_name(r) for r in runs]
    return [f"{m} ({r.name})" if models.count(m) > 1 else m for m, r in zip(models, runs)]


def comparison_path(runs: Sequence[Path]) -> Path:
    """Where the comparison is written by default: ``RUN_A/compare_<RUN_B name>[_<RUN_C name>...].html``."""
    return runs[0] / ("compare_" + "_".join(slug(r.resolve().name) or "run" for r in runs[1:]) + ".html")


def _plain(c: Cell) -> str:
    return c[0] if isinstance(c, tuple) else c


def interleave(tables: Sequence[Table | None], labels: Sequence[str], text_cols: int) -> Table | None:
    """One table from the same table of several runs: each row of the first ``text_cols`` (key) columns is
    followed by one row per run that has it, with a ``run`` column after the keys, so the runs' numbers stand
    above each other. Sample sizes ``(n=…)`` in keys or headers move into the run column (they differ per run);
    best-cell marks are kept. None when no run has the table.

    Examples:
        >>> a = Table("t", ["set", "K_C (n=3) Δp"], [["Self", "0.1"]])
        >>> b = Table("t", ["set", "K_C (n=9) Δp"], [["Self", "0.2"], ["Union", "0.3"]])
        >>> t = interleave([a, b], ["A", "B"], 1)
        >>> t.columns, t.rows
        (['set', 'run', 'K_C Δp'], [['Self', 'A (K_C n=3)', '0.1'], ['Self', 'B (K_C n=9)', '0.2'], ['Union', 'B (K_C n=9)', '0.3']])
    """
    present = [(t, lab) for t, lab in zip(tables, labels) if t is not None]
    if not present:
        return None
    first = present[0][0]
    columns = (
        [_N.sub("", c) for c in first.columns[:text_cols]]
        + ["run"]
        + [_N.sub("", c) for c in first.columns[text_cols:]]
    )
    order: list[tuple[str, ...]] = []
    by_key: dict[tuple[str, ...], list[tuple[int, Table, str, int]]] = {}
    for k, (t, lab) in enumerate(present):
        for i, row in enumerate(t.rows):
            key = tuple(_N.sub("", _plain(c)) for c in row[:text_cols])
            if key not in by_key:
                order.append(key)
                by_key[key] = []
            by_key[key].append((k, t, lab, i))
    rows: list[list[Cell]] = []
    best: set[tuple[int, int]] = set()
    for key in order:
        for _, t, lab, i in sorted(by_key[key], key=lambda x: x[0]):
            row = t.rows[i]
            ns = [f"{c[: m.start()].strip()} n={m.group(1)}" for c in t.columns if (m := _N.search(c))]
            ns += [f"n={m.group(1)}" for c in row[:text_cols] if (m := _N.search(_plain(c)))]
            run = f"{lab} ({', '.join(dict.fromkeys(ns))})" if ns else lab
            best |= {(len(rows), j + 1 if j >= text_cols else j) for (r, j) in t.best if r == i}
            cells: list[Cell] = [*key, run, *row[text_cols:]]
            rows.append(cells)
    distinct = list(dict.fromkeys(t.note for t, _ in present if t.note))
    notes = (
        distinct[0] if len(distinct) == 1 else " ".join(f"[{lab}] {t.note}" for t, lab in present if t.note)
    )
    detail = " ".join(f"[{lab}] {t.detail}" for t, lab in present if t.detail)
    sources = [p for t, _ in present for p in t.sources]
    return Table(first.title, columns, rows, best=best, note=notes, sources=sources, detail=detail)


def _claims(runs: Sequence[Path], labels: Sequence[str], need: int) -> tuple[str, list[str]]:
    per_run = [claim_verdicts(r, min_facts=need) for r in runs]
    claims = list(dict.fromkeys(c for vs in per_run for c, _ in vs))
    lookup = [dict(vs) for vs in per_run]
    head = "".join(f"<th>{esc(lab)}</th>" for lab in labels)
    rows = []
    for c in claims:
        cells = []
        for lk in lookup:
            v = lk.get(c)
            cells.append(
                f"<td class='v'>{verdict_badge(v)}<details><summary>evidence</summary>{esc(v['evidence'])}</details></td>"
                if v else "<td class='v'>–</td>"
            )  # fmt: skip
        rows.append(f"<tr><td>{esc(c)}</td>{''.join(cells)}</tr>")
    table = (
        f"<table class='claims'><thead><tr><th>claim (Chen et al., ICLR 2025)</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    tallies = [tally_html(vs, need, lab) for vs, lab in zip(per_run, labels)]
    return table, tallies


def write_comparison(
    runs: Sequence[str | Path], path: str | Path | None = None, *, min_facts: int | None = None
) -> Path:
    """Write an HTML page that shows ``runs`` (two or more ``qloc-tl run`` output directories) side by side and
    return its path (default :func:`comparison_path`).

    ``min_facts``: the fewest facts per compared class for a claim verdict, the same for every run (see
    :func:`qloc_tl.reporting.claims.claim_verdicts`).
    """
    dirs = [Path(r) for r in runs]
    if len(dirs) < 2:
        raise InvalidInputError("a comparison needs at least two run directories")
    for d in dirs:
        if not (d / "run.json").is_file():
            raise InvalidInputError(f"{str(d)!r} is not a qloc-tl output directory (no run.json)")
    need = facts_needed(min_facts)
    out = Path(path) if path is not None else comparison_path(dirs)
    page_dir = out.resolve().parent
    labels = run_labels(dirs)
    claims, tallies = _claims(dirs, labels, need)
    heads = []
    for d, lab, tally in zip(dirs, labels, tallies):
        own = d / "report.html"
        link = f" ({rel_link(own, page_dir, 'its report')})" if own.is_file() else ""
        heads.append(f"<h3>{esc(lab)}{link}</h3>{headline_html(d)}{tally}")
    sections = [("runs", "Runs", side_by_side(heads)), ("claims", "Claims", claims)]
    for title, build, text_cols in COMPARED_TABLES:
        t = interleave([build(d) for d in dirs], labels, text_cols)
        body = (
            table_html(t, page_dir, text_cols=text_cols + 1, with_title=False)
            if t
            else "<p class='note'>not run</p>"
        )
        sections.append((slug(title), title, body))
    title = "qloc-tl comparison — " + " vs ".join(labels)
    intro = (
        "<p class='note'>Each run's verdicts apply to its model and facts only; each run's own report shows the "
        "figure behind every claim. Brackets: 95 % bootstrap CIs over facts.</p>"
    )
    page = page_html(title, sections, intro=intro, wide=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out
