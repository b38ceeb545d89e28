"""Value slots of knowledge neurons: where row ``i`` of ``blocks[l].mlp.W_out`` lives in a TL model, and
reversible, verified writes to it (:class:`WeightEdit`, :func:`write_value_rows`), used by the erase and update
edits of :mod:`qloc_tl.core.edits`.

Where the weight lives is **measured, not assumed**: the tensor returned by ``blocks[l].mlp.W_out`` is traced
to the parameter that shares its storage (HookedTransformer: the parameter itself; TL 4 bridges: the wrapped
HF/native module weight, e.g. GPT-2 ``c_proj.weight`` ``[d_mlp, d_model]`` or LLaMA ``down_proj.weight``
``[d_model, d_mlp]`` seen transposed), falling back to a unique value match. After writing, a probe forward
pass checks that ``hook_mlp_out`` moved by exactly ``Σ_i p_i·Δv_i`` for a probe activation ``p`` written into
``hook_post`` (``verify=True``); an edit that does not reach the forward pass is undone and raises
:class:`~qloc_tl.core.errors.CapabilityError`. Writes never monkeypatch modules, and :meth:`WeightEdit.undo`
restores the touched rows bit-exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import CapabilityError, InvalidInputError, UnsupportedModelError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import TLModel, check_model, d_mlp, n_layers
from qloc_tl.core.validation import as_neurons, validate_neurons

logger = logging.getLogger(__name__)

__all__ = ["WeightEdit", "value_rows", "write_value_rows", "prepare_neurons"]


@dataclass(frozen=True)
class _Slot:
    """Where the rows of ``blocks[layer].mlp.W_out`` live: ``param`` (``[d_mlp, d_model]``, or its transpose
    when ``transposed``)."""

    layer: int
    name: str
    param: Tensor
    transposed: bool

    def read(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` as ``[k, d_model]`` (a copy)."""
        with torch.no_grad():
            if self.transposed:
                return self.param.index_select(1, idx).t().clone()
            return self.param.index_select(0, idx).clone()

    def write(self, idx: Tensor, rows: Tensor) -> None:
        with torch.no_grad():
            rows = rows.to(device=self.param.device, dtype=self.param.dtype)
            if self.transposed:
                self.param.index_copy_(1, idx, rows.t().contiguous())
            else:
                self.param.index_copy_(0, idx, rows.contiguous())


def _w_out_view(model: TLModel, layer: int) -> Tensor:
    try:
        W = model.blocks[layer].mlp.W_out
    except Exception as exc:  # noqa: BLE001 - any failure means the attribute path is missing
        raise UnsupportedModelError(
            f"cannot read model.blocks[{layer}].mlp.W_out ({exc!r}); weight edits need TL's W_out accessor "
            f"(HookedTransformer or TransformerBridge)"
        ) from None
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise UnsupportedModelError(f"blocks[{layer}].mlp.W_out is not a 2-D tensor (got {type(W).__name__})")
    width, dm = d_mlp(model), int(model.cfg.d_model)
    if tuple(W.shape) != (width, dm):
        raise UnsupportedModelError(
            f"blocks[{layer}].mlp.W_out has shape {tuple(W.shape)}, expected [d_mlp={width}, d_model={dm}]"
        )
    return W


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _locate_slot(model: TLModel, layer: int) -> _Slot:
    """Find the parameter whose storage holds ``blocks[layer].mlp.W_out``.

    First by storage identity (a view with the same or transposed layout), then by a unique exact value
    match (``p == W`` or ``p.T == W``) among parameters of the right shape.
    """
    W = _w_out_view(model, layer)
    ptr = _storage_ptr(W)
    shape_t = (W.shape[1], W.shape[0])
    for name, p in model.named_parameters():
        if p.ndim != 2 or _storage_ptr(p) != ptr or p.storage_offset() != W.storage_offset():
            continue
        if tuple(p.shape) == tuple(W.shape) and p.stride() == W.stride():
            return _Slot(layer, name, p, False)
        if tuple(p.shape) == shape_t and p.t().stride() == W.stride():
            return _Slot(layer, name, p, True)
    matches = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            if tuple(p.shape) == tuple(W.shape) and torch.equal(p, W):
                matches.append(_Slot(layer, name, p, False))
            elif tuple(p.shape) == shape_t and torch.equal(p.t(), W):
                matches.append(_Slot(layer, name, p, True))
    if len(matches) == 1:
        logger.debug("W_out of layer %d located by value match: %s", layer, matches[0].name)
        return matches[0]
    raise CapabilityError(
        f"cannot locate the parameter that holds blocks[{layer}].mlp.W_out on this backend "
        f"({'several' if matches else 'no'} parameters match its storage or values); weight edits are not "
        f"possible here — use activation interventions (qloc_tl.scale_neurons) instead"
    )


