"""HTML building blocks of the report: the style sheet, tables (formatted and raw), inlined figures, collapsed
sections and links to the CSV files, and the page frame. All text is escaped here.

Raw tables (:func:`raw_table_html`) show every number with :func:`~qloc_tl.reporting.formatting.fmt_num`, and
every cell of a ratio or relative-change column through
:func:`~qloc_tl.reporting.formatting.guard_value`, so no relative change over a near-zero base is shown.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from qloc_tl.reporting.formatting import GUARDED, RATIO_LIMIT, fmt_num, guard_value, is_relative_column
from qloc_tl.reporting.run_tables import Cell, Table

__all__ = [
    "CSS",
    "esc",
    "slug",
    "rel_link",
    "table_html",
    "raw_table_html",
    "figure_html",
    "details_html",
    "row_html",
    "page_html",
    "body_of",
    "side_by_side",
]

CSS = """
:root{--line:#dfe3e8;--muted:#5f6b7a}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2rem auto 3rem;max-width:1180px;
  padding:0 1rem;color:#1f2328;line-height:1.4}
h1{font-size:1.45rem;margin:.2rem 0 .5rem}h2{font-size:1.2rem;border-bottom:1px solid var(--line);
  padding-bottom:.2rem;margin-top:2.2rem}h3{font-size:1rem;margin:1.4rem 0 .4rem}
.headline{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:.25rem .9rem;
  background:#f6f8fa;border:1px solid var(--line);border-radius:6px;padding:.5rem .8rem;font-size:.82rem;margin:0}
.headline dt{font-weight:600;color:var(--muted);font-size:.7rem;text-transform:uppercase;letter-spacing:.03em}
.headline dd{margin:0 0 .2rem}
.tally{font-size:.85rem;margin:.5rem 0 .3rem}
table{border-collapse:collapse;font-size:.78rem;margin:.4rem 0 .3rem}
th,td{border:1px solid var(--line);padding:.18rem .4rem;text-align:right;vertical-align:top}
th{background:#f3f5f7;font-weight:600}td:first-child,th:first-child{text-align:left}
td.l,th.l{text-align:left}td .ci{display:block;color:var(--muted);font-size:.68rem;white-space:nowrap}
td.best{font-weight:700;background:#eef6ee}
.claims td,.claims th{text-align:left}.claims td.v{white-space:nowrap}.claims{width:100%;font-size:.8rem}
.claims details{font-size:.72rem;color:var(--muted)}.claims summary{cursor:pointer}
.note{font-size:.74rem;color:var(--muted);margin:.1rem 0 .8rem;max-width:1100px}
.badge{display:inline-block;padding:.02rem .45rem;border-radius:.6rem;font-size:.72rem;color:#fff;white-space:nowrap}
.supported{background:#2e7d32}.not-supported{background:#c62828}.partial{background:#ef6c00}.not-run{background:#777}
.too-few-facts{background:#5c6bc0}
figure{margin:.4rem 0 .8rem;display:inline-block;vertical-align:top;max-width:100%}
.row{display:flex;flex-wrap:wrap;gap:.3rem 1.5rem;align-items:flex-start}.row>*{min-width:0}
.row.half>figure{flex:1 1 46%}figure.pf{display:table}figure.pf figcaption{display:table-caption;caption-side:bottom}.cv{overflow:auto;max-height:760px;padding-left:.9rem}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.74rem;color:var(--muted);max-width:760px}
figcaption b{color:#1f2328}
details.raw{margin:.3rem 0;border:1px solid var(--line);border-radius:5px;padding:.2rem .5rem}
details.raw>summary{cursor:pointer;font-size:.85rem}details.raw td{white-space:nowrap}
.scroll{overflow:auto;max-height:420px}.wide{overflow-x:auto}.side .headline{grid-template-columns:repeat(2,minmax(0,1fr))}
body.wide{max-width:none}.side{display:grid;gap:1rem}.side>div{min-width:0;overflow-x:auto}
a{color:#0b57d0}code{background:#f4f4f4;padding:0 .2rem}
"""
"""The page's style sheet."""


def esc(text: object) -> str:
    """HTML-escaped ``str(text)``."""
    return html.escape(str(text))


def slug(text: str) -> str:
    """An HTML id from ``text``: lower case, runs of other characters as ``-``.

    Examples:
        >>> slug("K_I share per method (static)")
        'k-i-share-per-method-static'
    """
    out, dash = [], False
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
            dash = False
        elif not dash and out:
            out.append("-")
            dash = True
    return "".join(out).strip("-")


def rel_link(path: Path, page_dir: Path, label: str | None = None) -> str:
    """A link to ``path`` relative to the page's directory (works when the run directory is moved whole)."""
    href = Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()
    return f"<a href='{esc(href)}'>{esc(label or path.name)}</a>"


def _cell(c: Cell, cls: str = "") -> str:
    attr = f" class='{cls}'" if cls else ""
    if isinstance(c, tuple):
        return f"<td{attr}>{esc(c[0])}<span class='ci'>{esc(c[1])}</span></td>"
    return f"<td{attr}>{esc(c)}</td>"


def table_html(t: Table, page_dir: Path, *, text_cols: int = 1, with_title: bool = True) -> str:
    """A formatted :class:`~qloc_tl.reporting.run_tables.Table`: its title, the table (best cells bold), its note and
    links to its CSV sources. The first ``text_cols`` columns are left-aligned."""
    head = "".join(f"<th{' class=l' if j < text_cols else ''}>{esc(c)}</th>" for j, c in enumerate(t.columns))
    body = []
    for i, row in enumerate(t.rows):
        cells = []
        for j, c in enumerate(row):
            cls = " ".join(x for x in ("l" if j < text_cols else "", "best" if (i, j) in t.best else "") if x)
            cells.append(_cell(c, cls))
        body.append("<tr>" + "".join(cells) + "</tr>")
    names = [p.name for p in t.sources]
    dup = len(set(names)) < len(names)  # several runs' files: label each by its path from the page
    links = " · ".join(
        rel_link(p, page_dir, os.path.relpath(p.resolve(), page_dir.resolve()) if dup else p.name)
        for p in t.sources
    )
    note = " ".join(x for x in (t.note, t.detail) if x) + (" " if (t.note or t.detail) and links else "")
    title = f"<h3 id='{slug(t.title)}'>{esc(t.title)}</h3>" if with_title else ""
    return (
        f"{title}<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        f"<p class='note'>{esc(note)}{('CSV: ' + links) if links else ''}</p>"
    )


def _raw_cell(v: object, relative: bool) -> tuple[str, bool]:
    if relative:
        return guard_value(v)
    if isinstance(v, str):
        return (v if len(v) <= 80 else v[:77] + "…"), False
    return fmt_num(v), False


def raw_table_html(df: pd.DataFrame, *, max_rows: int = 200) -> str:
    """A raw stage table (at most ``max_rows`` rows), numbers by :func:`fmt_num`, long strings cut at 80
    characters, ratio columns guarded (with a note when a cell was)."""
    if df.empty:
        return "<p class='note'>no rows</p>"
    rel = [is_relative_column(str(c)) for c in df.columns]
    text = [df[c].dtype == object or pd.api.types.is_string_dtype(df[c]) for c in df.columns]
    head = "".join(f"<th{' class=l' if t else ''}>{esc(c)}</th>" for c, t in zip(df.columns, text))
    guarded = 0
    body = []
    for row in df.head(max_rows).itertuples(index=False):
        cells = []
        for v, r, t in zip(row, rel, text):
            s, g = _raw_cell(v, r)
            guarded += g
            cells.append(f"<td{' class=l' if t else ''}>{esc(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = []
    if len(df) > max_rows:
        notes.append(f"first {max_rows} of {len(df)} rows; all of them in the CSV file")
    if guarded:
        notes.append(f"{GUARDED}: {guarded} ratio cell(s) beyond ±{RATIO_LIMIT:,.0f} (a base near zero) not shown; "
                     "read the absolute Δ column")  # fmt: skip
    note = f"<p class='note'>{esc('; '.join(notes))}</p>" if notes else ""
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{note}"


def figure_html(png: bytes, anchor: str, title: str, caption: str = "") -> str:
    """An inlined PNG figure with an id, a bold title and a caption."""
    data = base64.b64encode(png).decode()
    return (
        f"<figure class='pf' id='{esc(anchor)}'><img alt='{esc(title)}' src='data:image/png;base64,{data}'>"
        f"<figcaption><b>{esc(title)}.</b> {esc(caption)}</figcaption></figure>"
    )


def row_html(parts: Iterable[str], *, half: bool = False) -> str:
    """``parts`` (HTML) next to each other, wrapping on a narrow screen; ``half``: two equal columns."""
    return f"<div class='row{' half' if half else ''}'>" + "".join(p for p in parts if p) + "</div>"


def details_html(summary: str, body: str, *, open_: bool = False, cls: str = "raw") -> str:
    """A collapsed ``<details>`` section (``summary`` is escaped, ``body`` is HTML)."""
    return (
        f"<details class='{cls}'{' open' if open_ else ''}><summary>{esc(summary)}</summary>{body}</details>"
    )


def page_html(
    title: str, sections: Iterable[tuple[str, str, str]], *, intro: str = "", wide: bool = False
) -> str:
    """The whole page: ``<h1>`` title, ``intro`` (HTML) and one ``<section id>`` with an ``<h2>`` per
    ``(id, heading, body HTML)``; ``wide``: no maximum width (for runs side by side)."""
    body = "".join(f"<section id='{esc(i)}'><h2>{esc(h)}</h2>{b}</section>" for i, h, b in sections)
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
        f"content='width=device-width,initial-scale=1'><title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body{' class=wide' if wide else ''}><h1>{esc(title)}</h1>{intro}{body}</body></html>"
    )


def body_of(doc: str) -> str:
    """The body of a standalone HTML document (or the text itself when it is a fragment)."""
    lo = doc.lower()
    i, j = lo.find("<body"), lo.rfind("</body>")
    if i == -1 or j == -1:
        return doc
    return doc[doc.index(">", i) + 1 : j]


def side_by_side(parts: Sequence[str]) -> str:
    """``parts`` (HTML) in equal columns next to each other."""
    cols = f"grid-template-columns:repeat({max(1, len(parts))},minmax(0,1fr))"
    return f"<div class='side' style='{cols}'>" + "".join(f"<div>{p}</div>" for p in parts) + "</div>"
