# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Consistency of knowledge neurons across neighbor queries (the paper's experiment 1)
#
# For each fact, every neighbor query (paraphrase) gets its own KN set N_i. The **Consistency Score** compares
# them: relaxed CS = |{neurons in more than one N_i}| / |∪ N_i|. Facts with CS ≥ τ are *consistent knowledge*
# (K_C, the KL assumption holds); the others are *inconsistent knowledge* (K_I).

# %%
import matplotlib

matplotlib.use("Agg")
from IPython.display import Image, display

import qloc_tl as q
from qloc_tl.cli import cap_facts
from qloc_tl.experiments.consistency import ConsistencyConfig, run_consistency
from qloc_tl.methods.attribution import attribute_neurons
from qloc_tl.reporting.consistency_plots import plot_cs_histogram, plot_fact_heatmap

model = q.load_builtin_model()
facts = cap_facts(q.data.builtin_facts(), 12)  # a small, relation-balanced sample
config = ConsistencyConfig(methods=("ig",), steps=10, n_boot=200, n_perm=200)
res = run_consistency(model, facts, config, model_name="builtin", show_progress=False)
res.summary[["method", "threshold", "tau", "n_facts", "prop_KI", "mean_cs", "mean_cs_KC", "mean_cs_KI"]]

# %% [markdown]
# One row per fact: the CS (relaxed and strict) and the class under the static (0.3) and Otsu thresholds.

# %%
res.facts[["relation", "subject", "object", "n_queries", "n_union", "cs_relaxed", "cs_strict", "class_static", "class_otsu"]]

# %% [markdown]
# ## The paper's Figure 1: neuron scores per neighbor query
#
# Rows are the neighbor queries of one fact, columns the neurons of the union of their KNs. A consistent fact
# lights the same columns in every row; an inconsistent fact shows different neurons per query.

# %%
ranked = res.facts.dropna(subset=["cs"]).sort_values("cs")
by_key = {f.key: f for f in facts}
for label, key in [("least consistent", ranked.iloc[0]["fact_key"]), ("most consistent", ranked.iloc[-1]["fact_key"])]:
    print(label)
    fact = by_key[key]
    attribution = attribute_neurons(model, list(fact.prompts), [fact.answer] * len(fact.queries), steps=10)
    plot_fact_heatmap(attribution, fact, path=f"/tmp/heat_{label.split()[0]}.png")
    display(Image(f"/tmp/heat_{label.split()[0]}.png"))

# %%
plot_cs_histogram(res, "ig", path="/tmp/cs_hist.png")
display(Image("/tmp/cs_hist.png"))

# %% [markdown]
# ## The whole experiment from the command line, and two runs side by side
#
# `qloc-tl run` runs this experiment and the paper's other two (query localization, editing) and writes every
# table and a `report.html`; `qloc-tl report A B` puts two finished runs on one page: headlines, claim
# verdicts and headline tables, the runs' rows one above the other. Here two small runs of the built-in model
# differ only in the integration steps m (6 and 20): does the K_I share depend on the quadrature? With 8
# facts, read the CIs before the point estimates.

# %%
import contextlib
import io
import json
import shlex
import tempfile
from pathlib import Path

import pandas as pd

from qloc_tl.cli import main
from qloc_tl.reporting.compare import interleave, run_labels
from qloc_tl.reporting.run_tables import ki_share_table


def qloc_tl_cli(command: str) -> None:
    """Run `qloc-tl COMMAND` in this kernel (the console script's entry point) and print its last line."""
    print("$ qloc-tl", command)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(shlex.split(command)) == 0
    print(printed.getvalue().strip().splitlines()[-1].strip())


runs = Path(tempfile.mkdtemp(prefix="qloc_demo_"))
small = "--quick --max-facts 8 --no-figures --no-progress"  # 8 built-in facts, IG + AMIG, tables only
qloc_tl_cli(f"run {small} --steps 6 --out {runs}/m6")
qloc_tl_cli(f"run {small} --steps 20 --out {runs}/m20")
qloc_tl_cli(f"report {runs}/m6 {runs}/m20")  # the page: m6/compare_m20.html
# the page's K_I table as a DataFrame (CIs in brackets)
ki = interleave([ki_share_table(runs / r) for r in ("m6", "m20")], run_labels([runs / "m6", runs / "m20"]), 1)
pd.DataFrame([[c if isinstance(c, str) else " ".join(c) for c in row] for row in ki.rows], columns=ki.columns)

# %% [markdown]
# ## Scale-out: the same run on Ray
#
# `qloc-tl run --ray` splits the facts into shards, runs each shard's attribution as a Ray task (retried if its
# worker dies), then merges them and finishes the run as a local run does (see `docs/scale_out.md`). Here a
# local Ray instance with 2 CPUs runs 2 shards of 4 facts (on a cluster: `--ray-address HOST:6379`). Every
# table equals the local m = 6 run's; only three per-query float32 diagnostics differ in the last bits, since a
# shard batches other prompts together.

# %%
import ray

ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")  # without it, --ray starts a local instance
qloc_tl_cli(f"run --ray {small} --steps 6 --out {runs}/ray")
ray.shutdown()
json.loads((runs / "ray" / "run.json").read_text())["ray"]  # shards, task resources, wall times, attempts

# %%
KEYS = ["method", "fact_key", "query_index", "layer", "neuron", "relation", "kind", "split", "setting", "metric", "name"]
FLOATS = ["clean_prob", "max_score", "max_abs_completeness_delta"]  # of consistency_queries; equal to 1e-5


def tables(run):
    out = {}
    for p in sorted(run.glob("*/*.parquet")):
        df = pd.read_parquet(p)
        out[str(p.relative_to(run))] = df.sort_values([k for k in KEYS if k in df], kind="stable").reset_index(drop=True)
    return out


local, on_ray = tables(runs / "m6"), tables(runs / "ray")
assert local.keys() == on_ray.keys()
for name, df in local.items():
    loose = FLOATS if name == "consistency/consistency_queries.parquet" else []
    pd.testing.assert_frame_equal(df.drop(columns=loose), on_ray[name].drop(columns=loose), check_exact=True, obj=name)
    for c in loose:
        pd.testing.assert_series_equal(df[c], on_ray[name][c], check_exact=False, rtol=1e-5, atol=1e-7)
print(len(local), "tables, and every one of the Ray run's equals the local run's")
