"""The ``"packed"`` engine (TL 4 bridges, the fallback after ``"blockwise"``): a prompt's prefix, then one copy
of the answer token per sample, through the bridge's normal forward; and :func:`bridge_mask`, the 4-D mask in
the convention of the bridge's backend, which it shares with ``"blockwise"``."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from qloc_tl.core.memory import is_out_of_memory
from qloc_tl.core.model import TLModel, bridge_mask_convention
from qloc_tl.methods.attribution.engines.base import Evaluation, PathMismatch, PromptEngine, row_hooks

logger = logging.getLogger(__name__)

__all__ = ["PackedEngine", "bridge_mask", "bridge_row_limit"]


def bridge_mask(model: TLModel, allowed: Tensor) -> Tensor:
    """The boolean 4-D ``attention_mask`` a bridge's forward takes for ``allowed`` (``[B, 1, N, N]``, True where
    a query may attend): ``allowed`` itself for HF-backed bridges (True = keep), its complement for TL 4's
    ``boot_native`` bridges, which read True as masked (:func:`~qloc_tl.core.model.bridge_mask_convention`).
    With neither convention confirmed by the probe, ``allowed``: the first pass's validation decides."""
    return ~allowed if bridge_mask_convention(model) == "mask" else allowed


def bridge_row_limit(model: TLModel) -> int | None:
    """The longest row a bridge's forward and blocks take: ``n_ctx`` for TL 4's ``boot_native`` bridges (their
    position table and causal-mask buffer are sized ``n_ctx``; the forward refuses longer inputs), ``None``
    (no limit: explicit position ids) for HF-backed ones."""
    if bridge_mask_convention(model) != "mask":
        return None
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    return n_ctx or None


class PackedEngine(PromptEngine):
    """Each sequence = prompt prefix + copies of the answer token, one copy per sample.

    A 4-D boolean attention mask (:func:`bridge_mask`) lets every copy attend to the prefix and to itself only, and every copy gets
    the answer position's position id, so each copy computes exactly the clean last-token forward; the hook
    at layer l overwrites the copies of layer-l samples. When the context cannot hold all copies after the
    prefix (``n_ctx``), they are spread over several rows of one batch, each row repeating the prefix, so a
    chunk is still one forward pass.
    """

    path = "packed"
    validated = True

    def default_chunk(self, n_tok: int, samples: int) -> int:
        return max(1, min(samples, 128))  # chunks of whole layers: backward stops at the chunk's lowest layer

    def evaluate_prompt(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        S, t = x.shape[0], self.t
        r = self.copies_per_row(S)

        def place(act: Tensor, rows: Tensor, vals: Tensor) -> Tensor:
            return act.index_put((rows // r, t + rows % r), vals)

        logits = self._run(S, r, row_hooks(self.prep.names, layer_of, x, place), check)
        return self.finish(logits, x, check)

    def copies_per_row(self, S: int) -> int:
        """Copies one row holds: all ``S`` samples, within the context after the prefix."""
        n_ctx = int(getattr(self.model.cfg, "n_ctx", 0) or 0)  # position tables are sized n_ctx
        return max(1, min(S, n_ctx - self.t)) if n_ctx else S

    def layout(self, B: int, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens [B, N], mask [B, 1, N, N], position ids [B, N])`` of ``B`` rows = prefix + ``r`` copies."""
        t, dev = self.t, self.row.device
        N = t + r
        seq = torch.cat([self.row[:t], self.row[t:].expand(r)]).unsqueeze(0).expand(B, N)
        allowed = torch.zeros(N, N, dtype=torch.bool, device=dev)
        allowed[:t, :t] = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        allowed[t:, :t] = True
        diag = torch.arange(t, N, device=dev)
        allowed[diag, diag] = True
        pos = torch.cat([torch.arange(t, device=dev), torch.full((r,), t, device=dev)]).unsqueeze(0).expand(B, N)
        return seq, bridge_mask(self.model, allowed[None, None].expand(B, 1, N, N)), pos

    def _run(self, S: int, r: int, hooks: list[tuple[str, Any]], check: bool) -> Tensor:
        t = self.t
        B = -(-S // r)
        seq, mask, pos = self.layout(B, r)
        with self.model.hooks(fwd_hooks=hooks):
            try:
                logits = self.model(seq, attention_mask=mask, position_ids=pos)
            except Exception as exc:
                if not check or is_out_of_memory(exc):  # no fallback for a lack of memory
                    raise
                # on the validation chunk: a backend that rejects 4-D masks / position ids → fall back
                logger.debug("packed forward raised %r", exc)
                raise PathMismatch(float("nan")) from exc
        # copies past S in the last row are unedited answer-token copies: computed, then dropped
        return logits[:, t:].reshape(B * r, -1)[:S]
