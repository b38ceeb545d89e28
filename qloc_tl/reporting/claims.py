"""Verdicts on the paper's claims, computed from the tables of a ``qloc-tl run`` output directory.

Each claim is evaluated by a small, documented rule (see the ``*_claims`` functions); a claim whose experiment
did not run is reported as ``not run``, never silently dropped. A claim gets a verdict only when every class
it compares holds at least :data:`MIN_FACTS_PER_CLASS` facts (a claim about all facts together: that many in
all); otherwise its status is :data:`TOO_FEW` and the evidence gives the counts. Every verdict's evidence
states its n's and a confidence interval. Texts name the model of the run (``run.json``'s
``settings["model"]``, :func:`run_model_name`).

* :func:`consistency_claims`: the K_I share and the K_C / K_I difference in CS (``consistency/``);
* :func:`ql_claims`: Query-KN mapping, dynamic KN selection, Enh < Sup (``ql/``);
* :func:`editing_claims`: the four editing claims (``editing/``);
* :func:`claim_verdicts`: all of them for one output directory, as shown by the HTML report.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.stats import bootstrap_summary, derive_seed
from qloc_tl.experiments.editing_config import CLASSES

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_FACTS_PER_CLASS",
    "TOO_FEW",
    "STATUSES",
    "facts_needed",
    "run_model_name",
    "consistency_claims",
    "ql_claims",
    "editing_claims",
    "claim_verdicts",
]

MIN_FACTS_PER_CLASS = 20
"""Fewest facts each class that a claim compares must hold before the claim gets a verdict (for a claim
about all facts together, e.g. the share of K_I facts, the fewest facts in all). With fewer, a difference
between classes is mostly noise: a 95 % CI of a proportion from 20 facts is still about ±0.2 wide. Override
per call (``min_facts=`` of :func:`claim_verdicts`, :func:`editing_claims`,
:func:`qloc_tl.reporting.report.write_report`) or for the session by assigning
``qloc_tl.reporting.claims.MIN_FACTS_PER_CLASS``."""

TOO_FEW = "too few facts"
"""The status of a claim when a class it compares holds fewer than the minimum number of facts."""

STATUSES = ("supported", "partial", "not supported", TOO_FEW, "not run")
"""The statuses a claim can get."""


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def _verdict(status: str, evidence: str) -> dict[str, str]:
    return {"status": status, "evidence": evidence}


def facts_needed(min_facts: int | None = None) -> int:
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


def run_model_name(out: str | Path) -> str:
    """The run's model name from ``run.json`` (``settings["model"]``), or ``"the model"``."""
    try:
        name = json.loads((Path(out) / "run.json").read_text()).get("settings", {}).get("model")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else "the model"


def consistency_claims(out: str | Path, *, min_facts: int | None = None) -> list[tuple[str, dict[str, str]]]:
    """Verdicts of the consistency claims from ``out/consistency``'s ``consistency_summary`` (and
    ``consistency_facts`` for the CI): ``[(claim, {"status", "evidence"})]``. ``need`` below is
    :func:`facts_needed` of ``min_facts``.

    * **K_I share**: needs ≥ ``need`` classified facts; *supported* when even the most conservative view (the
      facts every method calls K_I, ``∩``; else the smallest share) has ≥ 20 % K_I, *partial* at ≥ 5 %. The
      evidence gives each share with its bootstrap CI (``prop_KI_ci_lo`` / ``_hi``).
    * **Welch's t-test**: only methods with ≥ ``need`` facts in K_C *and* in K_I count; *supported* when all of
      them have p < 0.05, *partial* when some do. The evidence gives n_KC, n_KI, p and the Welch CI of the
      difference of mean CS.
    """
    out, need = Path(out), facts_needed(min_facts)
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
            + f"; at Otsu's τ: {otsu} (paper's talk: most facts K_I on LLaMA3-8B; it gives no table values)",
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


