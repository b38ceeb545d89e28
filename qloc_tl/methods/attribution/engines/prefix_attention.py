"""Shared-prefix attention for the TL 3 ``"kv-hooked"`` climb: the samples' one token attends to its prompt's
prefix held once per prompt, instead of TL's per-row KV cache.

In the climb every batch row is one sample: the answer token of a prompt, whose keys and values before it are
the clean prefix's. Through TL's own attention each row carries a copy of its prefix's keys and values, which
TL concatenates with the new token's, rotates (rotary models rotate every cached key again on every call),
repeats over the query heads of a key/value head (GQA) and multiplies in ``[rows · heads, 1, T + 1]`` products:
per row work on the whole prefix, most of the climb's time on a rotary GQA model such as SmolLM2.
:class:`PrefixAttention` computes the same attention with the prefix's keys rotated once per prompt and
block, the query heads of a key/value head stacked (no repeat), and one ``[kv heads, rows · group, prompts ·
T]`` product for all rows, then adds each row's score against its own key.

It replaces ``attn.forward`` for the call (through :func:`~.patching.swapped`), only on models whose
attention it computes exactly as TL does (:func:`prefix_attention_applies`), and the climb's validation
against the clean logits guards it on every call. TL's hook points inside the attention after the q/k/v
projections (``hook_rot_q`` … ``hook_z``) do not run; the swap is refused while any of them has a hook.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qloc_tl.core.model import TLModel
from qloc_tl.methods.attribution.engines.patching import has_hooks

__all__ = ["PrefixAttention", "RowPrompts", "prefix_attention_applies", "SKIPPED_HOOKS"]

SKIPPED_HOOKS = ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result")
"""The attention's hook points :class:`PrefixAttention` does not pass through."""

# configuration flags under which TL's attention computes something else than plain softmax attention
_OFF_FLAGS = (
    "use_split_qkv_input",
    "use_attn_in",
    "use_attn_result",
    "use_qk_norm",
    "use_logn_attn",
    "use_attention_sinks",
    "use_dynamic_ntk_rope",
    "load_in_4bit",
    "ungroup_grouped_query_attention",
)


def prefix_attention_applies(model: TLModel) -> bool:
    """Whether every block's attention of a TL 3 ``HookedTransformer`` can be replaced: TL's own
    ``AbstractAttention.forward`` (no subclass overriding it), causal global attention with learned absolute
    or rotary positions, none of the variants in which TL's attention does more (split inputs, per-head
    results, QK norm, score soft-capping, clipping, log-n scaling, sinks, dynamic NTK rotary, 4-bit weights),
    and no hooks on the skipped hook points or the module."""
    try:
        from transformer_lens.components.abstract_attention import AbstractAttention
    except ImportError:  # TL 4 has no such module path: not a TL 3 model
        return False
    cfg = model.cfg
    if getattr(cfg, "positional_embedding_type", None) not in ("standard", "rotary"):
        return False
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return False
    if any(t != "global" for t in (getattr(cfg, "attn_types", None) or ())):
        return False
    if any(getattr(cfg, f, False) for f in _OFF_FLAGS):
        return False
    if getattr(cfg, "attn_scores_soft_cap", -1.0) not in (None, -1.0, 0.0) or getattr(cfg, "clip_qkv", None):
        return False
    for block in getattr(model, "blocks", ()):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, AbstractAttention) or type(attn).forward is not AbstractAttention.forward:
            return False
        if has_hooks(attn) or any(has_hooks(getattr(attn, h)) for h in SKIPPED_HOOKS if hasattr(attn, h)):
            return False
    return True


class RowPrompts:
    """The climb's current rows: ``prompt_of [R]`` (the prompt 0..G-1 of each row) and ``mask [R, T + 1]``
    (its prefix's attention mask, then 1 for the row's own token), set before each block."""

    prompt_of: Tensor
    mask: Tensor


class PrefixAttention:
    """``attn.forward`` for rows of one new token each (``query_input [R, 1, d_model]``), attending to their
    prompt's prefix (``keys``, ``values`` ``[G, T, kv heads, d_head]`` as TL caches them, unrotated;
    ``mask [G, T]``: 1 on a prefix's tokens, 0 on padding) and to themselves. The q/k/v projections are TL's
    own (``calculate_qkv_matrices``, its ``hook_q/k/v`` run), the rotation TL's ``apply_rotary`` with the
    positions TL derives from the mask, the output ``z @ W_O + b_O`` as TL computes it."""

    def __init__(self, attn: Any, keys: Tensor, values: Tensor, mask: Tensor, rows: RowPrompts) -> None:
        self.attn, self.rows = attn, rows
        G, T, nkv, dh = keys.shape
        self.rotary = attn.cfg.positional_embedding_type == "rotary"
        if self.rotary and T > 0:
            keys = attn.apply_rotary(keys, 0, mask)
        self.keys = keys.permute(2, 3, 0, 1).reshape(nkv, dh, G * T)  # [kv heads, d_head, G·T]
        self.values = values.permute(2, 0, 1, 3).reshape(nkv, G * T, dh)  # [kv heads, G·T, d_head]
        self.key_prompt = torch.arange(G, device=keys.device).repeat_interleave(T)  # [G·T]
        self.key_valid = mask.reshape(G * T).bool()
        self.T = T

    def __call__(
        self,
        query_input: Tensor,
        key_input: Tensor,
        value_input: Tensor,
        past_kv_cache_entry: Any = None,
        additive_attention_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> Tensor:
        if additive_attention_mask is not None or position_bias is not None or query_input.shape[1] != 1:
            raise RuntimeError("PrefixAttention runs one token per row, without additive masks or biases")
        attn, rows = self.attn, self.rows
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # [R, 1, heads, d_head]
        if self.rotary:
            q = attn.apply_rotary(q, self.T, rows.mask)
            k = attn.apply_rotary(k, self.T, rows.mask)
        R, _, H, dh = q.shape
        nkv = k.shape[2]
        grp = H // nkv
        qg = q.view(R, nkv, grp, dh)
        scale = attn.attn_scale
        pre = (qg.permute(1, 0, 2, 3).reshape(nkv, R * grp, dh) @ self.keys).view(nkv, R, grp, -1)
        own = (qg * k.view(R, nkv, 1, dh)).sum(-1)  # [R, kv heads, grp]
        scores = (
            torch.cat([pre.permute(1, 0, 2, 3), own.unsqueeze(-1)], dim=-1) / scale
        )  # [R, nkv, grp, GT+1]
        allowed = (self.key_prompt[None, :] == rows.prompt_of[:, None]) & self.key_valid[None, :]  # [R, G·T]
        allowed = torch.cat([allowed, allowed.new_ones(R, 1)], dim=1)
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        pattern = F.softmax(scores, dim=-1).to(v.dtype)
        z = (pattern[..., :-1].permute(1, 0, 2, 3).reshape(nkv, R * grp, -1) @ self.values).view(
            nkv, R, grp, dh
        )
        z = z.permute(1, 0, 2, 3) + pattern[..., -1:] * v.view(R, nkv, 1, dh)  # [R, nkv, grp, d_head]
        # TL's own output product: F.linear with W_O as a contiguous [d_model, heads · d_head] matrix (a view,
        # no copy, under the matmul-ready layout), so the result does not depend on the weights' layout
        w = attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[-1], H * dh).contiguous()
        return F.linear(z.reshape(R, 1, H * dh).to(w.dtype), w, attn.b_O)
