# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
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
