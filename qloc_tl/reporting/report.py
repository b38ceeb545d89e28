"""The self-contained HTML report of a ``qloc-tl run`` output directory, ordered for a reader.

1. A headline (model, facts known and used, methods, split, time), then the paper's claims with their
   verdicts (:func:`qloc_tl.reporting.claims.claim_verdicts`), each linked to the figure that shows it: both
   fit on the first screen, the evidence of each verdict one click away.
2. Per experiment, figures drawn from the run's tables (:mod:`qloc_tl.reporting.report_figures`) and one
   paper-style table (:mod:`qloc_tl.reporting.run_tables`): the K_I share per method (the paper's Table 1),
   the CS histogram with τ, K_I per relation, the τ sweep, the Figure-1 heatmaps of the most and the least
   consistent fact; the Query-KN mapping and dynamic-KN-selection bars; the editing table; the
   knowledge-synapse heads (circuitsvis, inlined with their JavaScript so the file works offline).
3. Every raw stage table, collapsed (``<details>``), with readable fact names and a link to its CSV file.
4. The run's settings as a small table.

Numbers follow :mod:`qloc_tl.reporting.formatting`: three significant digits, no ratio over a near-zero base.
:func:`qloc_tl.reporting.compare.write_comparison` puts two runs side by side.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.store import atomic_write_text
from qloc_tl.reporting import report_figures as rf
from qloc_tl.reporting.claims import STATUSES, TOO_FEW, claim_verdicts, facts_needed, run_model_name
from qloc_tl.reporting.formatting import fmt_num
from qloc_tl.reporting.html_page import (
    body_of,
    details_html,
    esc,
    figure_html,
    page_html,
    raw_table_html,
    rel_link,
    row_html,
    table_html,
)
from qloc_tl.reporting.run_tables import (
    RAW_DESCRIPTIONS,
    dynamic_table,
    editing_table,
    headline_items,
    ki_share_table,
    mapping_table,
    raw_tables,
    read_table,
    run_info,
    settings_table,
)

logger = logging.getLogger(__name__)

__all__ = [
    "write_report",
    "claim_verdicts",
    "SECTIONS",
    "SECTION_IDS",
    "CLAIM_FIGURES",
    "claim_figures",
    "headline_html",
    "verdict_badge",
    "tally_html",
    "report_title",
]

SECTIONS = (
    "Claims",
    "Consistency (experiment 1)",
    "Query localization",
    "Knowledge editing",
    "Raw tables",
    "Run settings",
)
"""The page's sections, in order (the headline precedes them)."""

SECTION_IDS = {
    "Claims": "claims",
    "Consistency (experiment 1)": "consistency",
    "Query localization": "query-localization",
    "Knowledge editing": "knowledge-editing",
    "Raw tables": "raw-tables",
    "Run settings": "run-settings",
}
"""The HTML id of each section."""

CLAIM_FIGURES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("KL fails", "consistency", (("fig-ki-share", "K_I share"), ("tab-ki-share", "table"))),
    ("K_C and K_I differ", "consistency", (("fig-cs-hist", "CS histogram"),)),
    (
        "QL (Query-KN mapping)",
        "query-localization",
        (("fig-mapping", "mapping bars"), ("tab-mapping", "table")),
    ),
    (
        "QL (dynamic KN selection)",
        "query-localization",
        (("fig-dynamic", "dynamic bars"), ("tab-dynamic", "table")),
    ),
    ("Query-KN mapping and dynamic", "query-localization", ()),
    ("Enh < Sup", "query-localization", (("fig-dynamic", "dynamic bars"), ("fig-mapping", "mapping bars"))),
    ("Edits of", "knowledge-editing", (("fig-editing", "editing bars"), ("tab-editing", "table"))),
    ("Editing the", "knowledge-editing", (("fig-editing", "editing bars"), ("tab-editing", "table"))),
    ("CAS", "knowledge-editing", (("tab-editing", "editing table"),)),
    ("editing claims", "knowledge-editing", ()),
)
"""Where the page shows each claim: ``(claim text prefix, section id, ((figure or table id, label), ...))``."""


def claim_figures(claim: str, present: set[str] | None = None) -> tuple[tuple[str, str], ...]:
    """The ``(anchor, label)`` pairs of the figures and tables that show ``claim`` (matched by text prefix),
    keeping only the anchors in ``present`` when given; when none is left, its section (``"section"``)."""
    for prefix, section, links in CLAIM_FIGURES:
        if claim.startswith(prefix):
            kept = tuple(x for x in links if present is None or x[0] in present)
            return kept or ((section, "section"),)
    return ()


