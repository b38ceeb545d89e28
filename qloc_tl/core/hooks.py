"""Hook-function factories: every qloc_tl intervention is one of these.

Each factory returns a :class:`HookList` — a plain list of ``(hook_name, hook_fn)`` pairs that works
unchanged with TL's own ``model.hooks(fwd_hooks=...)`` and ``model.run_with_hooks(..., fwd_hooks=...)``.
Use them inside :func:`intervene` (or :func:`run_with_interventions`) to also get:

* validation of layer / neuron / head indices against the model before anything runs;
* a refusal (:class:`~qloc_tl.core.errors.CapabilityError`) when the backend ignores attention edits;
* an error (:class:`~qloc_tl.core.errors.HookNotFiredError`) when a hook never ran — silence is never success;
* removal of every hook on exit, also when an exception is raised.

Hook functions never mutate their input; they return a new tensor, so gradients flow through them, and a
``factor`` may itself be a tensor that requires grad.

Positions: ``positions`` is an int or a sequence of ints applied to every batch row (negative counts from
the end of the padded sequence), or ``None`` for all positions. ``row_positions`` (a 1-D integer tensor of
length ``batch``) picks one position per row instead — use it for right-padded batches, where each prompt's
last real token sits at a different index.

Examples:
    >>> import torch
    >>> from qloc_tl import Neuron, scale_neurons, intervene
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> tokens = torch.tensor([[1, 2, 3, 4]])
    >>> with intervene(model, scale_neurons([Neuron(0, 3)], 0.0)):
    ...     logits = model(tokens)
    >>> logits.shape[-1] == model.cfg.d_vocab
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import CapabilityError, HookNotFiredError, InvalidInputError
from qloc_tl.core.identities import Head, Neuron
from qloc_tl.core.model import TLModel, capabilities, check_layer, check_model, check_site, d_mlp, n_heads
from qloc_tl.core.validation import as_neurons, check_float, check_int, check_tensor, validate_neurons

logger = logging.getLogger(__name__)

__all__ = [
    "HookList",
    "CountingHook",
    "NeuronHook",
    "AttentionHook",
    "scale_neurons",
    "set_neurons",
    "scale_attention",
    "record_neurons",
    "intervene",
    "run_with_interventions",
]

FactorLike = float | int | Tensor
Positions = int | Sequence[int] | None


class HookList(list):
    """A list of ``(hook_name, hook_fn)`` pairs; concatenate with ``+`` to compose interventions."""

    def __add__(self, other: Iterable[tuple[str, Any]]) -> HookList:  # type: ignore[override]
        return HookList(list(self) + list(other))



def _check_positions(positions: Positions) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if isinstance(positions, bool):
        raise InvalidInputError(f"positions must be int, a sequence of ints or None, got {positions!r}")
    if isinstance(positions, int):
        return (positions,)
    pos = tuple(positions)
    if not pos or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
        raise InvalidInputError(f"positions must be int, a non-empty sequence of ints or None, got {positions!r}")
    return pos


def _position_mask(
    batch: int, seq: int, positions: tuple[int, ...] | None, row_positions: Tensor | None, device: torch.device
) -> Tensor:
    """Bool mask [batch, seq] of the positions an intervention touches."""
    if row_positions is not None:
        rp = row_positions.to(device).long()
        if rp.ndim != 1 or rp.shape[0] != batch:
            raise InvalidInputError(
                f"row_positions must be a 1-D tensor of length batch={batch}, got shape {tuple(rp.shape)}"
            )
        rp = torch.where(rp < 0, rp + seq, rp)
        if bool(((rp < 0) | (rp >= seq)).any()):
            raise InvalidInputError(f"row_positions out of range for a sequence of {seq} positions")
        return torch.arange(seq, device=device).unsqueeze(0) == rp.unsqueeze(1)
    if positions is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask = torch.zeros(seq, dtype=torch.bool, device=device)
    for p in positions:
        q = p + seq if p < 0 else p
        if not 0 <= q < seq:
            raise InvalidInputError(f"position {p} out of range for a sequence of {seq} positions")
        mask[q] = True
    return mask.unsqueeze(0).expand(batch, seq)


class CountingHook:
    """Base of qloc_tl hook functions: counts calls so that :func:`intervene` can verify they fired.

    Subclass it for your own hook function (override :meth:`apply`, which maps the hooked activation to its
    replacement) and pass it in a ``(name, fn)`` list to :func:`intervene`: a hook that never fires then raises
    :class:`~qloc_tl.core.errors.HookNotFiredError` instead of silently doing nothing.

    Examples:
        >>> import torch
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> class Halve(CountingHook):
        ...     def apply(self, act):
        ...         return act / 2
        >>> model = tiny_model()
        >>> halve = Halve()
        >>> with intervene(model, [("blocks.0.mlp.hook_post", halve)]):
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> halve.calls
        1
    """

    kind = "hook"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, act: Tensor, hook: Any = None) -> Tensor:
        out = self.apply(act)
        self.calls += 1
        return out

    def apply(self, act: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class NeuronHook(CountingHook):
    """Replace neuron activations ``act[..., idx]`` at chosen positions by ``op(act[..., idx])``.

    ``mode="scale"`` multiplies by ``value``; ``mode="set"`` writes ``value``. ``value`` broadcasts as a
    scalar or a 1-D tensor with one entry per neuron of this layer.
    """

    kind = "neuron"

    def __init__(
        self,
        layer: int,
        indices: Sequence[int],
        value: FactorLike,
        mode: str,
        positions: tuple[int, ...] | None,
        row_positions: Tensor | None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.indices = list(indices)
        self.value = value
        self.mode = mode
        self.positions = positions
        self.row_positions = row_positions
        self._idx = torch.tensor(self.indices, dtype=torch.long)

    def apply(self, act: Tensor) -> Tensor:
        if act.ndim != 3:
            raise InvalidInputError(f"neuron hook expects [batch, pos, d_mlp] activations, got {tuple(act.shape)}")
        width = act.shape[-1]
        if max(self.indices) >= width:
            raise InvalidInputError(
                f"neuron index {max(self.indices)} out of range for layer {self.layer} with d_mlp={width}"
            )
        B, P, _ = act.shape
        idx = self._idx.to(act.device)
        sel = act.index_select(-1, idx)  # [B, P, k]
        value = self.value
        big = torch.finfo(act.dtype).max
        if isinstance(value, Tensor):
            value = value.to(device=act.device, dtype=act.dtype)
            if value.ndim == 1 and value.shape[0] not in (1, len(self.indices)):
                raise InvalidInputError(
                    f"value has {value.shape[0]} entries but layer {self.layer} has {len(self.indices)} neurons"
                )
            if not bool(torch.isfinite(value.detach()).all()):
                raise InvalidInputError(f"a value of layer {self.layer}'s hook overflows {act.dtype} activations")
        elif abs(value) > big:
            raise InvalidInputError(f"value {value!r} of layer {self.layer}'s hook overflows {act.dtype} activations")
        new = sel * value if self.mode == "scale" else torch.zeros_like(sel) + value
        mask = _position_mask(B, P, self.positions, self.row_positions, act.device).unsqueeze(-1)
        new = torch.where(mask, new, sel)
        return act.scatter(-1, idx.expand(B, P, -1), new)


def _group(neurons: list[Neuron], value: FactorLike) -> dict[int, tuple[list[int], FactorLike]]:
    by_layer: dict[int, list[int]] = defaultdict(list)
    order: dict[int, list[int]] = defaultdict(list)
    for k, n in enumerate(neurons):
        if n.index in by_layer[n.layer]:
            raise InvalidInputError(f"neuron {n} listed twice")
        by_layer[n.layer].append(n.index)
        order[n.layer].append(k)
    per_neuron = isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] > 1
    if per_neuron and value.shape[0] != len(neurons):  # type: ignore[union-attr]
        raise InvalidInputError(f"value has {value.shape[0]} entries for {len(neurons)} neurons")  # type: ignore[union-attr]
    out = {}
    for layer, idx in by_layer.items():
        v = value[torch.tensor(order[layer])] if per_neuron else value  # type: ignore[index]
        out[layer] = (idx, v)
    return out


def _check_value(value: Any, what: str) -> None:
    """A factor or value: a finite real number, or a finite floating-point tensor (scalar or 1-D)."""
    if isinstance(value, Tensor):
        # the finiteness test of a tensor that requires grad reads its values only; gradients still flow
        check_tensor(what, value.detach(), kind="float", ndim=(0, 1))
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{what} must be a number or a tensor, got {type(value).__name__}")
    check_float(what, value)


def _check_row_positions(row_positions: Tensor | None) -> Tensor | None:
    if row_positions is not None:
        check_tensor("row_positions", row_positions, kind="int", ndim=1)
    return row_positions


def _check_positions_fit(model: TLModel, positions: tuple[int, ...] | None, what: str = "positions") -> None:
    """Positions no prompt of the model's context ``n_ctx`` can have are refused when the model is known."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if positions is None or not n_ctx:
        return
    for p in positions:
        if not -int(n_ctx) <= p < int(n_ctx):
            raise InvalidInputError(f"{what} entry {p} is out of range for the model's context n_ctx={n_ctx}")


