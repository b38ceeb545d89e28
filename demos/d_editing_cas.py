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
# # Editing knowledge with consistency-aware neuron selection (CAS)
#
# Editing the KNs of one query (N_i) tends not to generalise to its paraphrases; editing the union over all
# paraphrases (N_u) touches many neurons and hurts unrelated facts. CAS picks neurons whose (normalised)
# scores are high on average **and** stable across the neighbor queries: CAS = β1·mean − β2·variance.
#
# Edits are reversible contexts: the original weights are restored exactly on exit, even after an error.

# %%
import torch

import qloc_tl as q
from qloc_tl.core.tokens import tokenize_prompts
from qloc_tl.methods.attribution import attribute_neurons, select_neurons

model = q.load_builtin_model()
facts = q.data.builtin_facts()
fact = facts[5]
unrelated = [f for f in facts if f.relation != fact.relation][:20]
att = attribute_neurons(model, list(fact.prompts), [fact.answer] * len(fact.queries), steps=10)
per_query = select_neurons(att.scores)
sets = {
    "N_i (query 0)": per_query[0],
    "N_u (union)": q.NeuronSet(set().union(*[s.to_frozenset() for s in per_query])),
    "CAS": q.select_cas(att.scores),
}
{name: len(s) for name, s in sets.items()}

# %%
answer = int(att.answer_ids[0])


def top1_hits(prompts, target):
    toks, last = tokenize_prompts(model, prompts)
    with torch.no_grad():
        pred = model(toks)[torch.arange(len(prompts)), last].argmax(-1)
    return float((pred == target).float().mean())


unrel_prompts = [f.prompts[0] for f in unrelated]
with torch.no_grad():
    toks, last = tokenize_prompts(model, unrel_prompts)
    unrel_before = model(toks)[torch.arange(len(unrel_prompts)), last].argmax(-1)

rows = []
for name, neurons in sets.items():
    with q.erase(model, neurons):
        rel = 1 - top1_hits([fact.prompts[0]], answer)  # erased answer no longer top-1 on the edited query
        gen = 1 - top1_hits(list(fact.prompts[1:]), answer)  # ... nor on its paraphrases
        with torch.no_grad():
            after = model(toks)[torch.arange(len(unrel_prompts)), last].argmax(-1)
        loc = float((after == unrel_before).float().mean())  # unrelated facts keep their answers
    rows.append({"set": name, "neurons": len(neurons), "Rel": rel, "Gen": gen, "Loc": loc})
import pandas as pd

pd.DataFrame(rows)

# %% [markdown]
# ## Update: make the model answer a new object
#
# Dai et al.'s update moves each value slot away from the old object's embedding and towards the new one:
# v ← v − λ1(‖v‖/‖e_old‖)e_old + λ2(‖v‖/‖e_new‖)e_new (λ1 = 1, λ2 = 8).

# %%
new = next(f.object for f in facts if f.relation == fact.relation and f.object != fact.object)
new_id = model.to_single_token(" " + new) if model.to_str_tokens(" " + new, prepend_bos=False)[0].strip() else None
with q.update(model, sets["CAS"], fact.answer, " " + new):
    print("edited query top-1:", model.to_string(model(fact.prompts[0])[0, -1].argmax()))
    print("paraphrases top-1: ", [model.to_string(model(p)[0, -1].argmax()) for p in fact.prompts[1:]])
print("after the context, restored:", model.to_string(model(fact.prompts[0])[0, -1].argmax()), "(gold:", fact.object + ")")

# %% [markdown]
# ## How strong should the update be? And what else does it hit?
#
# `update_strength_sweep` runs the editing experiment's update at several strengths λ2 on the same facts,
# neuron sets, new objects and Locality queries. Each row has two Localities: `loc` on facts of other
# relations, `loc_same` on other facts of the *same* relation. On a real LM those share KNs, so `loc_same`
# suffers first. On this toy model every strength saturates (Rel = Gen = 1). SmolLM2-135M has no strength
# that works without damage: see the editing docs.

# %%
from qloc_tl.experiments.editing import EditingConfig
from qloc_tl.experiments.strength import update_strength_sweep

few = [f for f in facts if f.relation == fact.relation][:4] + [f for f in facts if f.relation != fact.relation][:2]
sweep = update_strength_sweep(
    model, few, lambdas=(1, 8), config=EditingConfig(steps=6, n_unrelated=4, n_same_relation=3), unrelated_facts=facts
)
sweep.round(2)