def _neuron_index(neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for n in neurons:
        lst = by_layer.setdefault(n.layer, [])
        if n.index in lst:
            raise InvalidInputError(f"neuron {n} listed twice; give each neuron once")
        lst.append(n.index)
    return by_layer


def prepare_neurons(model: TLModel, neurons: Iterable[Neuron] | Neuron, site: str) -> list[Neuron]:
    """``neurons`` as a list of :class:`Neuron`, each checked to exist in ``model`` at ``site``."""
    ns = as_neurons(neurons)
    validate_neurons(model, ns, site)
    return ns


def value_rows(model: TLModel, neurons: Iterable[Neuron] | Neuron) -> Float[Tensor, "k d_model"]:
    """The current value slots (rows of ``W_out``) of ``neurons``, in the order given (a copy).

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> value_rows(model, [Neuron(0, 1)]).shape
        torch.Size([1, 64])
    """
    check_model(model)
    ns = prepare_neurons(model, neurons, "post")
    return torch.stack([_locate_slot(model, n.layer).read(torch.tensor([n.index]))[0] for n in ns])


class WeightEdit:
    """A weight edit applied to a model: which rows were written, their old and new values, and
    :meth:`undo`. Returned by :func:`apply_erase` / :func:`apply_update` and yielded by the contexts.

    Attributes:
        kind: ``"erase"`` or ``"update"``.
        neurons: the edited neurons, in the order given.
        old_rows: ``[k, d_model]`` the rows before the edit (bit-exact copies, the parameter's dtype).
        new_rows: ``[k, d_model]`` the rows as written (after casting to the parameter's dtype).
        params: the names of the parameters written (one per layer touched).
    """

    def __init__(
        self,
        kind: str,
        neurons: tuple[Neuron, ...],
        slots: dict[int, _Slot],
        old: dict[int, Tensor],
        new: dict[int, Tensor],
        model: TLModel,
    ) -> None:
        self.kind = kind
        self.neurons = neurons
        self._slots = slots
        self._old = old
        self._new = new
        self._model = model
        self._active = True

    @property
    def active(self) -> bool:
        """True until :meth:`undo` has run."""
        return self._active

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(self._slots[l].name for l in sorted(self._slots))

    def _rows(self, store: dict[int, Tensor]) -> Tensor:
        pos: dict[int, int] = {}
        out = []
        for n in self.neurons:
            j = pos.get(n.layer, 0)
            pos[n.layer] = j + 1
            out.append(store[n.layer][j])
        return torch.stack(out)

    @property
    def old_rows(self) -> Float[Tensor, "k d_model"]:
        return self._rows(self._old)

    @property
    def new_rows(self) -> Float[Tensor, "k d_model"]:
        return self._rows(self._new)

    def undo(self) -> bool:
        """Restore the original rows (bit-exact). Returns False when already undone.

        If the rows were changed by someone else since the edit, they are still restored and a warning is
        logged.
        """
        if not self._active:
            return False
        idx_by_layer = _neuron_index(self.neurons)
        errors = []
        for layer, slot in self._slots.items():
            idx = torch.tensor(idx_by_layer[layer], device=slot.param.device)
            try:
                if not torch.equal(slot.read(idx), self._new[layer]):
                    logger.warning(
                        "rows of %s changed after the edit; restoring the pre-edit values anyway", slot.name
                    )
                slot.write(idx, self._old[layer])
            except Exception as exc:  # noqa: BLE001 - keep restoring the other layers
                errors.append(exc)
        self._active = False
        if errors:
            raise errors[0]
        return True

    def __enter__(self) -> WeightEdit:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self._active else "undone"
        return f"WeightEdit({self.kind}, {len(self.neurons)} neurons, {state})"


def write_value_rows(
    model: TLModel,
    kind: str,
    neurons: list[Neuron],
    make_rows: Any,
    verify: bool,
) -> WeightEdit:
    """Write ``make_rows(old [k, d_model] float) -> new`` into the value slots of ``neurons``; verify; return
    the edit. On any failure the model is left unchanged."""
    idx_by_layer = _neuron_index(neurons)
    slots = {layer: _locate_slot(model, layer) for layer in idx_by_layer}
    old = {}
    for layer, idx in idx_by_layer.items():
        slot = slots[layer]
        old[layer] = slot.read(torch.tensor(idx, device=slot.param.device))
    # new rows, computed in the order of `neurons`
    pos: dict[int, int] = {}
    order = []
    for n in neurons:
        j = pos.get(n.layer, 0)
        pos[n.layer] = j + 1
        order.append((n.layer, j))
    old_stack = torch.stack([old[l][j] for l, j in order])
    new_stack = make_rows(old_stack)
    if tuple(new_stack.shape) != tuple(old_stack.shape):
        raise InvalidInputError(
            f"new rows have shape {tuple(new_stack.shape)}, expected {tuple(old_stack.shape)}"
        )
    if not torch.isfinite(new_stack).all():
        raise InvalidInputError("the edited rows contain inf/NaN (e.g. a zero-norm embedding in rule='dai')")
    new: dict[int, Tensor] = {}
    for layer in idx_by_layer:
        rows = [new_stack[k] for k, (l, _) in enumerate(order) if l == layer]
        new[layer] = torch.stack(rows).to(dtype=old[layer].dtype, device=old[layer].device)
    before = _probe_mlp_out(model, slots, idx_by_layer) if verify else None
    written: list[int] = []
    try:
        for layer, idx in idx_by_layer.items():
            slot = slots[layer]
            slot.write(torch.tensor(idx, device=slot.param.device), new[layer])
            written.append(layer)
        # what was really stored (after the dtype cast), read back
        for layer, idx in idx_by_layer.items():
            slot = slots[layer]
            new[layer] = slot.read(torch.tensor(idx, device=slot.param.device))
        if verify:
            after = _probe_mlp_out(model, slots, idx_by_layer)
            _check_probe(model, before, after, old, new, idx_by_layer)
    except BaseException:
        for layer in written:
            slot = slots[layer]
            slot.write(torch.tensor(idx_by_layer[layer], device=slot.param.device), old[layer])
        raise
    return WeightEdit(kind, tuple(neurons), slots, old, new, model)


def _probe_vectors(model: TLModel, idx_by_layer: dict[int, list[int]]) -> dict[int, Tensor]:
    """A fixed probe activation per layer: ±1 at the edited indices, 0 elsewhere."""
    g = torch.Generator().manual_seed(12345)
    width = d_mlp(model)
    out = {}
    for layer, idx in sorted(idx_by_layer.items()):
        v = torch.zeros(width, dtype=torch.float64)
        signs = torch.randint(0, 2, (len(idx),), generator=g).double() * 2 - 1
        v[torch.tensor(idx)] = signs
        out[layer] = v
    return out


def _probe_mlp_out(
    model: TLModel, slots: dict[int, _Slot], idx_by_layer: dict[int, list[int]]
) -> dict[int, Tensor] | None:
    """``hook_mlp_out`` of every edited layer when its ``hook_post`` is replaced by the probe vector."""
    names = {l: (f"blocks.{l}.mlp.hook_post", f"blocks.{l}.hook_mlp_out") for l in idx_by_layer}
    if any(a not in model.hook_dict or b not in model.hook_dict for a, b in names.values()):
        logger.warning("model lacks mlp.hook_post / hook_mlp_out: weight edits are not verified")
        return None
    probes = _probe_vectors(model, idx_by_layer)
    store: dict[int, Tensor] = {}
    hooks = []
    for layer, (post, out) in names.items():
        vec = probes[layer]

        def put(act: Tensor, hook: Any, vec: Tensor = vec) -> Tensor:
            return vec.to(device=act.device, dtype=act.dtype).expand_as(act).clone()

        def rec(act: Tensor, hook: Any, layer: int = layer) -> Tensor:
            store[layer] = act.detach()[0, -1].double().cpu()
            return act

        hooks += [(post, put), (out, rec)]
    device = next(iter(slots.values())).param.device
    tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
    stop = max(idx_by_layer) + 1
    with torch.no_grad():
        try:
            kw = {"stop_at_layer": stop} if stop < n_layers(model) else {}
            model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)
        except Exception:  # noqa: BLE001 - stop_at_layer unsupported: run the whole model
            store.clear()
            model.run_with_hooks(tokens, fwd_hooks=hooks)
    if set(store) != set(idx_by_layer):
        logger.warning("hook_mlp_out did not fire for every edited layer: weight edits are not verified")
        return None
    return store


