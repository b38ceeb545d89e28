"""The fast engine of knowledge-synapse attribution (:func:`~qloc_tl.methods.synapses.find_synapses`,
``implementation="fast"``): the answer token alone per sample, on top of the clean prefix.

Scaling the answer row (position q) of one layer's pattern changes the computation at position q only:
every earlier position's keys and values, in every layer, are the clean ones. So a sample (layer l, factor
α) needs only the answer token recomputed on top of the clean prefix, and the samples of a call share that
prefix. Two paths, by backend (:func:`synapse_fast_path`): ``"kv-hooked"`` (:class:`KVRows`, TL 3 with a
working KV cache and ``start_at_layer``) and ``"packed"`` (:class:`PackedRows`, TL 4 bridges). The first
pass of every call is validated (:func:`attattr_fast`); a failure raises :class:`FastMismatch`, which the
method turns into a fallback to its batched engine and remembers in
:data:`~qloc_tl.methods.attribution.engines.cache.ENGINE_CACHE` (path ``"synapses"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qloc_tl.core.errors import CapabilityError
from qloc_tl.core.hooks import AttentionHook, intervene, scale_attention
from qloc_tl.core.identities import Head
from qloc_tl.core.memory import is_out_of_memory
from qloc_tl.core.model import (
    TLModel,
    bridge_mask_convention,
    capabilities,
    frozen_parameters,
    hooked_kv_cache,
    hooked_kv_mask,
    logit_tolerance,
    logits_mismatch,
    model_dtype,
    n_heads,
    n_layers,
    pattern_hook_name,
)
from qloc_tl.core.tokens import answer_probability
from qloc_tl.methods.attribution.engines.cache import ENGINE_CACHE
from qloc_tl.methods.attribution.engines.packed import bridge_mask
from qloc_tl.methods.attribution.engines.unembed import hooked_ln_final, hooked_logits

__all__ = [
    "FastPath",
    "FastMismatch",
    "FastPass",
    "SampleRowsEdit",
    "FastRows",
    "KVRows",
    "PackedRows",
    "synapse_fast_path",
    "attattr_fast",
]

FastPath = Literal["kv-hooked", "packed"]


class FastMismatch(Exception):
    """The fast engine cannot reproduce this model (its validation failed, or its forward raised)."""


class SampleRowsEdit(AttentionHook):
    """The fast engine's edit of layer ``layer``'s pattern: the answer rows of the samples are multiplied by
    their factors (all heads), and a zero leaf ``z`` is added to them so that ``z.grad`` is ∂P/∂(pattern
    entry) at the scaled point.

    ``rows`` picks the sample rows of the hooked ``[batch, head, query, key]`` pattern: ``"tail"`` (TL 3 KV
    path: one query per batch row, the samples are the last ``len(factors)`` batch rows, ``factors [n]``) or
    ``"copies"`` (packed rows: the copies are the queries from ``q`` on, ``factors [batch, copies]``, 1 for
    copies of other samples). An :class:`~qloc_tl.core.hooks.AttentionHook` (target ``"pattern"``, every head), so
    :func:`~qloc_tl.core.hooks.intervene` validates it as a pattern edit and refuses backends that ignore those.
    """

    def __init__(
        self, layer: int, n_heads_: int, factors: Tensor, rows: Literal["tail", "copies"], q: int = 0
    ) -> None:
        super().__init__(layer, list(range(n_heads_)), 1.0, None, None, False, "pattern", None)
        self.factors = factors
        self.rows = rows
        self.q = q
        self.z: Tensor | None = None

    def apply(self, act: Tensor) -> Tensor:
        if self.rows == "tail":
            n = self.factors.shape[0]
            keep, edit = act[: act.shape[0] - n], act[act.shape[0] - n :]
            f = self.factors.to(device=act.device, dtype=act.dtype).view(n, 1, 1, 1)
            self.z = torch.zeros_like(edit, requires_grad=True)
            return torch.cat([keep, edit * f + self.z], dim=0)
        keep, edit = act[:, :, : self.q], act[:, :, self.q :]
        f = self.factors.to(device=act.device, dtype=act.dtype).unsqueeze(1).unsqueeze(-1)  # [B, 1, r, 1]
        self.z = torch.zeros_like(edit, requires_grad=True)
        return torch.cat([keep, edit * f + self.z], dim=2)


@dataclass
class FastPass:
    """One pass of the fast engine: P(answer) ``[S]`` and the answer-row gradients ``[S, n_heads, n_keys]``
    (float64, CPU) of its samples, and, when asked for, the answer logits ``[2, d_vocab]`` of the unedited
    validation row and of the pass's first sample."""

    prob: Tensor
    grads: Tensor
    check_logits: Tensor | None


