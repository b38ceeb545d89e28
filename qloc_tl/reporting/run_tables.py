"""The report's paper-style tables, computed from the tables of a ``qloc-tl run`` output directory.

Each builder returns a :class:`Table` (already formatted text, see :mod:`qloc_tl.reporting.formatting`) or
None when its stage did not run:

* :func:`headline_items`: model, facts used (and screened), methods, split, time, versions;
* :func:`ki_share_table`: the share of K_I facts per attribution method with its CI, at the static τ and at
  Otsu's τ (the shape of the paper's Table 1);
* :func:`mapping_table`: Δprob per neuron set × class under suppression and enhancement (Query-KN mapping);
* :func:`dynamic_table`: ΔValue and Δprob through each neuron group under the KS edit (dynamic KN selection);
* :func:`editing_table`: Rel, Gen, Loc, ΔPPL, Avg per edit × class × neuron set, best per column marked;
* :func:`settings_table`: the run's settings as a small two-column table;
* :func:`raw_tables`: every stage table with readable fact names, for the collapsed raw-data section.

Ratios are shown only where their denominator cannot be near zero (Δp/p over the answer's probability,
ΔValue Σ/Σ over the summed |activations|), and every cell of a ratio column passes :func:`guard_value`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qloc_tl.experiments.editing_config import CLASSES
from qloc_tl.reporting.formatting import (
    fmt_ci,
    fmt_num,
    guard_value,
    readable_facts,
    with_readable_keys,
)

__all__ = [
    "Cell",
    "Table",
    "read_table",
    "run_info",
    "headline_items",
    "ki_share_table",
    "mapping_table",
    "dynamic_table",
    "editing_table",
    "settings_table",
    "raw_tables",
    "SET_ORDER",
    "GROUP_ORDER",
    "METHOD_NAMES",
    "RAW_STAGES",
    "RAW_DESCRIPTIONS",
]

Cell = str | tuple[str, str]
"""A table cell: its text, or ``(text, detail)`` where the detail (a CI) is shown smaller below the text."""

SET_ORDER = ("Self", "Union", "Intersection", "Refine", "Unrelated")
"""The neuron sets of the Query-KN mapping, in the paper's order."""

GROUP_ORDER = ("query", "neighbor", "random")
"""The neuron groups of the dynamic KN selection."""

METHOD_NAMES = {"ig": "IG", "sig": "SIG", "amig": "AMIG", "∩": "∩ (all methods)"}
"""Display names of the attribution methods (∩: the facts every method calls K_I)."""


@dataclass
class Table:
    """A formatted table: column headers, rows of cells, the cells to mark as best, a note under it (what the
    columns mean), a detail (numbers of this run that have no column) and the CSV files it was computed from
    (linked from the page)."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    best: set[tuple[int, int]] = field(default_factory=set)
    note: str = ""
    sources: list[Path] = field(default_factory=list)
    detail: str = ""


def read_table(out: Path, rel: str) -> pd.DataFrame | None:
    """The table ``out/rel`` (a ``.parquet`` path relative to the run directory), or None when it is absent."""
    p = out / rel
    return pd.read_parquet(p) if p.is_file() else None


def run_info(out: str | Path) -> dict[str, Any]:
    """The run's ``run.json`` (empty dict when it cannot be read)."""
    try:
        info = json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _csv(out: Path, rel: str) -> list[Path]:
    p = out / rel
    return [p] if p.is_file() else []


def _methods(info: dict[str, Any]) -> str:
    s = info.get("settings", {})
    names = ", ".join(METHOD_NAMES.get(m, m) for m in s.get("methods") or [])
    return f"{names} (m = {s['steps']} steps)" if s.get("steps") else names or "–"


def _facts_line(out: Path, info: dict[str, Any]) -> str:
    """How many facts the run used, and how many were screened for them when a known-fact screening ran."""
    s = info.get("settings", {})
    n = info.get("n_facts")
    used = f"{n} used" if n is not None else "–"
    known = out / "known"
    if (known / "facts.json").is_file():
        try:
            kept = len(json.loads((known / "facts.json").read_text()))
            dropped = (
                max(0, sum(1 for _ in (known / "dropped_facts.csv").open()) - 1)
                if (known / "dropped_facts.csv").is_file()
                else 0
            )
            return f"{used}; {kept} known to the model of {kept + dropped} screened (top-1 on ≥ 2 queries)"
        except (OSError, ValueError):
            pass
    src = str(s.get("facts", ""))
    screening = Path(src) / "per_relation.csv"
    if src and screening.is_file():
        try:
            pr = pd.read_csv(screening)
            return f"{used}; from a screening of {int(pr['facts'].sum())} facts, {int(pr['facts_known'].sum())} known"
        except (OSError, ValueError, KeyError):
            pass
    if s.get("known") == "off":
        return f"{used} ({src or 'given'} facts, no known-fact screening)"
    return f"{used} ({src})" if src else used


