"""The answer objective from the final residual stream, without materialising the logits.

IG, SIG and AMIG need, for every sample, the softmax probability (or log-probability) of the answer token
and its gradient. Through a plain unembedding ``z = r @ W_U + b_U`` with ``p = softmax(z)`` these are

* ``log p_a = z_a − logsumexp(z)``;
* ``∂ p_a / ∂r = p_a · (W_U[:, a] − W_U p)`` and ``∂ log p_a / ∂r = W_U[:, a] − W_U p``.

:func:`answer_objective` computes both in one sweep over blocks of the vocabulary (an online logsumexp,
with the running ``Σ_v e^{z_v − m} W_U[:, v]`` rescaled whenever the running max ``m`` grows), so the
``[samples, d_vocab]`` logits, their softmax and their gradient are never held in memory at once. On a CPU
this is what the attribution of a small model with a 50 257-token vocabulary spends most of its time on:
the blocks stay in cache, and the gradient needs one matmul instead of autograd's softmax backward plus a
matmul.

It is exact up to float rounding (the same sums in a different order). It is used only where the
unembedding is exactly that affine map (see :func:`linear_unembedding`); the blockwise paths still check
their logits against the clean forward pass on the first pass of every call.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.model import TLModel, model_device

__all__ = [
    "answer_objective",
    "answer_objective_and_logits",
    "linear_unembedding",
    "sweep_unembedding",
    "hooked_ln_final",
    "hooked_logits",
]

# block of the sweep: rows × vocabulary columns (about 1 MB of float32 logits: stays in a core's L2 cache)
_ROWS = 256
_COLS = 1024


def linear_unembedding(model: TLModel) -> tuple[Tensor, Tensor | None] | None:
    """``(W_U [d_model, d_vocab], b_U [d_vocab] or None)`` when the model's logits are ``ln_final(r) @ W_U +
    b_U`` in float32 or float64 (no logit soft cap); ``None`` otherwise (low precision: the matmuls of the
    plain path run in the model's dtype, which this sweep would not reproduce)."""
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


class _AnswerObjective(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        resid: Tensor,
        W_U: Tensor,
        b_U: Tensor | None,
        answers: Tensor,
        logprob: bool,
        keep: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        lp, pW, kept = _sweep(resid.detach(), W_U, b_U, answers, keep)
        prob = lp.exp()
        ctx.save_for_backward(prob, pW, W_U, answers)
        ctx.logprob = logprob
        out = prob.clone()  # the detached copy (the objective itself may be ``prob``)
        ctx.mark_non_differentiable(out, kept)
        return (lp if logprob else prob), out, kept

    @staticmethod
    def backward(
        ctx: Any, g: Tensor, _g_prob: Tensor, _g_kept: Tensor
    ) -> tuple[Tensor | None, ...]:
        prob, pW, W_U, answers = ctx.saved_tensors
        scale = g if ctx.logprob else g * prob
        grad = scale.unsqueeze(-1) * (W_U.t()[answers] - pW)
        return grad, None, None, None, None, None


@torch.no_grad()
def _sweep(
    r: Tensor, W: Tensor, b: Tensor | None, answers: Tensor, keep: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p_a [R], W_U p [R, d_model], logits [k, d_vocab])`` by blocks of rows and vocabulary columns;
    the logits are those of the rows ``keep [k]`` (none without it), copied out as the sweep passes them."""
    R, V = r.shape[0], W.shape[1]
    lp = r.new_empty(R)
    pW = r.new_empty(R, r.shape[1])
    keep = keep if keep is not None else torch.zeros(0, dtype=torch.long, device=r.device)
    kept = r.new_empty(keep.shape[0], V)
    W_t = W.t()  # [V, d_model] view
    for r0 in range(0, R, _ROWS):
        x = r[r0 : r0 + _ROWS]
        n = x.shape[0]
        sel = ((keep >= r0) & (keep < r0 + n)).nonzero().squeeze(-1)  # which kept rows lie in this block
        local = keep[sel] - r0
        m = x.new_full((n,), float("-inf"))
        s = x.new_zeros(n)
        acc = pW[r0 : r0 + n].zero_()
        for c0 in range(0, V, _COLS):
            Wc = W[:, c0 : c0 + _COLS]
            z = x @ Wc if b is None else torch.addmm(b[c0 : c0 + _COLS], x, Wc)
            if sel.numel():
                kept[sel, c0 : c0 + _COLS] = z[local]
            m_new = torch.maximum(m, z.amax(-1))
            rescale = torch.exp(m - m_new)  # exp(-inf) = 0 on the first block
            s.mul_(rescale)
            acc.mul_(rescale.unsqueeze(-1))
            e = z.sub_(m_new.unsqueeze(-1)).exp_()
            s.add_(e.sum(-1))
            acc.addmm_(e, W_t[c0 : c0 + _COLS])
            m = m_new
        a = answers[r0 : r0 + n]
        z_a = (x * W_t[a]).sum(-1)
        if b is not None:
            z_a = z_a + b[a]
        lp[r0 : r0 + n] = z_a - m - s.log()
        acc.div_(s.unsqueeze(-1))
    return lp, pW, kept


def answer_objective(
    resid: Float[Tensor, "rows d_model"],
    W_U: Float[Tensor, "_d_model d_vocab"],  # _: d_model and rows are checked below (InvalidInputError)
    b_U: Float[Tensor, " d_vocab"] | None,
    answers: Int[Tensor, " _rows"],
    objective: str = "prob",
) -> tuple[Float[Tensor, " rows"], Float[Tensor, " rows"]]:
    """``(objective, prob)`` of the answer tokens from the final (normalised) residual ``resid``:
    ``objective`` is the softmax probability (``"prob"``) or its log (``"logprob"``) of ``answers`` under
    the logits ``resid @ W_U + b_U``, differentiable w.r.t. ``resid``; ``prob`` is detached.

    Equals ``log_softmax(resid @ W_U + b_U).gather(answers)`` (and its ``exp``) and their gradients up to
    float rounding, with memory ``O(rows · d_model)`` instead of ``O(rows · d_vocab)``.
    """
    obj, prob, _ = answer_objective_and_logits(resid, W_U, b_U, answers, objective)
    return obj, prob


def answer_objective_and_logits(
    resid: Float[Tensor, "rows d_model"],
    W_U: Float[Tensor, "_d_model d_vocab"],  # _: d_model and rows are checked below (InvalidInputError)
    b_U: Float[Tensor, " d_vocab"] | None,
    answers: Int[Tensor, " _rows"],
    objective: str = "prob",
    logits_of: Int[Tensor, "..."] | None = None,
) -> tuple[Float[Tensor, " rows"], Float[Tensor, " rows"], Float[Tensor, "kept d_vocab"]]:
    """:func:`answer_objective`, plus the logits ``resid[logits_of] @ W_U + b_U`` (detached; ``logits_of`` of
    any shape, flattened: ``[logits_of.numel(), d_vocab]``, ``[0, d_vocab]`` without it), taken from the same
    sweep instead of a second pass over ``W_U``."""
    if objective not in ("prob", "logprob"):
        raise InvalidInputError(f"objective must be 'prob' or 'logprob', got {objective!r}")
    if resid.dim() != 2 or resid.shape[1] != W_U.shape[0] or answers.shape != resid.shape[:1]:
        raise InvalidInputError(
            f"answer_objective: resid [rows, d_model], W_U [d_model, d_vocab], answers [rows]; got "
            f"{tuple(resid.shape)}, {tuple(W_U.shape)}, {tuple(answers.shape)}"
        )
    if logits_of is not None:
        logits_of = logits_of.reshape(-1).to(device=resid.device, dtype=torch.long)
        if logits_of.numel() and not bool(((logits_of >= 0) & (logits_of < resid.shape[0])).all()):
            raise InvalidInputError(f"answer_objective: logits_of must index the {resid.shape[0]} rows")
    if resid.dtype != W_U.dtype:
        resid = resid.to(W_U.dtype)
    obj, prob, kept = _AnswerObjective.apply(resid, W_U, b_U, answers, objective == "logprob", logits_of)
    return obj, prob, kept


def sweep_unembedding(model: TLModel) -> tuple[Tensor, Tensor | None] | None:
    """``(W_U, b_U)`` when the grouped fast paths compute the objective with :func:`answer_objective` (on the
    CPU, with a plain float32/float64 unembedding: :func:`linear_unembedding`); ``None`` when they
    materialise the logits (on a GPU its blocks of ``_ROWS × _COLS`` would be launch-bound)."""
    if model_device(model).type != "cpu":
        return None
    return linear_unembedding(model)


def hooked_ln_final(model: TLModel, resid: Tensor) -> Tensor:
    """A HookedTransformer's ``ln_final`` of ``resid`` (``resid`` itself for a model without normalisation)."""
    return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def hooked_logits(model: TLModel, final: Tensor) -> Tensor:
    """A HookedTransformer's logits from the normalised final residual: ``final @ W_U + b_U`` (soft-capped
    where the model caps them); HT's own ``unembed`` copies ``W_U.T`` on every call."""
    logits = final @ model.W_U + model.b_U
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits
