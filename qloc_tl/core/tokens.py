"""Tokenisation for every stage: prompts to right-padded token batches (BOS, padding, the last real position),
answers to token ids (whole objects, or their first token with ``multi_token="first"``), and P(answer) at a
position. Works with TL 3 and TL 4 models, with or without a tokenizer (token tensors are taken as they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.model import TLModel, model_device

__all__ = ["tokenize_prompts", "answer_probability", "to_tokens", "answer_token_id"]


def answer_probability(logits: Tensor, position: int, answer: int) -> Tensor:
    """``softmax(logits[:, position])[:, answer]`` per batch row, computed in float32 (float64 for float64
    logits) so that half-precision models do not lose the small probabilities."""
    if not isinstance(logits, Tensor) or logits.ndim != 3 or not logits.dtype.is_floating_point:
        raise InvalidInputError(
            f"logits must be a floating-point [batch, pos, d_vocab] tensor, got {getattr(logits, 'dtype', type(logits))} "
            f"of shape {tuple(getattr(logits, 'shape', ()))}"
        )
    if not -logits.shape[1] <= position < logits.shape[1] or not 0 <= answer < logits.shape[2]:
        raise InvalidInputError(
            f"position {position} / answer {answer} out of range for logits of shape {tuple(logits.shape)}"
        )
    x = logits[:, position]
    x = x.double() if x.dtype == torch.float64 else x.float()
    return x.softmax(-1)[:, answer]


def to_tokens(model: TLModel, text: str, prepend_bos: bool | None = None) -> Tensor:
    """``model.to_tokens`` for one string, never truncating silently (TL truncates to n_ctx by default)."""
    kw: dict[str, Any] = {"truncate": False}
    if prepend_bos is not None:
        kw["prepend_bos"] = prepend_bos
    try:
        return model.to_tokens(text, **kw)
    except TypeError:  # a TL version without `truncate`
        kw.pop("truncate")
        return model.to_tokens(text, **kw)


def _has_tokenizer(model: TLModel) -> bool:
    return getattr(model, "tokenizer", None) is not None


def _pad_id(model: TLModel) -> int:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and getattr(tok, "pad_token_id", None) is not None:
        return int(tok.pad_token_id)
    return 0


def _check_token_dtype(t: Tensor) -> None:
    dt = t.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise InvalidInputError(f"token tensors must hold integer token ids, got dtype {dt}")


def tokenize_prompts(
    model: TLModel,
    prompts: str | Tensor | Sequence[str | Tensor],
    *,
    prepend_bos: bool | None = None,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Tokenise prompts into a right-padded batch and the index of each prompt's last real token.

    Right padding is exact for causal models: positions after a prompt's last token cannot influence it,
    so reading each row at ``last[i]`` gives the same numbers as running the prompt alone.

    Args:
        model: a TL model (needs a tokenizer for string prompts).
        prompts: a string, a list of strings, a 1-D / 2-D token tensor, or a list of 1-D token tensors.
        prepend_bos: follows TL's convention (``None`` = the model's ``cfg.default_prepend_bos``); only used
            for strings.

    Returns:
        ``(tokens [batch, pos], last [batch])``.
    """
    device = model_device(model)
    if isinstance(prompts, Tensor):
        t = prompts
        _check_token_dtype(t)
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2:
            raise InvalidInputError(f"token tensor must be 1-D or 2-D, got shape {tuple(t.shape)}")
        if t.shape[1] == 0:
            raise InvalidInputError("empty prompt: the token tensor has no positions")
        rows: list[Any] = [r for r in t]
    else:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidInputError("no prompts given")
        rows = []
        for p in prompts:
            if isinstance(p, Tensor):
                _check_token_dtype(p)
                if p.ndim != 1 or p.numel() == 0:
                    raise InvalidInputError(f"each token tensor must be 1-D and non-empty, got {tuple(p.shape)}")
                rows.append(p)
            elif isinstance(p, str):
                if not p.strip():
                    raise InvalidInputError("empty prompt string; give the query text before the answer")
                if not _has_tokenizer(model):
                    raise InvalidInputError(
                        "model has no tokenizer, so string prompts cannot be tokenised; pass token-id tensors "
                        "or attach a tokenizer (boot_native(cfg, tokenizer=...) / HookedTransformer(cfg, tokenizer))"
                    )
                rows.append(to_tokens(model, p, prepend_bos)[0])
            else:
                raise InvalidInputError(f"prompt must be a string or a token tensor, got {type(p).__name__}")
    n_ctx = int(getattr(model.cfg, "n_ctx", 10**9) or 10**9)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if int(lengths.max()) > n_ctx:
        raise InvalidInputError(
            f"prompt of {int(lengths.max())} tokens is longer than the model's context n_ctx={n_ctx}; shorten it"
        )
    vocab = int(model.cfg.d_vocab)
    tokens = torch.full((len(rows), int(lengths.max())), _pad_id(model), dtype=torch.long)
    for i, r in enumerate(rows):
        r = r.to("cpu").long()
        if r.numel() and (int(r.max()) >= vocab or int(r.min()) < 0):
            raise InvalidInputError(f"token id out of range 0..{vocab - 1} in prompt {i}")
        tokens[i, : len(r)] = r
    return tokens.to(device), (lengths - 1).to(device)