def ql_claims(
    ql: str | Path, *, min_facts: int | None = None, model: str = "the model"
) -> list[tuple[str, dict[str, str]]]:
    """Verdicts of the Query Localization claims from the ``ql`` stage tables in the directory ``ql``:
    ``[(claim, {"status", "evidence"})]``; ``model`` names the model in the evidence.

    Rules (a class "has enough facts" when it holds ≥ ``need`` = :func:`facts_needed` of ``min_facts`` facts):

    * **Query-KN mapping**: gap = |Δp/p(Self)| − |Δp/p(Intersection)| under suppression (``mapping_summary``).
      Needs enough facts in K_I and in K_C. *supported* when the K_I gap is > 0.1 and larger than the K_C gap;
      *partial* when the K_I gap is > 0 only; else *not supported*. Evidence: n and the fact-bootstrap CIs of
      both sets' Δp/p per class.
    * **Dynamic KN selection** (``dynamic_rows``, all classes pooled, each row once; needs ≥ ``need`` facts in
      all): under KS suppression, the query's KN group must change more (|ΔValue| Σ/Σ) than random neurons
      and carry more Δprob (``dprob_via``) than the neighbors' KNs, and the KS edit must move P(answer) more
      than the irrelevant-KS control. All three: *supported*; one or two: *partial*. Evidence: n and
      fact-bootstrap CIs (:func:`qloc_tl.core.stats.bootstrap_summary`, the stage's ``n_bootstrap`` and ``ci``).
    * **Enh < Sup**: |Δprob| under enhancement < under suppression for the KS intervention and, when the mapping
      ran, for the Self and Union neuron sets (``mapping_enh_vs_sup``), checked in each class with enough facts
      (classes with fewer are named and left out): all comparisons hold → *supported*, some → *partial*. Evidence: n and the CIs of Δprob
      under both ops (``dynamic_summary``), and the model's mean P(answer) before the edit.
    """
    ql, need = Path(ql), facts_needed(min_facts)
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
            selfs = {cls: cell(cls, "Self") for cls in ("K_I", "K_C")}
            counts = {cls: int(c["n_facts"]) if c is not None else 0 for cls, c in selfs.items()}
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
            flags = enough["dprob_enh_lt_sup"].dropna().astype(bool).tolist()
            # the same comparison for the query's own neuron sets (Self, and Union over its neighbors), when the
            # mapping stage ran: the claim is about enhancement in general, not only through synapses
            me = _read(ql / "mapping_enh_vs_sup.parquet")
            kn_rows = (
                me[me["set"].isin(("Self", "Union")) & me["class"].isin(list(enough["class"]))]
                if me is not None and not me.empty
                else None
            )
            if kn_rows is not None:
                flags += kn_rows["dprob_enh_lt_sup"].dropna().astype(bool).tolist()
            status = "supported" if flags and all(flags) else ("partial" if any(flags) else "not supported")

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
            if kn_rows is not None and not kn_rows.empty:
                ev += "; neuron sets: " + "; ".join(
                    f"{r['class']} {r['set']}: |Δp| enh {r['dprob_enh']:.2f} vs sup {r['dprob_sup']:.2f}"
                    for _, r in kn_rows.iterrows()
                )
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


