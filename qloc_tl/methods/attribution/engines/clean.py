"""The clean pass of an attribution call: tokens, clean activations ``w̄``, the answer-position logits and
objective, and what the fast engines start from (residuals, TL 3 prefix keys and values)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from qloc_tl.core.errors import NumericalError
from qloc_tl.core.memory import memory_cap, run_chunked
from qloc_tl.core.model import (
    TLModel,
    check_layer,
    d_mlp,
    logit_tolerance,
    logits_mismatch,
    model_dtype,
    n_layers,
    neuron_hook_name,
)
from qloc_tl.core.tokens import tokenize_prompts
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines.base import acc_dtype, check_finite, objective_of_logits
from qloc_tl.methods.attribution.engines.cache import ENGINE_CACHE
from qloc_tl.methods.attribution.engines.unembed import hooked_ln_final

logger = logging.getLogger(__name__)

__all__ = ["CleanPass", "clean_pass", "check_activations", "CLEAN_CHUNK", "CLEAN_ELEMENTS", "PREFIX_KV_ELEMENTS"]

CLEAN_CHUNK = 256
"""At most this many prompts per clean forward pass."""
CLEAN_ELEMENTS = {"cpu": 1 << 25, "other": 1 << 28}
"""About this many elements of logits and cached activations per clean pass, per device type (a GPU pass is
launch-bound, so it takes more prompts at once), or fewer where ``config.memory_fraction`` of the free memory
holds fewer (:func:`~qloc_tl.core.memory.memory_cap`)."""
PREFIX_KV_ELEMENTS = 1 << 24
"""TL 3 prefix-reusing paths on models with learned absolute positions: the prefixes' keys and values are
kept from the clean pass (``hook_k`` / ``hook_v``) for the first prompts of a call while they take at most
this many elements; the prompts after them get their prefix cache from a forward pass of its own."""


@dataclass
class CleanPass:
    """What the clean pass found, per prompt (``n`` prompts, right-padded to ``pos`` tokens)."""

    tokens: Int[Tensor, "n pos"]
    last: Int[Tensor, " n"]  # the answer position (the last real prompt token)
    answers: Int[Tensor, " n"]
    layers: list[int]  # the requested layers
    names: dict[int, str]  # layer -> the neuron hook name at the requested site
    acts: Float[Tensor, "n n_layers d_mlp"]  # w̄, model dtype
    clean_last_logits: Float[Tensor, "n d_vocab"]
    clean_obj: Tensor
    clean_prob: Tensor
    resid_last: dict[int, Tensor]  # layer -> [n, d_model] resid_pre at the answer position (blockwise paths)
    resid_rows: Tensor | None  # [n, pos, d_model] resid_pre of the lowest requested layer (bridge blockwise path)
    resid_post: dict[int, Tensor]  # layer -> [n, d_model] resid_post at the answer position (MLP-out shortcut)
    # (keys, values) per layer [n_kept, pos, n_kv_heads, d_head] of the clean pass (right-padded, all positions)
    # for the first n_kept prompts (TL 3 prefix caches); None: not kept
    prefix_kv: tuple[list[Tensor], list[Tensor]] | None = None


def _affine_unembed_key(model: TLModel) -> Any:
    """The module the unembedding check of :func:`clean_pass` is remembered for, or ``None`` (never skip the
    model's own unembedding) when it or one of its hook points (``unembed.hook_in`` / ``hook_out``) carries a
    hook, or it has an instance-level ``forward``."""
    mod = getattr(model, "unembed", None)
    if not isinstance(mod, torch.nn.Module) or "forward" in vars(mod):
        return None
    for m in mod.modules():
        if any(getattr(m, h, None) for h in ("_forward_hooks", "_forward_pre_hooks")):
            return None
    return mod


def _last_logits_by_map(model: TLModel, resid_post: Tensor, unembed: tuple[Tensor, Tensor | None]) -> Tensor:
    """``ln_final(resid_post) @ W_U + b_U`` for ``resid_post [R, d_model]`` (the last block's output)."""
    final = hooked_ln_final(model, resid_post)
    W_U, b_U = unembed
    return final.to(W_U.dtype) @ W_U + (b_U if b_U is not None else 0.0)


def check_activations(acts: Tensor, names: dict[int, str], model: TLModel) -> None:
    """Raise :class:`~qloc_tl.core.errors.NumericalError` naming the first layer whose clean activations
    ``acts [n, n_layers, d_mlp]`` (hooks ``names``) hold inf/NaN."""
    if bool(torch.isfinite(acts).all()):
        return
    bad = (~torch.isfinite(acts)).transpose(0, 1).reshape(acts.shape[1], -1).any(1).nonzero().flatten().tolist()
    first, dtype = int(bad[0]), model_dtype(model)
    if dtype in (torch.float16, torch.bfloat16):
        advice = (
            "half-precision activations overflow easily: run the attribution in float32 (model.to(torch.float32))"
        )
    else:
        advice = "check the model's weights (inf/NaN parameters) and any hook or intervention on it"
    raise NumericalError(
        f"clean activations became inf/NaN at layer {first} ({names[first]!r}; non-finite layers: {bad}; model "
        f"dtype {dtype}); {advice}"
    )


def clean_pass(
    model: TLModel,
    plist: list[Any],
    ids: list[int],
    config: AttributionConfig,
    want_resid: bool = False,
    want_rows: bool = False,
    unembed: tuple[Tensor, Tensor | None] | None = None,
    want_post: bool = False,
    want_kv: bool = False,
) -> CleanPass:
    """The clean forward pass of the prompts ``plist`` with answer ids ``ids``, in chunks
    (:data:`CLEAN_CHUNK`, :data:`CLEAN_ELEMENTS`), halved and retried after an out-of-memory error
    (:func:`~qloc_tl.core.memory.run_chunked`). Non-finite clean activations raise
    :class:`~qloc_tl.core.errors.NumericalError` naming their first layer (:func:`check_activations`), as do
    non-finite clean logits.

    ``want_resid`` / ``want_rows`` / ``want_post``: keep the residuals the blockwise paths start from
    (:class:`CleanPass`).

    ``unembed`` (``(W_U, b_U)``, TL 3 prefix-reusing paths on the CPU only): the clean logits at the
    answer position are then ``ln_final(resid_post) @ W_U + b_U`` of that position alone, and the model's own
    unembedding — all positions, and in HookedTransformer a ``W_U.T.contiguous()`` copy per call — is
    skipped. That this map *is* the model's unembedding is checked against the model's own logits on the
    first such call and remembered per ``model.unembed`` module (:class:`~.cache.EngineCache`; a replaced
    module is checked again; one with a hook, also on ``unembed.hook_out``, or an instance-level ``forward``
    always keeps the plain clean pass, as does a model that fails the check).

    ``want_kv`` (TL 3 prefix-reusing paths, learned absolute positions): the keys and values of every block
    (``hook_k`` / ``hook_v``, what TL's KV cache stores) are kept for the first prompts, within
    :data:`PREFIX_KV_ELEMENTS`, so that their prefix caches need no forward pass of their own.
    """
    tokens, last = tokenize_prompts(model, plist, prepend_bos=config.prepend_bos)
    L = n_layers(model)
    layers = list(config.layers) if config.layers is not None else list(range(L))
    for l in layers:
        check_layer(model, l)
    names = {l: neuron_hook_name(model, l, config.site) for l in range(L)}
    resid_names = {l: f"blocks.{l}.hook_resid_pre" for l in layers} if want_resid or want_rows else {}
    post_names = {l: f"blocks.{l}.hook_resid_post" for l in layers} if want_post else {}
    key = _affine_unembed_key(model) if unembed is not None else None
    if key is None or ENGINE_CACHE.affine_unembed(key) is False:
        unembed = None
    final_name = f"blocks.{L - 1}.hook_resid_post"
    extra = [final_name] if unembed is not None else []
    kv_names = [(f"blocks.{l}.attn.hook_k", f"blocks.{l}.attn.hook_v") for l in range(L)] if want_kv else []
    n_kv = 0  # prompts whose keys and values are kept
    if kv_names:
        kv_heads = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
        per = 2 * L * tokens.shape[1] * int(kv_heads) * int(model.cfg.d_head)
        n_kv = min(tokens.shape[0], PREFIX_KV_ELEMENTS // max(1, per))
    keys_l: list[list[Tensor]] = [[] for _ in kv_names]
    values_l: list[list[Tensor]] = [[] for _ in kv_names]
    acc = acc_dtype(model)
    answers = torch.tensor(ids, dtype=torch.long, device=tokens.device)
    acts_l, resid_l, post_l, last_l, rows_l = [], [], [], [], []
    with torch.no_grad():
        # bounded [chunk, pos, d_vocab] logits and cache; tiny models: one pass for many prompts (a forward
        # pass has a fixed cost of its own, large next to a tiny model's work)
        per_prompt = tokens.shape[1] * (int(model.cfg.d_vocab) + L * (d_mlp(model) + 3 * int(model.cfg.d_model)))
        dev = tokens.device
        elem = torch.finfo(acc).bits // 8
        budget = CLEAN_ELEMENTS["cpu" if dev.type == "cpu" else "other"]
        budget = memory_cap(budget, elem, dev, config.memory_fraction)  # or fewer, where the free memory is short
        chunk = max(1, min(CLEAN_CHUNK, budget // per_prompt))

        def step(c0: int, c1: int) -> None:
            """The clean pass of prompts ``c0:c1``; what it keeps is stored last (a chunk that ran out of
            memory is run again, smaller)."""
            nonlocal unembed, extra
            toks, pos = tokens[c0:c1], last[c0:c1]
            skip = unembed is not None and ENGINE_CACHE.affine_unembed(key) is True
            kv = [n for pair in kv_names for n in pair] if c0 < n_kv else []
            logits, cache = model.run_with_cache(
                toks,
                names_filter=[*names.values(), *resid_names.values(), *post_names.values(), *extra, *kv],
                **({"return_type": None} if skip else {}),
            )
            keep = min(toks.shape[0], n_kv - c0)
            kept = [(cache[kn][:keep], cache[vn][:keep]) for kn, vn in kv_names] if kv else []
            rows = torch.arange(toks.shape[0], device=toks.device)
            acts = torch.stack([cache[names[l]][rows, pos] for l in range(L)], dim=1)
            resid = {l: cache[n][rows, pos] for l, n in resid_names.items()}
            post = {l: cache[n][rows, pos] for l, n in post_names.items()}
            full_rows = cache[resid_names[min(layers)]] if want_rows else None
            if unembed is not None:
                by_map = _last_logits_by_map(model, cache[final_name][rows, pos], unembed)
                if not skip:  # the first call on this module: is the map the model's own unembedding?
                    own = logits[rows, pos].to(by_map.dtype)
                    err = logits_mismatch(by_map, own)
                    ok = err <= logit_tolerance(model_dtype(model))
                    ENGINE_CACHE.remember_affine_unembed(key, ok)
                    if not ok:
                        logger.info("clean logits: the model's unembedding is not ln_final(r) @ W_U + b_U")
                        by_map, unembed, extra = own, None, []
                last_logits = by_map
            else:
                last_logits = logits[rows, pos]
            del logits, cache
            for l, (k, v) in enumerate(kept):
                keys_l[l].append(k)
                values_l[l].append(v)
            acts_l.append(acts)
            resid_l.append(resid)
            post_l.append(post)
            if full_rows is not None:
                rows_l.append(full_rows)
            last_l.append(last_logits)

        run_chunked(
            tokens.shape[0],
            chunk,
            step,
            what="prompts",
            advice=(
                f"the clean forward pass of one prompt of {tokens.shape[1]} tokens does not fit on {dev}: shorten "
                f"the prompt, free memory, or load the model in a smaller dtype (torch.bfloat16)"
            ),
            device=dev,
        )
        acts = torch.cat(acts_l)
        resid = {l: torch.cat([r[l] for r in resid_l]) for l in resid_names}
        post = {l: torch.cat([r[l] for r in post_l]) for l in post_names}
        clean_last = torch.cat(last_l)
        resid_rows = torch.cat(rows_l) if want_rows else None
        obj, prob = objective_of_logits(clean_last, answers, config.objective, acc)
        prefix_kv = ([torch.cat(k) for k in keys_l], [torch.cat(v) for v in values_l]) if n_kv else None
    check_activations(acts, names, model)
    check_finite(clean_last, "clean logits", model)
    return CleanPass(
        tokens, last, answers, layers, names, acts, clean_last, obj, prob, resid, resid_rows, post, prefix_kv
    )
