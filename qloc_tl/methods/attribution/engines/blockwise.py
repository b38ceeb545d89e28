"""The ``"blockwise"`` engine of TL 4 bridges (HF-backed and ``boot_native``): packed rows driven one block at a
time through ``model.blocks[j]``, the samples of layer l joining at block l."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qloc_tl.core.memory import is_out_of_memory
from qloc_tl.core.model import n_layers
from qloc_tl.methods.attribution.engines.base import Evaluation, PathMismatch
from qloc_tl.methods.attribution.engines.grouped import GroupedEngine, in_order, inverse, layer_groups
from qloc_tl.methods.attribution.engines.packed import bridge_mask, bridge_row_limit

logger = logging.getLogger(__name__)

__all__ = ["BlockwiseEngine", "BlockCall"]


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


class BlockCall:
    """How the HF-backed bridge calls its blocks for the packed layout of any length ``N ≤ n_max``.

    Block 0's call (positional args after the hidden states, and kwargs) is captured from two probe forwards
    of the packed layout, of lengths ``n_max`` and ``n_max + 1``, each stopped at block 0 (embedding only).
    The tensor dimensions that differ between the two are the sequence dimensions (mask rows and columns,
    position ids, rotary cos/sin, cache positions); :meth:`at` slices them to the first ``N`` positions —
    the packed layout of a shorter sequence. KV caches are dropped and ``use_cache`` is set to False. The
    same call is assumed for every block; the validation row of the method checks the whole result.
    """

    def __init__(self, ev: BlockwiseEngine, n_max: int) -> None:
        a1, k1 = self._probe(ev, n_max)
        a2, k2 = self._probe(ev, n_max + 1)
        self.n_max = n_max

        def leaf(u: Any, v: Any) -> _Leaf:
            if not (isinstance(u, Tensor) and isinstance(v, Tensor)):
                return _Leaf(u, ())
            dims = tuple(d for d in range(u.dim()) if u.dim() == v.dim() and u.shape[d] != v.shape[d])
            if u.dim() != v.dim() or any(u.shape[d] != n_max or v.shape[d] != n_max + 1 for d in dims):
                raise PathMismatch(float("nan"))  # not a per-position dimension: cannot slice it
            return _Leaf(u, dims)

        self.args = _zip_map(tuple(a1[1:]), tuple(a2[1:]), leaf)
        self.kwargs = _zip_map(dict(k1), dict(k2), leaf)

    @staticmethod
    def _probe(ev: BlockwiseEngine, N: int) -> tuple[tuple, dict]:
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
            raise PathMismatch(float("nan"))
        return got["call"]

    def at(self, N: int) -> tuple[tuple, dict]:
        """Block 0's arguments for the layout of length ``N``."""

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


class BlockwiseEngine(GroupedEngine):
    """TL 4 bridges, blockwise, several prompts per pass (one row each).

    Row g = the prompt's prefix, left-padded to the group's longest prefix T, then one copy of the answer
    token per sample; a 4-D mask (in the backend's convention: :func:`~.packed.bridge_mask`) lets each copy see its row's prefix and itself (pads see only themselves)
    and every copy gets the answer's position id. The rows are driven one block at a time through
    ``model.blocks[j]`` (:class:`BlockCall`): the copies of layer-l samples join every row at block l with
    the clean residual entering it (``resid_last``) — with the MLP-out shortcut at block l + 1 — so no copy
    computes a layer below its own. The prefix (the clean input of the lowest requested layer,
    ``resid_rows``) is recomputed per block, since the bridges keep no KV cache; the logits are
    ``unembed(ln_final(·))`` of the copies only. All rows of a pass hold the same samples (layer, path, step)
    of their prompts. On HF-backed bridges a row may be longer than ``n_ctx`` (on ``boot_native`` ones not:
    :meth:`max_chunk`): position ids are explicit and no copy's exceeds the prompt's; the validation copy is the last of its row, the farthest along the sequence (with the
    shortcut, the probe of layer j is the farthest entry at block j), so a backend that cares about the
    sequence length fails validation.
    """

    path = "blockwise"
    ts: list[int]
    T: int
    _call: BlockCall | None = None

    def start_group(self, idxs: list[int]) -> None:
        super().start_group(idxs)
        self.ts = [int(self.prep.last[i]) for i in idxs]
        self.T = max(self.ts)
        self._call = None

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
        return seq, bridge_mask(self.model, allowed.unsqueeze(1)), pos

    def max_chunk(self, n_tok: int) -> int | None:
        """Where the backend refuses rows longer than ``n_ctx`` (:func:`~.packed.bridge_row_limit`: TL 4's
        ``boot_native`` bridges): a row (prefix of up to ``n_tok - 1`` tokens, the samples, a probe) and the
        one-longer layout :class:`BlockCall` probes must fit; else no limit."""
        limit = bridge_row_limit(self.model)
        return None if limit is None else limit - n_tok - 2

    def evaluate(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        """``x [G, S, D]`` (the same samples ``layer_of [S]`` for every row) → objective, probability ``[G,
        S]`` and the gradient ``[G, S, D]``; with ``check`` the logits of each row's last two samples."""
        order, counts = layer_groups(layer_of)
        try:
            final = self._final(order, counts, x, check)  # [G, S, d_model], samples in layer order
        except PathMismatch:  # also ShortcutMismatch
            raise
        except Exception as exc:
            if not check or is_out_of_memory(exc):  # no fallback for a lack of memory
                raise
            # on the validation chunk: a backend whose blocks cannot be driven this way → fall back
            logger.debug("blockwise evaluation raised %r", exc)
            raise PathMismatch(float("nan")) from exc
        G, S, d = final.shape
        rows = S * torch.arange(G, device=x.device).unsqueeze(1) + inverse(order)  # row g*S + sorted index
        answers = self.prep.answers[self.idxs].repeat_interleave(S)
        return self.finish_group(final.reshape(G * S, d), answers, rows, x, check)

    def _final(self, order: Tensor, counts: dict[int, int], x: Tensor, check: bool) -> Tensor:
        """``ln_final`` of the copies ``[G, S, d_model]`` (samples sorted by layer)."""
        model, S, L = self.model, x.shape[1], n_layers(self.model)
        xs = in_order(x, order)
        idx = torch.tensor(self.idxs, device=x.device)
        probe, hooks, joining = self.joins(counts, xs, idx, 1, check)
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
            raise PathMismatch(float("nan"))
        if any(h.calls != (j in ran) for j, (_, h) in enumerate(layout)):  # the layout of every block run
            raise PathMismatch(float("nan"))
        if probe is not None:
            self.check_shortcut(got, probe[2])
        return final

    def _begin(self, idx: Tensor, need: int) -> tuple[Tensor, list[tuple[str, Any]]]:
        """Before a climb with up to ``need`` copies per row: the rows before any copy joins (here the
        left-padded prefixes, recomputed at every block) and the hooks that lay the rows out, one per block in
        block order (here none: the captured block call carries the 4-D mask)."""
        T = self.T
        if self._call is None or self._call.n_max < T + need:
            self._call = BlockCall(self, T + need)
        assert self.prep.resid_rows is not None  # the clean pass keeps them for this engine (want_rows)
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
