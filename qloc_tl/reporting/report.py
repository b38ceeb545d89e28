"""A self-contained HTML report of a ``qloc-tl run`` output directory.

The page holds: the run's settings, versions and timings; one verdict per claim of the paper, computed from
the measured tables; every final table; every figure (PNG, inlined as base64); and the circuitsvis
knowledge-synapse views (inlined with their JavaScript bundle, so the file works offline).

Claims are evaluated by small, documented rules (see :func:`claim_verdicts`); a claim whose experiment did
not run is reported as ``not run``, never silently dropped. A claim gets a verdict only when every class it
compares holds at least :data:`MIN_FACTS_PER_CLASS` facts (a claim about all facts together: that many in
all); otherwise its status is ``too few facts`` and the evidence gives the counts. Every verdict's evidence
states its n's and a confidence interval. Texts name the model of the run (``run.json``'s
``settings["model"]``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.store import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["write_report", "claim_verdicts", "SECTIONS", "MIN_FACTS_PER_CLASS", "STATUSES", "TOO_FEW"]

MIN_FACTS_PER_CLASS = 20
"""Fewest facts each class that a claim compares must hold before the claim gets a verdict (for a claim
about all facts together, e.g. the share of K_I facts, the fewest facts in all). With fewer, a difference
between classes is mostly noise: a 95 % CI of a proportion from 20 facts is still about ±0.2 wide. Override
per call (``min_facts=`` of :func:`claim_verdicts`, :func:`write_report`, :func:`qloc_tl.experiments.editing.claims`)
or for the session by assigning ``qloc_tl.reporting.report.MIN_FACTS_PER_CLASS``."""

TOO_FEW = "too few facts"
STATUSES = ("supported", "partial", "not supported", TOO_FEW, "not run")

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


def _need(min_facts: int | None) -> int:
    """The minimum number of facts per class: ``min_facts``, or :data:`MIN_FACTS_PER_CLASS` when None."""
    n = MIN_FACTS_PER_CLASS if min_facts is None else min_facts
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidInputError(f"min_facts must be a positive int, got {n!r}")
    return int(n)


def _too_few(counts: Mapping[str, int], need: int, scope: str = "in each class it compares") -> dict[str, str] | None:
    """The ``too few facts`` verdict when a count is below ``need`` (or there are none), else None."""
    if counts and all(int(v) >= need for v in counts.values()):
        return None
    have = ", ".join(f"{k} n={int(v)}" for k, v in counts.items()) or "no facts"
    return _verdict(TOO_FEW, f"a verdict needs ≥ {need} facts {scope}; this run has {have}")


def _ci(lo: float, hi: float, level: float = 0.95, fmt: str = "+.2f") -> str:
    """``"95% CI [lo, hi]"`` (``"CI n/a"`` when a bound is missing)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "CI n/a"
    return f"{level:.0%} CI [{lo:{fmt}}, {hi:{fmt}}]"