@contextlib.contextmanager
def _forward_guard(path: str, active: bool) -> Iterator[None]:
    """While ``active`` (the validation pass): an exception of the fast layout's forward (a backend that
    rejects 4-D masks, position ids or the KV cache, or whose hooks do not fire) becomes
    :class:`FastMismatch` and the call falls back; :class:`~qloc_tl.core.errors.CapabilityError` (pattern
    edits ignored) and out-of-memory errors are raised as they are."""
    if not active:
        yield
        return
    try:
        yield
    except (FastMismatch, CapabilityError):
        raise
    except Exception as exc:
        if is_out_of_memory(exc):  # a lack of memory, not a backend that refuses the layout: no fallback
            raise
        raise FastMismatch(f"the {path!r} forward raised {exc!r}") from exc


class FastRows:
    """Evaluates samples ``(layer, factor)`` of one prompt on top of its clean prefix (see the subclasses)."""

    path: str = ""

    def __init__(self, model: TLModel, tokens: Tensor, answer: int) -> None:
        self.model = model
        self.tokens = tokens
        self.P = tokens.shape[1]
        self.q = self.P - 1
        self.H = n_heads(model)
        self.answer = answer

    def run(self, layer_of: list[int], factors: Tensor, check: bool) -> FastPass:
        raise NotImplementedError

    def _grads(self, prob: Tensor, taps: dict[int, SampleRowsEdit]) -> dict[int, Tensor]:
        order = list(taps)
        zs = [taps[l].z for l in order]
        if any(z is None for z in zs):
            raise FastMismatch("a pattern hook of the fast pass did not run")
        got = torch.autograd.grad(prob.sum(), zs)  # type: ignore[arg-type]
        return dict(zip(order, got))