def headline_items(out: str | Path) -> list[tuple[str, str]]:
    """``[(label, text)]`` of the page's headline: model, facts, methods, K_C / K_I split, time and run."""
    out = Path(out)
    info = run_info(out)
    s = info.get("settings", {})
    t = info.get("timings_s", {})
    stage = {"load": "load", "consistency": "consistency", "ql": "QL", "edit": "editing"}
    parts = ", ".join(
        f"{stage[k]} {fmt_num(v, 2)}" for k, v in t.items() if k in stage and isinstance(v, (int, float))
    )
    total = t.get("total")
    time_s = (
        (f"{fmt_num(total, 3)} s" + (f" ({parts})" if parts else ""))
        if isinstance(total, (int, float))
        else "–"
    )
    earlier = info.get("earlier_invocations") or []
    if earlier:  # a resumed run: the last invocation's time alone would understate the run's
        timed = [e["total_s"] for e in earlier if isinstance(e.get("total_s"), (int, float))]
        untimed = len(earlier) - len(timed)
        time_s += (
            f" in the last invocation; {len(earlier)} earlier"
            + (f": {fmt_num(sum(timed), 3)} s" if timed else "")
            + (f" ({untimed} interrupted before finishing, not timed)" if untimed else "")
        )
    v = info.get("versions", {})
    run = ", ".join(
        x for x in (str(info.get("started", "")).replace("T", " "), f"status {info.get('status', '?')}",
                    f"qloc-tl {v['qloc-tl']}" if "qloc-tl" in v else "",
                    f"TransformerLens {v['transformer-lens']}" if "transformer-lens" in v else "") if x
    )  # fmt: skip
    split = s.get("split", "otsu")
    return [
        ("Model", str(s.get("model", "–")) + (" (quick run)" if s.get("quick") else "")),
        ("Facts", _facts_line(out, info)),
        ("Methods", _methods(info)),
        ("K_C / K_I split", "Otsu's τ of the CS distribution" if split == "otsu" else "static τ = 0.3"),
        ("Time", time_s),
        ("Run", run or "–"),
    ]


