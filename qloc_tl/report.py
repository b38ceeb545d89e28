"""A self-contained HTML report of a ``qloc-tl run`` output directory.

The page holds: the run's settings, versions and timings; one verdict per claim of the paper, computed from
the measured tables; every final table; every figure (PNG, inlined as base64); and the circuitsvis
knowledge-synapse views (inlined with their JavaScript bundle, so the file works offline).

Claims are evaluated by small, documented rules (see :func:`claim_verdicts`); a claim whose experiment did
not run is reported as ``not run``, never silently dropped.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .store import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["write_report", "claim_verdicts", "SECTIONS"]

SECTIONS = ("Summary of claims", "Run", "Consistency (experiment 1)", "Query localization", "Knowledge editing", "Figures")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.8rem;margin:.6rem 0 1.2rem}th,td{border:1px solid #ddd;padding:.2rem .45rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto;max-height:420px;overflow-y:auto}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:.6rem;font-size:.75rem;color:#fff}
.supported{background:#2e7d32}.not-supported{background:#c62828}.partial{background:#ef6c00}.not-run{background:#777}
figure{display:inline-block;margin:.5rem;vertical-align:top}figure img{max-width:520px;border:1px solid #eee}
figcaption{font-size:.75rem;color:#555}code{background:#f4f4f4;padding:0 .2rem}
"""


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


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


def _verdict(status: str, evidence: str) -> dict[str, str]:
    return {"status": status, "evidence": evidence}


def _consistency_claims(out: Path) -> list[tuple[str, dict[str, str]]]:
    summ = _read(out / "consistency" / "consistency_summary.parquet")
    claim1 = "KL fails: a substantial share of facts is inconsistent knowledge (K_I)"
    claim2 = "K_C and K_I differ significantly in CS (Welch's t-test)"
    if summ is None or summ.empty:
        return [(claim1, _verdict("not run", "consistency stage missing")), (claim2, _verdict("not run", "consistency stage missing"))]
    st = summ[summ["threshold"] == "static"]
    parts = [f"{r.method}: {r.prop_KI:.0%}" for r in st.itertuples() if not math.isnan(r.prop_KI)]
    inter = st[st["method"] == "∩"]
    ref = float(inter["prop_KI"].iloc[0]) if len(inter) else float(st["prop_KI"].min())
    # rule: supported if even the most conservative view (∩, else the smallest) has ≥ 20% K_I
    status = "supported" if ref >= 0.2 else ("partial" if ref >= 0.05 else "not supported")
    ot = summ[summ["threshold"] == "otsu"]
    otsu = ", ".join(f"{r.method}: {r.prop_KI:.0%} (τ={r.tau:.2f})" for r in ot.itertuples() if not math.isnan(r.prop_KI) and r.method != "∩")
    tau = st["tau"].dropna().iloc[0] if st["tau"].notna().any() else 0.3
    v1 = _verdict(status, f"K_I at static τ={tau:.2f}: " + ", ".join(parts) + f"; at Otsu's τ: {otsu} (paper: 77% ∩ on LLaMA3-8B, GPT-2 lowest)")
    ps = st[st["method"] != "∩"]["welch_p"].dropna()
    if ps.empty:
        v2 = _verdict("not run", "too few facts in one class for a test")
    else:
        status = "supported" if (ps < 0.05).all() else ("partial" if (ps < 0.05).any() else "not supported")
        v2 = _verdict(status, "Welch p: " + ", ".join(f"{m}: {p:.2g}" for m, p in zip(st["method"], st["welch_p"]) if not math.isnan(p)) + " (tautological for a threshold split; reported for parity)")
    return [(claim1, v1), (claim2, v2)]