class KVRows(FastRows):
    """TL 3 ``HookedTransformer``: the prefix (tokens 0..q−1) goes once into TL's KV cache; a pass runs the
    answer token only, one block per call (``start_at_layer=j, stop_at_layer=j + 1``) with the prefix's keys
    and values of block j expanded over the batch (views). The samples of layer l join the batch at block l
    with the clean residual entering it at q (``resid_q[l]``), so no sample computes a block below its own;
    the answer-row pattern of block l is ``[batch, head, 1, n_keys]`` and its samples are the last batch rows.
    """

    path = "kv-hooked"

    def __init__(self, model: TLModel, tokens: Tensor, answer: int, resid_q: dict[int, Tensor]) -> None:
        super().__init__(model, tokens, answer)
        self.resid_q = resid_q
        self.L = n_layers(model)
        self.prefix = hooked_kv_cache(model, 1)
        if self.q > 0:
            with torch.no_grad():
                head = tokens[:, : self.q]
                model(
                    head,
                    past_kv_cache=self.prefix,
                    attention_mask=hooked_kv_mask(model, head),
                    return_type=None,
                )
        self.prefix.freeze()

    def _cache(self, j: int, R: int) -> Any:
        """A frozen cache whose block-``j`` entry holds the prefix for ``R`` rows; a one-block call reads no
        other entry."""
        c = hooked_kv_cache(self.model, R)
        src = self.prefix.entries[j]
        c.entries[j].past_keys = src.past_keys.expand(R, *src.past_keys.shape[1:])
        c.entries[j].past_values = src.past_values.expand(R, *src.past_values.shape[1:])
        c.freeze()
        return c

    def _logits(self, resid: Tensor) -> Tensor:
        """The logits from the last block's output: ``ln_final``, then ``@ W_U + b_U`` (soft-capped where the
        model caps them); HookedTransformer's own ``unembed`` copies ``W_U.T`` on every call. The validation
        compares these logits with the model's own."""
        return hooked_logits(self.model, hooked_ln_final(self.model, resid))

    def run(self, layer_of: list[int], factors: Tensor, check: bool) -> FastPass:
        counts: dict[int, int] = {}
        for l in layer_of:  # samples come sorted by layer
            counts[l] = counts.get(l, 0) + 1
        taps: dict[int, SampleRowsEdit] = {}
        s0 = 0
        for l, n in counts.items():
            taps[l] = SampleRowsEdit(l, self.H, factors[s0 : s0 + n], "tail")
            s0 += n
        hooks = [(pattern_hook_name(self.model, l), t) for l, t in taps.items()]
        lmin = min(counts)
        d = self.resid_q[lmin].shape[-1]
        with _forward_guard(self.path, check), intervene(self.model, hooks):
            # the unedited validation row joins first, at the lowest block, and climbs with the samples
            resid = self.resid_q[lmin].view(1, 1, d) if check else self.resid_q[lmin].new_zeros(0, 1, d)
            for j in range(lmin, self.L):
                if j in counts:
                    resid = torch.cat([resid, self.resid_q[j].view(1, 1, d).expand(counts[j], 1, d)])
                resid = self.model(
                    resid, start_at_layer=j, stop_at_layer=j + 1, past_kv_cache=self._cache(j, resid.shape[0])
                )
            logits = self._logits(resid)  # [R, 1, d_vocab]
        prob = answer_probability(logits, 0, self.answer)
        g = self._grads(prob, taps)
        grads = torch.cat([g[l][:, :, 0, :] for l in counts]).detach().to("cpu", torch.float64)
        off = 1 if check else 0
        check_logits = logits[: off + 1, 0].detach() if check else None
        return FastPass(prob[off:].detach(), grads, check_logits)


