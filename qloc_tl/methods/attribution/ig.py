"""Integrated-gradients attribution of MLP neurons: IG (Dai et al.), SIG (Enguehard) and AMIG (Chen et al.).

What is computed (method_spec §2.1–2.4). For a prompt with answer token y and answer position t (the last
real prompt token), layer l and the clean neuron vector ``w̄ = act_l[t]`` (at ``site``: ``hook_post`` by
default), let ``F(x)`` be the objective — ``P(y | prompt)`` (``objective="prob"``, default; Dai) or
``log P`` — computed with layer l's neurons *at position t only* replaced by ``x``; everything upstream, and
every other position, keeps its clean value. With quadrature nodes/weights ``(α_k, w_k)``
(:mod:`~qloc_tl.methods.attribution.quadrature`) and the path ``x(α) = b + α (w̄ − b)``:

* **IG** (``method="ig"``): ``G = Σ_k w_k ∇F(x(α_k)) ≈ ∫_0^1 ∇F(x(α)) dα`` and
  ``attr_l = (w̄ − b) ⊙ G`` (``multiply_by="difference"``, default) or ``w̄ ⊙ G`` (``"activation"``).
  b is zero by default (Dai) or a user tensor ``[d_mlp]`` / ``[n_layers, d_mlp]``.
* **SIG** (``method="sig"``, the proposed neuron adaptation of spec §2.3): for each masked position j
  (:mod:`~qloc_tl.methods.attribution.baselines`) the baseline ``b_j`` is layer l's activation at t when token j is
  replaced by EOS; IG is run from every ``b_j`` to w̄ and the attributions are **averaged**:
  ``attr_l = mean_j (w̄ − b_j) ⊙ G_j``. Cost: n_masked × steps samples per layer.
* **AMIG** (``method="amig"``, Chen et al. 2024 code): the same per-token baselines, but the **paths** are
  averaged, i.e. one straight path from the mean baseline ``b̄ = mean_j b_j``, and the result is multiplied by
  the activation: ``attr_l = w̄ ⊙ G(b̄)`` (``multiply_by="activation"``, the default for AMIG, as in the
  authors' code) or ``(w̄ − b̄) ⊙ G(b̄)`` (``"difference"``, textbook IG from b̄).

Each layer is attributed separately ("layer-wise IG"): only one layer is scaled at a time.
Completeness: for IG/SIG (and AMIG with ``"difference"``), ``Σ_i attr_l[i] → F(w̄) − F(b)`` (SIG: the mean of
``F(b_j)``) as the quadrature error vanishes; :attr:`NeuronAttribution.completeness_delta` reports the gap.

Engines (``implementation=``):

* ``"reference"`` — per prompt, per layer, per path, a plain full forward of the repeated prompt in chunks of
  ``batch_size`` steps with a hook that replaces position t at layer l, then ``torch.autograd.grad`` of the
  summed objective w.r.t. the injected activations. Obviously correct, slow; the oracle of the tests.
* ``"fast"`` (default) — the answer position is the last token, and in a causal model every earlier
  position's keys/values are unchanged when layer l's neurons at t change, so only position t has to be
  recomputed per sample. Samples of several layers share one pass (a hook per layer overwrites its rows).
  Four paths, picked per backend (from :func:`~qloc_tl.core.model.capabilities`) and validated once per call
  against the clean logits (unedited samples at the first chunk's lowest and highest layer, compared
  relative to the logits' scale by :func:`~qloc_tl.core.model.logits_mismatch`; on a mismatch the next path).
  Whenever a call runs slower than the model's normal schedule — a capability probe or a validation failed,
  or hooks on the model keep the MLP-out shortcut off — one WARNING per model names the path taken and why.
  The paths:

  - ``"kv-hooked"`` (TL 3 ``HookedTransformer``, :class:`_HookedKVEvaluator`): blockwise. The prefixes of
    the prompts of a pass go once into TL's KV cache; then one block per call on the answer token only
    (``start_at_layer=j, stop_at_layer=j + 1``), the samples of layer l joining the batch at block l with the
    clean residual of position t, so no sample computes a layer below its own.
  - ``"blockwise"`` (HF-backed TL 4 ``TransformerBridge``, :class:`_BlockwiseEvaluator`): the same schedule
    driven through ``model.blocks[j]`` on packed rows (a prompt's prefix, then one copy of the answer token
    per sample, a 4-D mask and explicit position ids; the block call is captured by :class:`_BlockCall`).
    TL 4.3 bridges keep no KV cache, so the prefix is recomputed at each block. On TL 3
    ``HookedTransformer`` with learned absolute positions (GPT-2 and its family; :func:`_rows_layout_ok`)
    the copies of a prompt run as one sequence through ``model.blocks[j]``, its prefix in TL's KV cache and
    the rest of the layout mask added by a ``hook_attn_scores`` hook (:class:`_HookedBlockwiseEvaluator`):
    the default there when ``n_ctx`` leaves room, faster than ``"kv-hooked"``, which it falls back to.
  - ``"packed"`` (fallback on HF-backed bridges): the packed rows through the bridge's normal forward.
  - ``"full"`` (fallback: native bridges, which ignore 4-D masks): rows of the repeated prompt, batched.

  With ``site="post"`` the blockwise paths let the samples of layer l join at block l + 1, with the clean
  residual after block l plus ``(x − w̄_l) @ W_out_l`` (the MLP-out shortcut of :class:`_GroupedEvaluator`,
  checked on the first pass of every call by probes that run block l the plain way), so block l's attention
  and MLP input projection are not computed for them.

  On the CPU the blockwise paths compute the objective and its gradient from the final residual without
  materialising the ``[samples, d_vocab]`` logits (:func:`~qloc_tl.methods.attribution.unembed.answer_objective`,
  a blocked sweep over the vocabulary) when the unembedding is a plain float32/float64 affine map.

  The fast paths also compute a tanh-GELU (``gelu_new``: GPT-2 and its family) with torch's fused kernel
  instead of the model's op-by-op formula (:mod:`~qloc_tl.methods.attribution.fused`; the same function, rounding
  differences only), and on TL 3 ``HookedTransformer`` (CPU) store the attention and gated-MLP weights in
  the order the components multiply by, so their per-call rearrangement copies become views
  (:mod:`~qloc_tl.methods.attribution.layout`; bitwise the same results). The reference runs the model's own modules
  untouched.

Parameters are frozen (``requires_grad_(False)``) for the duration of the call and restored afterwards; all
hooks are scoped with TL's ``model.hooks(...)`` and removed even on error, and swapped activations and
weights are put back.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from qloc_tl.core.errors import CapabilityError, InvalidInputError, NumericalError
from qloc_tl.core.model import (
    answer_token_id,
    capabilities,
    check_layer,
    check_model,
    d_mlp,
    frozen_parameters,
    hooked_kv_cache,
    logit_tolerance,
    logits_mismatch,
    mode_key,
    model_device,
    model_dtype,
    n_layers,
    neuron_hook_name,
    require_eval,
    tokenize_prompts,
)
from qloc_tl.methods.attribution.baselines import fixed_baseline, masked_token_baselines_many
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.fused import _has_hooks, fused_activations, fused_layer_norms
from qloc_tl.methods.attribution.layout import matmul_ready_weights
from qloc_tl.methods.attribution.quadrature import quadrature
from qloc_tl.methods.attribution.results import NeuronAttribution
from qloc_tl.methods.attribution.unembed import answer_objective_and_logits, linear_unembedding

logger = logging.getLogger(__name__)

__all__ = ["attribute_neurons"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _acc_dtype(model: Any) -> torch.dtype:
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def _tolerance(dtype: torch.dtype) -> float:
    """The relative mismatch (:func:`~qloc_tl.core.model.logits_mismatch`: ``max|Δ| / (1 + max|logits|)``) a fast
    path, the clean pass's map and the MLP-out shortcut may show: :func:`~qloc_tl.core.model.logit_tolerance`, the
    same as the capability probes'."""
    return logit_tolerance(dtype)