def _neuron_hooks(
    neurons: Iterable[Neuron] | Neuron,
    value: FactorLike | Any,  # checked by _check_value (InvalidInputError)
    mode: str,
    positions: Positions,
    site: str,
    row_positions: Tensor | None,
    model: TLModel | None,
) -> HookList:
    suffix = check_site(site)
    _check_value(value, "factor" if mode == "scale" else "values")
    ns = as_neurons(neurons)
    pos = _check_positions(positions)
    row_positions = _check_row_positions(row_positions)
    if model is not None:
        validate_neurons(model, ns, site)
        _check_positions_fit(model, pos)
    hooks = HookList()
    for layer, (idx, v) in sorted(_group(ns, value).items()):
        hooks.append((f"blocks.{layer}.{suffix}", NeuronHook(layer, idx, v, mode, pos, row_positions)))
    return hooks



def scale_neurons(
    neurons: Iterable[Neuron] | Neuron,
    factor: FactorLike | Any,  # checked: a number or a tensor (InvalidInputError)
    *,
    positions: Positions = -1,
    site: str = "post",
    row_positions: Tensor | None = None,
    model: TLModel | None = None,
) -> HookList:
    """Multiply the given neurons' activations by ``factor`` at ``positions``.

    Suppression is ``factor=0`` and enhancement ``factor=2`` (Dai et al. 2022). ``factor`` may be a float,
    a scalar tensor (``requires_grad`` is fine: gradients flow) or a 1-D tensor with one factor per neuron.

    Args:
        neurons: ``Neuron`` objects (or ``(layer, index)`` pairs).
        factor: the multiplier.
        positions: token positions to edit (default ``-1``, the last position); ``None`` edits all.
        site: ``"post"`` (``mlp.hook_post``), ``"pre"`` or ``"pre_linear"``.
        row_positions: per-row positions ``[batch]`` for right-padded batches (overrides ``positions``).
        model: optional; when given, indices are validated against it now.

    Returns:
        A :class:`HookList` with one hook per layer involved.

    Examples:
        >>> hooks = scale_neurons([Neuron(1, 4), Neuron(0, 2)], 0.0)
        >>> [name for name, _ in hooks]
        ['blocks.0.mlp.hook_post', 'blocks.1.mlp.hook_post']
    """
    return _neuron_hooks(neurons, factor, "scale", positions, site, row_positions, model)