def ki_share_table(out: str | Path) -> Table | None:
    """The share of inconsistent facts (K_I) per attribution method, with bootstrap CIs over facts, at the
    static τ = 0.3 and at Otsu's τ, plus mean CS per class and Welch's p under the run's split."""
    out = Path(out)
    summ = read_table(out, "consistency/consistency_summary.parquet")
    if summ is None or summ.empty:
        return None
    split = run_info(out).get("settings", {}).get("split", "otsu")
    methods = list(dict.fromkeys(summ["method"]))
    methods = [m for m in methods if m != "∩"] + [m for m in methods if m == "∩"]
    rows: list[list[Cell]] = []
    for m in methods:
        by = {r["threshold"]: r for _, r in summ[summ["method"] == m].iterrows()}
        st, ot = by.get("static"), by.get("otsu")
        ref = by.get(split) if by.get(split) is not None else (ot if ot is not None else st)
        n = int(ref["n_facts"]) if ref is not None else 0

        def share(r: Any) -> Cell:
            if r is None:
                return "–"
            ci = fmt_ci(r["prop_KI"], r["prop_KI_ci_lo"], r["prop_KI_ci_hi"], pct=True)
            head, _, rest = ci.partition(" ")
            return (
                (f"{head} ({int(r['n_KI'])} of {int(r['n_facts'])})", rest)
                if rest
                else f"{head} ({int(r['n_KI'])})"
            )

        tau = fmt_num(ot["tau"], 2) if ot is not None and math.isfinite(float(ot["tau"])) else "–"
        cs = "–"
        p = "–"
        if ref is not None:
            cs = f"{fmt_num(ref['mean_cs_KC'], 2)} / {fmt_num(ref['mean_cs_KI'], 2)}"
            p = fmt_num(ref["welch_p"], 2) if "welch_p" in ref and pd.notna(ref["welch_p"]) else "–"
        rows.append([METHOD_NAMES.get(m, m), str(n), share(st), tau, share(ot), cs, p])
    split_name = "Otsu" if split == "otsu" else "static"
    return Table(
        title="Inconsistent knowledge (K_I) per attribution method",
        columns=[
            "method",
            "facts",
            "K_I at static τ = 0.3",
            "Otsu's τ",
            "K_I at Otsu's τ",
            f"mean CS K_C / K_I ({split_name})",
            f"Welch p ({split_name})",
        ],  # fmt: skip
        rows=rows,
        note="K_I: CS < τ. Brackets: 95 % bootstrap CI over facts. ∩: the facts every method calls K_I. "
        "The paper's claim (talk): on LLaMA3-8B more than 80 % of facts are K_I even at τ = 0.1; "
        "its table values are not available to compare.",
        sources=_csv(out, "consistency/consistency_summary.csv"),
    )


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def mapping_table(out: str | Path) -> Table | None:
    """Δprob of the answer when each neuron set is suppressed (× 0) or enhanced (× 2), per class, with CIs;
    and Δp/p under suppression (the claim's measure; its base, P(answer), is the model's own prediction)."""
    out = Path(out)
    m = read_table(out, "ql/mapping_summary.parquet")
    if m is None or m.empty:
        return None
    classes = [c for c in CLASSES if c in set(m["class"])]
    sets = _ordered(m["set"].tolist(), SET_ORDER)
    cell = {(r["class"], r["set"], r["op"]): r for _, r in m.iterrows()}
    cols = ["neuron set"]
    for c in classes:
        n = int(m.loc[m["class"] == c, "n_facts"].max())
        cols += [f"{c} (n={n}) neurons", f"{c} suppress Δp", f"{c} suppress Δp/p", f"{c} enhance Δp"]
    rows: list[list[Cell]] = []
    for s in sets:
        row: list[Cell] = [s]
        for c in classes:
            sup, enh = cell.get((c, s, "suppress")), cell.get((c, s, "enhance"))
            ref = sup if sup is not None else enh
            row.append(fmt_num(ref["mean_n_neurons"], 3) if ref is not None else "–")
            row.append(_ci_cell(sup, "mean_dprob"))
            row.append(_ci_cell(sup, "mean_of_ratios", guard=True))
            row.append(_ci_cell(enh, "mean_dprob"))
        rows.append(row)
    return Table(
        title="Query-KN mapping: P(answer) when a neuron set is switched off or doubled",
        columns=cols,
        rows=rows,
        note="Δp = mean change of P(answer) over the fact's queries; Δp/p = the same relative to P(answer) "
        "before the edit (mean of per-query ratios). Neurons: mean set size. Brackets: 95 % bootstrap CI over facts.",
        sources=_csv(out, "ql/mapping_summary.csv"),
    )


def _ci_cell(r: Any, col: str, *, guard: bool = False) -> Cell:
    """``(value, "[lo, hi]")`` of ``r[col]`` with its CI columns; ratio columns pass :func:`guard_value`."""
    if r is None or col not in r or pd.isna(r[col]):
        return "–"
    if guard:
        text, hidden = guard_value(r[col])
        if hidden:
            return text
    lo, hi = r.get(f"{col}_lo"), r.get(f"{col}_hi")
    full = fmt_ci(r[col], lo, hi, signed=True)
    head, _, rest = full.partition(" ")
    if guard and rest:
        lo_t, lo_hidden = guard_value(lo)
        hi_t, hi_hidden = guard_value(hi)
        if lo_hidden or hi_hidden:
            rest = f"[{lo_t}, {hi_t}]"
    return (head, rest) if rest else head


