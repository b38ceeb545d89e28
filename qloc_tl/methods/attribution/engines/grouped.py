"""What the blockwise engines share: several prompts per pass, the samples of layer l joining the pass as it
climbs the blocks, the MLP-out shortcut and its probes, and the objective from the final residual.

Engines built on :class:`GroupedEngine`: ``"kv-hooked"`` (:mod:`.kv_hooked`), ``"blockwise"`` on TL 4
bridges (:mod:`.blockwise`) and on TL 3 HookedTransformers (:mod:`.hooked_blockwise`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from qloc_tl.core.memory import memory_cap
from qloc_tl.core.model import TLModel, logit_tolerance, model_device, model_dtype
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines.base import (
    Engine,
    Evaluation,
    ShortcutMismatch,
    acc_dtype,
    objective_of_logits,
)
from qloc_tl.methods.attribution.engines.cache import ENGINE_CACHE
from qloc_tl.methods.attribution.engines.clean import CleanPass

__all__ = [
    "GroupedEngine",
    "ResidualLine",
    "TailHook",
    "tail_hooks",
    "layer_groups",
    "in_order",
    "inverse",
    "BLOCKWISE_BATCH",
    "GROUP_LOGITS",
    "GROUP_MAX",
]

BLOCKWISE_BATCH = 512
"""Samples per blockwise chunk (bounds the activations and the logits)."""
# Prompts per pass: while the [prompts, samples, d_vocab] logits stay below GROUP_LOGITS elements (per device
# type; fewer where config.memory_fraction of the free memory holds fewer), at most GROUP_MAX: element-wise
# work on larger logits falls out of cache.
GROUP_LOGITS = {"cpu": 1 << 23, "other": 1 << 27}
GROUP_MAX = 64


class ResidualLine:
    """The samples' path with the MLP-out shortcut: a sample of layer l enters the pass as its block-l output
    at the answer position, ``r = resid_post_l + (x − w̄) @ W_out``, and on the path ``x − w̄ = (1 − α)(b −
    w̄)``, so ``r = resid_post_l + (1 − α) v`` with ``v = (b − w̄) @ W_out`` computed once per prompt, path
    and layer instead of a product per sample. The gradient comes back w.r.t. ``r`` (``[.., d_model]``), and
    since ``∇_x F = ∇_r F @ W_out^T`` is linear, ``Σ_k w_k ∇_x F`` is ``(Σ_k w_k ∇_r F) @ W_out^T``
    (:meth:`to_neurons`): one product per prompt, path and layer again, after the sum over the nodes."""

    def __init__(
        self, prep: CleanPass, idxs: list[int], bases: Tensor, wbar: Tensor, W_out: dict[int, Tensor]
    ) -> None:
        acc, dev = wbar.dtype, wbar.device
        G, J, D = bases.shape[0], bases.shape[1], bases.shape[-1]
        self.layers, self.W, self.acc, self.J = prep.layers, W_out, acc, J
        rows = torch.tensor(idxs, dtype=torch.long, device=dev)
        self.post = torch.stack([prep.resid_post[l][rows] for l in prep.layers], dim=1)  # [G, nl, d_model]
        self.v = torch.stack(
            [
                ((bases[:, :, l] - wbar[:, None, l]).reshape(G * J, D).to(W_out[l].dtype) @ W_out[l])
                .to(acc)
                .view(G, J, -1)
                for l in prep.layers
            ],
            dim=2,
        )  # [G, J, nl, d_model]
        self.li_of = {l: i for i, l in enumerate(prep.layers)}
        self.width = self.post.shape[-1]
        self.dtype = self.post.dtype

    def at(self, li: Tensor, j: Tensor, alpha: Tensor) -> Tensor:
        """``[G, S, d_model]``: the block-l outputs of the samples (see :meth:`NeuronLine.at <.base.NeuronLine.at>`)."""
        return self.post[:, li].to(self.acc) + (1 - alpha).view(1, -1, 1) * self.v[:, j, li]

    def clean(self, layers: Tensor) -> Tensor:
        """``[G, n, d_model]``: the clean block outputs at the given layers (the validation samples)."""
        return self.post[:, [self.li_of[int(e)] for e in layers]].to(self.acc)

    def to_neurons(self, integral: Tensor) -> Tensor:
        """``Σ_k w_k ∇_r F [G, nl·J, d_model]`` → ``Σ_k w_k ∇_x F [G, nl·J, d_mlp]``."""
        G, J, d = integral.shape[0], self.J, integral.shape[-1]
        return torch.cat(
            [
                (integral[:, i * J : (i + 1) * J].reshape(-1, d) @ self.W[l].to(self.acc).T).view(G, J, -1)
                for i, l in enumerate(self.layers)
            ],
            dim=1,
        )


class GroupedEngine(Engine):
    """Several prompts per pass, the samples of layer l joining the pass as it climbs the blocks.

    **MLP-out shortcut** (``shortcut=True``; ``site="post"`` only, see
    :func:`~.shortcut.shortcut_applies`). The samples of layer l join at block l + 1 with their block-l output
    (:class:`ResidualLine`), so block l's attention and MLP input projection for them — computed and then
    discarded by the ``hook_post`` replacement, forward and backward — are skipped.

    It is checked on the first pass of every call (unless ``verified``: the probes passed on an earlier call
    for blocks of the same ``signature``): one probe entry per prompt and requested layer l rides along,
    joining at block l with the clean residual and a perturbed ``hook_post`` written by a hook (without the
    shortcut), and leaves the pass after block l; its output there must equal the shortcut's within the path
    tolerance, relative to ``1 + max|output|``. The perturbation (four neurons) is sized so that its effect on
    the output is as large as the residual stream itself. On a mismatch (a post-MLP normalisation, as in
    Gemma 2, ...) :class:`~.base.ShortcutMismatch` is raised and the method starts the prompts again on an
    engine without the shortcut.
    """

    validated = True
    idxs: list[int]
    W_out: dict[int, Tensor]

    def __init__(
        self,
        model: TLModel,
        prep: CleanPass,
        config: AttributionConfig,
        shortcut: bool = False,
        signature: Any = None,
        verified: bool = False,
    ) -> None:
        super().__init__(model, prep, config)
        self.shortcut, self.signature, self.verified = shortcut, signature, verified
        if shortcut:
            self.W_out = {l: model.blocks[l].mlp.W_out for l in prep.layers}

    # ------------------------------------------------------------------------- schedule

    def default_chunk(self, n_tok: int, samples: int) -> int:
        return max(1, min(samples, BLOCKWISE_BATCH))  # no sample computes a layer below its own

    def group_size(self, samples: int, left: int) -> int:
        """Bounded by :data:`GROUP_MAX` and by a budget of elements of the ``[G, S, d_vocab]`` logits:
        :data:`GROUP_LOGITS` (per device type), or fewer where ``config.memory_fraction`` of the free memory
        holds fewer (:func:`~qloc_tl.core.memory.memory_cap`). SIG prompts (one path per token: different
        sample counts) go alone."""
        if self.config.method == "sig":
            return 1
        model = self.model
        S = min(samples, self.config.batch_size or BLOCKWISE_BATCH)
        dev = model_device(model)
        elem = torch.finfo(acc_dtype(model)).bits // 8
        budget = GROUP_LOGITS["cpu" if dev.type == "cpu" else "other"]
        budget = memory_cap(budget, elem, dev, self.config.memory_fraction)
        return max(1, min(left, budget // max(1, S * int(model.cfg.d_vocab)), GROUP_MAX))

    def line(self, idxs: list[int], bases: Tensor, wbar: Tensor) -> Any:
        if self.shortcut:
            return ResidualLine(self.prep, idxs, bases, wbar, self.W_out)
        return super().line(idxs, bases, wbar)

    @contextlib.contextmanager
    def prompts(self, idxs: list[int]) -> Iterator[None]:
        self.start_group(idxs)
        try:
            yield
        finally:
            self.end_group()

    def start_group(self, idxs: list[int]) -> None:
        """Set up the prompts ``idxs`` of a pass (undone by :meth:`end_group`)."""
        self.idxs = idxs

    def end_group(self) -> None:
        """Drop what :meth:`start_group` built."""

    # ----------------------------------------------------------------------- the climb

    def joins(
        self, counts: dict[int, int], xs: Tensor, idx: Tensor, dim: int, check: bool
    ) -> tuple[tuple[dict[int, int], Tensor, dict[int, Tensor]] | None, list[tuple[str, Any]], Any]:
        """What a climb needs for the samples ``xs [G, S, D]`` (sorted by layer, ``counts`` per layer):
        ``(probe, hooks, joining)``. ``probe`` is :meth:`probes`. Without the shortcut the samples of layer l
        join at block l and a hook on ``hook_post`` writes their ``x``; with it they join at block l + 1 (``xs``
        are then their block-l outputs) and only the probes (the last entries at their block) are hooked.
        ``joining(j)`` gives the entries that join the pass before block j (``j = L``: after the last block),
        ``[G, c, d_model]``, or ``None``. ``dim``: 0 when entries are batch rows (TL 3 kv-hooked), 1 when they
        are sequence positions."""
        probe = self.probes(idx, check)
        if probe is not None:
            hooks = tail_hooks(self.prep.names, probe[0], probe[1], dim)
        else:
            hooks = [] if self.shortcut else tail_hooks(self.prep.names, counts, xs, dim)
        parts = dict(zip(counts, torch.split(xs, list(counts.values()), dim=1)))

        def joining(j: int) -> Tensor | None:
            l = j - 1 if self.shortcut else j
            if l not in counts:
                return None
            if self.shortcut:
                return parts[l]
            return self.prep.resid_last[l][idx].unsqueeze(1).expand(-1, counts[l], -1)

        return probe, hooks, joining

    def _shortcut_rows(self, l: int, xs: Tensor, idx: Tensor) -> Tensor:
        """``[G, c, d_model]``: the output of block l at the answer position of each prompt ``idx`` with
        ``hook_post`` there replaced by ``xs [G, c, d_mlp]`` (the shortcut)."""
        post = self.prep.resid_post[l][idx].unsqueeze(1)  # [G, 1, d_model]
        W = self.W_out[l]
        delta = xs - self.prep.acts[idx, l].unsqueeze(1).to(xs.dtype)
        return post + (delta.to(W.dtype) @ W).to(post.dtype)

    def probes(self, idx: Tensor, check: bool) -> tuple[dict[int, int], Tensor, dict[int, Tensor]] | None:
        """On the checking pass with the shortcut on (and not ``verified``): ``(counts, xs [G,
        n_layers_requested, D], want)`` of the probe entries (one per prompt and requested layer, sorted by
        layer) and the shortcut's output for each layer ``[G, 1, d_model]``; else ``None``."""
        if not (self.shortcut and check) or self.verified:
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
        """Raise :class:`~.base.ShortcutMismatch` unless the probes' block outputs ``got`` match ``want``;
        the verdict is remembered for the blocks' signature (:class:`~.cache.EngineCache`)."""
        with torch.no_grad():
            err = max(
                float(((got[l] - want[l]).abs().amax() / (1.0 + want[l].abs().amax())).to(torch.float64))
                for l in want
            )
        ok = err <= logit_tolerance(model_dtype(self.model))  # NaN fails too
        ENGINE_CACHE.remember_shortcut(self.model, self.signature, ok)
        if not ok:
            raise ShortcutMismatch(err)

    # ----------------------------------------------------------------------- objective

    def finish_group(
        self, final: Tensor, answers: Tensor, rows: Tensor, x: Tensor, check: bool
    ) -> Evaluation:
        """The result of a pass: ``final [R, d_model]``, the normalised final residual (``ln_final``'s
        output) of the pass's rows in whatever order the pass produced them, ``answers [R]`` their answer
        ids, ``rows [G, S]`` the row of each sample of ``x [G, S, D]``; only the per-sample results are
        permuted.

        The logits come from :meth:`logits_of`; the validation reads those of each prompt's last two samples."""
        logits = self.logits_of(final)
        tail_logits = logits[rows[:, -2:]].detach() if check else None  # [G, 2, d_vocab]
        obj, prob = objective_of_logits(logits, answers, self.config.objective, self.acc)
        obj, prob = obj[rows], prob[rows]
        (g,) = torch.autograd.grad(obj.sum(), x)
        return Evaluation(obj.detach(), prob.detach(), g, tail_logits)

    def logits_of(self, final: Tensor) -> Tensor:
        """Logits ``[R, d_vocab]`` from the normalised final residual."""
        return self.model.unembed(final)