def set_neurons(
    neurons: Iterable[Neuron] | Neuron,
    values: FactorLike | Any,  # checked: a number or a tensor (InvalidInputError)
    *,
    positions: Positions = -1,
    site: str = "post",
    row_positions: Tensor | None = None,
    model: TLModel | None = None,
) -> HookList:
    """Overwrite the given neurons' activations with ``values`` (a scalar or one value per neuron).

    Examples:
        >>> import torch
        >>> hooks = set_neurons([Neuron(0, 1), Neuron(0, 5)], torch.tensor([0.5, -1.0]))
        >>> len(hooks)
        1
    """
    return _neuron_hooks(neurons, values, "set", positions, site, row_positions, model)


class AttentionHook(CountingHook):
    """Scale attention pattern (or score) entries of some heads at some (query, key) positions."""

    kind = "attention"

    def __init__(
        self,
        layer: int,
        heads: Sequence[int],
        factor: FactorLike,
        query_positions: tuple[int, ...] | None,
        key_positions: tuple[int, ...] | None,
        renormalize: bool,
        target: str,
        row_positions: Tensor | None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.heads = list(heads)
        self.factor = factor
        self.query_positions = query_positions
        self.key_positions = key_positions
        self.renormalize = renormalize
        self.target = target
        self.row_positions = row_positions

    def apply(self, act: Tensor) -> Tensor:
        if act.ndim != 4:
            raise InvalidInputError(f"attention hook expects [batch, head, q, k], got {tuple(act.shape)}")
        B, H, Q, K = act.shape
        if max(self.heads) >= H:
            raise InvalidInputError(f"head index {max(self.heads)} out of range for layer {self.layer} with {H} heads")
        dev = act.device
        head_mask = torch.zeros(H, dtype=torch.bool, device=dev)
        head_mask[torch.tensor(self.heads, device=dev)] = True
        qmask = _position_mask(B, Q, self.query_positions, self.row_positions, dev)  # [B, Q]
        if self.key_positions is None:
            kmask = torch.ones(K, dtype=torch.bool, device=dev)
        else:
            kmask = _position_mask(1, K, self.key_positions, None, dev)[0]
        # causal entries only: key <= query (offset for a KV-cached run where K > Q)
        offset = K - Q
        causal = torch.arange(K, device=dev).unsqueeze(0) <= (torch.arange(Q, device=dev).unsqueeze(1) + offset)
        mask = head_mask.view(1, H, 1, 1) & qmask.view(B, 1, Q, 1) & kmask.view(1, 1, 1, K) & causal.view(1, 1, Q, K)
        factor = self.factor
        if isinstance(factor, Tensor):
            factor = factor.to(device=dev, dtype=act.dtype)
        if self.target == "scores":
            allowed = torch.isfinite(act) & (act > torch.finfo(act.dtype).min / 2)
            mask = mask & allowed
            return torch.where(mask, act * factor, act)
        out = torch.where(mask, act * factor, act)
        if self.renormalize:
            touched = mask.any(-1, keepdim=True)
            denom = out.sum(-1, keepdim=True)
            safe = torch.where(denom.abs() > 0, denom, torch.ones_like(denom))
            out = torch.where(touched, out / safe, out)
        return out


def scale_attention(
    heads: Iterable[Head] | Head,
    factor: FactorLike | Any,  # checked: a number or a tensor (InvalidInputError)
    *,
    query_positions: Positions = -1,
    key_positions: Positions = None,
    renormalize: bool = False,
    target: str = "pattern",
    row_positions: Tensor | None = None,
    model: TLModel | None = None,
) -> HookList:
    """Scale attention entries of ``heads`` at (query row, key column) positions by ``factor``.

    Args:
        heads: ``Head`` objects (or ``(layer, head)`` pairs).
        factor: multiplier (0 suppresses, 2 enhances); a tensor with ``requires_grad`` is allowed.
        query_positions: query rows to edit (default the last position); ``None`` = all rows.
        key_positions: key columns to edit (default ``None`` = all columns, i.e. whole rows).
        renormalize: rescale each edited row to sum to 1 again (pattern target only).
        target: ``"pattern"`` (``attn.hook_pattern``, post-softmax; default) or ``"scores"``
            (``attn.hook_attn_scores``, pre-softmax; only causal, unmasked entries are scaled, so masked
            future positions never become visible).
        row_positions: per-row query positions ``[batch]`` for right-padded batches.
        model: optional; when given, layer/head indices are validated now.

    Examples:
        >>> hooks = scale_attention([Head(1, 0)], 0.0, key_positions=[2])
        >>> hooks[0][0]
        'blocks.1.attn.hook_pattern'
    """
    if target not in ("pattern", "scores"):
        raise InvalidInputError(f"target must be 'pattern' or 'scores', got {target!r}")
    if renormalize and target == "scores":
        raise InvalidInputError("renormalize applies to target='pattern' only (softmax renormalises scores)")
    _check_value(factor, "factor")
    if isinstance(factor, Tensor) and factor.ndim != 0:
        raise InvalidInputError("attention factor must be a scalar (float or 0-d tensor)")
    if isinstance(heads, Head):
        heads = [heads]
    hs = []
    for h in heads:
        if isinstance(h, Head):
            hs.append(h)
        elif isinstance(h, (tuple, list)) and len(h) == 2:
            hs.append(Head(*h))
        else:
            raise InvalidInputError(f"expected Head(layer, head) or a (layer, head) pair, got {h!r}")
    if not hs:
        raise InvalidInputError("empty head list: give at least one Head(layer, head)")
    if model is not None:
        H = n_heads(model)
        for h in hs:
            check_layer(model, h.layer, what=f"layer of {h!r}")
            if h.head >= H:
                raise InvalidInputError(
                    f"head index of {h!r} is out of range: the model has {H} query heads per layer "
                    f"(under GQA, hook_pattern is indexed by query heads, not key/value heads)"
                )
    qpos = _check_positions(query_positions)
    kpos = _check_positions(key_positions)
    row_positions = _check_row_positions(row_positions)
    if model is not None:
        _check_positions_fit(model, qpos, "query_positions")
        _check_positions_fit(model, kpos, "key_positions")
    suffix = "attn.hook_pattern" if target == "pattern" else "attn.hook_attn_scores"
    by_layer: dict[int, list[int]] = defaultdict(list)
    for h in hs:
        if h.head not in by_layer[h.layer]:
            by_layer[h.layer].append(h.head)
    return HookList(
        (f"blocks.{layer}.{suffix}", AttentionHook(layer, heads_, factor, qpos, kpos, renormalize, target, row_positions))
        for layer, heads_ in sorted(by_layer.items())
    )


class _Recorder(CountingHook):
    kind = "record"

    def __init__(self, store: dict[int, Tensor], layer: int, detach: bool) -> None:
        super().__init__()
        self.store = store
        self.layer = layer
        self.detach = detach

    def apply(self, act: Tensor) -> Tensor:
        self.store[self.layer] = act.detach() if self.detach else act
        return act


def record_neurons(
    layers: Iterable[int], store: dict[int, Tensor], *, site: str = "post", detach: bool = True
) -> HookList:
    """Hooks that store each layer's neuron activations ``[batch, pos, d_mlp]`` into ``store[layer]``.

    Compose with other hooks (record after an intervention by listing it later) to read activations
    under an intervention, e.g. the ΔValue of knowledge neurons when attention is edited.
    """
    suffix = check_site(site)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise InvalidInputError(f"layers must be an iterable of layer indices, got {layers!r}")
    idx = [check_int("layer", l) for l in layers]
    if not idx:
        raise InvalidInputError("layers is empty: give at least one layer to record")
    return HookList((f"blocks.{l}.{suffix}", _Recorder(store, l, detach)) for l in idx)


def _validate_hooks(model: TLModel, hooks: Sequence[tuple[str, Any]]) -> None:
    need_pattern = need_scores = False
    for item in hooks:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and callable(item[1])):
            raise InvalidInputError(f"each hook must be a (hook_name, hook_fn) pair, got {item!r}")
        name, fn = item
        if name not in model.hook_dict:
            raise InvalidInputError(f"model has no hook point {name!r}; check the layer index and site")
        if isinstance(fn, NeuronHook):
            check_layer(model, fn.layer)
            width = d_mlp(model)
            if max(fn.indices) >= width:
                raise InvalidInputError(f"neuron index {max(fn.indices)} out of range: d_mlp={width}")
        if isinstance(fn, AttentionHook):
            check_layer(model, fn.layer)
            H = n_heads(model)
            if max(fn.heads) >= H:
                raise InvalidInputError(
                    f"head index {max(fn.heads)} out of range: the model has {H} query heads per layer"
                )
            need_pattern |= fn.target == "pattern"
            need_scores |= fn.target == "scores"
    if need_pattern or need_scores:
        caps = capabilities(model)
        if need_pattern and not caps.pattern_editable:
            raise CapabilityError(
                "this model's backend ignores edits to attn.hook_pattern (e.g. a TL 3.9 native bridge); "
                "load it with HookedTransformer or TransformerBridge.boot_transformers instead"
            )
        if need_scores and not caps.scores_editable:
            raise CapabilityError(
                "this model's backend ignores edits to attn.hook_attn_scores (TL 4 boot_native passes the "
                "post-softmax pattern there); use target='pattern' or an HF-backed model"
            )


