"""Completeness of IG per layer on SmolLM2-135M: the gap at m = 20, 60, 200 over known queries, P(α) along the
path for the worst layers, and what adaptive steps do. Writes small tables and one figure to DEST.

    python scripts/completeness_study.py KNOWN_DIR DEST [--queries 24]

KNOWN_DIR is a 'qloc-tl known' output directory (its known queries are the prompts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import qloc_tl as q
from qloc_tl.cli import cap_facts, screened_facts
from qloc_tl.methods.completeness import (
    adaptive_steps,
    completeness_by_layer,
    path_probabilities,
    plot_path_probabilities,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("known")
    ap.add_argument("dest")
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dest = Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = q.load_model("smollm2-135m")
    facts = cap_facts(screened_facts(Path(a.known), "smollm2-135m", None), a.queries)
    prompts = [f.prompts[0] for f in facts]
    answers = [f.answer for f in facts]
    gaps = completeness_by_layer(model, prompts, answers, steps=(20, 60))
    gaps.to_csv(dest / "completeness_gaps.csv", index=False)
    g20 = gaps[gaps.steps == 20]
    per_layer = g20.groupby("layer").agg(
        median_rel_gap=("rel_gap", "median"), share_rel_gap_over_10pct=("rel_gap", lambda v: float((v > 0.1).mean())),
        mean_abs_gap=("gap", lambda v: float(v.abs().mean())), mean_abs_target=("target", lambda v: float(v.abs().mean())),
    ).reset_index()  # fmt: skip
    g60 = gaps[gaps.steps == 60].groupby("layer")["rel_gap"].median().rename("median_rel_gap_m60")
    per_layer = per_layer.merge(g60, on="layer")
    per_layer.to_csv(dest / "completeness_per_layer.csv", index=False)
    # the worst (prompt, layer) cases at m = 20: P(α) on a fine grid and adaptive steps
    worst = g20[g20.target.abs() > 0.05].sort_values("rel_gap", ascending=False).head(3)
    curves, adaptive = [], []
    for _, r in worst.iterrows():
        c = path_probabilities(model, r.prompt, answers[prompts.index(r.prompt)], layer=int(r.layer), alphas=torch.linspace(0, 1, 401).tolist())
        curves.append(c.assign(prompt=r.prompt))
        ad = adaptive_steps(model, r.prompt, answers[prompts.index(r.prompt)], steps=20, tol=0.05, max_steps=640, layers=[int(r.layer)])
        adaptive.append(ad.table.assign(prompt=r.prompt))
    if curves:
        cv = pd.concat(curves, ignore_index=True)
        cv.to_csv(dest / "completeness_path_curves.csv", index=False)
        fig = plot_path_probabilities(cv[cv.prompt == cv.prompt.iloc[0]], steps=20)
        fig.savefig(dest / "completeness_path.png", dpi=120)
        pd.concat(adaptive, ignore_index=True).to_csv(dest / "completeness_adaptive.csv", index=False)
    (dest / "completeness_meta.json").write_text(json.dumps({
        "n_queries": len(prompts), "steps": [20, 60], "wall_s": round(time.time() - t0, 1),
        "command": f"python scripts/completeness_study.py {a.known} {a.dest} --queries {a.queries}",
    }, indent=1))  # fmt: skip
    print(per_layer.to_string())  # noqa: T201 - a script


if __name__ == "__main__":
    main()
