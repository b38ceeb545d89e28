"""The ``"kv-hooked"`` engine (TL 3 ``HookedTransformer``): the prompts' prefixes in TL's KV cache, then the
answer token alone, one block per call, the samples of layer l joining the batch at block l."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from qloc_tl.core.model import TLModel, hooked_kv_cache, n_layers
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines.base import Evaluation
from qloc_tl.methods.attribution.engines.cache import ENGINE_CACHE
from qloc_tl.methods.attribution.engines.clean import CleanPass
from qloc_tl.methods.attribution.engines.grouped import GroupedEngine, in_order, inverse, layer_groups
from qloc_tl.methods.attribution.engines.patching import Swap, swapped
from qloc_tl.methods.attribution.engines.prefix_attention import (
    PrefixAttention,
    RowPrompts,
    prefix_attention_applies,
)
from qloc_tl.methods.attribution.engines.unembed import hooked_ln_final, hooked_logits

__all__ = ["HookedKVEngine", "hooked_prefix_cache"]


def hooked_prefix_cache(model: TLModel, prep: CleanPass, idxs: list[int]) -> tuple[Any, Tensor]:
    """``(cache, mask [G, T])``: a frozen TL 3 KV cache of the prompts' prefixes (the tokens before the answer
    position), padded to the longest (T), and their ``attention_mask``. From the keys and values the clean
    pass kept (``prep.prefix_kv``; right-padded: a prompt's key at position p depends on its tokens up to p
    only, so the clean pass's keys before the answer position are the prefix's) where it kept those of every
    prompt of ``idxs``, else from a forward pass of the prefixes, left-padded. A block sees no positions on the
    models the keys are kept for (learned absolute positions), and the mask hides the padding either way."""
    ts = [int(prep.last[i]) for i in idxs]
    G, T, dev = len(idxs), max(ts), prep.tokens.device
    cache = hooked_kv_cache(model, G)
    kept = prep.prefix_kv
    if kept is not None and max(idxs) < kept[0][0].shape[0]:
        rows = torch.tensor(idxs, dtype=torch.long, device=dev)
        for e, k, v in zip(cache.entries, *kept):
            e.past_keys, e.past_values = k[rows, :T], v[rows, :T]
        mask = (torch.arange(T, device=dev)[None, :] < torch.tensor(ts, device=dev)[:, None]).long()
        cache.previous_attention_mask = mask
        cache.freeze()
        return cache, mask
    toks = torch.zeros(G, T, dtype=torch.long, device=dev)
    mask = torch.zeros(G, T, dtype=torch.long, device=dev)
    for g, (i, t) in enumerate(zip(idxs, ts)):
        toks[g] = prep.tokens[i, 0]  # padding: masked out, any token
        toks[g, T - t :] = prep.tokens[i, :t]
        mask[g, T - t :] = 1
    if T > 0:
        with torch.no_grad():
            model(toks, past_kv_cache=cache, attention_mask=mask, return_type=None)
    cache.freeze()
    return cache, mask


class HookedKVEngine(GroupedEngine):
    """TL 3 HookedTransformer, blockwise, several prompts per pass.

    The prompts' prefixes go into one KV cache, padded to the longest (:func:`hooked_prefix_cache`; TL's
    ``attention_mask`` handles positions and masking); a chunk runs only the answer token, one block at a
    time (``start_at_layer=j, stop_at_layer=j + 1``, each row with its prompt's cache entry and
    ``attention_mask``). The samples of layer l join the batch at block l (the clean residual entering block
    l at the answer position, ``resid_last``) — with the MLP-out shortcut at block l + 1 — so no sample
    computes a layer below its own, and the batch grows as the chunk climbs. The objective comes from
    the logits ``final @ W_U + b_U`` of ``ln_final`` of the answer token (HT's own ``unembed`` copies ``W_U.T`` on every call); the validation samples guard all of it.

    Where :func:`~.prefix_attention.prefix_attention_applies` (and it has not failed validation on this model:
    ``ENGINE_CACHE`` path ``"prefix-attention"``), each block's attention is replaced for the group by
    :class:`~.prefix_attention.PrefixAttention` (the prefix held once per prompt instead of once per row) and
    the blocks are called directly; ``prefix_attention=False`` keeps TL's own attention."""

    path = "kv-hooked"
    prefix: Any = None
    mask: Tensor
    rows: RowPrompts | None = None
    _swaps: contextlib.ExitStack | None = None

    def __init__(
        self,
        model: TLModel,
        prep: CleanPass,
        config: AttributionConfig,
        shortcut: bool = False,
        signature: Any = None,
        verified: bool = False,
        prefix_attention: bool | None = None,
    ) -> None:
        super().__init__(model, prep, config, shortcut, signature, verified)
        if prefix_attention is None:
            prefix_attention = prefix_attention_applies(model) and not ENGINE_CACHE.failed(
                model, "prefix-attention"
            )
        self.prefix_attention = prefix_attention

    def start_group(self, idxs: list[int]) -> None:
        super().start_group(idxs)
        self.prefix, self.mask = hooked_prefix_cache(self.model, self.prep, idxs)
        if self.prefix_attention:
            self.rows = RowPrompts()
            low = min(self.prep.layers)
            swaps = [
                Swap(
                    self.model.blocks[j].attn,
                    "forward",
                    PrefixAttention(
                        self.model.blocks[j].attn, e.past_keys, e.past_values, self.mask, self.rows
                    ),
                    "forward",
                )
                for j, e in enumerate(self.prefix.entries)
                if j >= low
            ]
            self._swaps = contextlib.ExitStack()
            self._swaps.enter_context(swapped(swaps))

    def end_group(self) -> None:
        if self._swaps is not None:
            self._swaps.close()
        self.prefix = self.rows = self._swaps = None

    def _cache(self, j: int, rows: Tensor) -> Any:
        """A frozen cache whose block-``j`` entry holds, per batch row, its prompt's prefix (``rows``: the
        prompt of each row); the other blocks' entries are not read by a one-block call."""
        R = rows.shape[0]
        c = hooked_kv_cache(self.model, R)
        src = self.prefix.entries[j]
        if len(self.idxs) == 1:  # one prompt: views, no copies
            keys = src.past_keys.expand(R, *src.past_keys.shape[1:])
            values = src.past_values.expand(R, *src.past_values.shape[1:])
        else:
            keys, values = src.past_keys.index_select(0, rows), src.past_values.index_select(0, rows)
        c.entries[j].past_keys, c.entries[j].past_values = keys, values
        c.freeze()
        return c

    def logits_of(self, final: Tensor) -> Tensor:
        return hooked_logits(self.model, final)

    def evaluate(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        """Batch rows are (layer group, prompt, sample)."""
        G, S, dev = x.shape[0], x.shape[1], x.device
        order, counts = layer_groups(layer_of)
        row_of = torch.empty(G, S, dtype=torch.long, device=dev)  # batch row of (prompt, sorted sample)
        s0 = 0
        for c in counts.values():
            row_of[:, s0 : s0 + c] = G * s0 + torch.arange(G * c, device=dev).view(G, c)
            s0 += c
        idx = torch.tensor(self.idxs, device=dev)
        resid, prompt_of = self._climb(counts, in_order(x, order), idx, check)
        final = hooked_ln_final(self.model, resid[:, -1])
        return self.finish_group(
            final, self.prep.answers[idx][prompt_of], row_of[:, inverse(order)], x, check
        )

    def _climb(self, counts: dict[int, int], xs: Tensor, idx: Tensor, check: bool) -> tuple[Tensor, Tensor]:
        """The answer token through blocks ``min(counts)`` .. ``L - 1``; ``xs [G, S, D]`` sorted by layer.
        Returns the residual rows ``[R, 1, d_model]`` (layer group, prompt, sample) and the prompt (0..G-1) of
        each row. Without the shortcut the samples of layer l join at block l with the clean residual entering
        it, and a hook on ``hook_post`` writes their ``x``; with it they join at block l + 1, and only the
        probes (the last G rows while they are there) are hooked."""
        G, dev, L = xs.shape[0], xs.device, n_layers(self.model)
        probe, hooks, joining = self.joins(counts, xs, idx, 0, check)
        resid = xs.new_zeros(0, 1, self.prep.resid_last[self.prep.layers[0]].shape[-1])
        prompt_of = torch.empty(0, dtype=torch.long, device=dev)  # prompt (0..G-1) of each batch row
        got: dict[int, Tensor] = {}

        def join(new: Tensor | None) -> None:  # new [G, c, d_model]
            nonlocal resid, prompt_of
            if new is None:
                return
            c = new.shape[1]
            resid = torch.cat([resid, new.reshape(G * c, 1, -1).to(resid.dtype)])
            prompt_of = torch.cat([prompt_of, torch.arange(G, device=dev).repeat_interleave(c)])

        with self.model.hooks(fwd_hooks=hooks):
            for j in range(min(counts), L):
                join(joining(j))
                probing = probe is not None and j in probe[0]
                if probing:  # the probe of layer j: clean residual in, hook_post written by its hook
                    join(self.prep.resid_last[j][idx].unsqueeze(1))
                if resid.shape[0] == 0:
                    continue  # with the shortcut: no samples join block min(counts)
                ones = torch.ones(resid.shape[0], 1, dtype=self.mask.dtype, device=dev)
                mask = torch.cat([self.mask[prompt_of], ones], dim=1)
                if self.rows is not None:  # the prefix attention reads the rows' prompts and masks
                    self.rows.prompt_of, self.rows.mask = prompt_of, mask
                    resid = self.model.blocks[j](resid)
                else:
                    resid = self.model(
                        resid,
                        start_at_layer=j,
                        stop_at_layer=j + 1,
                        past_kv_cache=self._cache(j, prompt_of),
                        attention_mask=mask,
                    )
                if probing:
                    got[j] = resid[-G:].view(G, 1, -1)
                    resid, prompt_of = resid[:-G], prompt_of[:-G]
        join(joining(L))  # with the shortcut: the samples of the last layer
        if probe is not None:
            self.check_shortcut(got, probe[2])
        return resid, prompt_of