def _bootstrap_mean_ci(
    values: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI (resampling facts, i.e. rows) of the mean over columns of the column means of
    ``values`` (``[n_facts]`` or ``[n_facts, n_cols]``; NaN entries skipped per column, as in
    :func:`qloc_tl.experiments.editing.summarize`). NaN bounds with fewer than two facts."""
    v = np.asarray(values, dtype=float)
    v = v[:, None] if v.ndim == 1 else v
    if v.shape[0] < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stat = np.nanmean(v[idx], axis=1).mean(axis=1)
    stat = stat[np.isfinite(stat)]
    if stat.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    return float(np.quantile(stat, a)), float(np.quantile(stat, 1 - a))


def editing_claims(
    out_dir: str | Path, *, min_facts: int | None = None, n_boot: int = 1000, seed: int = 0
) -> list[tuple[str, str, str]]:
    """Verdicts on the paper's editing claims from a run directory's ``editing_table``:
    ``[(claim, status, evidence)]`` with status ``supported`` / ``partial`` / ``not supported`` /
    ``too few facts`` / ``not run``.

    A claim is checked per (edit, class) cell (K_I vs K_C per (edit, method)); ``supported`` when it holds
    in every cell, ``partial`` in some, ``not supported`` in none. Differences under ``margin = 0.02`` count
    as ties (not holding). A cell counts only when each class it involves holds ≥ ``min_facts`` facts
    (default :data:`MIN_FACTS_PER_CLASS`); cells with fewer are named in the evidence, and a
    claim with no such cell is ``too few facts``. Evidence gives each cell's n and a 95 % percentile
    bootstrap CI over facts (:func:`_bootstrap_mean_ci`, ``n_boot`` resamples, seeded per cell from ``seed``)
    of the compared metric, computed from ``editing_rows`` (``CI n/a`` without that table).
    """
    need = facts_needed(min_facts)
    path = Path(out_dir) / "editing_table.parquet"
    names = [
        "Edits of inconsistent facts (K_I) generalise worse than of consistent ones (K_C)",
        "Editing the query's own KNs (N_i) generalises poorly to neighbor queries",
        "Editing the union over neighbor queries (N_u) hurts locality / perplexity most",
        "CAS gives the best balance (highest Avg = (Rel+Gen+Loc)/3)",
    ]
    if not path.is_file():
        return [(n, "not run", f"no {path.name} in {out_dir}") for n in names]
    t = pd.read_parquet(path)
    t = t[t["n_facts"] > 0]
    rows_path = Path(out_dir) / "editing_rows.parquet"
    rows = pd.read_parquet(rows_path) if rows_path.is_file() else None
    if rows is not None and "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    margin = 0.02

    def cell(edit: str, cls: str, method: str, col: str) -> float:
        sel = t[(t["edit"] == edit) & (t["class"] == cls) & (t["method"] == method)]
        return float(sel[col].iloc[0]) if len(sel) else math.nan

    def n_of(edit: str, cls: str, method: str) -> int:
        return int(cell(edit, cls, method, "n_facts")) if not math.isnan(cell(edit, cls, method, "n_facts")) else 0

    def ci(edit: str, cls: str, method: str, col: str) -> str:
        cols = ["rel", "gen", "loc"] if col == "avg" else [col]
        if rows is None or not set(cols) <= set(rows.columns):
            return "CI n/a"
        g = rows[(rows["edit"] == edit) & (rows["class"] == cls) & (rows["method"] == method)]
        cell_seed = zlib.crc32(f"{seed}|{edit}|{cls}|{method}|{col}".encode())
        lo, hi = _bootstrap_mean_ci(g[cols].to_numpy(dtype=float), n_boot=n_boot, seed=cell_seed)
        return f"95% CI [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else "CI n/a"

    def verdict(results: list[tuple[bool, str]], short: list[str]) -> tuple[str, str]:
        if not results:
            if short:
                return TOO_FEW, f"a verdict needs ≥ {need} facts in each class it compares; this run has " + "; ".join(short)
            return "not run", "no cells with data"
        held = sum(ok for ok, _ in results)
        status = "supported" if held == len(results) else ("partial" if held else "not supported")
        ev = f"holds in {held}/{len(results)} cells: " + "; ".join(e for _, e in results)
        if short:
            ev += f"; too few facts (< {need}) in: " + "; ".join(short)
        return status, ev

    edits = list(dict.fromkeys(t["edit"]))
    out = []
    res1: list[tuple[bool, str]] = []
    short1: list[str] = []
    for edit in edits:
        for m in ("N_i", "N_u", "CAS"):
            c, i = cell(edit, "K_C", m, "gen"), cell(edit, "K_I", m, "gen")
            if math.isnan(c) or math.isnan(i):
                continue
            nc, ni = n_of(edit, "K_C", m), n_of(edit, "K_I", m)
            if nc < need or ni < need:
                short1.append(f"{edit}/{m} K_I n={ni}, K_C n={nc}")
                continue
            res1.append((i < c - margin, f"{edit}/{m} Gen K_I {i:.2f} (n={ni}, {ci(edit, 'K_I', m, 'gen')}) vs "
                         f"K_C {c:.2f} (n={nc}, {ci(edit, 'K_C', m, 'gen')})"))  # fmt: skip
    out.append((names[0], *verdict(res1, short1)))
    res2: list[tuple[bool, str]] = []
    short2: list[str] = []
    for edit in edits:
        for cls in CLASSES:
            rel, gen, gen_u = (
                cell(edit, cls, "N_i", "rel"),
                cell(edit, cls, "N_i", "gen"),
                cell(edit, cls, "N_u", "gen"),
            )
            if math.isnan(rel) or math.isnan(gen):
                continue
            n = n_of(edit, cls, "N_i")
            if n < need:
                short2.append(f"{edit}/{cls} n={n}")
                continue
            ok = gen < rel - margin and (math.isnan(gen_u) or gen < gen_u - margin)
            res2.append((ok, f"{edit}/{cls} (n={n}) N_i Rel {rel:.2f} ({ci(edit, cls, 'N_i', 'rel')}) Gen {gen:.2f} "
                         f"({ci(edit, cls, 'N_i', 'gen')}) (N_u Gen {gen_u:.2f})"))  # fmt: skip
    out.append((names[1], *verdict(res2, short2)))
    res3: list[tuple[bool, str]] = []
    short3: list[str] = []
    for edit in edits:
        for cls in CLASSES:
            loc = {m: cell(edit, cls, m, "loc") for m in ("N_i", "N_u", "CAS")}
            ppl = {m: cell(edit, cls, m, "ppl_rel_delta") for m in ("N_i", "N_u", "CAS")}
            if math.isnan(loc["N_u"]):
                continue
            n = n_of(edit, cls, "N_u")
            if n < need:
                short3.append(f"{edit}/{cls} n={n}")
                continue
            others = [m for m in ("N_i", "CAS") if not math.isnan(loc[m])]
            worst_loc = all(loc["N_u"] < loc[m] - margin for m in others)
            worst_ppl = not math.isnan(ppl["N_u"]) and all(
                ppl["N_u"] > ppl[m] + margin for m in others if not math.isnan(ppl[m])
            )
            res3.append((worst_loc or worst_ppl, f"{edit}/{cls} (n={n}) Loc N_u {loc['N_u']:.2f} "
                         f"({ci(edit, cls, 'N_u', 'loc')}) vs " + ", ".join(f"{m} {loc[m]:.2f}" for m in others)
                         + f"; rel.ΔPPL N_u {ppl['N_u']:.3g}"))  # fmt: skip
    out.append((names[2], *verdict(res3, short3)))
    res4: list[tuple[bool, str]] = []
    short4: list[str] = []
    for edit in edits:
        for cls in CLASSES:
            avg = {m: cell(edit, cls, m, "avg") for m in ("N_i", "N_u", "CAS")}
            if math.isnan(avg["CAS"]):
                continue
            n = n_of(edit, cls, "CAS")
            if n < need:
                short4.append(f"{edit}/{cls} n={n}")
                continue
            others = [m for m in ("N_i", "N_u") if not math.isnan(avg[m])]
            ok = all(avg["CAS"] > avg[m] + margin for m in others)
            res4.append(
                (ok, f"{edit}/{cls} (n={n}) Avg " + ", ".join(
                    f"{m} {avg[m]:.2f} ({ci(edit, cls, m, 'avg')})" for m in ("N_i", "N_u", "CAS")))
            )  # fmt: skip
    out.append((names[3], *verdict(res4, short4)))
    return out


def _editing_verdicts(out_dir: Path, need: int) -> list[tuple[str, dict[str, str]]]:
    """:func:`editing_claims` as ``[(claim, {"status", "evidence"})]``; an error becomes one ``not run`` verdict
    (a broken verdict must not hide the rest of the report)."""
    try:
        return [(c, _verdict(s, e)) for c, s, e in editing_claims(out_dir, min_facts=need)]
    except Exception as exc:  # noqa: BLE001 - any failure of a verdict rule
        logger.warning("editing claims failed: %r", exc)
        return [("editing claims", _verdict("not run", f"could not evaluate: {exc!r}"))]


def claim_verdicts(out: str | Path, *, min_facts: int | None = None) -> list[tuple[str, dict[str, str]]]:
    """``[(claim, {"status", "evidence"})]`` for every claim of the paper, from the tables in ``out``.

    Status is one of :data:`STATUSES`: ``supported``, ``partial``, ``not supported``, ``too few facts``
    (a class the claim compares holds fewer than ``min_facts`` facts; the evidence gives the counts) or
    ``not run``. ``min_facts`` defaults to :data:`MIN_FACTS_PER_CLASS` (read at call time).
    """
    out = Path(out)
    need = facts_needed(min_facts)
    model = run_model_name(out)
    verdicts = consistency_claims(out, min_facts=need)
    ql = ql_claims(out / "ql", min_facts=need, model=model) if (out / "ql").is_dir() else []
    ed = _editing_verdicts(out / "editing", need) if (out / "editing").is_dir() else []
    if not ql:
        ql = [("Query-KN mapping and dynamic KN selection (QL assumption)", _verdict("not run", "query-localization stage missing"))]
    if not ed:
        ed = [("CAS editing balances Rel/Gen/Loc/PPL better than N_i and N_u", _verdict("not run", "editing stage missing"))]
    return verdicts + ql + ed
