"""The ``"blockwise"`` engine of TL 3 ``HookedTransformer`` with learned absolute positions: a prompt's copies
of the answer token as one sequence after its prefix in TL's KV cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qloc_tl.core.model import TLModel, capabilities, n_layers
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines.blockwise import BlockwiseEngine
from qloc_tl.methods.attribution.engines.grouped import BLOCKWISE_BATCH
from qloc_tl.methods.attribution.engines.kv_hooked import hooked_prefix_cache
from qloc_tl.methods.attribution.engines.unembed import hooked_ln_final, hooked_logits

__all__ = ["HookedBlockwiseEngine", "MaskHook", "rows_room", "rows_chunk_wanted", "rows_layout_ok"]


class MaskHook:
    """On ``blocks.{j}.attn.hook_attn_scores`` ``[G, n_heads, N, T + N]`` (N copies; keys: the cached prefix,
    then the copies): sets the scores of the pairs the layout forbids (``blocked``, sliced to ``N`` copies) to
    ``-inf``, as TL's own masks do; counts its calls."""

    def __init__(self, blocked: Tensor) -> None:
        self.blocked, self.calls = blocked, 0

    def __call__(self, act: Tensor, hook: Any) -> Tensor:
        self.calls += 1
        return act.masked_fill(self.blocked[..., : act.shape[-2], : act.shape[-1]], float("-inf"))


class HookedBlockwiseEngine(BlockwiseEngine):
    """The copies of :class:`~.blockwise.BlockwiseEngine` (one copy of the answer token per sample, a row per
    prompt) driven through ``model.blocks[j](copies, past_kv_cache_entry=…, attention_mask=…)``, the prompts'
    prefixes in TL's KV cache as for ``"kv-hooked"`` (padded to the longest, built once per group by
    :func:`~.kv_hooked.hooked_prefix_cache`: neither recomputed per block nor copied per row). TL's causal
    and padding masks apply; a hook on ``hook_attn_scores`` (:class:`MaskHook`) adds the rest of the layout:
    a copy sees its prompt's prefix and itself, not the copies before it. A block of such a model does not
    see positions (they enter the residual stream once, at the embedding), so a copy computes what the answer
    token computes at its own position; :func:`rows_layout_ok` says which models qualify (no rotary, ALiBi or
    shortformer positions, no local attention windows).

    Against ``"kv-hooked"`` (one batch row per sample, each with its own copy of the cached keys and values,
    and ``[R·heads]`` one-query attention products: tiny batched matmuls, slow on the CPU in both
    directions) this runs one ``[G·heads, N, T + N]`` attention per block. The objective comes from the
    logits ``final @ W_U + b_U``, as for ``"kv-hooked"``."""

    prefix: Any = None
    mask: Tensor
    _blocked: Tensor | None = None  # [1, 1, n, T + n]: True where a copy may not look (n copies)

    def start_group(self, idxs: list[int]) -> None:
        super().start_group(idxs)
        self.prefix, self.mask = hooked_prefix_cache(self.model, self.prep, idxs)
        self._blocked = None

    def end_group(self) -> None:
        super().end_group()
        self.prefix = self._blocked = None

    def max_chunk(self, n_tok: int) -> int | None:
        return rows_room(self.model, n_tok)

    def logits_of(self, final: Tensor) -> Tensor:
        return hooked_logits(self.model, final)

    def _begin(self, idx: Tensor, need: int) -> tuple[Tensor, list[tuple[str, Any]]]:
        """No rows before the copies (the prefixes are in the cache); a :class:`MaskHook` per block."""
        T, dev = self.T, idx.device
        if self._blocked is None or self._blocked.shape[-2] < need:
            q, k = torch.arange(need, device=dev), torch.arange(T + need, device=dev)
            self._blocked = ((k[None, :] >= T) & (k[None, :] != T + q[:, None]))[None, None]
        layout = [(f"blocks.{j}.attn.hook_attn_scores", MaskHook(self._blocked)) for j in range(n_layers(self.model))]
        r = self.prep.resid_last[self.prep.layers[0]]  # [n_prompts, d_model]
        return r.new_zeros(len(self.idxs), 0, r.shape[-1]), layout

    def _block(self, j: int, hidden: Tensor) -> Tensor:
        ones = torch.ones(hidden.shape[0], hidden.shape[1], dtype=self.mask.dtype, device=hidden.device)
        return self.model.blocks[j](
            hidden, past_kv_cache_entry=self.prefix.entries[j], attention_mask=torch.cat([self.mask, ones], dim=1)
        )

    def _ln_final(self, h: Tensor) -> Tensor:
        return hooked_ln_final(self.model, h)


def rows_room(model: TLModel, n_tok: int) -> int:
    """Samples a chunk of :class:`HookedBlockwiseEngine` may hold for prompts of ``n_tok`` tokens: a row
    (prefix of ``n_tok - 1`` tokens, the samples, up to two validation samples and one probe) must fit TL's
    ``n_ctx`` causal-mask buffer."""
    return int(model.cfg.n_ctx) - n_tok - 2


def rows_chunk_wanted(model: TLModel, config: AttributionConfig, longest: int) -> int:
    """The chunk size TL 3 "blockwise" must allow for ``fast_path="auto"`` to take it: kv-hooked's, i.e. every
    sample of a prompt (all layers, ``steps`` + 1 nodes, SIG: a path per token) up to
    :data:`~.grouped.BLOCKWISE_BATCH`. Rows cut into more passes than kv-hooked's one pass per prompt group
    lose on calls of a few queries (each pass has a fixed cost) and win only on long ones, so "auto" keeps
    kv-hooked where the rows would need more passes."""
    per_path = n_layers(model) * (config.steps + 1)
    return min(BLOCKWISE_BATCH, per_path * (longest if config.method == "sig" else 1))


def rows_layout_ok(model: TLModel) -> bool:
    """Whether a TL 3 HookedTransformer can run the rows of :class:`HookedBlockwiseEngine`: learned absolute
    positions (``positional_embedding_type="standard"``: a block never sees positions), causal global
    attention only (a local window would measure distances in the row, not in the prompt), and
    ``hook_attn_scores`` edits honoured (:func:`~qloc_tl.core.model.capabilities`)."""
    cfg = model.cfg
    if getattr(cfg, "positional_embedding_type", None) != "standard":
        return False
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return False
    if any(t != "global" for t in (getattr(cfg, "attn_types", None) or ())):
        return False
    return capabilities(model).scores_editable