def _ql_claims(ql: Path) -> list[tuple[str, dict[str, str]]]:
    """Verdicts of the Query Localization claims from the ``ql`` stage tables.

    Rules (documented in docs/cli.md):

    * **Query-KN mapping**: gap = |Δp/p(Self)| − |Δp/p(Intersection)| under suppression. *supported* when the
      K_I gap is > 0.1 and larger than the K_C gap; *partial* when the K_I gap is > 0 only; else *not supported*.
    * **Dynamic KN selection**: under KS suppression, the query's KN group must change more (|ΔValue| Σ/Σ)
      than random neurons and carry more Δprob (``dprob_via``) than the neighbors' KNs, and the KS edit must
      move P(answer) more than the irrelevant-KS control. All three: *supported*; one or two: *partial*.
    * **Enh < Sup**: |Δprob| under enhancement < under suppression for the KS intervention in every class.
    """
    c1 = "QL (Query-KN mapping): for K_I, a query's own KNs (Self) matter much more than the shared ones (Intersection)"
    c2 = "QL (dynamic KN selection): knowledge synapses select the query's KNs (ΔValue, Δprob vs neighbor/random neurons)"
    c3 = "Enh < Sup: enhancing moves P(answer) less than suppressing"
    m, d, e = (_read(ql / f"{n}.parquet") for n in ("mapping_summary", "dynamic_summary", "dynamic_enh_vs_sup"))
    out: list[tuple[str, dict[str, str]]] = []
    if m is None or m.empty:
        out.append((c1, _verdict("not run", "no mapping table")))
    else:
        sup = m[m["op"] == "suppress"].set_index(["class", "set"])["mean_of_ratios"]

        def gap(cls: str) -> float:
            try:
                return abs(float(sup[(cls, "Self")])) - abs(float(sup[(cls, "Intersection")]))
            except KeyError:
                return math.nan

        gi, gc = gap("K_I"), gap("K_C")
        if math.isnan(gi):
            out.append((c1, _verdict("not run", "no K_I facts in this run (see the class split)")))
        else:
            status = "supported" if gi > 0.1 and (math.isnan(gc) or gi > gc) else ("partial" if gi > 0 else "not supported")
            out.append((c1, _verdict(status, f"Self − Intersection |Δp/p| under suppression: K_I {gi:+.2f}, K_C {gc:+.2f} (set sizes differ; see docs/query_localization.md)")))
    if d is None or d.empty:
        out.append((c2, _verdict("not run", "no dynamic-KN-selection table")))
    else:
        sup = d[(d["op"] == "suppress")]
        ks = sup[sup["intervention"] == "KS"].groupby("group")[["dvalue_rel_agg", "dprob_via", "dprob"]].mean()
        irr = sup[sup["intervention"] == "irrelevant"]["dprob"].abs().mean()
        try:
            checks = [
                abs(ks.loc["query", "dvalue_rel_agg"]) > abs(ks.loc["random", "dvalue_rel_agg"]),
                abs(ks.loc["query", "dprob_via"]) > abs(ks.loc["neighbor", "dprob_via"]),
                abs(ks["dprob"].mean()) > irr,
            ]
            n = sum(bool(c) for c in checks)
            status = "supported" if n == 3 else ("partial" if n else "not supported")
            ev = (
                f"KS suppression: ΔValue query {ks.loc['query', 'dvalue_rel_agg']:+.2f} / neighbor "
                f"{ks.loc['neighbor', 'dvalue_rel_agg']:+.2f} / random {ks.loc['random', 'dvalue_rel_agg']:+.2f}; "
                f"Δp via query KNs {ks.loc['query', 'dprob_via']:+.2f} vs neighbor {ks.loc['neighbor', 'dprob_via']:+.2f}; "
                f"Δp {ks['dprob'].mean():+.2f} vs irrelevant-KS |Δp| {irr:.2f}"
            )
            out.append((c2, _verdict(status, ev)))
        except KeyError as exc:
            out.append((c2, _verdict("not run", f"missing group {exc}")))
    if e is None or e.empty:
        out.append((c3, _verdict("not run", "no Enh-vs-Sup table")))
    else:
        ks = e[(e["intervention"] == "KS") & (e["group"] == "query")]
        flags = ks["dprob_enh_lt_sup"].dropna().astype(bool)
        status = "supported" if len(flags) and flags.all() else ("partial" if flags.any() else "not supported")
        ev = "; ".join(f"{r['class']}: |Δp| enh {r['dprob_enh']:.2f} vs sup {r['dprob_sup']:.2f}" for _, r in ks.iterrows())
        out.append((c3, _verdict(status, ev + " (the built-in model answers at p≈0.74, leaving little room to enhance)")))
    return out