def _objective(
    logits_last: Tensor, answers: Tensor, objective: str, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(objective [S], prob [S])`` of answer tokens from last-position logits ``[S, V]``."""
    lp = torch.log_softmax(logits_last.to(acc), dim=-1)
    lp_y = lp.gather(-1, answers.view(-1, 1)).squeeze(-1)
    prob = lp_y.exp()
    return (prob if objective == "prob" else lp_y), prob


def _sweep_unembedding(model: Any) -> tuple[Tensor, Tensor | None] | None:
    """``(W_U, b_U)`` when the grouped paths compute the objective with
    :func:`~qloc_tl.methods.attribution.unembed.answer_objective` (on CPU, with a plain float32/float64
    unembedding); ``None`` when they materialise the logits (on a GPU its blocks of 256 × 1024 would be
    launch-bound; not measured there)."""
    if model_device(model).type != "cpu":
        return None
    return linear_unembedding(model)


def _check_finite(t: Tensor, what: str, model: Any) -> None:
    # one reduction first: an inf/NaN makes the sum non-finite; a sum that overflows from finite values goes on
    # to the element-wise test, which decides
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise NumericalError(
            f"{what} became inf/NaN (model dtype {model_dtype(model)}); fp16 activations overflow easily — run "
            f"the attribution in bfloat16 or float32 (model.to(torch.float32))"
        )


def _normalise_inputs(
    model: Any, prompts: Any, answers: Any, config: AttributionConfig
) -> tuple[list[Any], list[int], bool]:
    single = isinstance(prompts, str) or (isinstance(prompts, Tensor) and prompts.ndim == 1)
    if single:
        plist: list[Any] = [prompts]
    elif isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise InvalidInputError(
                f"token tensor prompts must be 1-D or 2-D, got shape {tuple(prompts.shape)}"
            )
        plist = list(prompts)
    else:
        plist = list(prompts)
    if not plist:
        raise InvalidInputError("no prompts given")
    if isinstance(answers, (str, int)) or (isinstance(answers, Tensor) and answers.numel() == 1 and single):
        alist: list[Any] = [answers]
    elif isinstance(answers, Tensor):
        alist = [int(a) for a in answers.reshape(-1)]
    else:
        alist = list(answers)
    if len(alist) == 1 and len(plist) > 1 and isinstance(answers, (str, int)):
        raise InvalidInputError(
            f"got {len(plist)} prompts but a single answer; pass a list of {len(plist)} answers (one per prompt)"
        )
    if len(alist) != len(plist):
        raise InvalidInputError(
            f"got {len(plist)} prompts but {len(alist)} answers; give one answer per prompt"
        )
    ids = [
        answer_token_id(model, p if isinstance(p, str) else None, a, multi_token=config.multi_token)
        for p, a in zip(plist, alist)
    ]
    return plist, ids, single


_CLEAN_CHUNK = 256  # at most this many prompts per clean forward pass
# and about this many elements of logits and cached activations per pass (a GPU pass is launch-bound: the
# LLaMA-3-8B shape gets 17 prompts of 16 tokens per pass there, 2 on the CPU)
_CLEAN_ELEMENTS = {"cpu": 1 << 25, "other": 1 << 28}
_BLOCKWISE_BATCH = 512  # samples per blockwise chunk (bounds the activations and, without the sweep, the logits)
# blockwise paths (TL 4 and TL 3): prompts per pass. Measured on TL 4, one CPU thread (2026-11-26):
# * with the unembedding sweep (CPU, float32/64: no [samples, d_vocab] logits) the per-pass overhead is what
#   grouping saves, so prompts join a pass while its samples · d_model · d_mlp stays below _GROUP_WORK, at most
#   _GROUP_MAX_SWEEP: 4-layer d128 GPT-2 with V 50257, 73 -> 54 ms/query (1 -> 16 prompts per pass); built-in
#   model 36 -> 17 ms (1 -> 16), 18.5 ms with 32; LLaMA 8L d512 579 -> 427 ms (1 -> 2), 419 ms with 4; the
#   GPT-2-small shape (6e8 per prompt) gains nothing (1 853 / 2 013 / 1 914 ms with 1 / 2 / 4);
# * otherwise (GPU, low precision) while the [prompts, samples, d_vocab] logits stay below _GROUP_LOGITS
#   elements, at most _GROUP_MAX (on CPU, before the sweep: GPT-2-small with 4 prompts per pass was 1.35x
#   slower, the element-wise work on [G, S, d_vocab] falling out of cache).
_GROUP_WORK = 4e8
_GROUP_MAX_SWEEP = 32
_GROUP_LOGITS = {"cpu": 1 << 23, "other": 1 << 27}
_GROUP_MAX = 64
# TL 3 prefix-reusing paths on models with learned absolute positions: the prefixes' keys and values are kept
# from the clean pass (hook_k / hook_v) for the first prompts of a call while they take at most this many
# elements; the prompts after them get their prefix cache from a forward pass of its own
_PREFIX_KV_ELEMENTS = 1 << 24
_MIN_PACKED_ROOM = 2  # "packed" only when the context has room for this many copies after the prompt
# blockwise paths with site="post": samples of layer l join after block l (:class:`_GroupedEvaluator`); turned
# off only by the tests and by side-by-side timings of what it saves
_MLP_SHORTCUT = True


def _longest(model: Any, plist: list[Any], config: AttributionConfig) -> int:
    from qloc_tl.core.model import tokenize_prompts

    # tokenize_prompts validates (tokenizer present, non-empty, fits n_ctx) before anything else runs
    _, last = tokenize_prompts(model, plist, prepend_bos=config.prepend_bos)
    return int(last.max()) + 1


@dataclass
class _Prepared:
    tokens: Int[Tensor, "n pos"]
    last: Int[Tensor, " n"]
    answers: Int[Tensor, " n"]
    layers: list[int]
    names: dict[int, str]
    acts: Float[Tensor, "n n_layers d_mlp"]  # model dtype
    clean_last_logits: Float[Tensor, "n d_vocab"]
    clean_obj: Tensor
    clean_prob: Tensor
    resid_last: dict[int, Tensor]  # layer -> [n, d_model] resid_pre at the answer position (blockwise paths)
    resid_rows: Tensor | None  # [n, pos, d_model] resid_pre of the lowest requested layer (bridge blockwise path)
    resid_post: dict[int, Tensor]  # layer -> [n, d_model] resid_post at the answer position (MLP-out shortcut)
    # (keys, values) per layer [n_kept, pos, n_kv_heads, d_head] of the clean pass (right-padded, all positions)
    # for the first n_kept prompts (TL 3 prefix caches, :func:`_hooked_prefix_cache`); None: not kept
    prefix_kv: tuple[list[Tensor], list[Tensor]] | None = None


# unembedding modules (HookedTransformer ``model.unembed``) whose model's logits were found equal to
# ``ln_final(resid) @ W_U + b_U`` (True) or not (False) on a first kv-hooked call; see :func:`_prepare`
_AFFINE_UNEMBED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _affine_unembed_key(model: Any) -> Any:
    """The module the check of :func:`_prepare` is remembered for, or ``None`` (never skip the model's own
    unembedding) when it or one of its hook points (``unembed.hook_in`` / ``hook_out``) carries a hook, or it
    has an instance-level ``forward``."""
    mod = getattr(model, "unembed", None)
    if not isinstance(mod, torch.nn.Module) or "forward" in vars(mod):
        return None
    for m in mod.modules():
        if any(getattr(m, h, None) for h in ("_forward_hooks", "_forward_pre_hooks")):
            return None
    return mod


def _hooked_ln_final(model: Any, resid: Tensor) -> Tensor:
    """A HookedTransformer's ``ln_final`` of ``resid`` (``resid`` itself for a model without normalisation)."""
    return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def _last_logits_by_map(model: Any, resid_post: Tensor, unembed: tuple[Tensor, Tensor | None]) -> Tensor:
    """``ln_final(resid_post) @ W_U + b_U`` for ``resid_post [R, d_model]`` (the last block's output)."""
    final = _hooked_ln_final(model, resid_post)
    W_U, b_U = unembed
    return final.to(W_U.dtype) @ W_U + (b_U if b_U is not None else 0.0)


def _prepare(
    model: Any,
    plist: list[Any],
    ids: list[int],
    config: AttributionConfig,
    want_resid: bool,
    want_rows: bool,
    unembed: tuple[Tensor, Tensor | None] | None = None,
    want_post: bool = False,
    want_kv: bool = False,
) -> _Prepared:
    """The clean pass: tokens, clean activations, answer-position logits and objective, and the residuals the
    blockwise paths start from.

    ``unembed`` (``(W_U, b_U)``, TL 3 kv-hooked path with the CPU sweep only): the clean logits at the answer
    position are then ``ln_final(resid_post) @ W_U + b_U`` of that position alone, and the model's own
    unembedding — all positions, and in HookedTransformer a ``W_U.T.contiguous()`` copy per call (≈ 0.2 s on
    GPT-2 small) — is skipped. That this map *is* the model's unembedding is checked against the model's own
    logits on the first such call, and remembered per ``model.unembed`` module (a replaced module is checked
    again; one with a hook, also on ``unembed.hook_out``, or an overridden ``forward`` always keeps the plain
    clean pass, as does a model that fails the check).

    ``want_kv`` (TL 3 prefix-reusing paths, learned absolute positions): the keys and values of every block
    (``hook_k`` / ``hook_v``, what TL's KV cache stores) are kept for the first prompts, within
    ``_PREFIX_KV_ELEMENTS``, so that their prefix caches need no forward pass of their own
    (:func:`_hooked_prefix_cache`).
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
    if key is None or _AFFINE_UNEMBED.get(key) is False:
        unembed = None
    final_name = f"blocks.{L - 1}.hook_resid_post"
    extra = [final_name] if unembed is not None else []
    kv_names = [(f"blocks.{l}.attn.hook_k", f"blocks.{l}.attn.hook_v") for l in range(L)] if want_kv else []
    n_kv = 0  # prompts whose keys and values are kept
    if kv_names:
        kv_heads = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
        per = 2 * L * tokens.shape[1] * int(kv_heads) * int(model.cfg.d_head)
        n_kv = min(tokens.shape[0], _PREFIX_KV_ELEMENTS // max(1, per))
    keys_l: list[list[Tensor]] = [[] for _ in kv_names]
    values_l: list[list[Tensor]] = [[] for _ in kv_names]
    acc = _acc_dtype(model)
    answers = torch.tensor(ids, dtype=torch.long, device=tokens.device)
    acts_l, resid_l, post_l, last_l, rows_l = [], [], [], [], []
    with torch.no_grad():
        # bounded [chunk, pos, d_vocab] logits and cache; tiny models: one pass for many prompts (a pass of a
        # TL 4 bridge costs ~5 ms of its own on the 4-layer d128 model)
        per_prompt = tokens.shape[1] * (int(model.cfg.d_vocab) + L * (d_mlp(model) + 3 * int(model.cfg.d_model)))
        budget = _CLEAN_ELEMENTS["cpu" if tokens.device.type == "cpu" else "other"]
        chunk = max(1, min(_CLEAN_CHUNK, budget // per_prompt))
        for c0 in range(0, tokens.shape[0], chunk):
            toks, pos = tokens[c0 : c0 + chunk], last[c0 : c0 + chunk]
            skip = unembed is not None and _AFFINE_UNEMBED.get(key) is True
            kv = [n for pair in kv_names for n in pair] if c0 < n_kv else []
            logits, cache = model.run_with_cache(
                toks,
                names_filter=[*names.values(), *resid_names.values(), *post_names.values(), *extra, *kv],
                **({"return_type": None} if skip else {}),
            )
            if kv:
                keep = min(toks.shape[0], n_kv - c0)
                for l, (kn, vn) in enumerate(kv_names):
                    keys_l[l].append(cache[kn][:keep])
                    values_l[l].append(cache[vn][:keep])
            rows = torch.arange(toks.shape[0], device=toks.device)
            acts_l.append(torch.stack([cache[names[l]][rows, pos] for l in range(L)], dim=1))
            resid_l.append({l: cache[n][rows, pos] for l, n in resid_names.items()})
            post_l.append({l: cache[n][rows, pos] for l, n in post_names.items()})
            if want_rows:
                rows_l.append(cache[resid_names[min(layers)]])
            if unembed is not None:
                by_map = _last_logits_by_map(model, cache[final_name][rows, pos], unembed)
                if not skip:  # the first call on this model: is the map the model's own unembedding?
                    own = logits[rows, pos].to(by_map.dtype)
                    err = logits_mismatch(by_map, own)
                    _AFFINE_UNEMBED[key] = ok = err <= _tolerance(model_dtype(model))
                    if not ok:
                        logger.info("clean logits: the model's unembedding is not ln_final(r) @ W_U + b_U")
                        by_map, unembed, extra = own, None, []
                last_l.append(by_map)
            else:
                last_l.append(logits[rows, pos])
            del logits, cache
        acts = torch.cat(acts_l)
        resid = {l: torch.cat([r[l] for r in resid_l]) for l in resid_names}
        post = {l: torch.cat([r[l] for r in post_l]) for l in post_names}
        clean_last = torch.cat(last_l)
        resid_rows = torch.cat(rows_l) if want_rows else None
        obj, prob = _objective(clean_last, answers, config.objective, acc)
        prefix_kv = ([torch.cat(k) for k in keys_l], [torch.cat(v) for v in values_l]) if n_kv else None
    _check_finite(clean_last, "clean logits", model)
    return _Prepared(
        tokens, last, answers, layers, names, acts, clean_last, obj, prob, resid, resid_rows, post, prefix_kv
    )


# --------------------------------------------------------------------------------------------------
# evaluators: F and ∇F for a chunk of samples of one prompt
# --------------------------------------------------------------------------------------------------


class _Evaluator:
    """Computes ``(objective [S], prob [S], grad [S, d_mlp])`` for samples ``(layer_s, x_s)`` of one prompt:
    the prompt run with layer ``layer_s``'s neurons at the answer position replaced by ``x_s``."""

    path = "reference"
    single_layer_chunks = False  # True: every chunk must hold one layer only
    checking = False  # True while the validation chunk runs

    def __init__(self, model: Any, prep: _Prepared, config: AttributionConfig) -> None:
        self.model = model
        self.prep = prep
        self.config = config
        self.acc = _acc_dtype(model)

    def start_prompt(self, i: int) -> None:
        self.i = i
        self.t = int(self.prep.last[i])
        self.row = self.prep.tokens[i, : self.t + 1]

    def end_prompt(self) -> None:
        pass

    def evaluate(self, layer_of: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def max_chunk(self, n_tok: int) -> int | None:
        """The most samples one chunk may hold for prompts of up to ``n_tok`` tokens (``None``: no limit)."""
        return None

    def _finish(self, logits_last: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Objective, probability and gradient w.r.t. ``x`` of the samples (``logits_last [S, d_vocab]`` in
        the order of ``x``)."""
        self.tail_logits = logits_last[-2:].detach()  # read by the validation of the main loop
        ans = self.prep.answers[self.i].expand(x.shape[0])
        obj, prob = _objective(logits_last, ans, self.config.objective, self.acc)
        (g,) = torch.autograd.grad(obj.sum(), x)
        return obj.detach(), prob.detach(), g

    def _finish_group(
        self, final: Tensor, answers: Tensor, rows: Tensor, x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_finish` of a group pass: ``final [R, d_model]``, the normalised final residual
        (``ln_final``'s output) of the pass's rows in whatever order the pass produced them, ``answers [R]``
        their answer ids, ``rows [G, S]`` the row of each sample of ``x [G, S, D]``; only the per-sample
        results are permuted.

        On CPU with a plain float32/float64 unembedding (:func:`_sweep_unembedding`) the objective is
        computed without materialising the ``[R, d_vocab]`` logits
        (:func:`~qloc_tl.methods.attribution.unembed.answer_objective_and_logits`); the validation's tail logits (only
        while checking) are then ``final @ W_U + b_U`` of those rows, taken from the same sweep, so the
        validation also checks that the model's logits are that map, as the sweep computes it. Otherwise the
        logits come from :meth:`_logits_of`."""
        lin = _sweep_unembedding(self.model)
        if lin is None:
            logits = self._logits_of(final)
            self.tail_logits = logits[rows[:, -2:]].detach()  # [G, 2, d_vocab], read by the validation
            obj, prob = _objective(logits, answers, self.config.objective, self.acc)
        else:
            W_U, b_U = lin
            tail = rows[:, -2:] if self.checking else None  # the tail logits are read only by the validation
            obj, prob, kept = answer_objective_and_logits(final, W_U, b_U, answers, self.config.objective, tail)
            if tail is not None:  # from the sweep itself: no second pass over W_U (~25 ms on GPT-2 small)
                self.tail_logits = kept.view(*tail.shape, -1)
        obj, prob = obj[rows], prob[rows]
        (g,) = torch.autograd.grad(obj.sum(), x)
        return obj.detach(), prob.detach(), g

    def _logits_of(self, final: Tensor) -> Tensor:
        """Logits ``[R, d_vocab]`` from the normalised final residual (the grouped evaluators)."""
        return self.model.unembed(final)


def _row_hooks(names: dict[int, str], layer_of: Tensor, x: Tensor, place: Any) -> list[tuple[str, Any]]:
    """One hook per layer present in ``layer_of``; ``place(act, rows, values)`` writes the rows' values."""
    hooks = []
    for l in torch.unique(layer_of).tolist():
        rows = (layer_of == l).nonzero().squeeze(-1)

        def fn(act: Tensor, hook: Any, rows: Tensor = rows) -> Tensor:
            return place(act, rows, x.index_select(0, rows).to(act.dtype))

        hooks.append((names[int(l)], fn))
    return hooks


class _ReferenceEvaluator(_Evaluator):
    """The oracle: full forward of the prompt repeated once per sample; one layer per chunk."""

    path = "reference"
    single_layer_chunks = True

    def evaluate(self, layer_of: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        S, t = x.shape[0], self.t
        layer = int(layer_of[0])
        xs = x.unsqueeze(1)

        def replace(act: Tensor, hook: Any) -> Tensor:
            return torch.cat([act[:, :t], xs.to(act.dtype), act[:, t + 1 :]], dim=1)

        toks = self.row.unsqueeze(0).expand(S, -1)
        with self.model.hooks(fwd_hooks=[(self.prep.names[layer], replace)]):
            logits = self.model(toks)
        return self._finish(logits[:, t], x)


class _FullEvaluator(_Evaluator):
    """Batched full-sequence fallback: rows of the repeated prompt, mixed layers per chunk."""

    path = "full"

    def evaluate(self, layer_of: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        S, t = x.shape[0], self.t

        def place(act: Tensor, rows: Tensor, vals: Tensor) -> Tensor:
            pos = torch.full_like(rows, t)
            return act.index_put((rows, pos), vals)

        toks = self.row.unsqueeze(0).expand(S, -1)
        with self.model.hooks(fwd_hooks=_row_hooks(self.prep.names, layer_of, x, place)):
            logits = self.model(toks)
        return self._finish(logits[:, t], x)


class _PackedEvaluator(_Evaluator):
    """HF-backed bridges: each sequence = prompt prefix + copies of the answer token, one copy per sample.

    A 4-D boolean attention mask lets every copy attend to the prefix and to itself only, and every copy gets
    the answer position's position id, so each copy computes exactly the clean last-token forward; the hook
    at layer l overwrites the copies of layer-l samples. When the context cannot hold all copies after the
    prefix (``n_ctx``), they are spread over several rows of one batch, each row repeating the prefix, so a
    chunk is still one forward pass.
    """

    path = "packed"

    def evaluate(self, layer_of: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        S, t = x.shape[0], self.t
        r = self.copies_per_row(S)

        def place(act: Tensor, rows: Tensor, vals: Tensor) -> Tensor:
            return act.index_put((rows // r, t + rows % r), vals)

        logits = self._run(S, r, _row_hooks(self.prep.names, layer_of, x, place))
        return self._finish(logits, x)

    def copies_per_row(self, S: int) -> int:
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
        return seq, allowed[None, None].expand(B, 1, N, N), pos

    def _run(self, S: int, r: int, hooks: list[tuple[str, Any]]) -> Tensor:
        t = self.t
        B = -(-S // r)
        seq, mask, pos = self.layout(B, r)
        with self.model.hooks(fwd_hooks=hooks):
            try:
                logits = self.model(seq, attention_mask=mask, position_ids=pos)
            except Exception as exc:
                if not self.checking:
                    raise
                # on the validation chunk: a backend that rejects 4-D masks / position ids → fall back
                logger.debug("packed forward raised %r", exc)
                raise _PathMismatch(float("nan")) from exc
        # copies past S in the last row are unedited answer-token copies: computed, then dropped
        return logits[:, t:].reshape(B * r, -1)[:S]


class _Abort(Exception):
    """Raised by the pre-hook that captures block 0's call, to stop the probe forward there."""


def _is_cache(v: Any) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(v).__mro__)


@dataclass(frozen=True)
class _Leaf:
    value: Any
    seq_dims: tuple[int, ...]  # dimensions indexed by sequence position (sliced to N)


def _zip_map(a: Any, b: Any, fn: Any) -> Any:
    """``fn(a_leaf, b_leaf)`` over two structures of nested tuples / lists / dicts of the same shape."""
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return type(a)(_zip_map(x, y, fn) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _zip_map(a[k], b[k], fn) for k in a}
    return fn(a, b)


def _leaf_map(v: Any, fn: Any) -> Any:
    if isinstance(v, _Leaf):
        return fn(v)
    if isinstance(v, (tuple, list)):
        return type(v)(_leaf_map(e, fn) for e in v)
    return {k: _leaf_map(e, fn) for k, e in v.items()}


class _BlockCall:
    """How the HF-backed bridge calls its blocks for the packed layout of any length ``N ≤ n_max``.

    Block 0's call (positional args after the hidden states, and kwargs) is captured from two probe forwards
    of the packed layout, of lengths ``n_max`` and ``n_max + 1``, each stopped at block 0 (embedding only).
    The tensor dimensions that differ between the two are the sequence dimensions (mask rows and columns,
    position ids, rotary cos/sin, cache positions); :meth:`at` slices them to the first ``N`` positions —
    the packed layout of a shorter sequence. KV caches are dropped and ``use_cache`` is set to False. The
    same call is assumed for every block; the validation row of the main loop checks the whole result.
    """

    def __init__(self, ev: _BlockwiseEvaluator, n_max: int) -> None:
        a1, k1 = self._probe(ev, n_max)
        a2, k2 = self._probe(ev, n_max + 1)
        self.n_max = n_max

        def leaf(u: Any, v: Any) -> _Leaf:
            if not (isinstance(u, Tensor) and isinstance(v, Tensor)):
                return _Leaf(u, ())
            dims = tuple(d for d in range(u.dim()) if u.dim() == v.dim() and u.shape[d] != v.shape[d])
            if u.dim() != v.dim() or any(u.shape[d] != n_max or v.shape[d] != n_max + 1 for d in dims):
                raise _PathMismatch(float("nan"))  # not a per-position dimension: cannot slice it
            return _Leaf(u, dims)

        self.args = _zip_map(tuple(a1[1:]), tuple(a2[1:]), leaf)
        self.kwargs = _zip_map(dict(k1), dict(k2), leaf)

    @staticmethod
    def _probe(ev: _BlockwiseEvaluator, N: int) -> tuple[tuple, dict]:
        seq, mask, pos = ev.layout(N - ev.T)
        got: dict[str, Any] = {}

        def pre(mod: Any, args: tuple, kwargs: dict) -> None:
            got["call"] = (args, kwargs)
            raise _Abort

        handle = ev.model.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                ev.model(seq, attention_mask=mask, position_ids=pos)
        except _Abort:
            pass
        finally:
            handle.remove()
        if "call" not in got:
            raise _PathMismatch(float("nan"))
        return got["call"]

    def at(self, N: int) -> tuple[tuple, dict]:
        def cut(leaf: _Leaf) -> Any:
            if _is_cache(leaf.value):
                return None
            v = leaf.value
            for d in leaf.seq_dims:
                v = v.narrow(d, 0, N)
            return v

        args, kwargs = _leaf_map(self.args, cut), _leaf_map(self.kwargs, cut)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return args, kwargs


class _GroupedEvaluator(_Evaluator):
    """The blockwise evaluators (TL 3 ``"kv-hooked"``, TL 4 ``"blockwise"``): several prompts per pass, the
    samples of layer l joining the pass as it climbs the blocks.

    **MLP-out shortcut** (``shortcut``; ``site="post"`` only, see :func:`_shortcut_eligible`). A sample of
    layer l replaces ``hook_post`` of block l at the answer position; what block l then outputs there is
    ``resid_post_l + (x − w̄_l) @ W_out_l`` (the clean residual stream after block l plus the change of the
    MLP's output, which is linear in ``hook_post``) in every block whose output adds the MLP's output to the
    residual stream and does nothing after it (GPT-2, GPT-J/NeoX, LLaMA, ...). With the shortcut the samples
    of layer l join at block l + 1 with that residual, so block l's attention and MLP input projection for
    them — computed and then discarded by the ``hook_post`` replacement, forward and backward — are skipped.

    It is checked on the first pass of every call: one probe entry per prompt and requested layer l rides
    along, joining at block l with the clean residual and a perturbed ``hook_post`` written by a hook
    (without the shortcut), and leaves the pass after block l; its output there must equal the shortcut's
    within the path tolerance, relative to ``1 + max|output|``. The perturbation (four neurons) is sized so
    that its effect on the output is as large as the residual stream itself. On a mismatch (a
    post-MLP normalisation, as in Gemma 2, ...) :class:`_ShortcutMismatch` is raised and the call starts
    again without the shortcut.
    """

    shortcut = False
    # with the shortcut: the x of evaluate_group are the samples' outputs of their block l at the answer
    # position ``[G, S, d_model]`` (set by :func:`_run_group`), not their neurons
    resid_in = False
    verified = False  # the probes' verdict is remembered for these blocks (:func:`_shortcut_verdict`): no probes
    signature: Any = None  # :func:`_blocks_signature` at the start of the call (before our own hooks)
    W_out: dict[int, Tensor]

    def start_group(self, idxs: list[int]) -> None:
        raise NotImplementedError

    def end_group(self) -> None:
        raise NotImplementedError

    def evaluate_group(self, layer_of: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def enable_shortcut(self, signature: Any = None, verified: bool = False) -> None:
        """Use the shortcut; ``verified``: the probes passed on an earlier call for the same blocks
        (``signature``, :func:`_blocks_signature`), so this call runs none."""
        self.W_out = {l: self.model.blocks[l].mlp.W_out for l in self.prep.layers}
        self.shortcut, self.signature, self.verified = True, signature, verified

    def _shortcut_rows(self, l: int, xs: Tensor, idx: Tensor) -> Tensor:
        """``[G, c, d_model]``: the output of block l at the answer position of each prompt ``idx`` with
        ``hook_post`` there replaced by ``xs [G, c, d_mlp]`` (the shortcut)."""
        post = self.prep.resid_post[l][idx].unsqueeze(1)  # [G, 1, d_model]
        W = self.W_out[l]
        delta = xs - self.prep.acts[idx, l].unsqueeze(1).to(xs.dtype)
        return post + (delta.to(W.dtype) @ W).to(post.dtype)

    def _joins(
        self, counts: dict[int, int], xs: Tensor, idx: Tensor, dim: int
    ) -> tuple[tuple[dict[int, int], Tensor, dict[int, Tensor]] | None, list[tuple[str, Any]], Any]:
        """What a climb needs for the samples ``xs [G, S, D]`` (sorted by layer, ``counts`` per layer):
        ``(probe, hooks, joining)``. ``probe`` is :meth:`_probes`. Without the shortcut the samples of
        layer l join at block l and a hook on ``hook_post`` writes their ``x``; with it they join at block
        l + 1 and only the probes (the last entries at their block) are hooked. ``joining(j)`` gives the
        entries that join the pass before block j (``j = L``: after the last block), ``[G, c, d_model]`` —
        the clean residual entering block l, or with the shortcut the shortcut's output of block l — or
        ``None``. ``dim``: 0 when entries are batch rows (TL 3), 1 when they are sequence positions (TL 4)."""
        probe = self._probes(idx)
        if probe is not None:
            hooks = _tail_hooks(self.prep.names, probe[0], probe[1], dim)
        else:
            hooks = [] if self.shortcut else _tail_hooks(self.prep.names, counts, xs, dim)
        parts = dict(zip(counts, torch.split(xs, list(counts.values()), dim=1)))

        def joining(j: int) -> Tensor | None:
            l = j - 1 if self.shortcut else j
            if l not in counts:
                return None
            if self.shortcut:
                return parts[l] if self.resid_in else self._shortcut_rows(l, parts[l], idx)
            return self.prep.resid_last[l][idx].unsqueeze(1).expand(-1, counts[l], -1)

        return probe, hooks, joining

    def _probes(self, idx: Tensor) -> tuple[dict[int, int], Tensor, dict[int, Tensor]] | None:
        """On the checking pass with the shortcut on: ``(counts, xs [G, n_layers_requested, D], want)`` of the
        probe entries (one per prompt and requested layer, sorted by layer) and the shortcut's output for each
        layer ``[G, 1, d_model]``; else ``None``."""
        if not (self.shortcut and self.checking) or self.verified:
            return None
        prep, dt = self.prep, self.prep.acts.dtype
        D = prep.acts.shape[-1]
        where = torch.linspace(0, D - 1, 4, device=idx.device).round().long().unique()
        coef = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=dt, device=idx.device)[: where.numel()]
        xs, want = [], {}
        with torch.no_grad():
            for l in prep.layers:
                w, post = prep.acts[idx, l], prep.resid_post[l][idx]  # [G, D], [G, d_model]
                gain = (coef.to(self.W_out[l].dtype) @ self.W_out[l][where]).to(post.dtype)  # u @ W_out
                s = float((1.0 + post.abs().amax()) / gain.abs().amax().clamp_min(1e-30))
                x = w.clone()
                x[:, where] += (s * coef).to(dt)
                xs.append(x.unsqueeze(1))
                want[l] = self._shortcut_rows(l, xs[-1], idx)  # what the pass itself uses
        return {l: 1 for l in prep.layers}, torch.cat(xs, dim=1), want

    def check_shortcut(self, got: dict[int, Tensor], want: dict[int, Tensor]) -> None:
        """Raise :class:`_ShortcutMismatch` unless the probes' block outputs ``got`` match ``want``."""
        with torch.no_grad():
            err = max(
                float(((got[l] - want[l]).abs().amax() / (1.0 + want[l].abs().amax())).to(torch.float64))
                for l in want
            )
        ok = err <= _tolerance(model_dtype(self.model))  # NaN fails too
        if self.signature is not None:
            _SHORTCUT_VERDICT[self.model] = (self.signature, ok)
        if not ok:
            raise _ShortcutMismatch(err)


# the probes' verdict on the MLP-out shortcut per model, with the :func:`_blocks_signature` it was reached for
_SHORTCUT_VERDICT: weakref.WeakKeyDictionary[Any, tuple[Any, bool]] = weakref.WeakKeyDictionary()


def _blocks_signature(model: Any) -> Any:
    """What the probes' verdict on the MLP-out shortcut rests on, or ``None`` (never remember it): the config
    (``str(model.cfg)``), dtype and device, and for every submodule of every block its name, identity, class,
    the class's ``forward`` and the keys of its PyTorch forward (pre-)hooks. A block or submodule replaced, a
    class whose ``forward`` was patched, a hook added or removed, a config changed: a different signature, so
    the probes run again. A module with an instance-level ``forward`` is never remembered."""
    try:
        parts: list[Any] = [str(model.cfg), mode_key(model)]
        for blk in model.blocks:
            for name, m in blk.named_modules():
                if "forward" in vars(m):
                    return None
                parts.append((name, id(m), type(m), type(m).forward, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)))
    except Exception:  # no blocks / cfg on this backend
        return None
    return tuple(parts)


def _shortcut_verdict(model: Any, signature: Any) -> bool | None:
    """The remembered verdict of the probes on ``model`` for blocks of this ``signature``, else ``None``."""
    if signature is None:
        return None
    known = _SHORTCUT_VERDICT.get(model)
    return known[1] if known is not None and known[0] == signature else None


def _shortcut_eligible(model: Any, config: AttributionConfig, kind: str) -> bool:
    """Whether the blockwise paths try the MLP-out shortcut (:class:`_GroupedEvaluator`): ``site="post"``, a
    blockwise path, ``_MLP_SHORTCUT`` on, no hook on any module of the model (a hook on ``hook_mlp_out``,
    ``hook_resid_post``, ... of block l would be skipped for the samples of layer l; our own hooks are added
    later), and ``blocks[l].mlp.W_out`` of shape ``[d_mlp, d_model]`` at every layer.

    "No hook" means no TL hook point with a hook and no global module hook: TL 4 bridges keep PyTorch hooks of
    their own on the wrapped HF modules (output capturing). A plain PyTorch hook a user put on some other
    module is not seen here; if it changes what block l computes from ``hook_post``, the probes of
    :class:`_GroupedEvaluator` turn the shortcut off."""
    return _shortcut_applies(model, config, kind) and _shortcut_blocker(model) is None


def _shortcut_applies(model: Any, config: AttributionConfig, kind: str) -> bool:
    """The shortcut is part of ``kind``'s normal schedule on this model (hooks aside): ``_MLP_SHORTCUT`` on,
    ``site="post"``, a blockwise path and ``blocks[l].mlp.W_out`` of shape ``[d_mlp, d_model]`` everywhere."""
    if not _MLP_SHORTCUT or config.site != "post" or kind not in ("kv-hooked", "blockwise"):
        return False
    want = (d_mlp(model), int(model.cfg.d_model))
    try:
        return all(tuple(model.blocks[l].mlp.W_out.shape) == want for l in range(n_layers(model)))
    except Exception:  # no blocks[l].mlp.W_out on this backend
        return False


def _shortcut_blocker(model: Any) -> str | None:
    """Why hooks keep the MLP-out shortcut off (global module hooks, or TL hook points carrying hooks, named),
    else ``None``."""
    from torch.nn.modules import module as nn_module
    from transformer_lens.hook_points import HookPoint

    if any(getattr(nn_module, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return "global PyTorch module hooks are registered (the MLP-out shortcut would skip them)"
    points = [(n, m) for n, m in model.named_modules() if isinstance(m, HookPoint) and _has_hooks(m)]
    if points:
        aliases: dict[int, list[str]] = {}  # the hook names a user knows (TL 4: a point has several)
        for name, hp in getattr(model, "hook_dict", {}).items():
            aliases.setdefault(id(hp), []).append(name)
        hooked = [" / ".join(aliases.get(id(m), [n])) for n, m in points]
        shown = ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")
        return f"hooks on {shown} (the MLP-out shortcut would skip them for the samples of their layer)"
    return None


class _BlockwiseEvaluator(_GroupedEvaluator):
    """HF-backed bridges, blockwise, several prompts per pass (one row each).

    Row g = the prompt's prefix, left-padded to the group's longest prefix T, then one copy of the answer
    token per sample; a 4-D mask lets each copy see its row's prefix and itself (pads see only themselves)
    and every copy gets the answer's position id. The rows are driven one block at a time through
    ``model.blocks[j]`` (:class:`_BlockCall`): the copies of layer-l samples join every row at block l with
    the clean residual entering it (``resid_last``) — with the MLP-out shortcut at block l + 1
    (:class:`_GroupedEvaluator`) — so no copy computes a layer below its own. The prefix
    (the clean input of the lowest requested layer, ``resid_rows``) is recomputed per block, since the
    bridges keep no KV cache; the logits are ``unembed(ln_final(·))`` of the copies only. All rows of a pass
    hold the same samples (layer, path, step) of their prompts. A row may be longer than ``n_ctx``: position
    ids are explicit and no copy's exceeds the prompt's; the validation copy is the last of its row, the
    farthest along the sequence (with the shortcut, the probe of layer j is the farthest entry at block j),
    so a backend that cares about the sequence length fails validation.
    """

    path = "blockwise"

    def start_group(self, idxs: list[int]) -> None:
        self.idxs = idxs
        self.ts = [int(self.prep.last[i]) for i in idxs]
        self.T = max(self.ts)
        self._call: _BlockCall | None = None

    def end_group(self) -> None:
        self._call = None

    def layout(self, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens [G, N], mask [G, 1, N, N], position ids [G, N])``: the group's rows with ``r`` copies."""
        G, T, dev = len(self.idxs), self.T, self.prep.tokens.device
        N = T + r
        seq = torch.empty(G, N, dtype=torch.long, device=dev)
        allowed = torch.eye(N, dtype=torch.bool, device=dev).repeat(G, 1, 1)  # pads and copies see themselves
        pos = torch.zeros(G, N, dtype=torch.long, device=dev)
        for g, (i, t) in enumerate(zip(self.idxs, self.ts)):
            row, off = self.prep.tokens[i], T - t
            seq[g, :off] = row[0]  # padding: masked out, any token
            seq[g, off:T] = row[:t]
            seq[g, T:] = row[t]
            allowed[g, off:T, off:T] = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            allowed[g, T:, off:T] = True
            pos[g, off:T] = torch.arange(t, device=dev)
            pos[g, T:] = t
        return seq, allowed.unsqueeze(1), pos

    def evaluate_group(self, layer_of: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [G, S, D]`` (the same samples ``layer_of [S]`` for every row) → objective, probability
        ``[G, S]`` and the gradient ``[G, S, D]``; ``tail_logits [G, 2, d_vocab]`` of each row's last two
        samples."""
        order, counts = _layer_groups(layer_of)
        try:
            final = self._final(order, counts, x)  # [G, S, d_model], samples in layer order
        except _PathMismatch:  # also _ShortcutMismatch
            raise
        except Exception as exc:
            if not self.checking:
                raise
            # on the validation chunk: a backend whose blocks cannot be driven this way → fall back
            logger.debug("blockwise evaluation raised %r", exc)
            raise _PathMismatch(float("nan")) from exc
        G, S, d = final.shape
        rows = S * torch.arange(G, device=x.device).unsqueeze(1) + _inverse(order)  # row g*S + sorted index
        answers = self.prep.answers[self.idxs].repeat_interleave(S)
        return self._finish_group(final.reshape(G * S, d), answers, rows, x)

    def _final(self, order: Tensor, counts: dict[int, int], x: Tensor) -> Tensor:
        """``ln_final`` of the copies ``[G, S, d_model]`` (samples sorted by layer)."""
        model, S, L = self.model, x.shape[1], n_layers(self.model)
        xs = _in_order(x, order)
        idx = torch.tensor(self.idxs, device=x.device)
        probe, hooks, joining = self._joins(counts, xs, idx, dim=1)
        need = S + (1 if probe is not None else 0)  # copies; a probe is one entry more at its block
        hidden, layout = self._begin(idx, need)
        P = hidden.shape[1]  # rows before the copies
        got: dict[int, Tensor] = {}
        ran: set[int] = set()
        with model.hooks(fwd_hooks=hooks + layout):
            for j in range(min(self.prep.layers), L):
                new = joining(j)
                if new is not None:
                    hidden = torch.cat([hidden, new.to(hidden.dtype)], dim=1)
                probing = probe is not None and j in probe[0]
                if probing:  # the probe of layer j: clean residual in, hook_post written by its hook
                    hidden = torch.cat([hidden, self.prep.resid_last[j][idx].unsqueeze(1)], dim=1)
                if hidden.shape[1] == 0:
                    continue  # an empty prefix and, with the shortcut, no copies yet
                hidden = self._block(j, hidden)
                ran.add(j)
                if probing:
                    got[j], hidden = hidden[:, -1:], hidden[:, :-1]
            new = joining(L)  # with the shortcut: the samples of the last layer
            if new is not None:
                hidden = torch.cat([hidden, new.to(hidden.dtype)], dim=1)
            final = self._ln_final(hidden[:, P:])
        if any(h.calls != 1 for _, h in hooks):  # a neuron hook that did not fire would leave x unused
            raise _PathMismatch(float("nan"))
        if any(h.calls != (j in ran) for j, (_, h) in enumerate(layout)):  # the layout of every block run
            raise _PathMismatch(float("nan"))
        if probe is not None:
            self.check_shortcut(got, probe[2])
        return final

    def _begin(self, idx: Tensor, need: int) -> tuple[Tensor, list[tuple[str, Any]]]:
        """Before a climb with up to ``need`` copies per row: the rows before any copy joins (here the
        left-padded prefixes, recomputed at every block) and the hooks that lay the rows out, one per block in
        block order (here none: the captured block call carries the 4-D mask)."""
        T = self.T
        if self._call is None or self._call.n_max < T + need:
            self._call = _BlockCall(self, T + need)
        rows = self.prep.resid_rows[idx]  # [G, pos, d_model]
        hidden = rows.new_zeros(len(self.idxs), T, rows.shape[-1])
        for g, t in enumerate(self.ts):
            hidden[g, T - t :] = rows[g, :t]
        return hidden, []

    def _block(self, j: int, hidden: Tensor) -> Tensor:
        """Block ``j`` on the rows ``hidden [G, N, d_model]``."""
        assert self._call is not None
        args, kwargs = self._call.at(hidden.shape[1])
        out = self.model.blocks[j](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _ln_final(self, h: Tensor) -> Tensor:
        return self.model.ln_final(h)


class _MaskHook:
    """On ``blocks.{j}.attn.hook_attn_scores`` ``[G, n_heads, N, T + N]`` (N copies; keys: the cached prefix,
    then the copies): sets the scores of the pairs the layout forbids (``blocked``, sliced to ``N`` copies) to
    ``-inf``, as TL's own masks do; counts its calls."""

    def __init__(self, blocked: Tensor) -> None:
        self.blocked, self.calls = blocked, 0

    def __call__(self, act: Tensor, hook: Any) -> Tensor:
        self.calls += 1
        return act.masked_fill(self.blocked[..., : act.shape[-2], : act.shape[-1]], float("-inf"))


class _HookedBlockwiseEvaluator(_BlockwiseEvaluator):
    """TL 3 HookedTransformer with standard (learned absolute) position embeddings: the copies of
    :class:`_BlockwiseEvaluator` (one copy of the answer token per sample, a row per prompt) driven through
    ``model.blocks[j](copies, past_kv_cache_entry=…, attention_mask=…)``, the prompts' prefixes in TL's KV
    cache as for ``"kv-hooked"`` (padded to the longest, built once per group by :func:`_hooked_prefix_cache`:
    neither recomputed per block nor copied per row). TL's causal and padding masks apply; a hook on ``hook_attn_scores``
    (:class:`_MaskHook`) adds the rest of the layout: a copy sees its prompt's prefix and itself, not the
    copies before it. A block of such a model does not see positions (they enter the residual stream once,
    at the embedding), so a copy computes what the answer token computes at its own position;
    :func:`_rows_layout_ok` says which models qualify (no rotary, ALiBi or shortformer positions, no local
    attention windows).

    Against ``"kv-hooked"`` (one batch row per sample, each with its own copy of the cached keys and values,
    and ``[R·heads]`` one-query attention products: tiny batched matmuls, slow on the CPU in both
    directions) this runs one ``[G·heads, N, T + N]`` attention per block. The objective comes from the
    unembedding sweep on the CPU or ``final @ W_U + b_U``, as for ``"kv-hooked"``."""

    def start_group(self, idxs: list[int]) -> None:
        super().start_group(idxs)
        self.prefix, self.mask = _hooked_prefix_cache(self.model, self.prep, idxs)
        self._blocked: Tensor | None = None  # [1, 1, n, T + n]: True where a copy may not look (n copies)

    def end_group(self) -> None:
        super().end_group()
        self.prefix = self._blocked = None

    def max_chunk(self, n_tok: int) -> int | None:
        return _rows_room(self.model, n_tok)

    def _logits_of(self, final: Tensor) -> Tensor:
        return _hooked_logits(self.model, final)

    def _begin(self, idx: Tensor, need: int) -> tuple[Tensor, list[tuple[str, Any]]]:
        """No rows before the copies (the prefixes are in the cache); a :class:`_MaskHook` per block."""
        T, dev = self.T, idx.device
        if self._blocked is None or self._blocked.shape[-2] < need:
            q, k = torch.arange(need, device=dev), torch.arange(T + need, device=dev)
            self._blocked = ((k[None, :] >= T) & (k[None, :] != T + q[:, None]))[None, None]
        layout = [(f"blocks.{j}.attn.hook_attn_scores", _MaskHook(self._blocked)) for j in range(n_layers(self.model))]
        r = self.prep.resid_last[self.prep.layers[0]]  # [n_prompts, d_model]
        return r.new_zeros(len(self.idxs), 0, r.shape[-1]), layout

    def _block(self, j: int, hidden: Tensor) -> Tensor:
        ones = torch.ones(hidden.shape[0], hidden.shape[1], dtype=self.mask.dtype, device=hidden.device)
        return self.model.blocks[j](
            hidden, past_kv_cache_entry=self.prefix.entries[j], attention_mask=torch.cat([self.mask, ones], dim=1)
        )

    def _ln_final(self, h: Tensor) -> Tensor:
        return _hooked_ln_final(self.model, h)


def _rows_room(model: Any, n_tok: int) -> int:
    """Samples a chunk of :class:`_HookedBlockwiseEvaluator` may hold for prompts of ``n_tok`` tokens: a row
    (prefix of ``n_tok - 1`` tokens, the samples, up to two validation samples and one probe) must fit TL's
    ``n_ctx`` causal-mask buffer."""
    return int(model.cfg.n_ctx) - n_tok - 2


def _rows_chunk_wanted(model: Any, config: AttributionConfig, longest: int) -> int:
    """The chunk size TL 3 "blockwise" must allow for "auto" to take it: kv-hooked's, i.e. every sample of a
    prompt (all layers, ``steps`` + 1 nodes, SIG: a path per token) up to ``_BLOCKWISE_BATCH``. Measured on
    the built-in model (12-token prompts, room for 17 samples in ``n_ctx`` 32, one thread, 2026-11-27): 4
    queries per call 21.1 ms per query as rows (8 passes) vs ≈ 15 ms on kv-hooked (one pass); 32 queries
    8.7–9.8 vs 12.0–14.8 ms. The rule gives up the second to avoid the first."""
    per_path = n_layers(model) * (config.steps + 1)
    return min(_BLOCKWISE_BATCH, per_path * (longest if config.method == "sig" else 1))


def _rows_layout_ok(model: Any) -> bool:
    """Whether a TL 3 HookedTransformer can run the rows of :class:`_HookedBlockwiseEvaluator`: learned
    absolute positions (``positional_embedding_type="standard"``: a block never sees positions), causal
    global attention only (a local window would measure distances in the row, not in the prompt), and
    ``hook_attn_scores`` edits honoured (:func:`~qloc_tl.core.model.capabilities`)."""
    cfg = model.cfg
    if getattr(cfg, "positional_embedding_type", None) != "standard":
        return False
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return False
    if any(t != "global" for t in (getattr(cfg, "attn_types", None) or ())):
        return False
    return capabilities(model).scores_editable


def _layer_groups(layer_of: Tensor) -> tuple[Tensor, dict[int, int]]:
    """``(order, counts)``: a stable sort of the samples by layer and the number of samples per layer."""
    order = torch.argsort(layer_of, stable=True)
    ls, cs = torch.unique_consecutive(layer_of[order], return_counts=True)
    return order, dict(zip(ls.tolist(), cs.tolist()))


class _Permute(torch.autograd.Function):
    """``x[:, order]`` for a permutation ``order``, whose backward is the gather ``grad[:, inverse]`` (autograd's
    index backward zero-fills a tensor of ``x``'s size and scatter-adds into it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor) -> Tensor:
        ctx.save_for_backward(_inverse(order))
        return x[:, order]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (inv,) = ctx.saved_tensors
        return grad[:, inv], None


def _in_order(x: Tensor, order: Tensor) -> Tensor:
    """``x[:, order]`` (``order`` a permutation), or ``x`` itself when ``order`` is the identity (the samples
    of a chunk are layer-major except the validation samples of the first one): no copy then."""
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return x
    return _Permute.apply(x, order)


def _inverse(order: Tensor) -> Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


class _TailHook:
    """Overwrites the last entries of the batch (``dim`` 0: act ``[R_l, 1, D]``, the ``G·c`` rows
    prompt-major) or of the sequence (``dim`` 1: act ``[G, N_l, D]``) with ``vals [G, c, D]``; counts its
    calls."""

    def __init__(self, vals: Tensor, dim: int) -> None:
        self.vals, self.dim, self.calls = vals, dim, 0

    def __call__(self, act: Tensor, hook: Any) -> Tensor:
        self.calls += 1
        v = self.vals.to(act.dtype)
        if self.dim == 0:
            v = v.reshape(-1, 1, v.shape[-1])
            return torch.cat([act[: -v.shape[0]], v], dim=0)
        return torch.cat([act[:, : -v.shape[1]], v], dim=1)


def _tail_hooks(names: dict[int, str], counts: dict[int, int], xs: Tensor, dim: int) -> list[tuple[str, _TailHook]]:
    """Blockwise evaluation: the samples of layer l join the batch (``dim`` 0) or the sequence (``dim`` 1) at
    block l, as its last ``counts[l]`` entries; the hook at layer l overwrites exactly those with their ``x``
    (``xs [G, S, D]`` sorted by layer)."""
    parts = torch.split(xs, list(counts.values()), dim=1)  # one backward (a cat), not a zero-fill per slice
    return [(names[l], _TailHook(v, dim)) for l, v in zip(counts, parts)]


def _hooked_logits(model: Any, final: Tensor) -> Tensor:
    """A HookedTransformer's logits from the normalised final residual: ``final @ W_U + b_U`` (soft-capped
    where the model caps them); HT's own ``unembed`` copies ``W_U.T`` on every call."""
    logits = final @ model.W_U + model.b_U
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def _hooked_prefix_cache(model: Any, prep: _Prepared, idxs: list[int]) -> tuple[Any, Tensor]:
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


class _HookedKVEvaluator(_GroupedEvaluator):
    """TL 3 HookedTransformer, blockwise, several prompts per pass.

    The prompts' prefixes go into one KV cache, padded to the longest (:func:`_hooked_prefix_cache`; TL's
    ``attention_mask`` handles positions and masking); a chunk runs only the answer token, one block at a time (``start_at_layer=j,
    stop_at_layer=j + 1``, each row with its prompt's cache entry and ``attention_mask``). The samples of
    layer l join the batch at block l (the clean residual entering block l at the answer position,
    ``resid_last``) — with the MLP-out shortcut at block l + 1 (:class:`_GroupedEvaluator`) — so no sample
    computes a layer below its own, and the batch grows as the chunk climbs.
    The objective comes from ``ln_final`` of the answer token by the unembedding sweep on the CPU, else from
    the logits ``final @ W_U + b_U`` (HT's own ``unembed`` copies ``W_U.T`` on every call); the validation
    samples guard all of it."""

    path = "kv-hooked"

    def start_group(self, idxs: list[int]) -> None:
        self.idxs = idxs
        self.prefix, self.mask = _hooked_prefix_cache(self.model, self.prep, idxs)

    def end_group(self) -> None:
        self.prefix = None

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

    def _logits_of(self, final: Tensor) -> Tensor:
        return _hooked_logits(self.model, final)

    def evaluate_group(self, layer_of: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`_BlockwiseEvaluator.evaluate_group`; batch rows are (layer group, prompt, sample)."""
        G, S, dev = x.shape[0], x.shape[1], x.device
        order, counts = _layer_groups(layer_of)
        row_of = torch.empty(G, S, dtype=torch.long, device=dev)  # batch row of (prompt, sorted sample)
        s0 = 0
        for c in counts.values():
            row_of[:, s0 : s0 + c] = G * s0 + torch.arange(G * c, device=dev).view(G, c)
            s0 += c
        idx = torch.tensor(self.idxs, device=dev)
        resid, prompt_of = self._climb(counts, _in_order(x, order), idx)
        final = _hooked_ln_final(self.model, resid[:, -1])
        return self._finish_group(final, self.prep.answers[idx][prompt_of], row_of[:, _inverse(order)], x)

    def _climb(self, counts: dict[int, int], xs: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The answer token through blocks ``min(counts)`` .. ``L - 1``; ``xs [G, S, D]`` sorted by layer.
        Returns the residual rows ``[R, 1, d_model]`` (layer group, prompt, sample) and the prompt (0..G-1) of
        each row. Without the shortcut the samples of layer l join at block l with the clean residual entering
        it, and a hook on ``hook_post`` writes their ``x``; with it they join at block l + 1
        (:meth:`_shortcut_rows`), and only the probes (the last G rows while they are there) are hooked."""
        G, dev, L = xs.shape[0], xs.device, n_layers(self.model)
        probe, hooks, joining = self._joins(counts, xs, idx, dim=0)
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
                resid = self.model(
                    resid,
                    start_at_layer=j,
                    stop_at_layer=j + 1,
                    past_kv_cache=self._cache(j, prompt_of),
                    attention_mask=torch.cat([self.mask[prompt_of], ones], dim=1),
                )
                if probing:
                    got[j] = resid[-G:].view(G, 1, -1)
                    resid, prompt_of = resid[:-G], prompt_of[:-G]
        join(joining(L))  # with the shortcut: the samples of the last layer
        if probe is not None:
            self.check_shortcut(got, probe[2])
        return resid, prompt_of


# --------------------------------------------------------------------------------------------------
# main loop
# --------------------------------------------------------------------------------------------------


# models on which the blockwise / packed path failed validation (per mode): skip it next time, warn once
_PACKED_FAILED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_BLOCKWISE_FAILED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _fast_kind(model: Any, config: AttributionConfig, longest: int) -> str:
    """The fast implementation's path: ``"kv-hooked"``, ``"blockwise"``, ``"packed"`` or ``"full"``.

    ``longest``: tokens of the longest prompt. On a HookedTransformer "auto" takes ``"blockwise"``
    (:class:`_HookedBlockwiseEvaluator`) where :func:`_rows_layout_ok` and ``n_ctx`` leaves room for chunks as
    large as kv-hooked's (:func:`_rows_chunk_wanted`), else (also after it failed validation on this model)
    ``"kv-hooked"``. On HF-backed bridges "auto" takes ``"blockwise"``, else (after it failed validation on
    this model) ``"packed"`` when the context has room for a few copies, else ``"full"``.
    """
    fp = config.fast_path
    if fp == "full":
        return "full"
    caps = capabilities(model)
    if caps.kv_cache == "hooked" and caps.start_at_layer == "fast":
        if fp == "packed":
            raise CapabilityError(
                f"fast_path='packed' is a path of HF-backed TL 4 bridges; this {type(model).__name__} uses "
                f"'blockwise' or 'kv-hooked' (fast_path='auto', 'blockwise' or 'kv')"
            )
        rows = _rows_layout_ok(model)
        room = _rows_room(model, longest)
        if fp == "blockwise":
            if not rows:
                raise CapabilityError(
                    f"fast_path='blockwise' on a {type(model).__name__} needs learned absolute positions, "
                    f"causal global attention and editable hook_attn_scores; use fast_path='auto' or 'kv'"
                )
            if room < 1:
                raise CapabilityError(
                    f"fast_path='blockwise' needs room for a copy after the longest prompt within n_ctx "
                    f"({longest} tokens + 3 > {model.cfg.n_ctx}); use fast_path='auto' or 'kv'"
                )
            return "blockwise"
        # "auto": only where its chunks are as large as kv-hooked's (a chunk is a pass, each with a fixed cost)
        wanted = _rows_chunk_wanted(model, config, longest)
        if fp == "auto" and rows and room >= wanted and _BLOCKWISE_FAILED.get(model) != mode_key(model):
            return "blockwise"
        return "kv-hooked"
    if caps.backend == "bridge":
        if fp in ("blockwise", "packed"):
            return fp
        if _BLOCKWISE_FAILED.get(model) != mode_key(model):
            return "blockwise"
        n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
        room = n_ctx - longest if n_ctx else 1 << 30  # copies that fit one row after the prompt, minus one
        if _PACKED_FAILED.get(model) != mode_key(model) and (fp == "kv" or room >= _MIN_PACKED_ROOM):
            # with one or two copies per row (a prompt that nearly fills n_ctx) a packed row is as long as the
            # full path's and gains nothing, so "auto" does not pack then
            return "packed"
    if fp in ("kv", "blockwise") and caps.backend == "hooked" and _is_hooked_transformer(model):
        why = "; ".join(caps.notes) or "the capability probes found no usable KV cache / start_at_layer"
        raise CapabilityError(
            f"fast_path={fp!r} needs TL's KV cache and start_at_layer on this {type(model).__name__}, and its "
            f"capability probes refused them: {why}; use fast_path='auto' or 'full'"
        )
    if fp == "kv":
        raise InvalidInputError(
            f"fast_path='kv' needs a HookedTransformer KV cache or an HF-backed bridge; this "
            f"{type(model).__name__} has neither — use fast_path='auto' or 'full'"
        )
    if fp in ("blockwise", "packed"):
        raise CapabilityError(
            f"fast_path={fp!r} needs an HF-backed TL 4 bridge; this {type(model).__name__} is not one"
        )
    return "full"


_EVALUATORS = {
    "reference": _ReferenceEvaluator,
    "full": _FullEvaluator,
    "packed": _PackedEvaluator,
    "blockwise": _BlockwiseEvaluator,
    "kv-hooked": _HookedKVEvaluator,
}


def _evaluator(model: Any, kind: str, prep: _Prepared, config: AttributionConfig) -> _Evaluator:
    """The evaluator of path ``kind``; ``"blockwise"`` on a HookedTransformer is
    :class:`_HookedBlockwiseEvaluator`."""
    if kind == "blockwise" and capabilities(model).backend == "hooked":
        return _HookedBlockwiseEvaluator(model, prep, config)
    return _EVALUATORS[kind](model, prep, config)


def _default_batch(config: AttributionConfig, path: str, n_tok: int, samples: int) -> int:
    if config.batch_size is not None:
        return config.batch_size
    if path == "reference":
        return config.steps
    if path in ("kv-hooked", "blockwise"):  # no sample computes a layer below its own: chunks can be large
        return max(1, min(samples, _BLOCKWISE_BATCH))
    if path == "packed":  # chunks of whole layers: backward stops at the chunk's lowest layer
        return max(1, min(samples, 128))
    return max(1, min(samples, 2048 // max(n_tok, 1)))


class _PathMismatch(Exception):
    def __init__(self, err: float) -> None:
        super().__init__(err)
        self.err = err


class _ShortcutMismatch(_PathMismatch):
    """The MLP-out shortcut did not reproduce block outputs (:meth:`_GroupedEvaluator.check_shortcut`): the
    path is fine, the call goes on with it, without the shortcut."""


def _chunks(nl: int, block: int, bs: int, single_layer: bool) -> list[tuple[int, int]]:
    """Ranges over the layer-major samples: whole layer blocks are grouped greedily up to ``bs`` samples
    (a block larger than ``bs`` is split on its own); ``single_layer`` never mixes layers."""
    out: list[tuple[int, int]] = []
    cur0, cur1 = 0, 0
    for li in range(nl):
        b0, b1 = li * block, (li + 1) * block
        if block > bs or single_layer:
            if cur1 > cur0:
                out.append((cur0, cur1))
            out.extend((s, min(s + bs, b1)) for s in range(b0, b1, bs))
            cur0 = cur1 = b1
        elif cur1 - cur0 + block > bs:
            out.append((cur0, cur1))
            cur0, cur1 = b0, b1
        else:
            cur1 = b1
    if cur1 > cur0:
        out.append((cur0, cur1))
    return out


def _run_group(
    ev: _Evaluator,
    idxs: list[int],
    prep: _Prepared,
    bases: Tensor,
    wbar: Tensor,
    alphas: Tensor,
    weights: Tensor,
    zero_k: int,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """All samples of the prompts ``idxs`` (bases ``[G, J, L, D]``, clean activations ``[G, L, D]``; G > 1
    only for the blockwise evaluators): returns ``(Σ_k w_k ∇F [G, nl·J, D], F(b) [G, nl·J], P(b) [G, nl·J])``.

    With the MLP-out shortcut (``ev.shortcut``) a sample of layer l enters the pass as its block-l output at
    the answer position, ``r = resid_post_l + (x − w̄) @ W_out``, and ``x − w̄ = (1 − α)(b − w̄)`` on the
    path, so ``r = resid_post_l + (1 − α) v`` with ``v = (b − w̄) @ W_out`` computed once per prompt, path and
    layer instead of a product per sample. The gradient then comes back w.r.t. ``r`` (``[.., d_model]``), and
    since ``∇_x F = ∇_r F @ W_out^T`` is linear, ``Σ_k w_k ∇_x F`` is ``(Σ_k w_k ∇_r F) @ W_out^T``: one
    product per prompt, path and layer again, after the sum over the nodes.

    With ``check``, the first chunk gets one or two extra unedited samples per prompt (x = w̄ at the chunk's
    lowest and highest layer) whose logits must reproduce the clean logits; otherwise :class:`_PathMismatch`
    is raised.
    """
    model, config = ev.model, ev.config
    grouped = isinstance(ev, _GroupedEvaluator)
    acc, dev = alphas.dtype, alphas.device
    G, J, K, D = bases.shape[0], bases.shape[1], alphas.shape[0], bases.shape[-1]
    assert grouped or G == 1
    layers_t = torch.tensor(prep.layers, dtype=torch.long, device=dev)
    nl = len(prep.layers)
    n_tok = int(prep.last[idxs].max()) + 1
    bs = _default_batch(config, ev.path, n_tok, nl * J * K)
    room = ev.max_chunk(n_tok)
    if room is not None:
        bs = max(1, min(bs, room))
    resid = grouped and bool(getattr(ev, "shortcut", False))
    if grouped:
        ev.resid_in = resid
    if resid:
        W = ev.W_out  # {layer: [D, d_model]}
        rows_t = torch.tensor(idxs, dtype=torch.long, device=dev)
        post = torch.stack([prep.resid_post[l][rows_t] for l in prep.layers], dim=1)  # [G, nl, d_model]
        v = torch.stack(
            [
                ((bases[:, :, l] - wbar[:, None, l]).reshape(G * J, D).to(W[l].dtype) @ W[l]).to(acc).view(G, J, -1)
                for l in prep.layers
            ],
            dim=2,
        )  # [G, J, nl, d_model]
        li_of = {l: i for i, l in enumerate(prep.layers)}
    integral = torch.zeros(G, nl * J, post.shape[-1] if resid else D, dtype=acc, device=dev)
    f0 = torch.zeros(G, nl * J, dtype=acc, device=dev)
    p0 = torch.zeros(G, nl * J, dtype=acc, device=dev)
    if grouped:
        ev.start_group(idxs)
    else:
        ev.start_prompt(idxs[0])
    try:
        for s0, s1 in _chunks(nl, J * K, bs, ev.single_layer_chunks):
            s_idx = torch.arange(s0, s1, device=dev)
            li, rest = s_idx // (J * K), s_idx % (J * K)
            j, k = rest // K, rest % K
            lay = layers_t[li]
            if resid:  # the samples' block-l outputs [G, S, d_model]
                x = post[:, li].to(acc) + (1 - alphas[k]).view(1, -1, 1) * v[:, j, li]
            else:
                b = bases[:, j, lay]  # [G, S, D]
                x = b + alphas[k].view(1, -1, 1) * (wbar[:, lay] - b)
            n_check = 0
            if check:  # unedited samples at the chunk's lowest layer (through every block the chunk runs) and
                # at its highest (blockwise: the last copy of the sequence, the farthest from the prefix)
                extra = torch.unique(torch.stack([lay.min(), lay.max()]))
                n_check = extra.numel()
                lay = torch.cat([lay, extra])
                if resid:
                    x = torch.cat([x, post[:, [li_of[int(e)] for e in extra]].to(acc)], dim=1)
                else:
                    x = torch.cat([x, wbar[:, extra]], dim=1)
            x = x.to(post.dtype if resid else prep.acts.dtype).detach().requires_grad_(True)
            ev.checking = check
            if grouped:
                o, p, g = ev.evaluate_group(lay, x)
            else:
                o, p, g = (v.unsqueeze(0) for v in ev.evaluate(lay, x[0]))
            ev.checking = False
            if check:
                got = ev.tail_logits.reshape(G, -1, ev.tail_logits.shape[-1])[:, -n_check:].to(acc)
                ref = prep.clean_last_logits[idxs].to(acc).unsqueeze(1)  # [G, 1, V]
                err = logits_mismatch(got, ref.expand_as(got))
                if not err <= _tolerance(model_dtype(model)):  # NaN / inf fail too
                    raise _PathMismatch(err)
                o, p, g, check = o[:, :-n_check], p[:, :-n_check], g[:, :-n_check], False
                lay = lay[:-n_check]
            _check_finite(g, f"gradients (layers {sorted(set(lay.tolist()))})", model)
            pj = li * J + j
            integral.index_add_(1, pj, weights[k].view(1, -1, 1) * g.to(acc))
            z = k == zero_k
            f0[:, pj[z]] = o[:, z].to(acc)
            p0[:, pj[z]] = p[:, z].to(acc)
    finally:
        if grouped:
            ev.end_group()
        else:
            ev.end_prompt()
    if resid:  # Σ_k w_k ∇_r F → Σ_k w_k ∇_x F, one product per prompt, path and layer
        d = integral.shape[-1]
        integral = torch.cat(
            [
                (integral[:, i * J : (i + 1) * J].reshape(-1, d) @ W[l].to(acc).T).view(G, J, -1)
                for i, l in enumerate(prep.layers)
            ],
            dim=1,
        )
    return integral, f0, p0


def _group_size(model: Any, config: AttributionConfig, kind: str, samples: int, left: int) -> int:
    """Prompts per pass of the blockwise paths (TL 4 ``"blockwise"``, TL 3 ``"kv-hooked"``; S = the samples
    of a prompt in one pass): with the unembedding sweep, while ``G · S · d_model · d_mlp ≤ _GROUP_WORK``, at
    most ``_GROUP_MAX_SWEEP`` (and ``_GROUP_MAX``); otherwise bounded by ``_GROUP_LOGITS`` elements (per
    device type) of the ``[G, S, d_vocab]`` logits and ``_GROUP_MAX``. SIG prompts (one path per token:
    different sample counts) go alone."""
    if kind not in ("blockwise", "kv-hooked") or config.method == "sig":
        return 1
    S = min(samples, config.batch_size or _BLOCKWISE_BATCH)
    if _sweep_unembedding(model) is not None:
        work = S * int(model.cfg.d_model) * d_mlp(model)
        return max(1, min(left, int(_GROUP_WORK // work), _GROUP_MAX_SWEEP, _GROUP_MAX))
    budget = _GROUP_LOGITS["cpu" if model_device(model).type == "cpu" else "other"]
    return max(1, min(left, budget // max(1, S * int(model.cfg.d_vocab)), _GROUP_MAX))


def attribute_neurons(
    model: Any,
    prompts: str | Tensor | Sequence[str] | Sequence[Tensor],
    answers: str | int | Tensor | Sequence[str] | Sequence[int],
    *,
    method: str = "ig",
    steps: int = 20,
    rule: str = "left",
    site: str = "post",
    baseline: str | Tensor | None = None,
    objective: str = "prob",
    multiply_by: str | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    prepend_bos: bool | None = None,
    multi_token: str = "error",
    implementation: str = "fast",
    show_progress: bool = False,
    replacement_id: int | None = None,
    mask_bos: bool = False,
    fast_path: str = "auto",
) -> NeuronAttribution:
    """Attribute the answer probability to every MLP neuron at the answer position (IG / SIG / AMIG).

    See the module docstring for exactly what each method computes.

    Args:
        model: a TL model (HookedTransformer or TransformerBridge) in eval mode.
        prompts: a string or 1-D token tensor (single prompt), or a list of them / a 2-D token tensor.
        answers: the answer for each prompt: a string (tokenised as the continuation of the prompt) or a
            token id; a list of the same length as ``prompts``.
        method: ``"ig"`` (Dai et al.), ``"sig"`` (per-token masked baselines, averaged attributions) or
            ``"amig"`` (per-token masked baselines, averaged path).
        steps: number of quadrature nodes m (default 20).
        rule: ``"left"`` (default, Dai's code), ``"right"``, ``"midpoint"``, ``"trapezoid"``,
            ``"gauss_legendre"`` or ``"eleuther"`` (see :mod:`~qloc_tl.methods.attribution.quadrature`).
        site: ``"post"`` (``mlp.hook_post``, default), ``"pre"`` or ``"pre_linear"``.
        baseline: IG only: ``"zero"`` (default) or a tensor ``[d_mlp]`` / ``[n_layers, d_mlp]``. SIG/AMIG build
            masked-token baselines (leave ``None``).
        objective: ``"prob"`` (default, softmax probability of the answer) or ``"logprob"``.
        multiply_by: ``"difference"`` (w̄ − b; default for IG/SIG) or ``"activation"`` (w̄; default for AMIG).
        layers: layers to attribute (default all); the others are NaN in the result.
        batch_size: samples of a prompt per pass (default: ``steps`` for the reference; up to 512 for the
            blockwise paths; 128 samples of whole layers for ``"packed"``; ``2048 // n_tokens`` rows for
            ``"full"``).
        prepend_bos: passed to TL tokenisation of string prompts (``None`` = the model's default).
        multi_token: ``"error"`` (default) or ``"first"`` for answers that are several tokens.
        implementation: ``"fast"`` (default) or ``"reference"``.
        show_progress: a tqdm bar over prompts.
        replacement_id: SIG/AMIG replacement token (default: the tokenizer's EOS).
        mask_bos: SIG/AMIG: also mask a leading BOS token (default False).
        fast_path: ``"auto"`` (default: ``"blockwise"`` on HF-backed bridges and on HookedTransformers with
            learned absolute positions where ``n_ctx`` leaves room for passes as large as kv-hooked's,
            else ``"kv-hooked"`` on HookedTransformers; after a failed validation the next one —
            HookedTransformer ``"blockwise"`` → ``"kv-hooked"``, bridge ``"blockwise"`` → ``"packed"`` when
            ≥ 3 copies fit after the prompt, else ``"full"``), ``"kv"`` (require a prefix-reusing path —
            HookedTransformer: the KV cache; bridges: blockwise/packed — and raise
            :class:`~qloc_tl.core.errors.CapabilityError` if it fails validation), ``"blockwise"`` /
            ``"packed"`` (that path exactly, same error; ``"packed"`` on bridges only) or ``"full"``
            (batched full sequences).

    Returns:
        A :class:`~qloc_tl.methods.attribution.NeuronAttribution`.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> res = attribute_neurons(model, "alice was born in", "paris", steps=4)
        >>> res.scores.shape == (model.cfg.n_layers, model.cfg.d_mlp)
        True
    """
    check_model(model)
    require_eval(model)
    config = AttributionConfig(
        method=method,  # type: ignore[arg-type]
        steps=steps,
        rule=rule,
        site=site,  # type: ignore[arg-type]
        baseline=baseline,
        objective=objective,  # type: ignore[arg-type]
        multiply_by=multiply_by,  # type: ignore[arg-type]
        layers=tuple(layers) if layers is not None and not isinstance(layers, (int, str)) else layers,  # type: ignore[arg-type]
        batch_size=batch_size,
        prepend_bos=prepend_bos,
        multi_token=multi_token,  # type: ignore[arg-type]
        implementation=implementation,  # type: ignore[arg-type]
        show_progress=show_progress,
        replacement_id=replacement_id,
        mask_bos=mask_bos,
        fast_path=fast_path,  # type: ignore[arg-type]
    )
    d_mlp(model)
    plist, ids, single = _normalise_inputs(model, prompts, answers, config)
    fast = config.implementation == "fast"
    # the blocks as the user has them, before the call swaps in fused activations (new modules on TL 4)
    signature = _blocks_signature(model) if fast and config.site == "post" and _MLP_SHORTCUT else None
    fused = fused_activations(model) if fast else contextlib.nullcontext()
    normed = fused_layer_norms(model) if fast else contextlib.nullcontext()
    laid_out = matmul_ready_weights(model) if fast else contextlib.nullcontext()
    with frozen_parameters(model), fused, normed, laid_out:
        return _attribute(model, plist, ids, single, config, signature)


_VALIDATED_PATHS = ("kv-hooked", "blockwise", "packed")


def _fall_back(model: Any, config: AttributionConfig, kind: str, err: float, longest: int) -> str:
    """After ``kind`` failed validation: the next path to try (HookedTransformer: "blockwise" → "kv-hooked"
    → "full"; bridges: "blockwise" → "packed" when the context has room → "full"), or
    :class:`CapabilityError` when the user asked for a prefix-reusing path."""
    if config.fast_path != "auto":
        raise CapabilityError(
            f"fast_path={config.fast_path!r}: the {kind} path does not reproduce the clean logits on this model "
            f"(relative error {err:.2e}); use fast_path='auto' or 'full'"
        ) from None
    if kind == "blockwise":
        _BLOCKWISE_FAILED[model] = mode_key(model)
        nxt = _fast_kind(model, config, longest)  # "packed" or "full" now
    else:
        if kind == "packed":
            _PACKED_FAILED[model] = mode_key(model)
        nxt = "full"
    # the detail of each event; the one warning per model is _warn_slower's, once the call runs on a path
    logger.info(
        "the %s fast path does not reproduce the clean logits on this %s (relative error %.2e; e.g. a native "
        "bridge ignores 4-D attention masks); using the %s path",
        kind,
        type(model).__name__,
        err,
        "batched full-sequence" if nxt == "full" else nxt,
    )
    return nxt


# slower-than-normal runs warned about, per model: {(mode, path, shortcut used)}
_SLOW_WARNED: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()
_PATH_WORDS = {
    "full": "'full' (batched full-sequence)",
    "packed": "'packed'",
    "kv-hooked": "'kv-hooked' (KV cache)",
    "blockwise": "'blockwise'",
}


def _is_hooked_transformer(model: Any) -> bool:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # pragma: no cover - a TL without it
        return False
    return isinstance(model, HookedTransformer)


def _start_reasons(model: Any, config: AttributionConfig, kind: str) -> tuple[str | None, list[str]]:
    """``(normal path, reasons)`` when the fast implementation starts on a slower path than the one it takes
    on this kind of model (``(None, [])`` otherwise): a HookedTransformer whose capability probes found no
    usable KV cache or ``start_at_layer`` (:attr:`~qloc_tl.core.model.Capabilities.notes` say why), or a path that
    failed validation on an earlier call (remembered per model). ``fast_path="full"`` and the reference are
    what the user asked for: never slower than normal."""
    if config.implementation == "reference" or config.fast_path == "full":
        return None, []
    caps, mode = capabilities(model), mode_key(model)
    earlier = "the %s path did not reproduce the clean logits on an earlier call"
    if caps.backend == "hooked":
        if kind == "full" and _is_hooked_transformer(model):
            notes = list(caps.notes) or ["the capability probes found no usable KV cache / start_at_layer"]
            return "'kv-hooked' / 'blockwise'", notes
        if kind == "kv-hooked" and config.fast_path == "auto" and _BLOCKWISE_FAILED.get(model) == mode:
            return "blockwise", [earlier % "blockwise"]
        return None, []
    reasons = []
    if kind != "blockwise" and _BLOCKWISE_FAILED.get(model) == mode:
        reasons.append(earlier % "blockwise")
    if kind == "full" and _PACKED_FAILED.get(model) == mode:
        reasons.append(earlier % "packed")
    return ("blockwise" if reasons else None), reasons


def _warn_slower(model: Any, normal: str, kind: str, shortcut: bool, lost_shortcut: bool, reasons: list[str]) -> None:
    """One WARNING per model (and mode, path and shortcut) that the attribution runs slower than it would
    normally: the path taken, the one it would take and why not."""
    key = (mode_key(model), kind, shortcut)
    seen = _SLOW_WARNED.setdefault(model, set())
    if key in seen:
        return
    seen.add(key)
    taken = _PATH_WORDS.get(kind, repr(kind)) + " path" + (" without the MLP-out shortcut" if lost_shortcut else "")
    instead = _PATH_WORDS.get(normal, normal) + (" with it" if lost_shortcut and normal == kind else "")
    logger.warning(
        "attribute_neurons on this %s runs the slower %s instead of %s, because %s (warned once per model)",
        type(model).__name__,
        taken,
        instead,
        "; ".join(reasons),
    )


def _attribute(
    model: Any, plist: list[Any], ids: list[int], single: bool, config: AttributionConfig, signature: Any = None
) -> NeuronAttribution:
    """``signature``: :func:`_blocks_signature` of the model before the call's swaps (``None``: the MLP-out
    shortcut's verdict is neither remembered nor looked up)."""
    longest = _longest(model, plist, config)
    kind = "reference" if config.implementation == "reference" else _fast_kind(model, config, longest)
    # why this call runs slower than it would normally (warned once per model by _warn_slower)
    normal, reasons = _start_reasons(model, config, kind)
    shortcut = _shortcut_applies(model, config, kind)
    blocker = _shortcut_blocker(model) if shortcut else None
    if blocker is not None:
        shortcut = False
        normal, reasons = normal or kind, [*reasons, blocker]
    signature = signature if shortcut else None
    verdict = _shortcut_verdict(model, signature)
    if verdict is False:  # the probes refused it on an earlier call, for the same blocks
        shortcut = False
        reasons.append("the MLP-out shortcut's probes refused it on an earlier call for these blocks")
        normal = normal or kind
    # TL 3's prefix-reusing paths (and the one they fall back to) compute the clean logits by the map
    hooked_path = kind in ("kv-hooked", "blockwise") and capabilities(model).backend == "hooked"
    prep = _prepare(
        model,
        plist,
        ids,
        config,
        want_resid=kind in ("kv-hooked", "blockwise"),
        want_rows=kind == "blockwise" and not hooked_path,
        unembed=_sweep_unembedding(model) if hooked_path else None,
        want_post=shortcut,
        want_kv=hooked_path and _rows_layout_ok(model),
    )
    ev = _evaluator(model, kind, prep, config)
    if shortcut:
        assert isinstance(ev, _GroupedEvaluator)
        # checked by the probes of the first pass (_GroupedEvaluator._probes), unless they passed on an
        # earlier call for the same blocks
        ev.enable_shortcut(signature, verified=verdict is True)
    n, L, D = prep.acts.shape
    acc = _acc_dtype(model)
    dev = prep.acts.device
    alphas, weights = quadrature(config.rule, config.steps)
    if not bool((alphas == 0).any()):  # one extra node at α=0 (weight 0) gives F(baseline) for the delta
        alphas = torch.cat([torch.zeros(1, dtype=alphas.dtype), alphas])
        weights = torch.cat([torch.zeros(1, dtype=weights.dtype), weights])
    zero_k = int((alphas == 0).nonzero()[0])
    alphas, weights = alphas.to(dev, acc), weights.to(dev, acc)

    scores = torch.full((n, L, D), float("nan"), dtype=acc, device=dev)
    base_prob = torch.full((n, L), float("nan"), dtype=acc, device=dev)
    base_obj = torch.full((n, L), float("nan"), dtype=acc, device=dev)
    delta = torch.full((n, L), float("nan"), dtype=acc, device=dev)
    fixed = fixed_baseline(config.baseline, L, D, prep.acts) if config.method == "ig" else None
    layer_names = {l: prep.names[l] for l in prep.layers}
    layers_t = torch.tensor(prep.layers, dtype=torch.long, device=dev)
    nl = len(prep.layers)
    validated = False

    from tqdm.auto import tqdm

    def bases_of(idxs: list[int]) -> Tensor:
        """``[G, J, L, D]`` baselines of the prompts ``idxs`` (J = 1 except for SIG, whose G is 1)."""
        if config.method == "ig":
            assert fixed is not None
            return fixed.to(acc).expand(len(idxs), 1, L, D)
        rows = [prep.tokens[i, : int(prep.last[i]) + 1] for i in idxs]
        chunk = 1 if kind == "reference" else 64
        masked = masked_token_baselines_many(model, rows, layer_names, config, chunk=chunk)  # [J_g, L, D] each
        if config.method == "sig":
            return torch.stack([m.to(acc) for m in masked])
        return torch.stack([m.to(acc).mean(0, keepdim=True) for m in masked])

    with tqdm(total=n, disable=not config.show_progress, desc=f"{config.method} attribution") as bar:
        done = 0
        while done < n:
            K = alphas.shape[0]
            G = _group_size(model, config, kind, nl * K, n - done)
            idxs = list(range(done, done + G))
            bases = bases_of(idxs)  # [G, J, L, D]
            wbar = prep.acts[idxs].to(acc)  # [G, L, D]
            check = kind in _VALIDATED_PATHS and not validated  # once per call, on the first pass
            try:
                integral, f0, p0 = _run_group(ev, idxs, prep, bases, wbar, alphas, weights, zero_k, check)
            except _ShortcutMismatch as exc:
                assert isinstance(ev, _GroupedEvaluator)
                logger.info(
                    "the MLP-out shortcut does not reproduce block outputs on this %s (relative error %.2e); "
                    "running every block of its samples",
                    type(model).__name__,
                    exc.err,
                )
                reasons.append(f"the MLP-out shortcut does not reproduce block outputs (relative error {exc.err:.2e})")
                normal = normal or kind
                ev.shortcut = False
                continue  # the same prompts again, without it
            except _PathMismatch as exc:
                reasons.append(f"the {kind} path does not reproduce the clean logits (relative error {exc.err:.2e})")
                normal = normal or kind
                kind = _fall_back(model, config, kind, exc.err, longest)
                ev = _evaluator(model, kind, prep, config)
                continue  # the same prompts again, on the next path
            if reasons and not validated:  # the path of the call is settled: say once per model why it is slower
                used = bool(getattr(ev, "shortcut", False))
                lost = not used and _shortcut_applies(model, config, kind)
                _warn_slower(model, normal or kind, kind, used, lost, reasons)
            validated = True
            J = bases.shape[1]
            for r, i in enumerate(idxs):
                integ = integral[r].view(nl, J, D)
                w = wbar[r, layers_t].unsqueeze(1)  # [nl, 1, D]
                mult = (w - bases[r][:, layers_t].transpose(0, 1)) if config.multiply_by == "difference" else w
                sc = (mult * integ).mean(1)  # [nl, D]
                scores[i, layers_t] = sc
                base_obj[i, layers_t] = f0[r].view(nl, J).mean(1)
                base_prob[i, layers_t] = p0[r].view(nl, J).mean(1)
                delta[i, layers_t] = sc.sum(-1) - (prep.clean_obj[i].to(acc) - base_obj[i, layers_t])
            done += G
            bar.update(G)
    _check_finite(scores[:, layers_t], "attribution scores", model)
    return NeuronAttribution(
        scores_batched=scores,
        clean_prob=prep.clean_prob.to(acc),
        baseline_prob=base_prob,
        baseline_objective=base_obj,
        completeness_delta=delta,
        activations=prep.acts.to(acc),
        prompts=tuple(plist),
        answer_ids=prep.answers,
        positions=prep.last,
        n_tokens=prep.last + 1,
        config=config,
        path=kind,
        single=single,
    )
