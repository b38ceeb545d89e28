"""Weight edits of knowledge-neuron value slots: erase and update (Dai et al., ACL 2022), reversible.

The *value slot* of neuron ``Neuron(l, i)`` is row ``i`` of ``blocks[l].mlp.W_out`` (``[d_mlp, d_model]`` in
TL), i.e. the vector the neuron's activation multiplies on its way into the residual stream. That is true at
every neuron site (``"post"``, ``"pre"`` and ``"pre_linear"`` share the index ``i``), so ``site`` is only
validated.

* erase (:func:`erase`, permanent :func:`apply_erase`): ``v ← 0`` (or a given erase vector);
* update (:func:`update`, permanent :func:`apply_update`; the new rows by :func:`update_rows`),
  ``rule="dai"`` (default): ``v ← v − λ1·(‖v‖/‖e(o)‖)·e(o) + λ2·(‖v‖/‖e(o')‖)·e(o')`` with λ1 = 1, λ2 = 8
  (Dai et al.'s code); ``rule="eleuther"``: ``v ← v − λ1·e(o) + λ2·e(o')`` with λ1 = λ2 = 2 (EleutherAI
  ``knowledge-neurons`` / EasyEdit), no norm scaling. ``‖v‖`` is the norm of the row before the edit.
* ``embedding="unembed"`` (default) takes ``e(t) = W_U[:, t]`` (:func:`token_vector`), the direction the
  output reads; ``embedding="embed"`` takes ``e(t) = W_E[t]`` (the lineage's word embedding; identical to the
  unembedding for tied GPT-2 checkpoints loaded raw, different for untied models such as LLaMA and after TL's
  weight processing, which centres ``W_U``).

Where the weight lives is **measured, not assumed**: the tensor returned by ``blocks[l].mlp.W_out`` is traced
to the parameter that shares its storage (HookedTransformer: the parameter itself; TL 4 bridges: the wrapped
HF/native module weight, e.g. GPT-2 ``c_proj.weight`` ``[d_mlp, d_model]`` or LLaMA ``down_proj.weight``
``[d_model, d_mlp]`` seen transposed), falling back to a unique value match. After writing, a probe forward
pass checks that ``hook_mlp_out`` moved by exactly ``Σ_i p_i·Δv_i`` for a probe activation ``p`` written into
``hook_post`` (``verify=True``); an edit that does not reach the forward pass is undone and raises
:class:`~qloc_tl.core.errors.CapabilityError`. Edits never monkeypatch modules, and the contexts restore the
touched rows bit-exactly in ``finally``.

Examples:
    >>> import torch
    >>> from qloc_tl import Neuron
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> tokens = torch.tensor([[0, 5, 6, 7]])
    >>> clean = model(tokens)
    >>> with erase(model, [Neuron(1, 3), Neuron(2, 7)]) as edit:
    ...     edited = model(tokens)
    >>> bool((edited - clean).abs().max() > 0), torch.equal(model(tokens), clean)
    (True, True)
    >>> edit.new_rows.abs().max().item()
    0.0
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import CapabilityError, InvalidInputError, UnsupportedModelError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import TLModel, answer_token_id, check_model, d_mlp, n_layers
from qloc_tl.core.validation import as_neurons, validate_neurons

logger = logging.getLogger(__name__)

__all__ = [
    "WeightEdit",
    "erase",
    "update",
    "apply_erase",
    "apply_update",
    "value_rows",
    "update_rows",
    "token_vector",
    "RULE_DEFAULTS",
]

UpdateRule = Literal["dai", "eleuther"]
EmbeddingKind = Literal["unembed", "embed"]
TokenLike = int | str | Sequence[int] | Tensor

RULE_DEFAULTS: dict[str, tuple[float, float]] = {"dai": (1.0, 8.0), "eleuther": (2.0, 2.0)}
"""The default ``(λ1, λ2)`` of each update rule (the keys are the valid ``rule`` values)."""


# ==================================================================================================
# Locating and writing value slots
# ==================================================================================================


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


def _prepare_neurons(model: TLModel, neurons: Iterable[Neuron] | Neuron, site: str) -> list[Neuron]:
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
    ns = _prepare_neurons(model, neurons, "post")
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


def _apply_rows(
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


def _erase_maker(value: Any, d_model: int) -> Any:
    if isinstance(value, str):
        if value != "zero":
            raise InvalidInputError(
                f"erase value must be 'zero' or a tensor of shape [d_model], got {value!r}"
            )
        return lambda old: torch.zeros_like(old)
    if not isinstance(value, Tensor):
        raise InvalidInputError(f"erase value must be 'zero' or a tensor, got {type(value).__name__}")
    if value.ndim == 1 and value.shape[0] == d_model:
        return lambda old: value.to(device=old.device, dtype=old.dtype).expand_as(old).clone()
    if value.ndim == 2 and value.shape[1] == d_model:

        def per_row(old: Tensor) -> Tensor:
            if value.shape[0] != old.shape[0]:
                raise InvalidInputError(f"erase value has {value.shape[0]} rows for {old.shape[0]} neurons")
            return value.to(device=old.device, dtype=old.dtype).clone()

        return per_row
    raise InvalidInputError(
        f"erase value tensor must have shape [d_model={d_model}] or [n_neurons, d_model], got {tuple(value.shape)}"
    )


def apply_erase(
    model: TLModel,
    neurons: Iterable[Neuron] | Neuron,
    *,
    value: Literal["zero"] | Tensor = "zero",
    site: str = "post",
    verify: bool = True,
) -> WeightEdit:
    """Permanently set the value slots (rows of ``W_out``) of ``neurons`` to zero or ``value``.

    The edit stays until :meth:`WeightEdit.undo` is called (or use the record as a context manager). Prefer
    the scoped :func:`erase`.

    Args:
        model: a TL model (HookedTransformer or TransformerBridge, any weight processing).
        neurons: ``Neuron`` objects or ``(layer, index)`` pairs, each once.
        value: ``"zero"`` or an erase vector ``[d_model]`` (e.g. an ``[UNK]`` embedding), or one per neuron
            ``[n_neurons, d_model]``.
        site: the neuron site the indices refer to; only validated — the value slot is row ``index`` of
            ``W_out`` at every site.
        verify: check with a probe forward pass that the edit reaches the forward pass (2 one-token
            forwards); raises :class:`CapabilityError` and leaves the model unchanged if it does not.

    Returns:
        The :class:`WeightEdit`.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> edit = apply_erase(model, [Neuron(0, 2)])
        >>> value_rows(model, [Neuron(0, 2)]).abs().sum().item()
        0.0
        >>> edit.undo()
        True
    """
    check_model(model)
    ns = _prepare_neurons(model, neurons, site)
    return _apply_rows(model, "erase", ns, _erase_maker(value, int(model.cfg.d_model)), verify)


@contextlib.contextmanager
def erase(
    model: TLModel,
    neurons: Iterable[Neuron] | Neuron,
    *,
    value: Literal["zero"] | Tensor = "zero",
    site: str = "post",
    verify: bool = True,
) -> Iterator[WeightEdit]:
    """Context in which the value slots of ``neurons`` are erased; the original rows are restored bit-exactly
    on exit, also when an exception is raised. Arguments as :func:`apply_erase`.

    Erasing ``Neuron(l, i)`` has the same effect on the output as zeroing its activation at every position
    (``scale_neurons([Neuron(l, i)], 0.0, positions=None)``).

    Examples:
        >>> import torch
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> with erase(model, [Neuron(1, 0)]) as edit:
        ...     _ = model(torch.tensor([[0, 4, 5]]))
        >>> edit.active
        False
    """
    edit = apply_erase(model, neurons, value=value, site=site, verify=verify)
    try:
        yield edit
    finally:
        edit.undo()


def _token_ids(model: TLModel, token: TokenLike, what: str) -> list[int]:
    vocab = int(model.cfg.d_vocab)
    if isinstance(token, Tensor):
        token = token.flatten().tolist()
    if isinstance(token, bool):
        raise InvalidInputError(f"{what} must be a token id, a string or a list of token ids, got {token!r}")
    if isinstance(token, int):
        ids = [token]
    elif isinstance(token, str):
        try:
            ids = [answer_token_id(model, None, token)]
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"{what} {token!r}: {exc}; for a multi-token object pass its token ids as a list (their "
                f"embeddings are summed)"
            ) from None
    else:
        ids = list(token)
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidInputError(
                f"{what} must be a token id, a string or a non-empty list of token ids, got {token!r}"
            )
    for t in ids:
        if not 0 <= t < vocab:
            raise InvalidInputError(f"{what} token id {t} is out of range 0..{vocab - 1}")
    return ids


def token_vector(
    model: TLModel, token: TokenLike, embedding: EmbeddingKind = "unembed"
) -> Float[Tensor, " d_model"]:
    """``e(token)`` as used by :func:`update`: ``W_U[:, t]`` (``"unembed"``) or ``W_E[t]`` (``"embed"``),
    summed over the ids of a multi-token object; float64 copy.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> torch.equal(token_vector(model, 5), model.W_U[:, 5].double())
        True
    """
    if embedding not in ("unembed", "embed"):
        raise InvalidInputError(
            f"embedding must be 'unembed' (W_U[:, t]) or 'embed' (W_E[t]), got {embedding!r}"
        )
    ids = _token_ids(model, token, "token")
    with torch.no_grad():
        if embedding == "unembed":
            M = model.W_U  # [d_model, d_vocab]
            vecs = [M[:, t] for t in ids]
        else:
            M = model.W_E  # [d_vocab, d_model]
            vecs = [M[t] for t in ids]
        return torch.stack(vecs).double().sum(0).cpu()


def update_rows(
    rows: Float[Tensor, "k d_model"],
    e_old: Float[Tensor, " d_model"],
    e_new: Float[Tensor, " d_model"],
    *,
    rule: UpdateRule = "dai",
    lambda1: float | None = None,
    lambda2: float | None = None,
) -> Float[Tensor, "k d_model"]:
    """The updated value slots (pure function; computed in float64).

    * ``"dai"``: ``v − λ1·(‖v‖/‖e_old‖)·e_old + λ2·(‖v‖/‖e_new‖)·e_new`` (defaults λ1 = 1, λ2 = 8);
    * ``"eleuther"``: ``v − λ1·e_old + λ2·e_new`` (defaults λ1 = λ2 = 2).

    Examples:
        >>> v = torch.tensor([[3.0, 4.0]]); eo = torch.tensor([1.0, 0.0]); en = torch.tensor([0.0, 2.0])
        >>> update_rows(v, eo, en).tolist()   # 5/1·1 off x, 8·5/2·2 onto y
        [[-2.0, 44.0]]
        >>> update_rows(v, eo, en, rule="eleuther").tolist()
        [[1.0, 8.0]]
    """
    if rule not in RULE_DEFAULTS:
        raise InvalidInputError(f"rule must be 'dai' or 'eleuther', got {rule!r}")
    d1, d2 = RULE_DEFAULTS[rule]
    l1 = d1 if lambda1 is None else float(lambda1)
    l2 = d2 if lambda2 is None else float(lambda2)
    for name, lam in (("lambda1", l1), ("lambda2", l2)):
        if not math.isfinite(lam):
            raise InvalidInputError(f"{name} must be finite, got {lam}")
    v = rows.double()
    eo, en = e_old.double().to(v.device), e_new.double().to(v.device)
    if rule == "eleuther":
        return v - l1 * eo + l2 * en
    no, nn = eo.norm(), en.norm()
    if no == 0 or nn == 0:
        raise InvalidInputError(
            "an embedding used by rule='dai' has zero norm; pick another token or rule='eleuther'"
        )
    vn = v.norm(dim=-1, keepdim=True)
    return v - l1 * (vn / no) * eo + l2 * (vn / nn) * en


def apply_update(
    model: TLModel,
    neurons: Iterable[Neuron] | Neuron,
    old_token: TokenLike,
    new_token: TokenLike,
    *,
    lambda1: float | None = None,
    lambda2: float | None = None,
    rule: UpdateRule = "dai",
    embedding: EmbeddingKind = "unembed",
    site: str = "post",
    verify: bool = True,
) -> WeightEdit:
    """Permanently move the value slots of ``neurons`` from ``old_token`` towards ``new_token``
    (:func:`update_rows`); undo with :meth:`WeightEdit.undo`. Prefer the scoped :func:`update`.

    Args:
        old_token, new_token: o and o' — a token id, a single-token string, or a list of ids (embeddings
            summed).
        lambda1, lambda2: ``None`` takes the rule's default (dai: 1 and 8; eleuther: 2 and 2).
        rule: ``"dai"`` (norm-scaled, Dai et al. 2022) or ``"eleuther"`` (fixed step, EleutherAI / EasyEdit).
        embedding: ``"unembed"`` (default; ``W_U[:, t]``, what the output reads — the right choice for untied
            models) or ``"embed"`` (``W_E[t]``; lineage parity — EasyEdit/DKN use the input embedding).
        site, verify: as :func:`apply_erase`.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> with apply_update(model, [Neuron(2, 5)], 10, 11) as edit:
        ...     edit.kind
        'update'
    """
    check_model(model)
    ns = _prepare_neurons(model, neurons, site)
    e_old = token_vector(model, old_token, embedding)
    e_new = token_vector(model, new_token, embedding)

    def make(old: Tensor) -> Tensor:
        return update_rows(old, e_old, e_new, rule=rule, lambda1=lambda1, lambda2=lambda2)

    if rule not in RULE_DEFAULTS:
        raise InvalidInputError(f"rule must be 'dai' or 'eleuther', got {rule!r}")
    return _apply_rows(model, "update", ns, make, verify)


@contextlib.contextmanager
def update(
    model: TLModel,
    neurons: Iterable[Neuron] | Neuron,
    old_token: TokenLike,
    new_token: TokenLike,
    *,
    lambda1: float | None = None,
    lambda2: float | None = None,
    rule: UpdateRule = "dai",
    embedding: EmbeddingKind = "unembed",
    site: str = "post",
    verify: bool = True,
) -> Iterator[WeightEdit]:
    """Context in which ``neurons``' value slots are updated from ``old_token`` to ``new_token``; restored
    bit-exactly on exit, also on exceptions. Arguments as :func:`apply_update`.

    Examples:
        >>> import torch
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> before = value_rows(model, [Neuron(1, 2)])
        >>> with update(model, [Neuron(1, 2)], "paris", "rome"):
        ...     changed = not torch.equal(value_rows(model, [Neuron(1, 2)]), before)
        >>> changed, torch.equal(value_rows(model, [Neuron(1, 2)]), before)
        (True, True)
    """
    edit = apply_update(
        model, neurons, old_token, new_token, lambda1=lambda1, lambda2=lambda2, rule=rule, embedding=embedding,
        site=site, verify=verify,
    )  # fmt: skip
    try:
        yield edit
    finally:
        edit.undo()
