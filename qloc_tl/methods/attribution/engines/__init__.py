"""The fast engines of :func:`~qloc_tl.methods.attribution.attribute_neurons` (and of the knowledge-synapse
attribution): how ``F`` and ``∇F`` are computed for many samples at once.

The answer position is the last prompt token, and in a causal model every earlier position's keys and values
are unchanged when layer l's neurons at that position change, so only the answer position has to be
recomputed per sample. Samples of several layers share one pass (a hook per layer overwrites its rows). One
of four paths runs, picked per backend (from :func:`~qloc_tl.core.model.capabilities`) by
:func:`~.dispatch.fast_kind` and validated once per call against the clean logits (unedited samples at the
first chunk's lowest and highest layer, compared relative to the logits' scale by
:func:`~qloc_tl.core.model.logits_mismatch`; on a mismatch the next path, :class:`~.dispatch.PathPlan`).
Whenever a call runs slower than the model's normal schedule — a capability probe or a validation failed, or
hooks on the model keep the MLP-out shortcut off — one WARNING per model names the path taken and why.

* ``"kv-hooked"`` (TL 3 ``HookedTransformer``, :mod:`.kv_hooked`): the prefixes of the prompts of a pass go
  once into TL's KV cache; then one block per call on the answer token only (``start_at_layer=j,
  stop_at_layer=j + 1``), the samples of layer l joining the batch at block l with the clean residual of the
  answer position, so no sample computes a layer below its own.
* ``"blockwise"`` (HF-backed TL 4 ``TransformerBridge``, :mod:`.blockwise`): the same schedule driven through
  ``model.blocks[j]`` on packed rows (a prompt's prefix, then one copy of the answer token per sample, a 4-D
  mask and explicit position ids). Bridges keep no KV cache, so the prefix is recomputed at each block. On
  TL 3 ``HookedTransformer`` with learned absolute positions (GPT-2 and its family) the copies of a prompt
  run as one sequence through ``model.blocks[j]``, its prefix in TL's KV cache and the rest of the layout
  mask added by a ``hook_attn_scores`` hook (:mod:`.hooked_blockwise`): the default there when ``n_ctx``
  leaves room, with ``"kv-hooked"`` as its fallback.
* ``"packed"`` (fallback on HF-backed bridges, :mod:`.packed`): the packed rows through the bridge's normal
  forward.
* ``"full"`` (fallback: native bridges, which ignore 4-D masks; :mod:`.full`): rows of the repeated prompt,
  batched.

With ``site="post"`` the blockwise paths let the samples of layer l join at block l + 1, with the clean
residual after block l plus ``(x − w̄_l) @ W_out_l`` (the MLP-out shortcut, :mod:`.shortcut` and
:class:`~.grouped.GroupedEngine`, checked by probes that run block l the plain way). On the CPU they compute
the objective and its gradient from the final residual without materialising the ``[samples, d_vocab]``
logits (:mod:`.unembed`) when the unembedding is a plain float32/float64 affine map. For the duration of a
fast call the model's tanh-GELUs and layer norms compute with fused kernels (:mod:`.fused`) and TL 3 weights
are stored in the order their components multiply by (:mod:`.layout`); every such swap goes through
:func:`~.patching.swapped`, which restores the originals in ``finally``.

The knowledge-synapse fast engine (:mod:`.synapses`) applies the same idea to attention-pattern edits.
What the engines remember between calls lives in one object, :data:`~.cache.ENGINE_CACHE`, with a public
:meth:`~.cache.EngineCache.clear`.
"""

from __future__ import annotations

from qloc_tl.methods.attribution.engines.base import (
    Engine,
    Evaluation,
    NeuronLine,
    PathMismatch,
    PromptEngine,
    ShortcutMismatch,
)
from qloc_tl.methods.attribution.engines.cache import ENGINE_CACHE, EngineCache
from qloc_tl.methods.attribution.engines.clean import CleanPass, clean_pass
from qloc_tl.methods.attribution.engines.dispatch import PathPlan, fast_kind, make_engine
from qloc_tl.methods.attribution.engines.patching import Swap, swapped

__all__ = [
    "Engine",
    "PromptEngine",
    "Evaluation",
    "NeuronLine",
    "PathMismatch",
    "ShortcutMismatch",
    "EngineCache",
    "ENGINE_CACHE",
    "CleanPass",
    "clean_pass",
    "PathPlan",
    "fast_kind",
    "make_engine",
    "Swap",
    "swapped",
]