class PackedRows(FastRows):
    """TL 4 bridges (which keep no KV cache), HF-backed and ``boot_native``: a row is the prefix followed by
    one copy of the answer token per sample; a 4-D mask (in the bridge's convention,
    :func:`~.packed.bridge_mask`) lets each copy see the prefix and itself only, and every copy has position id
    q, so each copy computes the clean answer position. In the pattern a copy's row holds the prefix keys
    0..q−1 and its own column, which stands for key q. When the context (``n_ctx``) cannot hold all copies
    after the prefix they are spread over rows of one batch, each repeating the prefix."""

    path = "packed"

    def __init__(self, model: TLModel, tokens: Tensor, answer: int) -> None:
        super().__init__(model, tokens, answer)
        bridge_mask_convention(model)  # the once-per-model probe runs here, not under a pass's hooks
        n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
        self.room = n_ctx - self.q if n_ctx else None  # copies one row can hold
        if self.room is not None and self.room < 1:
            raise FastMismatch(f"the prompt ({self.P} tokens) leaves no room for a copy in n_ctx={n_ctx}")

    def layout(self, B: int, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens [B, N], mask [B, 1, N, N], position ids [B, N])``: ``B`` rows = prefix + ``r`` copies."""
        q, dev = self.q, self.tokens.device
        row = self.tokens[0]
        N = q + r
        seq = torch.cat([row[:q], row[q:].expand(r)]).unsqueeze(0).expand(B, N)
        allowed = torch.zeros(N, N, dtype=torch.bool, device=dev)
        allowed[:q, :q] = torch.ones(q, q, dtype=torch.bool, device=dev).tril()
        allowed[q:, :q] = True
        diag = torch.arange(q, N, device=dev)
        allowed[diag, diag] = True
        pos = torch.cat([torch.arange(q, device=dev), torch.full((r,), q, device=dev)])
        pos = pos.unsqueeze(0).expand(B, N)
        return seq, bridge_mask(self.model, allowed[None, None].expand(B, 1, N, N)), pos

    def run(self, layer_of: list[int], factors: Tensor, check: bool) -> FastPass:
        q, H = self.q, self.H
        off = 1 if check else 0  # copy 0 of row 0: the unedited validation copy
        S = len(layer_of) + off
        r = S if self.room is None else max(1, min(S, self.room))
        B = -(-S // r)
        dev = self.tokens.device
        slot_layer = torch.full((B * r,), -1, dtype=torch.long)
        slot_layer[off:S] = torch.tensor(layer_of, dtype=torch.long)
        slot_factor = torch.ones(B * r, dtype=torch.float64)
        slot_factor[off:S] = factors.to(torch.float64)
        taps: dict[int, SampleRowsEdit] = {}
        slots: dict[int, Tensor] = {}
        for l in dict.fromkeys(layer_of):
            sl = (slot_layer == l).nonzero().squeeze(-1)
            f = torch.ones(B * r, dtype=torch.float64)
            f[sl] = slot_factor[sl]
            slots[l] = sl
            taps[l] = SampleRowsEdit(l, H, f.view(B, r).to(dev), "copies", q=q)
        seq, mask, pos = self.layout(B, r)
        hooks = [(pattern_hook_name(self.model, l), t) for l, t in taps.items()]
        with _forward_guard(self.path, check), intervene(self.model, hooks):
            logits = self.model(seq, attention_mask=mask, position_ids=pos)
        copies = logits[:, q:].reshape(B * r, -1)[:S]  # copies past S in the last row: unedited, dropped
        prob = answer_probability(copies.unsqueeze(1), 0, self.answer)
        g = self._grads(prob, taps)
        parts = []
        for l in taps:
            sl = slots[l]
            zg = g[l].permute(0, 2, 1, 3).reshape(B * r, H, q + r)[sl.to(dev)]  # [n_l, H, N]
            own = (q + sl % r).to(dev).view(-1, 1, 1).expand(-1, H, 1)  # the copy's own column = key q
            parts.append(torch.cat([zg[:, :, :q], zg.gather(2, own)], dim=2))
        grads = torch.cat(parts).detach().to("cpu", torch.float64)
        check_logits = copies[: off + 1].detach() if check else None
        return FastPass(prob[off:].detach(), grads, check_logits)


def synapse_fast_path(model: TLModel) -> tuple[FastPath | None, str]:
    """The fast engine's path for this model, or ``(None, why not)``."""
    why = ENGINE_CACHE.failure(model, "synapses")
    if why is not None:
        return None, why
    caps = capabilities(model)
    if caps.backend == "hooked":
        if caps.kv_cache == "hooked" and caps.start_at_layer == "fast":
            return "kv-hooked", ""
        why = "; ".join(caps.notes) or "its capability probes found no usable KV cache / start_at_layer"
        return None, f"the fast engine needs TL's KV cache and start_at_layer: {why}"
    return "packed", ""  # TL 4 bridges; the validation tells HF-backed ones (4-D masks honoured) from others