def answer_token_id(
    model: TLModel,
    prompt: str | None,
    answer: str | int | Tensor,
    *,
    multi_token: Literal["error", "first"] = "error",
) -> int:
    """The token id of ``answer`` as the continuation of ``prompt``.

    Strings are tokenised as what follows the prompt: ``prompt + " " + answer`` is tokenised and the
    prompt's tokens are removed, which handles GPT-2's leading-space tokens, word-level tokenizers and BOS
    uniformly. When the prompt is not a token prefix of the joined text (rare), ``" " + answer`` is tokenised
    without BOS instead.

    Args:
        multi_token: ``"error"`` (default) raises when the answer is several tokens; ``"first"`` uses the
            first token (the convention of first-token probing).
    """
    if isinstance(answer, Tensor):
        if answer.numel() != 1:
            raise InvalidInputError(f"answer tensor must hold one token id, got shape {tuple(answer.shape)}")
        _check_token_dtype(answer)
        answer = int(answer.item())
    if isinstance(answer, int) and not isinstance(answer, bool):
        vocab = int(model.cfg.d_vocab)
        if not 0 <= answer < vocab:
            raise InvalidInputError(f"answer token id {answer} is out of range 0..{vocab - 1}")
        return answer
    if not isinstance(answer, str):
        raise InvalidInputError(f"answer must be a string or a token id, got {type(answer).__name__}")
    if not answer.strip():
        raise InvalidInputError("empty answer string")
    if not _has_tokenizer(model):
        raise InvalidInputError("model has no tokenizer: give the answer as a token id")
    ids: list[int] | None = None
    if prompt is not None:
        p = to_tokens(model, prompt)[0].tolist()
        full = to_tokens(model, prompt.rstrip() + " " + answer.strip())[0].tolist()
        if full[: len(p)] == p and len(full) > len(p):
            ids = full[len(p) :]
    if ids is None:
        ids = to_tokens(model, " " + answer.strip(), prepend_bos=False)[0].tolist()
    if not ids:
        raise InvalidInputError(f"answer {answer!r} tokenises to nothing")
    unk = getattr(getattr(model, "tokenizer", None), "unk_token_id", None)
    if unk is not None and unk in ids:
        raise InvalidInputError(f"answer {answer!r} is not in the model's vocabulary (tokenises to the unknown token)")
    if len(ids) > 1 and multi_token == "error":
        raise InvalidInputError(
            f"answer {answer!r} is {len(ids)} tokens {ids}; pass multi_token='first' to use its first token"
        )
    if multi_token not in ("error", "first"):
        raise InvalidInputError(f"multi_token must be 'error' or 'first', got {multi_token!r}")
    return int(ids[0])
