"""Consistency at the other neuron site: IG KNs at site="pre" (the gate pre-activation of SmolLM2's gated MLP)
on a slice of the facts of a finished run (site="post"), and the two sites' K_I shares side by side.

    python scripts/site_study.py RUN_DIR DEST [--max-facts 48]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qloc_tl.cli import cap_facts, load_facts, model_from_spec
from qloc_tl.experiments.consistency import ConsistencyConfig, run_consistency


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("dest")
    ap.add_argument("--max-facts", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    run, dest = Path(a.run), Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    settings = json.loads((run / "run.json").read_text())["settings"]
    model = model_from_spec(settings["model"], "cpu")
    facts = cap_facts(load_facts({**settings, "shard": None}, model, run, False), a.max_facts)
    cfg = ConsistencyConfig(methods=("ig",), steps=settings["steps"], seed=settings["seed"], site="pre")
    pre = run_consistency(model, facts, cfg, model_name=settings["model"], out_dir=dest / "pre_run", known_only=False)
    post_facts = pd.read_csv(run / "consistency" / "consistency_facts.csv")
    keys = {f.key for f in facts}
    post = post_facts[(post_facts["method"] == "ig") & post_facts["fact_key"].isin(keys)]
    a_pre = pre.facts[pre.facts["method"] == "ig"][["fact_key", "cs"]].rename(columns={"cs": "cs_pre"})
    both = post[["fact_key", "relation", "cs"]].rename(columns={"cs": "cs_post"}).merge(a_pre, on="fact_key")
    both.to_csv(dest / "site_facts.csv", index=False)
    rows = []
    for site, col in (("post", "cs_post"), ("pre", "cs_pre")):
        v = both[col].dropna()
        for tau in (0.1, 0.3):
            x = (v.to_numpy() < tau).astype(float)
            rng = np.random.default_rng(0)
            b = x[rng.integers(0, len(x), size=(1000, len(x)))].mean(axis=1)
            rows.append({"site": site, "tau": tau, "n_facts": len(x), "prop_KI": float(x.mean()),
                         "ci_low": float(np.quantile(b, 0.025)), "ci_high": float(np.quantile(b, 0.975)),
                         "mean_cs": float(v.mean())})  # fmt: skip
    pd.DataFrame(rows).to_csv(dest / "site_summary.csv", index=False)
    (dest / "site_meta.json").write_text(json.dumps({"n_facts": len(both), "wall_s": round(time.time() - t0, 1),
        "command": f"python scripts/site_study.py {a.run} {a.dest} --max-facts {a.max_facts}"}, indent=1))  # fmt: skip
    print(pd.DataFrame(rows).to_string())  # noqa: T201 - a script


if __name__ == "__main__":
    main()