def layer_groups(layer_of: Tensor) -> tuple[Tensor, dict[int, int]]:
    """``(order, counts)``: a stable sort of the samples by layer and the number of samples per layer."""
    order = torch.argsort(layer_of, stable=True)
    ls, cs = torch.unique_consecutive(layer_of[order], return_counts=True)
    return order, dict(zip(ls.tolist(), cs.tolist()))


class _Permute(torch.autograd.Function):
    """``x[:, order]`` for a permutation ``order``, whose backward is the gather ``grad[:, inverse]`` (autograd's
    index backward zero-fills a tensor of ``x``'s size and scatter-adds into it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor) -> Tensor:
        ctx.save_for_backward(inverse(order))
        return x[:, order]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (inv,) = ctx.saved_tensors
        return grad[:, inv], None


def in_order(x: Tensor, order: Tensor) -> Tensor:
    """``x[:, order]`` (``order`` a permutation), or ``x`` itself when ``order`` is the identity (the samples
    of a chunk are layer-major except the validation samples of the first one): no copy then."""
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return x
    return _Permute.apply(x, order)


def inverse(order: Tensor) -> Tensor:
    """The inverse of the permutation ``order``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


class TailHook:
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


def tail_hooks(names: dict[int, str], counts: dict[int, int], xs: Tensor, dim: int) -> list[tuple[str, TailHook]]:
    """Blockwise evaluation: the samples of layer l join the batch (``dim`` 0) or the sequence (``dim`` 1) at
    block l, as its last ``counts[l]`` entries; the hook at layer l overwrites exactly those with their ``x``
    (``xs [G, S, D]`` sorted by layer)."""
    parts = torch.split(xs, list(counts.values()), dim=1)  # one backward (a cat), not a zero-fill per slice
    return [(names[l], TailHook(v, dim)) for l, v in zip(counts, parts)]
