"""Baselines for neuron IG: zero, user tensors, and the per-token masked baselines of SIG and AMIG.

**Masked-token baselines**. For a prompt x of n tokens with answer position t
(its last token) and each masked position j, run the model on x with token j replaced by the
*replacement token* (the tokenizer's EOS by default — AMIG's "architecture adaptation" for causal LMs,
which have no [MASK]) and read layer l's neuron vector at position t: that is ``b_j[l]``.
Masked positions are every real prompt position, except position 0 when it holds the BOS token and
``mask_bos=False`` (the default: BOS is not part of the query; on GPT-2 BOS = EOS, so masking it would be a
no-op anyway). A position whose token already equals the replacement token gives ``b_j = w̄``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.model import TLModel
from qloc_tl.methods.attribution.config import AttributionConfig

logger = logging.getLogger(__name__)

__all__ = [
    "replacement_token_id",
    "masked_positions",
    "masked_token_baselines",
    "masked_token_baselines_many",
    "fixed_baseline",
]


def replacement_token_id(model: TLModel, config: AttributionConfig) -> int:
    """The token that replaces each position for SIG/AMIG baselines: ``config.replacement_id`` or EOS."""
    rid: int | None
    if config.replacement_id is not None:
        rid = config.replacement_id
    else:
        tok = getattr(model, "tokenizer", None)
        rid = getattr(tok, "eos_token_id", None) if tok is not None else None
        if rid is None:
            raise InvalidInputError(
                f"method={config.method!r} replaces each prompt token by the EOS token, but the model has no "
                f"tokenizer with an eos_token_id; pass replacement_id=<token id>"
            )
    vocab = int(model.cfg.d_vocab)
    if not 0 <= int(rid) < vocab:
        raise InvalidInputError(f"replacement_id {rid} is out of range 0..{vocab - 1}")
    return int(rid)


def masked_positions(model: TLModel, row: Tensor, config: AttributionConfig) -> list[int]:
    """Positions of the 1-D prompt ``row`` (real tokens only) that get masked one at a time."""
    n = int(row.shape[0])
    start = 0
    if not config.mask_bos and n > 1:
        bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        if bos is not None and int(row[0]) == int(bos):
            start = 1
    return list(range(start, n))


def masked_variants(row: Tensor, positions: list[int], rid: int) -> Tensor:
    """``[len(positions), n]``: copies of ``row`` with one position each replaced by ``rid``."""
    v = row.unsqueeze(0).repeat(len(positions), 1)
    idx = torch.arange(len(positions), device=row.device)
    v[idx, torch.tensor(positions, device=row.device)] = rid
    return v


@torch.no_grad()
def masked_token_baselines(
    model: TLModel,
    row: Tensor,
    hook_names: dict[int, str],
    config: AttributionConfig,
    chunk: int = 64,
) -> Float[Tensor, "n_masked n_layers d_mlp"]:
    """Per-token masked baselines ``b_j[l]`` of one prompt (see the module docstring).

    Args:
        row: the prompt's real tokens ``[n]`` (the answer position is ``n − 1``).
        hook_names: ``{layer: hook name}`` for every layer whose baseline is needed; the result has
            ``n_layers = cfg.n_layers`` rows, unset layers are 0.
        chunk: how many masked variants to run per forward pass.
    """
    return masked_token_baselines_many(model, [row], hook_names, config, chunk=chunk)[0]


@torch.no_grad()
def masked_token_baselines_many(
    model: TLModel,
    rows: list[Tensor],
    hook_names: dict[int, str],
    config: AttributionConfig,
    chunk: int = 64,
) -> list[Float[Tensor, "n_masked n_layers d_mlp"]]:
    """:func:`masked_token_baselines` of several prompts, their masked variants sharing forward passes
    (right-padded: in a causal model the tokens after a prompt's answer position do not change it)."""
    rid = replacement_token_id(model, config)
    variants, ends = [], []
    for row in rows:
        variants.append(masked_variants(row, masked_positions(model, row, config), rid))
        ends.append(int(row.shape[0]) - 1)
    n_var = [v.shape[0] for v in variants]
    width = max(v.shape[1] for v in variants)
    # padding: the prompt's answer-position token (any real token would do; not BOS, which some tokenizers
    # also use as pad)
    flat = torch.cat(
        [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=int(r[-1])) for v, r in zip(variants, rows)]
    )
    at = torch.tensor([e for e, k in zip(ends, n_var) for _ in range(k)], device=flat.device)  # answer positions
    L = int(model.cfg.n_layers)
    names = list(hook_names.values())
    out = None
    for s in range(0, flat.shape[0], chunk):
        v = flat[s : s + chunk]
        _, cache = model.run_with_cache(v, names_filter=names)
        if out is None:
            d = cache[names[0]].shape[-1]
            out = torch.zeros(flat.shape[0], L, d, dtype=cache[names[0]].dtype, device=v.device)
        r = torch.arange(v.shape[0], device=v.device)
        for l, name in hook_names.items():
            out[s : s + v.shape[0], l] = cache[name][r, at[s : s + v.shape[0]]]
    assert out is not None
    return list(out.split(n_var))


def fixed_baseline(baseline: Any, n_layers: int, d_mlp: int, like: Tensor) -> Float[Tensor, "n_layers d_mlp"]:
    """Resolve ``"zero"`` or a ``[d_mlp]`` / ``[n_layers, d_mlp]`` tensor to ``[n_layers, d_mlp]``."""
    if isinstance(baseline, str):  # "zero"
        return torch.zeros(n_layers, d_mlp, dtype=like.dtype, device=like.device)
    b = baseline.to(dtype=like.dtype, device=like.device)
    if b.ndim == 1:
        if b.shape[0] != d_mlp:
            raise InvalidInputError(f"baseline has {b.shape[0]} entries but d_mlp={d_mlp}")
        return b.unsqueeze(0).expand(n_layers, d_mlp).clone()
    if tuple(b.shape) != (n_layers, d_mlp):
        raise InvalidInputError(
            f"baseline must be [d_mlp]={d_mlp} or [n_layers, d_mlp]={(n_layers, d_mlp)}, got {tuple(b.shape)}"
        )
    return b.clone()