def _welch_ci(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Welch CI of ``mean(a) − mean(b)`` (Welch–Satterthwaite degrees of freedom); NaN with < 2 per group."""
    from scipy import stats

    if a.size < 2 or b.size < 2:
        return (math.nan, math.nan)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    d = float(a.mean() - b.mean())
    if se == 0:
        return (d, d)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    h = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return (d - h, d + h)


def _model_name(out: Path) -> str:
    """The run's model name from ``run.json`` (``settings["model"]``), or ``"the model"``."""
    try:
        name = json.loads((out / "run.json").read_text()).get("settings", {}).get("model")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else "the model"


def _consistency_claims(out: Path, need: int) -> list[tuple[str, dict[str, str]]]:
    """Verdicts of the consistency claims from ``consistency_summary`` (and ``consistency_facts`` for the CI).

    * **K_I share**: needs ≥ ``need`` classified facts; *supported* when even the most conservative view (the
      facts every method calls K_I, ``∩``; else the smallest share) has ≥ 20 % K_I, *partial* at ≥ 5 %. The
      evidence gives each share with its bootstrap CI (``prop_KI_ci_lo`` / ``_hi``).
    * **Welch's t-test**: only methods with ≥ ``need`` facts in K_C *and* in K_I count; *supported* when all of
      them have p < 0.05, *partial* when some do. The evidence gives n_KC, n_KI, p and the Welch CI of the
      difference of mean CS.
    """
    summ = _read(out / "consistency" / "consistency_summary.parquet")
    claim1 = "KL fails: a substantial share of facts is inconsistent knowledge (K_I)"
    claim2 = "K_C and K_I differ significantly in CS (Welch's t-test)"
    if summ is None or summ.empty or not (summ["threshold"] == "static").any():
        return [(claim1, _verdict("not run", "consistency stage missing")), (claim2, _verdict("not run", "consistency stage missing"))]
    st = summ[summ["threshold"] == "static"]
    inter = st[st["method"] == "∩"]
    ref = inter.iloc[0] if len(inter) else st.loc[st["prop_KI"].fillna(math.inf).idxmin()]
    n_ref = int(ref["n_facts"])
    tf = _too_few({"classified facts": n_ref}, need, "in all")
    if tf is not None:
        v1 = tf
    else:
        share = float(ref["prop_KI"])
        # rule: supported if even the most conservative view (∩, else the smallest) has ≥ 20% K_I
        status = "supported" if share >= 0.2 else ("partial" if share >= 0.05 else "not supported")
        parts = [
            f"{r.method}: {r.prop_KI:.0%} ({_ci(r.prop_KI_ci_lo, r.prop_KI_ci_hi, fmt='.0%')})"
            for r in st.itertuples() if not math.isnan(r.prop_KI)
        ]  # fmt: skip
        ot = summ[summ["threshold"] == "otsu"]
        otsu = ", ".join(f"{r.method}: {r.prop_KI:.0%} (τ={r.tau:.2f})" for r in ot.itertuples() if not math.isnan(r.prop_KI) and r.method != "∩")
        tau = st["tau"].dropna().iloc[0] if st["tau"].notna().any() else 0.3
        v1 = _verdict(
            status, f"n = {n_ref} facts; K_I at static τ={tau:.2f}: " + ", ".join(parts)
            + f"; at Otsu's τ: {otsu} (paper: 77% ∩ on LLaMA3-8B, GPT-2 lowest)",
        )  # fmt: skip
    facts = _read(out / "consistency" / "consistency_facts.parquet")
    per = st[st["method"] != "∩"]
    counts = {f"{r.method} K_C": int(r.n_KC) for r in per.itertuples()} | {f"{r.method} K_I": int(r.n_KI) for r in per.itertuples()}
    ok = per[(per["n_KC"] >= need) & (per["n_KI"] >= need) & per["welch_p"].notna()]
    if ok.empty:
        v2 = _too_few(counts, need) or _verdict("not run", "no method has a Welch test (CS constant within a class)")
    else:
        ps = ok["welch_p"]
        status = "supported" if (ps < 0.05).all() else ("partial" if (ps < 0.05).any() else "not supported")
        parts = []
        for r in ok.itertuples():
            lo = hi = math.nan
            if facts is not None and {"method", "cs", "class_static"} <= set(facts.columns):
                f = facts[facts["method"] == r.method]
                kc = f.loc[f["class_static"] == "K_C", "cs"].dropna().to_numpy(float)
                ki = f.loc[f["class_static"] == "K_I", "cs"].dropna().to_numpy(float)
                lo, hi = _welch_ci(kc, ki)
            parts.append(
                f"{r.method} (K_C n={int(r.n_KC)}, K_I n={int(r.n_KI)}): Welch p={r.welch_p:.2g}, mean CS K_C − K_I "
                f"{r.mean_cs_KC - r.mean_cs_KI:+.2f} ({_ci(lo, hi)})"
            )
        skipped = [f"{r.method} (K_C n={int(r.n_KC)}, K_I n={int(r.n_KI)})" for r in per.itertuples() if r.method not in set(ok["method"])]
        ev = "; ".join(parts) + (f"; too few facts for a test: {', '.join(skipped)}" if skipped else "")
        v2 = _verdict(status, ev + " (tautological for a threshold split; reported for parity)")
    return [(claim1, v1), (claim2, v2)]


def _ql_settings(ql: Path) -> tuple[int, float, int]:
    """``(n_bootstrap, ci, seed)`` of the query-localization stage (its ``config.json``; else 1000, 0.95, 0)."""
    try:
        cfg = json.loads((ql / "config.json").read_text())["config"]["qlconfig"]
        return int(cfg.get("n_bootstrap", 1000)) or 1000, float(cfg.get("ci", 0.95)), int(cfg.get("seed", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return 1000, 0.95, 0


def _ql_claims(ql: Path, need: int, model: str = "the model") -> list[tuple[str, dict[str, str]]]:
    """Verdicts of the Query Localization claims from the ``ql`` stage tables.

    Rules (a class "has enough facts" when it holds ≥ ``need`` facts):

    * **Query-KN mapping**: gap = |Δp/p(Self)| − |Δp/p(Intersection)| under suppression (``mapping_summary``).
      Needs enough facts in K_I and in K_C. *supported* when the K_I gap is > 0.1 and larger than the K_C gap;
      *partial* when the K_I gap is > 0 only; else *not supported*. Evidence: n and the fact-bootstrap CIs of
      both sets' Δp/p per class.
    * **Dynamic KN selection** (``dynamic_rows``, all classes pooled, each row once; needs ≥ ``need`` facts in
      all): under KS suppression, the query's KN group must change more (|ΔValue| Σ/Σ) than random neurons
      and carry more Δprob (``dprob_via``) than the neighbors' KNs, and the KS edit must move P(answer) more
      than the irrelevant-KS control. All three: *supported*; one or two: *partial*. Evidence: n and
      fact-bootstrap CIs (:func:`qloc_tl.experiments.mapping.bootstrap_summary`, the stage's ``n_bootstrap`` and ``ci``).
    * **Enh < Sup**: |Δprob| under enhancement < under suppression for the KS intervention, checked in each
      class with enough facts (classes with fewer are named and left out). Evidence: n and the CIs of Δprob
      under both ops (``dynamic_summary``), and the model's mean P(answer) before the edit.
    """
    from qloc_tl.experiments.mapping import bootstrap_summary, derive_seed

    c1 = "QL (Query-KN mapping): for K_I, a query's own KNs (Self) matter much more than the shared ones (Intersection)"
    c2 = "QL (dynamic KN selection): knowledge synapses select the query's KNs (ΔValue, Δprob vs neighbor/random neurons)"
    c3 = "Enh < Sup: enhancing moves P(answer) less than suppressing"
    m, d, e = (_read(ql / f"{n}.parquet") for n in ("mapping_summary", "dynamic_summary", "dynamic_enh_vs_sup"))
    rows = _read(ql / "dynamic_rows.parquet")
    n_boot, level, seed = _ql_settings(ql)
    out: list[tuple[str, dict[str, str]]] = []
    if m is None or m.empty:
        out.append((c1, _verdict("not run", "no mapping table")))
    else:
        sup = m[m["op"] == "suppress"].set_index(["class", "set"])

        def cell(cls: str, name: str) -> pd.Series | None:
            return sup.loc[(cls, name)] if (cls, name) in sup.index else None

        def gap(cls: str) -> float:
            a, b = cell(cls, "Self"), cell(cls, "Intersection")
            return math.nan if a is None or b is None else abs(float(a["mean_of_ratios"])) - abs(float(b["mean_of_ratios"]))

        if cell("K_I", "Self") is None:
            out.append((c1, _verdict("not run", "no K_I facts in this run (see the class split)")))
        else:
            counts = {cls: int(cell(cls, "Self")["n_facts"]) if cell(cls, "Self") is not None else 0 for cls in ("K_I", "K_C")}
            tf = _too_few(counts, need)
            if tf is not None:
                out.append((c1, tf))
            else:
                gi, gc = gap("K_I"), gap("K_C")
                status = "supported" if gi > 0.1 and (math.isnan(gc) or gi > gc) else ("partial" if gi > 0 else "not supported")
                parts = []
                for cls, g in (("K_I", gi), ("K_C", gc)):
                    sets = []
                    for name in ("Self", "Intersection"):
                        r = cell(cls, name)
                        if r is not None:
                            sets.append(f"{name} {float(r['mean_of_ratios']):+.2f} ({_ci(float(r['mean_of_ratios_lo']), float(r['mean_of_ratios_hi']), level)})")
                    parts.append(f"{cls} (n={counts[cls]}): " + " vs ".join(sets) + f", gap {g:+.2f}")
                ev = "Δp/p under suppression — " + "; ".join(parts) + " (set sizes differ; see docs/query_localization.md)"
                out.append((c1, _verdict(status, ev)))
    if rows is None or rows.empty:
        out.append((c2, _verdict("not run", "no dynamic-KN-selection table")))
    else:
        sup_rows = rows[rows["op"] == "suppress"]
        ks_rows = sup_rows[sup_rows["intervention"] == "KS"]
        n = int(ks_rows["fact_key"].nunique())
        per_class = ks_rows.groupby("class")["fact_key"].nunique().to_dict()
        tf = _too_few({"all classes": n}, need, "in all")
        missing = [g for g in ("query", "neighbor", "random") if not (ks_rows["group"] == g).any()]
        if tf is not None:
            out.append((c2, _verdict(TOO_FEW, tf["evidence"] + " (" + ", ".join(f"{k} n={v}" for k, v in per_class.items()) + ")")))
        elif missing:
            out.append((c2, _verdict("not run", f"missing group {missing[0]!r}")))
        else:
            stats = {
                g: bootstrap_summary(
                    ks_rows[ks_rows["group"] == g], ratios={"dv": ("dvalue_rel_agg", None), "via": ("dprob_via", None), "dp": ("dprob", None)},
                    n_bootstrap=n_boot, ci=level, seed=derive_seed(seed, "claim", g),
                )
                for g in ("query", "neighbor", "random")
            }  # fmt: skip
            irr_rows = sup_rows[(sup_rows["intervention"] == "irrelevant") & (sup_rows["group"] == "query")]
            irr = bootstrap_summary(
                irr_rows.assign(abs_dprob=irr_rows["dprob"].abs()), ratios={"adp": ("abs_dprob", None)},
                n_bootstrap=n_boot, ci=level, seed=derive_seed(seed, "claim", "irrelevant"),
            ) if len(irr_rows) else {"adp": math.nan, "adp_lo": math.nan, "adp_hi": math.nan}  # fmt: skip
            q, nb, rd = stats["query"], stats["neighbor"], stats["random"]
            checks = [abs(q["dv"]) > abs(rd["dv"]), abs(q["via"]) > abs(nb["via"]), abs(q["dp"]) > irr["adp"]]
            k = sum(bool(c) for c in checks)
            status = "supported" if k == 3 else ("partial" if k else "not supported")

            def v(st: Mapping[str, float], key: str) -> str:
                return f"{st[key]:+.2f} ({_ci(st[key + '_lo'], st[key + '_hi'], level)})"

            ev = (
                f"n = {n} facts (" + ", ".join(f"{c} {k_n}" for c, k_n in per_class.items()) + "); KS suppression: "
                f"ΔValue query {v(q, 'dv')} / neighbor {v(nb, 'dv')} / random {v(rd, 'dv')}; "
                f"Δp via query KNs {v(q, 'via')} vs neighbor {v(nb, 'via')}; "
                f"Δp {v(q, 'dp')} vs irrelevant-KS |Δp| {irr['adp']:.2f} ({_ci(irr['adp_lo'], irr['adp_hi'], level, '.2f')})"
            )
            out.append((c2, _verdict(status, ev)))
    if e is None or e.empty:
        out.append((c3, _verdict("not run", "no Enh-vs-Sup table")))
    else:
        ks = e[(e["intervention"] == "KS") & (e["group"] == "query")]
        cells = d[(d["intervention"] == "KS") & (d["group"] == "query")] if d is not None and not d.empty else None
        n_cls: dict[str, int] = {}
        for cls in ks["class"]:
            if cells is not None:
                c = cells[(cells["class"] == cls) & (cells["op"] == "suppress")]
                n_cls[cls] = int(c["n_facts"].iloc[0]) if len(c) else 0
            elif rows is not None:
                n_cls[cls] = int(rows.loc[rows["class"] == cls, "fact_key"].nunique())
            else:
                n_cls[cls] = 0
        enough = ks[[n_cls[c] >= need for c in ks["class"]]]
        if enough.empty:
            out.append((c3, _too_few(n_cls, need) or _verdict("not run", "no class in the Enh-vs-Sup table")))
        else:
            flags = enough["dprob_enh_lt_sup"].dropna().astype(bool)
            status = "supported" if len(flags) and flags.all() else ("partial" if flags.any() else "not supported")

            def dp_ci(cls: str, op: str) -> str:
                if cells is None:
                    return "CI n/a"
                c = cells[(cells["class"] == cls) & (cells["op"] == op)]
                return _ci(float(c["dprob_lo"].iloc[0]), float(c["dprob_hi"].iloc[0]), level) if len(c) else "CI n/a"

            ev = "; ".join(
                f"{r['class']} (n={n_cls[r['class']]}): |Δp| enh {r['dprob_enh']:.2f} vs sup {r['dprob_sup']:.2f} "
                f"(Δp enh {dp_ci(r['class'], 'enhance')}, sup {dp_ci(r['class'], 'suppress')})"
                for _, r in enough.iterrows()
            )  # fmt: skip
            skipped = [f"{c} n={n_cls[c]}" for c in ks["class"] if n_cls[c] < need]
            if skipped:
                ev += f"; too few facts for a verdict: {', '.join(skipped)}"
            if rows is not None and not rows.empty:
                base = rows[(rows["intervention"] == "KS") & (rows["op"] == "suppress") & (rows["group"] == "query")]
                p0 = float(base["p_before"].mean()) if len(base) else math.nan
                if math.isfinite(p0):
                    ev += f" ({model} answers at mean p≈{p0:.2f} before the edit, leaving {1 - p0:.2f} to gain by enhancing)"
            out.append((c3, _verdict(status, ev)))
    return out


def _module_claims(module: str, out: Path, need: int) -> list[tuple[str, dict[str, str]]]:
    """Claims from a stage module's ``claims(out_dir, min_facts=)`` function: ``[(claim, status, evidence), ...]``."""
    import importlib

    try:
        mod = importlib.import_module(f"qloc_tl.experiments.{module}")
        fn: Callable[..., list[tuple[str, str, str]]] | None = getattr(mod, "claims", None)
    except ImportError:
        fn = None
    if fn is None:
        return []
    try:
        return [(c, _verdict(s, e)) for c, s, e in fn(out, min_facts=need)]
    except Exception as exc:  # a broken verdict must not hide the report
        logger.warning("claims of %s failed: %r", module, exc)
        return [(f"{module} claims", _verdict("not run", f"could not evaluate: {exc!r}"))]


def claim_verdicts(out: str | Path, *, min_facts: int | None = None) -> list[tuple[str, dict[str, str]]]:
    """``[(claim, {"status", "evidence"})]`` for every claim of the paper, from the tables in ``out``.

    Status is one of :data:`STATUSES`: ``supported``, ``partial``, ``not supported``, ``too few facts``
    (a class the claim compares holds fewer than ``min_facts`` facts; the evidence gives the counts) or
    ``not run``. ``min_facts`` defaults to :data:`MIN_FACTS_PER_CLASS` (read at call time).
    """
    out = Path(out)
    need = _need(min_facts)
    model = _model_name(out)
    verdicts = _consistency_claims(out, need)
    ql = _ql_claims(out / "ql", need, model) if (out / "ql").is_dir() else []
    ed = _module_claims("editing", out / "editing", need) if (out / "editing").is_dir() else []
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


def write_report(out: str | Path, *, min_facts: int | None = None) -> Path:
    """Write ``report.html`` into the output directory ``out`` and return its path.

    ``min_facts``: the fewest facts per compared class for a claim verdict (default
    :data:`MIN_FACTS_PER_CLASS`); see :func:`claim_verdicts`.
    """
    out = Path(out)
    run_json = out / "run.json"
    if not run_json.is_file():
        raise InvalidInputError(f"{str(out)!r} is not a qloc-tl output directory (no run.json)")
    info = json.loads(run_json.read_text())
    need = _need(min_facts)
    model = _model_name(out)
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
