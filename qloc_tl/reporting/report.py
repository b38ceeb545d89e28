"""A self-contained HTML report of a ``qloc-tl run`` output directory.

The page holds: the run's settings, versions and timings; one verdict per claim of the paper
(:func:`qloc_tl.reporting.claims.claim_verdicts`, computed from the measured tables); every final table; every
figure (PNG, inlined as base64); and the circuitsvis knowledge-synapse views (inlined with their JavaScript
bundle, so the file works offline).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.store import atomic_write_text
from qloc_tl.reporting.claims import TOO_FEW, claim_verdicts, facts_needed, run_model_name

__all__ = ["write_report", "claim_verdicts", "SECTIONS"]

SECTIONS = ("Summary of claims", "Run", "Consistency (experiment 1)", "Query localization", "Knowledge editing", "Figures")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.8rem;margin:.6rem 0 1.2rem}th,td{border:1px solid #ddd;padding:.2rem .45rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto;max-height:420px;overflow-y:auto}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:.6rem;font-size:.75rem;color:#fff}
.supported{background:#2e7d32}.not-supported{background:#c62828}.partial{background:#ef6c00}.not-run{background:#777}
.too-few-facts{background:#5c6bc0}
figure{display:inline-block;margin:.5rem;vertical-align:top}figure img{max-width:520px;border:1px solid #eee}
figcaption{font-size:.75rem;color:#555}code{background:#f4f4f4;padding:0 .2rem}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return html.escape(str(v))


def _table(df: pd.DataFrame | None, max_rows: int = 200) -> str:
    if df is None or df.empty:
        return "<p><em>no rows</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in df.head(max_rows).itertuples(index=False)
    )
    more = f"<p><em>{len(df) - max_rows} more rows in the parquet/CSV file</em></p>" if len(df) > max_rows else ""
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<figure><img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'><figcaption>{html.escape(path.name)}</figcaption></figure>"


def _stage_tables(stage_dir: Path) -> str:
    if not stage_dir.is_dir():
        return "<p><em>not run</em></p>"
    parts = []
    for p in sorted(stage_dir.glob("*.parquet")):
        parts.append(f"<h3>{html.escape(p.stem)}</h3>" + _table(pd.read_parquet(p)))
    return "".join(parts) or "<p><em>no tables</em></p>"


def write_report(out: str | Path, *, min_facts: int | None = None) -> Path:
    """Write ``report.html`` into the output directory ``out`` and return its path.

    ``min_facts``: the fewest facts per compared class for a claim verdict (default
    :data:`qloc_tl.reporting.claims.MIN_FACTS_PER_CLASS`); see :func:`~qloc_tl.reporting.claims.claim_verdicts`.
    """
    out = Path(out)
    run_json = out / "run.json"
    if not run_json.is_file():
        raise InvalidInputError(f"{str(out)!r} is not a qloc-tl output directory (no run.json)")
    info = json.loads(run_json.read_text())
    need = facts_needed(min_facts)
    model = run_model_name(out)
    verdicts = claim_verdicts(out, min_facts=need)
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td><span class='badge {v['status'].replace(' ', '-')}'>{html.escape(v['status'])}</span></td>"
        f"<td>{html.escape(v['evidence'])}</td></tr>"
        for c, v in verdicts
    )
    figs_dir = out / "figures"
    pngs = sorted(figs_dir.glob("*.png")) if figs_dir.is_dir() else []
    views = sorted(figs_dir.glob("*.html")) if figs_dir.is_dir() else []
    heat = [p for p in pngs if p.stem.startswith("heatmap")]
    other = [p for p in pngs if p not in heat]
    view_html = "".join(
        f"<h3>{html.escape(v.stem)}</h3><div class='cv'>{_body_of(v.read_text())}</div>" for v in views
    ) or "<p><em>no circuitsvis views</em></p>"
    sections = [
        ("Summary of claims", f"<p>A claim gets a verdict only when each class it compares holds ≥ {need} facts of "
         f"this run (otherwise: <em>{TOO_FEW}</em>, with the counts); evidence gives n and confidence intervals.</p>"
         f"<table><thead><tr><th>claim (Chen et al., ICLR 2025)</th><th>verdict</th><th>evidence ({html.escape(model)}, "
         f"this run)</th></tr></thead><tbody>{rows}</tbody></table>"),
        ("Run", f"<pre>{html.escape(json.dumps(info, indent=2))}</pre>"),
        ("Consistency (experiment 1)", _stage_tables(out / "consistency") + "<h3>Neuron heatmaps per neighbor query (Figure 1 style)</h3>" + "".join(_img(p) for p in heat)),
        ("Query localization", _stage_tables(out / "ql") + "<h3>Knowledge-synapse heads (circuitsvis)</h3>" + view_html),
        ("Knowledge editing", _stage_tables(out / "editing")),
        ("Figures", "".join(_img(p) for p in other) or "<p><em>no figures</em></p>"),
    ]
    body = "".join(f"<section id='{html.escape(t.split(' ')[0].lower())}'><h2>{html.escape(t)}</h2>{c}</section>" for t, c in sections)
    title = f"qloc-tl report — {html.escape(model)}"
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
        f"<body><h1>{title}</h1><p>Reproduction of <em>Knowledge Localization: Mission Not Accomplished? Enter Query "
        f"Localization!</em> (Chen et al., ICLR 2025) with qloc_tl on {html.escape(model)}. Verdicts apply to "
        f"{html.escape(model)} and these facts only.</p>"
        f"{body}</body></html>"
    )
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


def _body_of(doc: str) -> str:
    """The body of a standalone HTML document (or the text itself when it is a fragment)."""
    lo = doc.lower()
    i, j = lo.find("<body"), lo.rfind("</body>")
    if i == -1 or j == -1:
        return doc
    return doc[doc.index(">", i) + 1 : j]