def dynamic_table(out: str | Path) -> Table | None:
    """Dynamic KN selection under the KS edit: per class and neuron group, the aggregate relative change of the
    group's activations (ΔValue Σ/Σ), their mean absolute change, and the change of P(answer) carried through
    the group alone (Δp via group), under suppression and enhancement."""
    out = Path(out)
    d = read_table(out, "ql/dynamic_summary.parquet")
    if d is None or d.empty:
        return None
    ks = d[d["intervention"] == "KS"]
    cell = {(r["class"], r["group"], r["op"]): r for _, r in ks.iterrows()}
    classes = [c for c in CLASSES if c in set(ks["class"])]
    groups = _ordered(ks["group"].tolist(), GROUP_ORDER)
    rows: list[list[Cell]] = []
    for c in classes:
        for g in groups:
            sup, enh = cell.get((c, g, "suppress")), cell.get((c, g, "enhance"))
            ref = sup if sup is not None else enh
            n = f"{c} (n={int(ref['n_facts'])})" if ref is not None else c
            rows.append([
                n, g, fmt_num(ref["mean_n_neurons"], 3) if ref is not None else "–",
                _ci_cell(sup, "dvalue_rel_agg", guard=True), _ci_cell(enh, "dvalue_rel_agg", guard=True),
                _ci_cell(sup, "dvalue_abs"), _ci_cell(sup, "dprob_via"), _ci_cell(enh, "dprob_via"),
            ])  # fmt: skip
    notes = []
    for c in classes:
        q = {
            (i, op): r
            for _, r in d[(d["class"] == c) & (d["group"] == "query")].iterrows()
            for i, op in [(r["intervention"], r["op"])]
        }
        parts = [
            f"{i} {op} {fmt_ci(q[(i, op)]['dprob'], q[(i, op)]['dprob_lo'], q[(i, op)]['dprob_hi'], signed=True)}"
            for i in ("KS", "irrelevant") for op in ("suppress", "enhance") if (i, op) in q
        ]  # fmt: skip
        if parts:
            notes.append(f"{c}: " + "; ".join(parts))
    return Table(
        title="Dynamic KN selection: what editing the knowledge synapses does to each neuron group",
        columns=[
            "class",
            "group",
            "neurons",
            "ΔValue Σ/Σ suppress",
            "ΔValue Σ/Σ enhance",
            "mean ΔValue suppress",
            "Δp via group suppress",
            "Δp via group enhance",
        ],  # fmt: skip
        rows=rows,
        note="ΔValue Σ/Σ = Σ(v_after − v_before) / Σ|v_before| over the group (no per-neuron ratio over near-zero "
        "activations); mean ΔValue: absolute. Δp via group: change of P(answer) when only the group's neurons take "
        "their post-edit values. Brackets: 95 % bootstrap CI over facts.",
        detail="Δp of the whole edit (the query's KS against the irrelevant-KS control): "
        + (" | ".join(notes) or "–")
        + ".",
        sources=_csv(out, "ql/dynamic_summary.csv"),
    )


def editing_table(out: str | Path) -> Table | None:
    """The editing table: Rel, Gen, Loc (other relations), ΔPPL (median over facts of PPL after − before) and
    Avg = (Rel + Gen + Loc) / 3 per edit × class × neuron set; the best value of each column within an
    (edit, class) block is marked (highest; lowest for ΔPPL)."""
    out = Path(out)
    t = read_table(out, "editing/editing_table.parquet")
    if t is None or t.empty:
        return None
    t = t[t["n_facts"] > 0]
    rows_df = read_table(out, "editing/editing_rows.parquet")
    if rows_df is not None and "status" in rows_df.columns:
        rows_df = rows_df[rows_df["status"] == "ok"]
    metrics = [("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc"), ("dppl", "ΔPPL (median)"), ("avg", "Avg")]
    rows: list[list[Cell]] = []
    best: set[tuple[int, int]] = set()
    for (edit, cls), block in t.groupby(["edit", "class"], sort=False):
        vals: list[dict[str, float]] = []
        for _, r in block.iterrows():
            v = {k: float(r[k]) if k in r and pd.notna(r[k]) else math.nan for k, _ in metrics if k != "dppl"}
            v["dppl"] = _median_dppl(rows_df, str(edit), str(cls), str(r["method"]), r)
            vals.append(v)
        start = len(rows)
        for (_, r), v in zip(block.iterrows(), vals):
            cells: list[Cell] = [str(edit), str(cls), str(r["method"]), str(int(r["n_facts"]))]
            rows.append(cells + [fmt_num(v[k], 3) for k, _ in metrics])
        for j, (k, _) in enumerate(metrics):
            col = [v[k] for v in vals]
            finite = [x for x in col if math.isfinite(x)]
            if len(finite) < 2 or max(finite) == min(finite):
                continue
            target = min(finite) if k == "dppl" else max(finite)
            best |= {(start + i, 4 + j) for i, x in enumerate(col) if x == target}
    lam = _lambda2(out)
    return Table(
        title="Knowledge editing: erase and update with each neuron set",
        columns=["edit", "class", "neurons", "facts"] + [lab for _, lab in metrics],
        rows=rows,
        best=best,
        note="Rel: the edited query; Gen: its neighbor queries; Loc: queries of other relations keep their answer. "
        "ΔPPL: median over facts of the perplexity change (absolute). Avg = (Rel + Gen + Loc) / 3. Bold: best in "
        "its edit × class block. N_i: the query's own KNs; N_u: the union over its neighbor queries; CAS: "
        "consistency-aware KN scores." + (f" Update strength λ2 = {fmt_num(lam, 2)}." if lam else ""),
        sources=_csv(out, "editing/editing_table.csv"),
    )