def _jobs(layers: Sequence[int], m: int, per_pass: int) -> list[list[tuple[int, int]]]:
    """Samples ``(layer, k)`` (k = −1: the α = 0 baseline, first in each layer: the first pass holds one),
    layer-major, cut into passes of whole layers of up to ``per_pass`` samples (a layer larger than that is
    split)."""
    jobs = [(l, k) for l in layers for k in range(-1, m)]
    per_layer = m + 1
    n = max(1, per_pass // per_layer) * per_layer if per_pass >= per_layer else per_pass
    return [jobs[i : i + n] for i in range(0, len(jobs), n)]


def attattr_fast(
    model: TLModel,
    path: FastPath,
    tokens: Tensor,
    answer: int,
    layers: Sequence[int],
    alphas: Tensor,
    weights: Tensor,
    per_pass: int,
    clean_logits: Tensor,
    resid_q: dict[int, Tensor] | None,
    show_progress: bool,
) -> tuple[dict[int, Tensor], dict[int, float]]:
    """The batched engine's sums and baselines (of :mod:`qloc_tl.methods.synapses`), from the answer token
    alone on top of the clean prefix: per layer ``Σ_k w_k ∂P/∂(answer row)`` ``[n_heads, n_keys]`` (float64,
    CPU) and P with that layer's answer row zeroed, over passes of up to ``per_pass`` samples.

    Validation (first pass): the unedited row's answer logits must equal the clean forward's
    (``clean_logits``), and the first sample (the α = 0 baseline of the first layer) must equal a full
    forward with that layer's answer row zeroed, both within :func:`~qloc_tl.core.model.logit_tolerance` relative
    to the logits' scale (:func:`~qloc_tl.core.model.logits_mismatch`). A mismatch, or a forward that raises on
    that pass, raises :class:`FastMismatch`.
    """
    P = tokens.shape[1]
    q = P - 1
    H = n_heads(model)
    ev: FastRows
    with _forward_guard(path, True):
        if path == "kv-hooked":
            ev = KVRows(model, tokens, answer, resid_q or {})
        else:
            ev = PackedRows(model, tokens, answer)
    m = len(alphas)
    acc = {layer: torch.zeros(H, P, dtype=torch.float64) for layer in layers}
    pzero: dict[int, float] = {}
    passes = _jobs(layers, m, per_pass)
    it: Iterable[list[tuple[int, int]]] = passes
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(passes, desc=f"attattr ({path})", unit="pass", leave=False)
    tol = logit_tolerance(model_dtype(model))
    w64 = weights.to(torch.float64)
    for i, chunk in enumerate(it):
        check = i == 0
        layer_of = [l for l, _ in chunk]
        factors = torch.tensor([0.0 if k < 0 else float(alphas[k]) for _, k in chunk], dtype=torch.float64)
        with frozen_parameters(model), torch.enable_grad():
            res = ev.run(layer_of, factors, check=check)
        if check:
            assert res.check_logits is not None
            _validate(model, tokens, q, chunk[0][0], res.check_logits, clean_logits, tol, path)
        for r, (layer, k) in enumerate(chunk):
            if k < 0:
                pzero[layer] = float(res.prob[r])
            else:
                acc[layer] += w64[k] * res.grads[r]
    return acc, pzero


def _validate(
    model: TLModel,
    tokens: Tensor,
    q: int,
    layer: int,
    got: Tensor,
    clean_logits: Tensor,
    tol: float,
    path: str,
) -> None:
    """Raise :class:`FastMismatch` unless the fast pass's unedited row reproduces the clean logits and its
    first sample (layer ``layer``'s answer row zeroed) a full forward with the same edit."""
    err = logits_mismatch(got[0], clean_logits)
    if not err <= tol:
        raise FastMismatch(
            f"{path!r}: the unedited answer token's logits differ from the full forward's by {err:.2e} "
            f"relative to the logits' scale (tolerance {tol:.0e})"
        )
    heads = [Head(layer, h) for h in range(n_heads(model))]
    zero = scale_attention(heads, 0.0, query_positions=[q], model=model)
    with torch.no_grad(), intervene(model, zero) as mdl:
        want = mdl(tokens)[0, q]
    err = logits_mismatch(got[1], want)
    if not err <= tol:
        raise FastMismatch(
            f"{path!r}: with layer {layer}'s answer row zeroed the logits differ from the full forward's by "
            f"{err:.2e} relative to the logits' scale (tolerance {tol:.0e})"
        )
