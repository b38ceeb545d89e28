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
# # Using qloc_tl inside an existing TransformerLens workflow, on your own model
#
# qloc_tl only uses TL's model protocol (`cfg`, `hooks()`, `run_with_hooks`, `run_with_cache`, `to_tokens`)
# and hook names, so the same calls work on
#
# * **TL 3.x** `HookedTransformer` — e.g. `HookedTransformer.from_pretrained("gpt2")`;
# * **TL 4.x** `TransformerBridge` — e.g. `TransformerBridge.boot_transformers("gpt2")`, raw or after
#   `enable_compatibility_mode()`.
#
# This machine has no model hub, so the cell below builds a small random LLaMA-style checkpoint (RMSNorm,
# gated MLP, rotary, grouped-query attention) in a local directory and loads it the way you would load a
# local fine-tune. Set `MODEL_NAME = "gpt2"` where you have network access.

# %%
import torch

import qloc_tl as q
from qloc_tl.zoo.tiny import tiny_hf_directory

MODEL_NAME = None  # e.g. "gpt2" or "meta-llama/Meta-Llama-3-8B" with network access
local_dir = str(tiny_hf_directory("llama"))

if q.tl_major() >= 4:
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(MODEL_NAME or local_dir, device="cpu")
    # model.enable_compatibility_mode()   # optional: HookedTransformer numerics and weight processing
else:
    from transformer_lens import HookedTransformer

    if MODEL_NAME:
        model = HookedTransformer.from_pretrained(MODEL_NAME)
    else:  # HookedTransformer.from_pretrained refuses local directories; qloc_tl converts them
        model = q.load_hf_directory(local_dir)
model.eval()
print(type(model).__name__, "| layers", model.cfg.n_layers, "| d_mlp", model.cfg.d_mlp, "| heads", model.cfg.n_heads,
      "| kv heads", model.cfg.n_key_value_heads)
print(q.capabilities(model))

# %% [markdown]
# ## Your usual TL code ...

# %%
prompt = "alice was born in the city of"
logits, cache = model.run_with_cache(prompt, names_filter=["blocks.1.mlp.hook_post", "blocks.1.attn.hook_pattern"])
print(cache["blocks.1.mlp.hook_post"].shape, cache["blocks.1.attn.hook_pattern"].shape)
answer = " " + model.to_string(logits[0, -1].argmax()).strip()
print("model's answer:", answer)

# %% [markdown]
# ## ... plus qloc_tl: attribution, selection and interventions as composable hooks

# %%
res = q.attribute_neurons(model, prompt, answer, steps=10)
kns = q.select_neurons(res.scores)
print("KNs:", [str(n) for n in kns][:10], "| completeness delta:", res.completeness_delta.abs().max().item())


def my_own_hook(act, hook):  # any hook you already have
    return act


hooks = q.scale_neurons(kns, 0.0) + q.scale_attention([q.Head(1, 0)], 2.0) + [("blocks.0.hook_resid_pre", my_own_hook)]
with model.hooks(fwd_hooks=hooks), torch.no_grad():  # plain TL context
    edited = model(prompt)
with q.intervene(model, hooks), torch.no_grad():  # the same, validated and checked for firing
    edited2 = model(prompt)
print("identical:", torch.allclose(edited, edited2), "| hooks left:", sum(len(h._forward_hooks) for h in model.hook_dict.values()))