def _median_dppl(rows: pd.DataFrame | None, edit: str, cls: str, method: str, r: Any) -> float:
    if rows is not None and {"ppl_after", "ppl_before"} <= set(rows.columns):
        g = rows[(rows["edit"] == edit) & (rows["class"] == cls) & (rows["method"] == method)]
        d = (g["ppl_after"].astype(float) - g["ppl_before"].astype(float)).dropna()
        if len(d):
            return float(d.median())
    return float(r["ppl_delta"]) if "ppl_delta" in r and pd.notna(r["ppl_delta"]) else math.nan


def _lambda2(out: Path) -> float | None:
    try:
        cfg = json.loads((out / "editing" / "config.json").read_text())["config"]["editing"]
        lam = cfg.get("lambda2")
        return float(lam) if lam is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def settings_table(out: str | Path) -> Table:
    """The run's settings, stages, timings and versions (``run.json``) as a two-column table."""
    info = run_info(out)
    rows: list[list[Cell]] = []
    for k, v in info.get("settings", {}).items():
        rows.append([k, "–" if v is None else ", ".join(map(str, v)) if isinstance(v, list) else str(v)])
    rows.append(["stages", ", ".join(info.get("stages", [])) or "–"])
    rows.append(["status", str(info.get("status", "–"))])
    rows.append(
        [
            "timings (s)",
            ", ".join(f"{k} {fmt_num(v, 3)}" for k, v in info.get("timings_s", {}).items()) or "–",
        ]
    )
    rows.append(["versions", ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()) or "–"])
    return Table(
        title="Run settings", columns=["setting", "value"], rows=rows, sources=_csv(Path(out), "run.json")
    )


RAW_STAGES = (("consistency", "Consistency"), ("ql", "Query localization"), ("editing", "Knowledge editing"))
"""The stage directories whose tables the raw-data section lists, with their titles."""


RAW_DESCRIPTIONS = {
    "consistency_facts": "one row per fact and method: CS and the class under both τ",
    "consistency_per_relation": "K_I share and mean CS per relation, method and τ",
    "consistency_queries": "one row per query and method: P(answer), number of KNs, completeness",
    "consistency_summary": "per method and τ: K_C / K_I counts, K_I share with its CI, Welch and permutation tests",
    "consistency_sweep": "K_I share as the KN threshold t varies",
    "consistency_tau_sweep": "K_I share against τ, with bootstrap CIs",
    "dynamic_enh_vs_sup": "|Δ| under enhancement against suppression, per class, intervention and group",
    "dynamic_rows": "one row per query, intervention, op and neuron group",
    "dynamic_summary": "per class, intervention, op and group: means with bootstrap CIs",
    "facts": "the facts of the query-localization stage with their class and CS",
    "mapping_by_relation": "the mapping summary per relation",
    "mapping_enh_vs_sup": "|Δp| under enhancement against suppression, per class and neuron set",
    "mapping_order": "the neuron sets ordered by their effect on P(answer)",
    "mapping_rows": "one row per query, neuron set and op",
    "mapping_summary": "per class, neuron set and op: Δp and Δp/p with CIs",
    "synapses": "the knowledge synapses of each query: layer, head, key token, score",
    "editing_rows": "one row per fact, edit and neuron set",
    "editing_table": "per edit, class and neuron set: Rel, Gen, Loc, ΔPPL, Avg",
}
"""One line on what each stage table holds, shown next to its name in the raw-data section."""


def raw_tables(out: str | Path) -> Iterator[tuple[str, str, pd.DataFrame, Path | None]]:
    """``(stage title, table name, table, CSV path)`` for every table of every stage, with readable fact names
    (:func:`~qloc_tl.reporting.formatting.with_readable_keys`) and a ``%`` share column turned into numbers."""
    out = Path(out)
    names = readable_facts(out)
    for stage, title in RAW_STAGES:
        d = out / stage
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.parquet")):
            df = with_readable_keys(pd.read_parquet(p), names)
            csv = p.with_suffix(".csv")
            yield title, p.stem, df, csv if csv.is_file() else None
