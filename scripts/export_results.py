"""Export a finished 'qloc-tl run' directory to small committed tables, figures and summary.json, and add the
KN-specificity measurements (overlap within vs across relations, suppression control), which need the model.

    python scripts/export_results.py RUN_DIR DEST --command "qloc-tl run ..." [--extra DIR ...]

DEST gets CSV tables, figures/ (the run's PNGs) and summary.json (n_facts, relations, methods, the command,
versions, wall time, and the table list with what each holds). --extra copies the CSVs of side studies
(completeness, update strength, site) into DEST as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd


def _ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    b = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))


def strict_tau_sweep(facts: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """K_I share (CS_strict < τ) per method and τ, with a 95 % percentile bootstrap CI over facts."""
    out = []
    for method, g in facts[facts["method"] != "∩"].groupby("method", sort=False):
        v = g["cs_strict"].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        for tau in np.round(np.arange(0.0, 1.0001, 0.05), 2):
            x = (v < tau).astype(float)
            lo, hi = _ci(x, seed=seed)
            out.append({"method": method, "tau": float(tau), "n_facts": len(x), "prop_KI": float(x.mean()), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(out)


def editing_table_with_cis(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (edit, class, method): n and the mean of Rel, Gen, Loc (other relations), Loc (same relation),
    Avg and relative ΔPPL, each with a 95 % percentile bootstrap CI over facts."""
    out = []
    ok = rows[rows["status"] == "ok"]
    for (edit, cls, method), g in ok.groupby(["edit", "class", "method"], sort=True):
        rec = {"edit": edit, "class": cls, "method": method, "n_facts": int(g["fact_key"].nunique()),
               "n_neurons_mean": float(g["n_neurons"].astype(float).mean())}  # fmt: skip
        for col in ("rel", "gen", "loc", "loc_same", "avg", "ppl_rel_delta"):
            if col not in g.columns:
                continue
            v = g[col].to_numpy(dtype=float)
            rec[col] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
            lo, hi = _ci(v, seed=zlib.crc32(f"{edit}|{cls}|{method}|{col}".encode()))
            rec[f"{col}_ci_low"], rec[f"{col}_ci_high"] = lo, hi
        out.append(rec)
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("dest")
    ap.add_argument("--command", required=True, help="the exact command(s) that produced RUN_DIR")
    ap.add_argument("--extra", nargs="*", default=[], help="directories of side studies whose CSVs are copied")
    ap.add_argument("--no-model", action="store_true", help="skip the measurements that need the model")
    ap.add_argument("--shards", nargs="*", default=[], help="shard directories whose run.json timings to record")
    a = ap.parse_args()
    run, dest = Path(a.run), Path(a.dest)
    (dest / "figures").mkdir(parents=True, exist_ok=True)
    info = json.loads((run / "run.json").read_text())
    settings = info["settings"]
    tables: dict[str, str] = {}

    def put(name: str, df: pd.DataFrame, what: str) -> None:
        df.to_csv(dest / f"{name}.csv", index=False)
        tables[f"{name}.csv"] = what

    c = run / "consistency"
    facts = pd.read_csv(c / "consistency_facts.csv")
    put("consistency_summary", pd.read_csv(c / "consistency_summary.csv"),
        "K_I share per method (and ∩: K_I under every method) at the static and Otsu τ, bootstrap CI, tests")  # fmt: skip
    put("consistency_per_relation", pd.read_csv(c / "consistency_per_relation.csv"), "K_I share and mean CS per relation")
    put("consistency_tau_sweep", pd.read_csv(c / "consistency_tau_sweep.csv"), "K_I share against the CS threshold τ, CI")
    put("consistency_kn_sweep", pd.read_csv(c / "consistency_sweep.csv"), "K_I share against the KN threshold t")
    put("consistency_tau_sweep_strict", strict_tau_sweep(facts, seed=settings["seed"]),
        "K_I share against τ with the strict CS (|∩| / |∪|), bootstrap CI")  # fmt: skip
    keep = ["method", "fact_key", "relation", "subject", "object", "n_queries", "n_union", "cs_relaxed", "cs_strict",
            "class_static", "class_otsu", "tau_otsu"]  # fmt: skip
    put("consistency_facts", facts[[k for k in keep if k in facts.columns]], "per-fact CS and class (the reproduction oracle)")
    q = run / "ql"
    for name, what in (("mapping_summary", "Δprob per set × op × class with CIs"), ("mapping_order", "set order per class"),
                       ("mapping_enh_vs_sup", "enhancement vs suppression effect sizes"),
                       ("dynamic_summary", "KS vs irrelevant KS × query/neighbor/random KNs: ΔValue, Δprob with CIs"),
                       ("dynamic_enh_vs_sup", "dynamic selection: enhancement vs suppression")):  # fmt: skip
        if (q / f"{name}.csv").is_file():
            put(name, pd.read_csv(q / f"{name}.csv"), what)
    e = run / "editing"
    if (e / "editing_rows.parquet").is_file():
        rows = pd.read_parquet(e / "editing_rows.parquet")
        put("editing_table", editing_table_with_cis(rows), "N_i / N_u / CAS × erase / update: Rel, Gen, Loc, Loc same, Avg, ΔPPL, CIs")
    for p in sorted((run / "figures").glob("*.png")):
        shutil.copy2(p, dest / "figures" / p.name)
    for d in a.extra:
        for p in sorted(Path(d).glob("*.csv")):
            shutil.copy2(p, dest / p.name)
            tables[p.name] = f"side study ({Path(d).name})"
        for p in sorted(Path(d).glob("*.png")):
            shutil.copy2(p, dest / "figures" / p.name)
    from qloc_tl.cli import load_facts

    run_facts = load_facts({**settings, "shard": None}, None, run, False)
    blob = [{"key": f.key, "relation": f.relation, "subject": f.subject, "object": f.object,
             "queries": [[q.text, q.template] for q in f.queries]} for f in run_facts]  # fmt: skip
    (dest / "facts.json").write_text(json.dumps(blob, indent=0, ensure_ascii=False))
    tables["facts.json"] = "the run's facts, each with its known queries (text, template)"
    shards = {}
    for d in a.shards:
        shards[Path(d).name] = json.loads((Path(d) / "run.json").read_text()).get("timings_s")
    t_spec = None
    if not a.no_model:
        t0 = time.time()
        from qloc_tl.cli import model_from_spec
        from qloc_tl.experiments.specificity import (
            control_summary,
            kn_overlap,
            overlap_summary,
            suppression_control,
        )

        model = model_from_spec(settings["model"], "cpu")
        fs = run_facts
        m0 = settings["methods"][0]
        kn = _kn_sets(run, m0, fs, model, settings["methods"])
        rel = {f.key: f.relation for f in fs}
        pairs = kn_overlap(kn, rel)
        put("specificity_overlap", overlap_summary(pairs, seed=settings["seed"]), f"Jaccard of fact KN sets ({m0}) within vs across relations, CI")
        ctrl = suppression_control(model, fs, kn, seed=settings["seed"])
        put("specificity_control_rows", ctrl, "per fact: Δp/p when suppressing own / same-relation / other-relation KNs")
        put("specificity_control", control_summary(ctrl, seed=settings["seed"]), "mean Δp/p per control, CI over facts")
        t_spec = round(time.time() - t0, 1)
    summary = {
        "model": settings["model"],
        "n_facts": int(facts.loc[facts["method"] == settings["methods"][0], "fact_key"].nunique()),
        "relations": sorted(facts["relation"].unique().tolist()),
        "methods": settings["methods"],
        "settings": settings,
        "command": a.command,
        "versions": info.get("versions"),
        "wall_time_s": info.get("timings_s"),
        "shard_wall_time_s": shards,
        "specificity_wall_s": t_spec,
        "tables": tables,
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))


def _kn_sets(run: Path, method: str, facts: list, model, methods) -> dict:
    """Per fact, the KN set of each query (the consistency stage's own selection), reloaded from the run's
    persisted scores through run_consistency (nothing is recomputed: every fact's parts are there)."""
    import dataclasses

    from qloc_tl.experiments.consistency import ConsistencyConfig, run_consistency

    stored = json.loads((run / "consistency" / "config.json").read_text())["config"]
    names = {f.name for f in dataclasses.fields(ConsistencyConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in names}
    cfg = ConsistencyConfig(**{**kw, "methods": tuple(methods)})
    res = run_consistency(model, facts, cfg, model_name=stored["model"], out_dir=run / "consistency", known_only=False)
    return {key: [set(s) for s in sets] for (m, key), sets in res.kn_sets.items() if m == method}


if __name__ == "__main__":
    main()