def _check_probe(
    model: TLModel,
    before: dict[int, Tensor] | None,
    after: dict[int, Tensor] | None,
    old: dict[int, Tensor],
    new: dict[int, Tensor],
    idx_by_layer: dict[int, list[int]],
) -> None:
    if before is None or after is None:
        return
    probes = _probe_vectors(model, idx_by_layer)
    dtype = next(iter(new.values())).dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1e-6
    for layer, idx in idx_by_layer.items():
        p = probes[layer][torch.tensor(idx)]  # [k]
        delta = new[layer].double().cpu() - old[layer].double().cpu()  # [k, d_model]
        expected = p @ delta
        got = after[layer] - before[layer]
        scale = (
            before[layer].abs().max()
            + after[layer].abs().max()
            + old[layer].double().abs().sum(0).max()
            + new[layer].double().abs().sum(0).max()
        ).item()
        tol = 64 * eps * max(scale, 1e-12) + 1e-30
        err = (got - expected).abs().max().item()
        if err > tol:
            raise CapabilityError(
                f"the weight edit of layer {layer} did not take effect in the forward pass as expected "
                f"(hook_mlp_out moved by {got.abs().max().item():.3g}, expected {expected.abs().max().item():.3g}, "
                f"error {err:.3g} > tol {tol:.3g}); this backend keeps a separate copy of W_out. The edit was "
                f"undone. Edit the model with activation interventions (qloc_tl.scale_neurons) instead"
            )