@contextlib.contextmanager
def intervene(
    model: TLModel | Any,  # anything else: check_model raises UnsupportedModelError
    hooks: Sequence[tuple[str, Any]],
    *,
    require_fired: bool = True,
) -> Iterator[Any]:
    """Context in which ``hooks`` are active on ``model``; every hook is removed on exit, even on error.

    Before entering, hook names and indices are validated and attention edits are refused on backends that
    ignore them. On a normal exit, a qloc_tl hook that never ran raises
    :class:`~qloc_tl.core.errors.HookNotFiredError` (disable with ``require_fired=False``).

    Examples:
        >>> import torch
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> with intervene(model, scale_neurons([Neuron(0, 0)], 2.0)) as m:
        ...     _ = m(torch.tensor([[1, 2, 3]]))
    """
    check_model(model)
    hooks = list(hooks)
    _validate_hooks(model, hooks)
    counted = [fn for _, fn in hooks if isinstance(fn, CountingHook)]
    for fn in counted:
        fn.calls = 0
    with model.hooks(fwd_hooks=hooks):
        yield model
    if require_fired:
        silent = [name for name, fn in hooks if isinstance(fn, CountingHook) and fn.calls == 0]
        if silent:
            raise HookNotFiredError(
                f"hooks never ran: {silent}; run a forward pass inside the context, and check that "
                f"stop_at_layer / start_at_layer do not skip those layers"
            )


def run_with_interventions(
    model: TLModel, inputs: Any, hooks: Sequence[tuple[str, Any]], **forward_kwargs: Any
) -> Float[Tensor, "batch pos d_vocab"]:
    """Run ``model(inputs, **forward_kwargs)`` inside :func:`intervene` and return its output.

    A tensor ``inputs`` is token ids (integer, ``[pos]`` or ``[batch, pos]``) or residual-stream input (float,
    ``[batch, pos, d_model]``); anything else (strings, lists of strings) goes to the model as it is.
    """
    if isinstance(inputs, Tensor):
        if inputs.dtype.is_floating_point:
            check_tensor("inputs", inputs, kind="float", ndim=3)
            if inputs.shape[-1] != int(model.cfg.d_model):
                raise InvalidInputError(
                    f"float inputs are residual-stream input [batch, pos, d_model={model.cfg.d_model}], got shape "
                    f"{tuple(inputs.shape)}; token ids must be an integer tensor"
                )
        else:
            check_tensor("inputs", inputs, kind="int", ndim=(1, 2))
    with intervene(model, hooks):
        return model(inputs, **forward_kwargs)