def report_title(model: str) -> str:
    """The page title of a run's report."""
    return f"qloc-tl report — {model}"


def verdict_badge(v: dict[str, str]) -> str:
    """A coloured badge of a verdict's status."""
    return f"<span class='badge {esc(v['status'].replace(' ', '-'))}'>{esc(v['status'])}</span>"


def tally_html(verdicts: Sequence[tuple[str, dict[str, str]]], need: int, model: str) -> str:
    """One line counting the verdicts by status, with the fact minimum that a verdict needs."""
    counts = {s: sum(v["status"] == s for _, v in verdicts) for s in STATUSES}
    parts = " · ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (
        f"<p class='tally'><b>Verdicts on {esc(model)}:</b> {esc(parts)}. A verdict needs ≥ {need} facts in each "
        f"class a claim compares (else <em>{TOO_FEW}</em>); each verdict's evidence gives n and 95 % CIs.</p>"
    )


def headline_html(out: Path) -> str:
    """The headline of a run: a definition grid of model, facts, methods, split, time and run."""
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in headline_items(out))
    return f"<dl class='headline'>{items}</dl>"


def _claims_table(verdicts: Sequence[tuple[str, dict[str, str]]], present: set[str]) -> str:
    rows = []
    for claim, v in verdicts:
        links = " · ".join(f"<a href='#{a}'>{esc(label)}</a>" for a, label in claim_figures(claim, present))
        rows.append(
            f"<tr><td>{esc(claim)}<details><summary>evidence</summary>{esc(v['evidence'])}</details></td>"
            f"<td class='v'>{verdict_badge(v)}</td><td class='v'>{links or '–'}</td></tr>"
        )
    return (
        "<table class='claims'><thead><tr><th>claim (Chen et al., ICLR 2025)</th><th>verdict</th><th>shown in</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _fig(make: Callable[[], Any], anchor: str, title: str, caption: str) -> str:
    """A figure drawn by ``make()``; a failure becomes a note (a figure must not cost the report)."""
    try:
        fig = make()
        return figure_html(rf.png_bytes(fig), anchor, title, caption)
    except Exception as exc:  # noqa: BLE001 - any plotting failure
        logger.warning("report figure %s failed: %r", anchor, exc)
        return f"<p class='note' id='{esc(anchor)}'>{esc(title)}: not drawn ({esc(repr(exc)[:200])})</p>"


def _png_file(path: Path, anchor: str, title: str, caption: str) -> str:
    return figure_html(path.read_bytes(), anchor, title, caption) if path.is_file() else ""


def _tab(t: Any, anchor: str, page_dir: Path, text_cols: int = 1) -> str:
    return f"<div id='{anchor}'>{table_html(t, page_dir, text_cols=text_cols)}</div>" if t is not None else ""


def _heatmaps(out: Path) -> str:
    """The Figure-1 heatmaps the run saved, captioned with their fact's CS and class under the run's split."""
    facts = read_table(out, "consistency/consistency_facts.parquet")
    s = run_info(out).get("settings", {})
    split = s.get("split", "otsu")
    m0 = (s.get("methods") or ["ig"])[0]
    html_parts = []
    for label, stem, anchor in (("most consistent", "heatmap_consistent", "fig-heatmap-kc"),
                                ("least consistent", "heatmap_inconsistent", "fig-heatmap-ki")):  # fmt: skip
        cap = ""
        if facts is not None and not facts.empty:
            f = facts[(facts["method"] == m0) & facts["cs"].notna()].sort_values(
                "cs", ascending=(label == "least consistent")
            )
            if len(f):
                r = f.iloc[0]
                cls = r.get(f"class_{split}", "?")
                cap = (f"{r['subject']} → {r['object']} ({r['relation']}): CS {fmt_num(r['cs'], 2)} with {m0.upper()}, "
                       f"{cls} under the run's split. ")  # fmt: skip
        cap += (
            "Rows: neighbor queries; columns: the union of their KNs; cells: attribution / the query's max."
        )
        html_parts.append(
            _png_file(out / "figures" / f"{stem}.png", anchor, f"Figure 1 view, the {label} fact", cap)
        )
    return row_html(html_parts, half=True)


def _consistency(out: Path, page_dir: Path) -> str:
    summ = read_table(out, "consistency/consistency_summary.parquet")
    facts = read_table(out, "consistency/consistency_facts.parquet")
    if summ is None or facts is None:
        return "<p class='note'>the consistency stage did not run</p>"
    per = read_table(out, "consistency/consistency_per_relation.parquet")
    split = run_info(out).get("settings", {}).get("split", "otsu")
    sweep = read_table(out, "consistency/consistency_tau_sweep.parquet")
    taus = {"static τ": 0.3}
    for _, r in summ[(summ["threshold"] == "otsu") & (summ["method"] != "∩")].iterrows():
        if math.isfinite(float(r["tau"])):
            taus[f"Otsu {str(r['method']).upper()}"] = float(r["tau"])
    parts = [
        _tab(ki_share_table(out), "tab-ki-share", page_dir),
        row_html([
            _fig(lambda: rf.ki_share_figure(summ), "fig-ki-share", "K_I share per method",
                 "Share of facts whose KNs disagree across neighbor queries (CS < τ), with 95 % bootstrap CIs over facts."),
            _fig(lambda: rf.cs_histogram_figure(facts), "fig-cs-hist", "Consistency scores",
                 "CS of each fact per attribution method; dashed lines: the static τ = 0.3 and Otsu's τ."),
        ]),
        row_html([
            _fig(lambda: rf.relation_ki_figure(per, split) if per is not None else None, "fig-relation",
                 "K_I per relation", "Share of K_I facts in each relation under the run's split."),
            _fig(lambda: rf.tau_sweep_figure(sweep if sweep is not None else rf.tau_sweep_from_facts(facts), taus),
                 "fig-tau-sweep", "K_I share against τ",
                 "How the K_I share depends on the threshold; bands: 95 % bootstrap CIs over facts."),
        ]),
        "<h3>Figure 1: neuron heatmaps per neighbor query</h3>" + _heatmaps(out),
    ]  # fmt: skip
    more = "".join(_png_file(p, f"fig-{p.stem}", p.stem.replace("_", " "), "share of K_I as the KN threshold t varies")
                   for p in sorted((out / "figures").glob("threshold_sweep_*.png")))  # fmt: skip
    if more:
        parts.append(details_html("More: KN-threshold sweep (static and Otsu τ)", row_html([more])))
    return "".join(parts)


def _ks_views(out: Path) -> str:
    views = sorted((out / "figures").glob("ks_heads_*.html")) if (out / "figures").is_dir() else []
    parts = []
    for v in sorted(views, key=lambda p: p.stem.endswith("K_C")):
        doc = v.read_text()
        m = re.search(r"<title>(.*?)</title>", doc, flags=re.S)
        query = m.group(1) if m else v.stem
        parts.append(
            f"<figure id='fig-{esc(v.stem)}'><figcaption><b>Knowledge-synapse heads, {esc(query)}.</b> Attention of "
            f"the heads that hold the query's synapses; ⟨KS⟩ marks synapse key tokens.</figcaption>"
            f"<div class='cv'>{body_of(doc)}</div></figure>"
        )
    return "<h3>Knowledge-synapse heads (circuitsvis)</h3>" + row_html(parts, half=True) if parts else ""


def _ql(out: Path, page_dir: Path) -> str:
    m = read_table(out, "ql/mapping_summary.parquet")
    d = read_table(out, "ql/dynamic_summary.parquet")
    if m is None and d is None:
        return "<p class='note'>the query-localization stage did not run</p>"
    parts = []
    if m is not None and not m.empty:
        parts += [
            _fig(lambda: rf.mapping_figure(m), "fig-mapping", "Query-KN mapping",
                 "Change of P(answer) when each neuron set of a query is switched off (× 0) or doubled (× 2). Self: the "
                 "query's own KNs; Union / Intersection: over the fact's queries; Refine: KNs shared by ≥ 2 queries; "
                 "Unrelated: as many random neurons. 95 % CIs over facts."),
            _tab(mapping_table(out), "tab-mapping", page_dir),
        ]  # fmt: skip
    if d is not None and not d.empty:
        parts += [
            _fig(lambda: rf.dynamic_figure(d), "fig-dynamic", "Dynamic KN selection",
                 "Editing a query's knowledge synapses (KS; suppress × 0, enhance × 2): change of each neuron group's "
                 "activations (query: its KNs; neighbor: other queries' KNs; random: matched random neurons), the part "
                 "of the P(answer) change that flows through each group, and the edit against an irrelevant-KS "
                 "control. 95 % CIs over facts."),
            _tab(dynamic_table(out), "tab-dynamic", page_dir, text_cols=2),
        ]  # fmt: skip
    parts.append(_ks_views(out))
    traces = "".join(_png_file(p, f"fig-{p.stem}", f"Causal trace, {p.stem.rsplit('_', 2)[-2]}_{p.stem.rsplit('_', 1)[-1]} fact",
                               "ROME-style indirect effect of restoring each residual state")
                     for p in sorted((out / "figures").glob("causal_trace_*.png")))  # fmt: skip
    if traces:
        parts.append(details_html("More: causal traces", row_html([traces])))
    return "".join(parts)


def _editing(out: Path, page_dir: Path) -> str:
    t = read_table(out, "editing/editing_table.parquet")
    if t is None or t.empty:
        return "<p class='note'>the editing stage did not run</p>"
    rows = read_table(out, "editing/editing_rows.parquet")
    if not (t["n_facts"] > 0).any():
        why = ""
        if rows is not None and "status" in rows.columns:
            why = ": " + ", ".join(f"{k} × {v}" for k, v in rows["status"].value_counts().items())
        return f"<p class='note'>no fact was edited (facts by status{esc(why)}); see the raw editing tables below</p>"
    seed = int(run_info(out).get("settings", {}).get("seed", 0) or 0)
    return _fig(lambda: rf.editing_figure(t, rows, seed=seed), "fig-editing", "Knowledge editing",
                "Rel, Gen, Loc and Avg of each neuron set (N_i, N_u, CAS) per class; 95 % bootstrap CIs over facts."
                ) + _tab(editing_table(out), "tab-editing", page_dir, text_cols=3)  # fmt: skip


def _raw(out: Path, page_dir: Path) -> str:
    parts, stage = [], None
    for title, name, df, csv in raw_tables(out):
        if title != stage:
            parts.append(f"<h3>{esc(title)}</h3>")
            stage = title
        link = f" · {rel_link(csv, page_dir, 'CSV')}" if csv is not None else ""
        parts.append(
            f"<details class='raw'><summary><b>{esc(name)}</b>: {esc(RAW_DESCRIPTIONS.get(name, 'a stage table'))} "
            f"({len(df):,} rows × {df.shape[1]} columns){link}</summary>"
            f"{raw_table_html(df)}</details>"
        )
    known = sorted((out / "known").glob("*.csv")) if (out / "known").is_dir() else []
    if known:
        links = " · ".join(rel_link(p, page_dir) for p in known)
        parts.append(f"<h3>Known-fact screening</h3><p class='note'>CSV: {links}</p>")
    return (
        "<p class='note'>Every table the stages wrote, rows keyed by fact (subject → object) and query text.</p>"
        + "".join(parts)
    )


def write_report(out: str | Path, *, min_facts: int | None = None) -> Path:
    """Write ``report.html`` into the output directory ``out`` and return its path.

    ``min_facts``: the fewest facts per compared class for a claim verdict (default
    :data:`qloc_tl.reporting.claims.MIN_FACTS_PER_CLASS`); see :func:`~qloc_tl.reporting.claims.claim_verdicts`.
    """
    out = Path(out)
    if not (out / "run.json").is_file():
        raise InvalidInputError(f"{str(out)!r} is not a qloc-tl output directory (no run.json)")
    need = facts_needed(min_facts)
    model = run_model_name(out)
    verdicts = claim_verdicts(out, min_facts=need)
    intro = headline_html(out) + tally_html(verdicts, need, model)
    bodies = {
        "Consistency (experiment 1)": _consistency(out, out),
        "Query localization": _ql(out, out),
        "Knowledge editing": _editing(out, out),
        "Raw tables": _raw(out, out),
        "Run settings": table_html(settings_table(out), out, text_cols=2, with_title=False),
    }
    present = set(re.findall(r"id='([^']+)'", "".join(bodies.values()))) | set(SECTION_IDS.values())
    bodies["Claims"] = (
        _claims_table(verdicts, present)
        + f"<p class='note'>Reproduction of <em>Knowledge Localization: Mission Not Accomplished? Enter Query "
        f"Localization!</em> (Chen et al., ICLR 2025) with qloc_tl. Verdicts apply to {esc(model)} and these facts only.</p>"
    )
    page = page_html(report_title(model), [(SECTION_IDS[s], s, bodies[s]) for s in SECTIONS], intro=intro)
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
