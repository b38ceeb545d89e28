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
# # Knowledge synapses: attention selects the knowledge neurons of a query
#
# The Query Localization assumption says the KNs used for a query are *selected* dynamically, by attention.
# A **knowledge synapse** `Synapse(l, h, k)` is key column `k` of head `(l, h)`'s attention pattern in the
# answer row, whose attribution (integrated gradients over the pattern, "attattr") is high. Suppressing the
# synapses should move the query's KN activations (ΔValue) and P(answer) — more than other neurons'.

# %%
import torch
from IPython.display import HTML, display

import qloc_tl as q
from qloc_tl.methods.attribution import attribute_neurons, select_neurons
from qloc_tl.methods.synapses import synapse_columns, synapse_patterns
from qloc_tl.reporting.views import save_html, synapse_heads_view

model = q.load_builtin_model()
fact = q.data.builtin_facts()[3]
query = fact.queries[0].text
syn = q.find_synapses(model, query, fact.answer, steps=10)
print(query, "->", fact.object)
print(len(syn.synapses), "synapses in", len(syn.heads), "heads")
syn.to_dataframe().sort_values("score", ascending=False).head(8)

# %% [markdown]
# ## The synapse heads, rendered with circuitsvis
#
# Heads are named `L{layer}H{head}`; the view is self-contained HTML (works offline once saved).

# %%
view = synapse_heads_view(syn, synapse_patterns(model, syn, max_heads=6))
save_html(view, "/tmp/ks_heads.html", title=f"knowledge synapses: {query}")
display(HTML(view.local_src if hasattr(view, "local_src") else str(view)))

# %% [markdown]
# ## Suppressing the synapses changes the KN activations
#
# We scale the synapse columns of the answer row by 0 (suppress) with `q.scale_attention` and read the
# query's KN activations with `q.record_neurons` in the same forward pass.

# %%
att = attribute_neurons(model, query, fact.answer, steps=10)
kns = select_neurons(att.scores)
layers = sorted({n.layer for n in kns})
tokens = model.to_tokens(query)
answer = int(att.answer_ids[0])


def run(hooks):
    store: dict[int, torch.Tensor] = {}
    with q.intervene(model, list(hooks) + list(q.record_neurons(layers, store))), torch.no_grad():
        p = float(model(tokens)[0, -1].softmax(-1)[answer])
    acts = torch.stack([store[n.layer][0, -1, n.index] for n in kns])
    return p, acts


edits = q.HookList()
for head, cols in synapse_columns(syn.synapses).items():
    edits += q.scale_attention([head], 0.0, key_positions=list(cols))
p0, a0 = run([])
p1, a1 = run(edits)
print(f"P(answer): {p0:.3f} -> {p1:.3f} after suppressing {len(syn.synapses)} synapses")
print(f"mean KN activation: {float(a0.mean()):.3f} -> {float(a1.mean()):.3f}")

# %% [markdown]
# ## The same measurement, with controls, in one call
#
# `dynamic_kn_selection` compares the query's KNs, its neighbors' KNs and random neurons, under suppression
# and enhancement of the synapses and of irrelevant (random, same heads) columns.

# %%
others = attribute_neurons(model, list(fact.prompts[1:]), [fact.answer] * (len(fact.queries) - 1), steps=10)
neighbor_kns = set().union(*[s.to_frozenset() for s in select_neurons(others.scores)])
table = q.dynamic_kn_selection(model, query, fact.answer, syn, query_kns=kns, neighbor_kns=neighbor_kns)
table