def _module_claims(module: str, out: Path) -> list[tuple[str, dict[str, str]]]:
    """Claims from a stage module's ``claims(out_dir)`` function: ``[(claim, status, evidence), ...]``."""
    import importlib

    try:
        mod = importlib.import_module(f"qloc_tl.{module}")
        fn: Callable[[Path], list[tuple[str, str, str]]] | None = getattr(mod, "claims", None)
    except ImportError:
        fn = None
    if fn is None:
        return []
    try:
        return [(c, _verdict(s, e)) for c, s, e in fn(out)]
    except Exception as exc:  # a broken verdict must not hide the report
        logger.warning("claims of %s failed: %r", module, exc)
        return [(f"{module} claims", _verdict("not run", f"could not evaluate: {exc!r}"))]


def claim_verdicts(out: str | Path) -> list[tuple[str, dict[str, str]]]:
    """``[(claim, {"status", "evidence"})]`` for every claim of the paper, from the tables in ``out``.

    Status is one of ``supported``, ``partial``, ``not supported``, ``not run``.
    """
    out = Path(out)
    verdicts = _consistency_claims(out)
    ql = _ql_claims(out / "ql") if (out / "ql").is_dir() else []
    ed = _module_claims("editing", out / "editing") if (out / "editing").is_dir() else []
    if not ql:
        ql = [("Query-KN mapping and dynamic KN selection (QL assumption)", _verdict("not run", "query-localization stage missing"))]
    if not ed:
        ed = [("CAS editing balances Rel/Gen/Loc/PPL better than N_i and N_u", _verdict("not run", "editing stage missing"))]
    return verdicts + ql + ed


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


def write_report(out: str | Path) -> Path:
    """Write ``report.html`` into the output directory ``out`` and return its path."""
    out = Path(out)
    from .errors import InvalidInputError

    run_json = out / "run.json"
    if not run_json.is_file():
        raise InvalidInputError(f"{str(out)!r} is not a qloc-tl output directory (no run.json)")
    info = json.loads(run_json.read_text())
    verdicts = claim_verdicts(out)
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
        ("Summary of claims", f"<table><thead><tr><th>claim (Chen et al., ICLR 2025)</th><th>verdict</th><th>evidence (this run)</th></tr></thead><tbody>{rows}</tbody></table>"),
        ("Run", f"<pre>{html.escape(json.dumps(info, indent=2))}</pre>"),
        ("Consistency (experiment 1)", _stage_tables(out / "consistency") + "<h3>Neuron heatmaps per neighbor query (Figure 1 style)</h3>" + "".join(_img(p) for p in heat)),
        ("Query localization", _stage_tables(out / "ql") + "<h3>Knowledge-synapse heads (circuitsvis)</h3>" + view_html),
        ("Knowledge editing", _stage_tables(out / "editing")),
        ("Figures", "".join(_img(p) for p in other) or "<p><em>no figures</em></p>"),
    ]
    body = "".join(f"<section id='{html.escape(t.split(' ')[0].lower())}'><h2>{html.escape(t)}</h2>{c}</section>" for t, c in sections)
    title = f"qloc-tl report — {html.escape(str(info.get('settings', {}).get('model', '?')))}"
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
        f"<body><h1>{title}</h1><p>Reproduction of <em>Knowledge Localization: Mission Not Accomplished? Enter Query "
        f"Localization!</em> (Chen et al., ICLR 2025) with qloc_tl. Verdicts apply to this model and these facts only.</p>"
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
