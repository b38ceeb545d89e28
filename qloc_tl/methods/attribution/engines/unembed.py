"""The unembedding as the fast paths use it: whether a model's logits are the affine map ``ln_final(r) @ W_U
+ b_U`` (:func:`linear_unembedding`; TL 3's prefix-reusing paths then compute the clean logits of the answer
position by that map instead of HookedTransformer's own unembedding of every position), and a
HookedTransformer's final norm and logits of the answer token (:func:`hooked_ln_final`, :func:`hooked_logits`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qloc_tl.core.model import TLModel

__all__ = ["linear_unembedding", "hooked_ln_final", "hooked_logits"]


def linear_unembedding(model: TLModel) -> tuple[Tensor, Tensor | None] | None:
    """``(W_U [d_model, d_vocab], b_U [d_vocab] or None)`` when the model's logits are ``ln_final(r) @ W_U +
    b_U`` in float32 or float64 (no logit soft cap); ``None`` otherwise (low precision: the model's own matmuls
    run in its dtype, which this map in float32 would not reproduce)."""
    cfg = model.cfg
    if float(getattr(cfg, "output_logits_soft_cap", 0.0) or 0.0) > 0:
        return None
    W = getattr(model, "W_U", None)
    if not isinstance(W, Tensor) or W.dim() != 2 or W.dtype not in (torch.float32, torch.float64):
        return None
    b = getattr(model, "b_U", None)
    if b is not None and (not isinstance(b, Tensor) or b.shape != W.shape[1:] or b.dtype != W.dtype):
        return None
    if W.shape[1] != int(cfg.d_vocab):
        return None
    return W, b


def hooked_ln_final(model: TLModel, resid: Tensor) -> Tensor:
    """A HookedTransformer's ``ln_final`` of ``resid`` (``resid`` itself for a model without normalisation)."""
    return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def hooked_logits(model: TLModel, final: Tensor) -> Tensor:
    """A HookedTransformer's logits from the normalised final residual: ``final @ W_U + b_U`` (soft-capped
    where the model caps them); HT's own ``unembed`` copies ``W_U.T`` on every call."""
    logits = final @ model.W_U + model.b_U
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits
