"""Knowledge editing on knowledge-neuron sets: erase and update, Rel/Gen/Loc/ΔPPL, and CAS selection.

This module reproduces the editing experiments of Chen et al. (ICLR 2025) on top of Dai et al.'s (ACL 2022)
weight edits. It has four layers, each usable on its own:

1. **Weight edits** (:func:`erase`, :func:`update`; permanent variants :func:`apply_erase`,
   :func:`apply_update`). The *value slot* of neuron ``Neuron(l, i)`` is row ``i`` of
   ``blocks[l].mlp.W_out`` (``[d_mlp, d_model]`` in TL), i.e. the vector the neuron's activation multiplies
   on its way into the residual stream. That is true at every neuron site (``"post"``, ``"pre"`` and
   ``"pre_linear"`` share the index ``i``), so ``site`` is only validated.

   * erase: ``v ← 0`` (or a given erase vector);
   * update, ``rule="dai"`` (default): ``v ← v − λ1·(‖v‖/‖e(o)‖)·e(o) + λ2·(‖v‖/‖e(o')‖)·e(o')`` with
     λ1 = 1, λ2 = 8 (Dai et al.'s code); ``rule="eleuther"``: ``v ← v − λ1·e(o) + λ2·e(o')`` with
     λ1 = λ2 = 2 (EleutherAI ``knowledge-neurons`` / EasyEdit), no norm scaling. ``‖v‖`` is the norm of the
     row before the edit.
   * ``embedding="unembed"`` (default) takes ``e(t) = W_U[:, t]``, the direction the output reads;
     ``embedding="embed"`` takes ``e(t) = W_E[t]`` (the lineage's word embedding; identical to the unembedding
     for tied GPT-2 checkpoints loaded raw, different for untied models such as LLaMA and after TL's weight
     processing, which centres ``W_U``).

   Where the weight lives is **measured, not assumed**: the tensor returned by ``blocks[l].mlp.W_out`` is
   traced to the parameter that shares its storage (HookedTransformer: the parameter itself; TL 4 bridges:
   the wrapped HF/native module weight, e.g. GPT-2 ``c_proj.weight`` ``[d_mlp, d_model]`` or LLaMA
   ``down_proj.weight`` ``[d_model, d_mlp]`` seen transposed), falling back to a unique value match. After
   writing, a probe forward pass checks that ``hook_mlp_out`` moved by exactly ``Σ_i p_i·Δv_i`` for a probe
   activation ``p`` written into ``hook_post`` (``verify=True``); an edit that does not reach the forward
   pass is undone and raises :class:`~qloc_tl.core.errors.CapabilityError`. Edits never monkeypatch modules and
   the contexts restore the touched rows bit-exactly in ``finally``.

2. **Metrics** (:func:`edit_metrics`, :func:`perplexity`), on the next-token prediction at each query's last
   position; o is the old object, o' the new one, q_i the edited query, q_j (j ≠ i) its neighbors:

   * Reliability — erase: ``1[argmax_after(q_i) ≠ o]``; update: ``1[argmax_after(q_i) = o']``.
   * Generalization — the same criterion averaged over the neighbors. For erase only the neighbors that
     predicted o *before* the edit count (an unknown neighbor would succeed trivially); ``nan`` when none
     did. For update every neighbor counts.
   * Locality — the fraction of unrelated queries whose top-1 prediction is unchanged: ``loc`` on queries of
     facts of *other* relations, ``loc_same`` on queries of other facts of the *same* relation (other
     subjects, other objects: "The capital of Germany is" after editing France's capital). On a real model
     the KNs of a relation are shared by its facts, so the two can differ widely.
   * Avg = (Rel + Gen + Loc) / 3, with Loc the other-relation Locality (the lineage's definition).
   * PPL = exp(Σ token NLL / #tokens) over a fixed held-out text set (every token after BOS is predicted);
     ΔPPL = PPL_after − PPL_before, relative ΔPPL = ΔPPL / PPL_before.
   * Also reported: the probability change of o (and o') on the edited query and on the neighbors.

3. **Neuron sets** for one fact with per-query attributions ``S [k, n_layers, d_mlp]``: ``N_i`` (the edited
   query's KNs), ``N_u`` (the union of all k queries' KNs — the "global" baseline) and **CAS**
   (:func:`cas_scores`, :func:`select_cas`): per neuron, with ``ŝ_j = S_j / max(S_j)`` (per-query max
   normalisation, so queries are comparable), ``CAS = β1·mean_j ŝ_j − β2·std_j ŝ_j`` (population std; or
   variance), β1 = β2 = 1; selected by fraction of max (0.2·max CAS, the same rule Dai et al. use for KNs)
   or top-k, never selecting CAS ≤ 0. These defaults are the proposals of ``method_spec.md`` §4.7: the
   paper's values were not retrievable.

   ``CAS_k`` (top-``|N_i|`` CAS neurons) is an optional size-matched control.

4. **Experiment runner** :func:`run_editing_experiment`; :func:`fact_attributions` + :func:`classify_facts` for
   a K_C/K_I split over all facts first (e.g. Otsu); the bar chart :func:`plot_editing`; :func:`claims` (verdicts
   on the paper's claims from a run directory). Measured numbers on the built-in model: ``docs/editing.md``.

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
import hashlib
import json
import logging
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import CapabilityError, InvalidInputError, UnsupportedModelError
from qloc_tl.core.hooks import _as_neurons, _validate_neurons
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import (
    answer_token_id,
    check_model,
    d_mlp,
    n_layers,
    require_eval,
    tokenize_prompts,
)
from qloc_tl.data.facts import Fact
from qloc_tl.experiments.consistency import consistency_score
from qloc_tl.methods.known import restrict_to_known

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
    "EditMetrics",
    "edit_metrics",
    "perplexity",
    "last_token_logprobs",
    "cas_scores",
    "select_by_cas",
    "select_cas",
    "fact_neuron_sets",
    "EditingConfig",
    "EditingResult",
    "FactClasses",
    "fact_attributions",
    "classify_facts",
    "run_editing_experiment",
    "plot_editing",
    "claims",
]

UpdateRule = Literal["dai", "eleuther"]
EmbeddingKind = Literal["unembed", "embed"]
TokenLike = int | str | Sequence[int] | Tensor

_RULE_DEFAULTS: dict[str, tuple[float, float]] = {"dai": (1.0, 8.0), "eleuther": (2.0, 2.0)}


# ==================================================================================================
# 1. Locating and writing value slots
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


def _w_out_view(model: Any, layer: int) -> Tensor:
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


def _locate_slot(model: Any, layer: int) -> _Slot:
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


def _prepare_neurons(model: Any, neurons: Iterable[Neuron] | Neuron, site: str) -> list[Neuron]:
    ns = _as_neurons(neurons)
    _validate_neurons(model, ns, site)
    return ns


def value_rows(model: Any, neurons: Iterable[Neuron] | Neuron) -> Float[Tensor, "k d_model"]:
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
        model: Any,
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
    model: Any,
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
            _check_probe(model, before, after, old, new, idx_by_layer)  # type: ignore[arg-type]
    except BaseException:
        for layer in written:
            slot = slots[layer]
            slot.write(torch.tensor(idx_by_layer[layer], device=slot.param.device), old[layer])
        raise
    return WeightEdit(kind, tuple(neurons), slots, old, new, model)


def _probe_vectors(model: Any, idx_by_layer: dict[int, list[int]]) -> dict[int, Tensor]:
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
    model: Any, slots: dict[int, _Slot], idx_by_layer: dict[int, list[int]]
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
    model: Any,
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
    model: Any,
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
    model: Any,
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


def _token_ids(model: Any, token: TokenLike, what: str) -> list[int]:
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
    model: Any, token: TokenLike, embedding: EmbeddingKind = "unembed"
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
    if rule not in _RULE_DEFAULTS:
        raise InvalidInputError(f"rule must be 'dai' or 'eleuther', got {rule!r}")
    d1, d2 = _RULE_DEFAULTS[rule]
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
    model: Any,
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

    if rule not in _RULE_DEFAULTS:
        raise InvalidInputError(f"rule must be 'dai' or 'eleuther', got {rule!r}")
    return _apply_rows(model, "update", ns, make, verify)


@contextlib.contextmanager
def update(
    model: Any,
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


# ==================================================================================================
# 2. Metrics
# ==================================================================================================


def last_token_logprobs(
    model: Any, prompts: Sequence[str] | Sequence[Tensor], *, batch_size: int = 32
) -> Float[Tensor, "n d_vocab"]:
    """Next-token log-probabilities at each prompt's last token (right-padded batches; float32, CPU)."""
    out = []
    prompts = list(prompts)
    for s in range(0, len(prompts), batch_size):
        toks, last = tokenize_prompts(model, prompts[s : s + batch_size])
        with torch.no_grad():
            logits = model(toks)
        rows = logits[torch.arange(len(last), device=logits.device), last]
        out.append(rows.float().log_softmax(-1).cpu())
    if not out:
        return torch.zeros(0, int(model.cfg.d_vocab))
    return torch.cat(out)


def _tokenize_texts(model: Any, texts: Sequence[str], batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Right-padded token batches of ``texts`` (sorted by length, so little padding), tokenised once."""
    texts = sorted(texts, key=lambda t: len(t.split()))
    return [tokenize_prompts(model, texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]


def _nll_sum(model: Any, batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for toks, last in batches:
        with torch.no_grad():
            logits = model(toks)[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        tgt = toks[:, 1:]  # position p predicts token p + 1
        nll = logits.logsumexp(-1) - logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [B, P-1]
        mask = torch.arange(tgt.shape[1], device=tgt.device).unsqueeze(0) < last.unsqueeze(1)
        total += float(nll[mask].double().sum())
        count += int(mask.sum())
    return total, count


def _ppl(model: Any, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    total, count = _nll_sum(model, batches)
    if count == 0:
        raise InvalidInputError(
            "the texts have no token to predict (each needs at least two tokens incl. BOS)"
        )
    return math.exp(total / count)


def perplexity(model: Any, texts: Sequence[str], *, batch_size: int = 32) -> float:
    """PPL = exp(Σ NLL / #tokens) over ``texts``, every token after the first (BOS when the model prepends
    one) predicted from its prefix; token-weighted across texts.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> p = perplexity(tiny_model(), ["the cat is red", "alice was born in paris"])
        >>> 1.0 < p < 96 * 4
        True
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise InvalidInputError("perplexity needs at least one text")
    return _ppl(model, _tokenize_texts(model, list(texts), batch_size))


@dataclass(frozen=True)
class EditMetrics:
    """Metrics of one edit (see the module docstring for the formulas).

    Attributes:
        reliability: 1.0 / 0.0 on the edited query.
        generalization: mean success over the neighbor queries (``nan`` when no neighbor counts).
        locality: fraction of unrelated queries whose top-1 is unchanged (``nan`` when there are none).
        ppl_before, ppl_after: held-out perplexity (``nan`` when not measured).
        dprob_old_edited: p_after(o) − p_before(o) on the edited query.
        dprob_new_edited: p_after(o') − p_before(o') on the edited query (update; ``nan`` for erase).
        dprob_old_neighbors, dprob_new_neighbors: the same averaged over the neighbors.
        n_neighbors: how many neighbors entered ``generalization``.
    """

    kind: str
    reliability: float
    generalization: float
    locality: float
    ppl_before: float = math.nan
    ppl_after: float = math.nan
    dprob_old_edited: float = math.nan
    dprob_new_edited: float = math.nan
    dprob_old_neighbors: float = math.nan
    dprob_new_neighbors: float = math.nan
    n_neighbors: int = 0

    @property
    def avg(self) -> float:
        """(Rel + Gen + Loc) / 3 (``nan`` if any is ``nan``)."""
        return (self.reliability + self.generalization + self.locality) / 3

    @property
    def ppl_delta(self) -> float:
        return self.ppl_after - self.ppl_before

    @property
    def ppl_rel_delta(self) -> float:
        return (self.ppl_after - self.ppl_before) / self.ppl_before

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(avg=self.avg, ppl_delta=self.ppl_delta, ppl_rel_delta=self.ppl_rel_delta)
        return d


def _as_2d(x: Tensor | None, what: str) -> Tensor:
    if x is None:
        return torch.zeros(0, 0)
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim == 1:
        return x.unsqueeze(0)
    if x.ndim != 2:
        raise InvalidInputError(
            f"{what} must be [n, d_vocab] logits (or [d_vocab]), got shape {tuple(x.shape)}"
        )
    return x


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


def edit_metrics(
    kind: Literal["erase", "update"],
    *,
    edited_before: Float[Tensor, " d_vocab"],
    edited_after: Float[Tensor, " d_vocab"],
    neighbors_before: Float[Tensor, "n d_vocab"] | None,
    neighbors_after: Float[Tensor, "n d_vocab"] | None,
    unrelated_before: Float[Tensor, "m d_vocab"] | None,
    unrelated_after: Float[Tensor, "m d_vocab"] | None,
    old_token: int,
    new_token: int | None = None,
    ppl_before: float = math.nan,
    ppl_after: float = math.nan,
) -> EditMetrics:
    """Rel / Gen / Loc (and probability changes) of one edit from next-token logits (or log-probs).

    Examples:
        >>> import torch
        >>> before = torch.tensor([3.0, 1.0, 0.0]); after = torch.tensor([0.0, 1.0, 3.0])
        >>> nb = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]); na = torch.tensor([[0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
        >>> m = edit_metrics("erase", edited_before=before, edited_after=after, neighbors_before=nb,
        ...                  neighbors_after=na, unrelated_before=nb, unrelated_after=na, old_token=0)
        >>> m.reliability, m.generalization, m.locality   # neighbor 2 never predicted o: excluded
        (1.0, 1.0, 0.5)
    """
    if kind not in ("erase", "update"):
        raise InvalidInputError(f"kind must be 'erase' or 'update', got {kind!r}")
    if kind == "update" and new_token is None:
        raise InvalidInputError("an update needs new_token (o')")
    eb, ea = _as_2d(edited_before, "edited_before"), _as_2d(edited_after, "edited_after")
    if eb.shape[0] != 1 or ea.shape != eb.shape:
        raise InvalidInputError(
            "edited_before / edited_after must be one [d_vocab] vector each, of equal size"
        )
    nb, na = _as_2d(neighbors_before, "neighbors_before"), _as_2d(neighbors_after, "neighbors_after")
    ub, ua = _as_2d(unrelated_before, "unrelated_before"), _as_2d(unrelated_after, "unrelated_after")
    if nb.shape != na.shape or ub.shape != ua.shape:
        raise InvalidInputError(
            "before/after logits of the neighbors (and of the unrelated queries) must match in shape"
        )
    o = int(old_token)
    pe_b, pe_a = eb.double().softmax(-1)[0], ea.double().softmax(-1)[0]
    top_e = int(ea[0].argmax())
    nbp, nap = (nb.double().softmax(-1), na.double().softmax(-1)) if nb.numel() else (nb, na)
    if kind == "erase":
        rel = float(top_e != o)
        if nb.numel():
            known = nb.argmax(-1) == o
            gen = _mean((na.argmax(-1)[known] != o).double()) if bool(known.any()) else math.nan
            n_nb = int(known.sum())
        else:
            gen, n_nb = math.nan, 0
        dnew_e = dnew_n = math.nan
    else:
        t = int(new_token)  # type: ignore[arg-type]
        rel = float(top_e == t)
        gen = _mean((na.argmax(-1) == t).double()) if nb.numel() else math.nan
        n_nb = int(nb.shape[0]) if nb.numel() else 0
        dnew_e = float(pe_a[t] - pe_b[t])
        dnew_n = _mean(nap[:, t] - nbp[:, t]) if nb.numel() else math.nan
    loc = _mean((ub.argmax(-1) == ua.argmax(-1)).double()) if ub.numel() else math.nan
    return EditMetrics(
        kind=kind,
        reliability=rel,
        generalization=gen,
        locality=loc,
        ppl_before=float(ppl_before),
        ppl_after=float(ppl_after),
        dprob_old_edited=float(pe_a[o] - pe_b[o]),
        dprob_new_edited=dnew_e,
        dprob_old_neighbors=_mean(nap[:, o] - nbp[:, o]) if nb.numel() else math.nan,
        dprob_new_neighbors=dnew_n,
        n_neighbors=n_nb,
    )


# ==================================================================================================
# 3. Neuron sets: N_i, N_u, CAS
# ==================================================================================================


def _check_scores(scores: Tensor, what: str = "scores") -> Tensor:
    if not isinstance(scores, Tensor):
        scores = getattr(scores, "scores", scores)
        scores = torch.as_tensor(scores)
    if scores.ndim != 3:
        raise InvalidInputError(
            f"{what} must have shape [k_queries, n_layers, d_mlp] (one attribution map per neighbor query), "
            f"got {tuple(scores.shape)}"
        )
    if scores.shape[0] < 1:
        raise InvalidInputError(f"{what} has no queries")
    if not torch.isfinite(scores).all():
        raise InvalidInputError(f"{what} contains inf/NaN")
    return scores


def cas_scores(
    scores: Float[Tensor, "k n_layers d_mlp"],
    *,
    beta1: float = 1.0,
    beta2: float = 1.0,
    spread: Literal["std", "var"] = "var",
    normalize: Literal["max", "none"] = "max",
) -> Float[Tensor, "n_layers d_mlp"]:
    """Consistency-Aware Score ``β1·μ − β2·σ`` per neuron over a fact's k neighbor queries.

    ``normalize="max"`` first divides each query's map by its maximum (by its largest absolute value when
    no score is positive; an all-zero map stays zero); ``μ`` is the mean over queries and ``σ`` the
    population variance (``spread="var"``, default: the paper's "variance across neighbor queries") or
    standard deviation (``"std"``). Computed in float64.

    Examples:
        >>> s = torch.tensor([[[1.0, 0.5]], [[1.0, 0.0]]])      # k=2 queries, 1 layer, 2 neurons
        >>> cas_scores(s).tolist()                               # [1-0, 0.25-0.0625]
        [[1.0, 0.1875]]
        >>> cas_scores(s, spread="std").tolist()                 # [1-0, 0.25-0.25]
        [[1.0, 0.0]]
    """
    s = _check_scores(scores).double()
    if spread not in ("std", "var"):
        raise InvalidInputError(f"spread must be 'std' or 'var', got {spread!r}")
    if normalize not in ("max", "none"):
        raise InvalidInputError(f"normalize must be 'max' or 'none', got {normalize!r}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {b!r}")
    if normalize == "max":
        flat = s.flatten(1)
        mx = flat.max(1).values
        amax = flat.abs().max(1).values
        denom = torch.where(mx > 0, mx, amax)
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        s = s / denom.view(-1, 1, 1)
    mu = s.mean(0)
    var = s.var(0, unbiased=False)
    sig = var.sqrt() if spread == "std" else var
    return beta1 * mu - beta2 * sig


def _neuron_set(neurons: Iterable[Neuron]) -> Any:
    """A NeuronSet when qloc_tl.methods.attribution provides one, else a sorted tuple of neurons."""
    ns = sorted(set(neurons))
    try:
        from qloc_tl.methods.attribution import NeuronSet  # type: ignore[attr-defined]
    except ImportError:
        return tuple(ns)
    return NeuronSet(ns)


def select_by_cas(
    cas: Float[Tensor, "n_layers d_mlp"],
    *,
    method: Literal["fraction_of_max", "topk"] = "fraction_of_max",
    value: float = 0.2,
) -> Any:
    """Neurons selected from a CAS map: ``"fraction_of_max"`` keeps CAS ≥ value·max(CAS);
    ``"topk"`` keeps the ``int(value)`` largest. Neurons with CAS ≤ 0 are never selected (so a fact whose
    CAS is nowhere positive gets an empty set).

    Returns:
        A ``NeuronSet`` (sorted by layer, index).

    Examples:
        >>> c = torch.tensor([[1.0, 0.1, -2.0], [0.3, 0.5, 0.0]])
        >>> [str(n) for n in select_by_cas(c)]
        ['L0N0', 'L1N0', 'L1N1']
        >>> [str(n) for n in select_by_cas(c, method="topk", value=2)]
        ['L0N0', 'L1N1']
    """
    if not isinstance(cas, Tensor) or cas.ndim != 2:
        raise InvalidInputError(
            f"cas must be a [n_layers, d_mlp] tensor, got {getattr(cas, 'shape', type(cas))}"
        )
    pos = cas > 0
    if method == "fraction_of_max":
        if isinstance(value, bool) or not 0 <= float(value) <= 1:
            raise InvalidInputError(f"fraction_of_max value must lie in [0, 1], got {value!r}")
        if not bool(pos.any()):
            return _neuron_set([])
        keep = pos & (cas >= float(value) * cas.max())
    elif method == "topk":
        if isinstance(value, bool) or int(value) != value or int(value) < 0:
            raise InvalidInputError(f"topk value must be a non-negative integer, got {value!r}")
        k = min(int(value), int(pos.sum()))
        keep = torch.zeros_like(pos)
        if k > 0:
            flat = torch.where(pos, cas, torch.full_like(cas, -math.inf)).flatten()
            keep.view(-1)[flat.topk(k).indices] = True
    else:
        raise InvalidInputError(f"method must be 'fraction_of_max' or 'topk', got {method!r}")
    return _neuron_set(Neuron(int(l), int(i)) for l, i in keep.nonzero().tolist())


def select_cas(
    scores: Float[Tensor, "k n_layers d_mlp"],
    *,
    beta1: float = 1.0,
    beta2: float = 1.0,
    spread: Literal["std", "var"] = "var",
    normalize: Literal["max", "none"] = "max",
    method: Literal["fraction_of_max", "topk"] = "fraction_of_max",
    value: float = 0.2,
) -> Any:
    """:func:`cas_scores` followed by :func:`select_by_cas`.

    Examples:
        >>> s = torch.tensor([[[1.0, 0.9, 0.0]], [[1.0, 0.0, 0.8]]])
        >>> [str(n) for n in select_cas(s, spread="std")]   # the consistent neuron only
        ['L0N0']
        >>> [str(n) for n in select_cas(s)]   # variance (default): 1.0, 0.45-0.2025, 0.4-0.16, all >= 0.2·max
        ['L0N0', 'L0N1', 'L0N2']
    """
    cas = cas_scores(scores, beta1=beta1, beta2=beta2, spread=spread, normalize=normalize)
    return select_by_cas(cas, method=method, value=value)


def _select_query(scores: Tensor, threshold: float) -> Any:
    """One query's KN set by fraction of max (qloc_tl.methods.attribution.select_neurons when available)."""
    try:
        from qloc_tl.methods.attribution import select_neurons  # type: ignore[attr-defined]
    except ImportError:
        select_neurons = None
    if select_neurons is not None:
        return select_neurons(scores, method="fraction_of_max", value=threshold)
    mx = scores.max()
    if not bool(mx > 0):
        return _neuron_set([])
    keep = scores >= threshold * mx
    return _neuron_set(Neuron(int(l), int(i)) for l, i in keep.nonzero().tolist())


def fact_neuron_sets(
    scores: Float[Tensor, "k n_layers d_mlp"],
    edited: int,
    *,
    kn_threshold: float = 0.2,
    beta1: float = 1.0,
    beta2: float = 1.0,
    spread: Literal["std", "var"] = "var",
    normalize: Literal["max", "none"] = "max",
    cas_method: Literal["fraction_of_max", "topk"] = "fraction_of_max",
    cas_value: float = 0.2,
) -> tuple[dict[str, Any], list[Any]]:
    """The editing sets of one fact, ``{"N_i", "N_u", "CAS", "CAS_k"}``, and the per-query KN sets.

    ``N_i`` = KNs of query ``edited`` (fraction-of-max ``kn_threshold`` of its own map); ``N_u`` = union of
    every query's KNs; ``CAS`` = :func:`select_cas`; ``CAS_k`` = the ``|N_i|`` neurons of highest positive
    CAS — a size-matched control that separates "which neurons" from "how many".
    """
    s = _check_scores(scores)
    if not 0 <= edited < s.shape[0]:
        raise InvalidInputError(f"edited query index {edited} out of range for {s.shape[0]} queries")
    per_query = [_select_query(s[j], kn_threshold) for j in range(s.shape[0])]
    union: set[Neuron] = set()
    for q in per_query:
        union.update(q)
    cas = cas_scores(s, beta1=beta1, beta2=beta2, spread=spread, normalize=normalize)
    sets = {
        "N_i": per_query[edited],
        "N_u": _neuron_set(union),
        "CAS": select_by_cas(cas, method=cas_method, value=cas_value),
        "CAS_k": select_by_cas(cas, method="topk", value=len(per_query[edited])),
    }
    return sets, per_query


# ==================================================================================================
# 4. Experiment runner
# ==================================================================================================

METHODS = ("N_i", "N_u", "CAS")
ALL_METHODS = ("N_i", "N_u", "CAS", "CAS_k")
EDITS = ("erase", "update")
CLASSES = ("K_C", "K_I")


@dataclass(frozen=True)
class EditingConfig:
    """Configuration of :func:`run_editing_experiment` (frozen, validated).

    Attributes:
        methods: neuron sets to edit with: ``"N_i"``, ``"N_u"``, ``"CAS"`` (default) and the optional
            size-matched control ``"CAS_k"`` (top-``|N_i|`` CAS neurons); see :func:`fact_neuron_sets`.
        edits: ``"erase"`` and/or ``"update"``.
        attribution_method, steps, site: passed to ``attribute_neurons`` when attributions are computed.
        kn_threshold: fraction of max selecting each query's KNs (Dai et al.'s t = 0.2).
        cas_beta1, cas_beta2, cas_spread, cas_normalize, cas_method, cas_value: CAS (see :func:`select_cas`).
        cs_mode, cs_threshold: K_C/K_I split when no ``classes`` are given: CS (``consistency_score`` over the
            per-query KN sets) ≥ ``cs_threshold`` → K_C, else K_I. 0.3 is the "example" static threshold of
            the submission (method_spec §4.3); the paper's value is unconfirmed.
        rule, lambda1, lambda2, embedding: the update (:func:`update`); ``None`` λ = the rule's default.
        erase_value: ``"zero"``.
        old_object: o = the model's top-1 on the edited query (``"top1"``) or the gold object (``"gold"``).
        require_known: skip facts none of whose queries the model answers with the gold object; the edited
            query is always one the model answers correctly when this is on.
        edit_query: which query is edited — ``"random"`` (seeded per fact, among the known ones) or
            ``"first"`` (the first known one).
        n_unrelated: unrelated queries per fact for Locality (one query each of facts of other relations).
        n_same_relation: queries per fact for the same-relation Locality ``loc_same`` (one query each of
            other facts of the fact's relation with another subject and another object; 0 turns it off).
        max_facts_per_class: stop once this many facts of each class were edited (``None``: all facts).
        chunk_size: facts per stored part (the unit of resumption).
        batch_size: prompts per forward pass.
        seed: seeds o', the edited query and the unrelated queries (per fact, from ``Fact.key``).
        verify_edits: verify every weight edit with a probe forward pass.
    """

    methods: tuple[str, ...] = METHODS
    edits: tuple[str, ...] = EDITS
    attribution_method: str = "ig"
    steps: int = 20
    site: str = "post"
    kn_threshold: float = 0.2
    cas_beta1: float = 1.0
    cas_beta2: float = 1.0
    cas_spread: Literal["std", "var"] = "var"
    cas_normalize: Literal["max", "none"] = "max"
    cas_method: Literal["fraction_of_max", "topk"] = "fraction_of_max"
    cas_value: float = 0.2
    cs_mode: Literal["relaxed", "strict"] = "relaxed"
    cs_threshold: float = 0.3
    rule: UpdateRule = "dai"
    lambda1: float | None = None
    lambda2: float | None = None
    embedding: EmbeddingKind = "unembed"
    erase_value: Literal["zero"] = "zero"
    old_object: Literal["top1", "gold"] = "top1"
    require_known: bool = True
    edit_query: Literal["random", "first"] = "random"
    n_unrelated: int = 20
    n_same_relation: int = 10
    max_facts_per_class: int | None = None
    chunk_size: int = 8
    batch_size: int = 32
    seed: int = 0
    verify_edits: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("methods", ALL_METHODS), ("edits", EDITS)):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            v = tuple(v)
            bad = [x for x in v if x not in allowed]
            if not v or bad or len(set(v)) != len(v):
                raise InvalidInputError(
                    f"{name} must be a non-empty tuple of distinct values from {allowed}, got {v!r}"
                )
            object.__setattr__(self, name, v)
        choices = {
            "attribution_method": ("ig", "sig", "amig"),
            "site": ("post", "pre", "pre_linear"),
            "cas_spread": ("std", "var"),
            "cas_normalize": ("max", "none"),
            "cas_method": ("fraction_of_max", "topk"),
            "cs_mode": ("relaxed", "strict"),
            "rule": tuple(_RULE_DEFAULTS),
            "embedding": ("unembed", "embed"),
            "erase_value": ("zero",),
            "old_object": ("top1", "gold"),
            "edit_query": ("random", "first"),
        }
        for name, allowed_values in choices.items():
            if getattr(self, name) not in allowed_values:
                raise InvalidInputError(
                    f"{name} must be one of {allowed_values}, got {getattr(self, name)!r}"
                )
        for name in ("kn_threshold", "cs_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise InvalidInputError(f"{name} must lie in [0, 1], got {v!r}")
        for name in ("cas_beta1", "cas_beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InvalidInputError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.cas_method == "fraction_of_max" and not 0 <= self.cas_value <= 1:
            raise InvalidInputError(
                f"cas_value must lie in [0, 1] for fraction_of_max, got {self.cas_value!r}"
            )
        if self.cas_method == "topk" and (int(self.cas_value) != self.cas_value or self.cas_value < 1):
            raise InvalidInputError(f"cas_value must be a positive integer for topk, got {self.cas_value!r}")
        for name in ("steps", "chunk_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {v!r}")
        for name in ("n_unrelated", "n_same_relation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidInputError(f"{name} must be an int >= 0, got {v!r}")
        if self.max_facts_per_class is not None and (
            isinstance(self.max_facts_per_class, bool)
            or not isinstance(self.max_facts_per_class, int)
            or self.max_facts_per_class < 1
        ):
            raise InvalidInputError(
                f"max_facts_per_class must be None or an int >= 1, got {self.max_facts_per_class!r}"
            )
        for name in ("lambda1", "lambda2"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise InvalidInputError(
                    f"{name} must be None (the rule's default) or a finite number, got {v!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"], d["edits"] = list(self.methods), list(self.edits)
        return d


@dataclass(frozen=True)
class EditingResult:
    """What :func:`run_editing_experiment` produced.

    Attributes:
        table: one row per (edit, class, method): ``n_facts``, mean ``rel``, ``gen``, ``loc``, ``avg``
            (= (rel+gen+loc)/3 of the means), ``ppl_delta``, ``ppl_rel_delta`` (and its median),
            ``n_neurons`` and the mean probability changes.
        rows: one row per (fact, method, edit).
        skipped: one row per skipped fact with its ``reason``.
        config: the configuration.
        out_dir: the run directory (``None`` when not persisted).
    """

    table: pd.DataFrame
    rows: pd.DataFrame
    skipped: pd.DataFrame
    config: EditingConfig
    out_dir: Path | None = None

    def to_markdown(self, digits: int = 3) -> str:
        """The table as a Markdown pipe table (no extra dependency)."""
        cols = [
            "edit",
            "class",
            "method",
            "n_facts",
            "rel",
            "gen",
            "loc",
            "avg",
            "ppl_delta",
            "ppl_rel_delta",
            "n_neurons",
        ]
        cols = [c for c in cols if c in self.table.columns]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in self.table[cols].iterrows():
            cells = []
            for c in cols:
                v = r[c]
                cells.append(f"{v:.{digits}f}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


_METRIC_COLS = (
    "rel", "gen", "loc", "avg", "ppl_before", "ppl_after", "ppl_delta", "ppl_rel_delta",
    "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors",
)  # fmt: skip


def summarize(rows: pd.DataFrame, config: EditingConfig | None = None) -> pd.DataFrame:
    """Aggregate per-fact rows into the (edit × class × method) table: means over facts (ignoring ``nan``),
    ``avg`` = (rel + gen + loc) / 3 of those means, plus the median relative ΔPPL (ΔPPL is heavy-tailed)."""
    cfg = config or EditingConfig()
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    out = []
    for edit in cfg.edits:
        for cls in CLASSES:
            for method in cfg.methods:
                g = (
                    ok[(ok["edit"] == edit) & (ok["class"] == cls) & (ok["method"] == method)]
                    if len(ok)
                    else ok
                )
                rec: dict[str, Any] = {"edit": edit, "class": cls, "method": method, "n_facts": int(len(g))}
                for c in ("rel", "gen", "loc", "loc_same", "ppl_delta", "ppl_rel_delta", "n_neurons",
                          "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors"):  # fmt: skip
                    has = c in g.columns and len(g) and g[c].notna().any()  # loc_same: absent in older rows
                    rec[c] = float(g[c].astype(float).mean()) if has else math.nan
                rec["avg"] = (rec["rel"] + rec["gen"] + rec["loc"]) / 3
                v = g["ppl_rel_delta"].astype(float).dropna() if len(g) else pd.Series(dtype=float)
                rec["ppl_rel_delta_median"] = float(v.median()) if len(v) else math.nan
                out.append(rec)
    cols = ["edit", "class", "method", "n_facts", "rel", "gen", "loc", "loc_same", "avg", "ppl_delta", "ppl_rel_delta",
            "ppl_rel_delta_median", "n_neurons", "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors"]  # fmt: skip
    return pd.DataFrame(out, columns=cols)


def _fact_rng(seed: int, key: str, purpose: str) -> random.Random:
    return random.Random(f"{seed}|{purpose}|{key}")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scores_of(obj: Any) -> Tensor:
    scores = getattr(obj, "scores", obj)
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(np.asarray(scores))
    return scores.detach().float().cpu()


def _decode(model: Any, t: int) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return str(t)
    try:
        return tok.decode([t]).strip()
    except Exception:  # noqa: BLE001
        return str(t)


@dataclass
class _RunState:
    """Caches shared across facts within one run (never persisted)."""

    logits_cache: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))


def _skip(fact: Fact, reason: str, **extra: Any) -> list[dict[str, Any]]:
    row = {"fact_key": fact.key, "relation": fact.relation, "subject": fact.subject, "object": fact.object,
           "status": reason}  # fmt: skip
    row.update(extra)
    return [row]


def run_editing_experiment(
    model: Any,
    facts: Sequence[Fact],
    *,
    config: EditingConfig | None = None,
    classes: Mapping[str, str] | None = None,
    attributions: Mapping[str, Any] | None = None,
    unrelated_facts: Sequence[Fact] | None = None,
    ppl_texts: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    show_progress: bool = False,
    known_only: bool | None = None,
) -> EditingResult:
    """Erase and update K_C and K_I facts with N_i, N_u and CAS neuron sets; score Rel/Gen/Loc/ΔPPL.

    Per fact (in order, skipping facts already stored in ``out_dir``):

    1. next-token predictions of all its queries; skip it unless some query predicts the gold object
       (``require_known``); pick the edited query q_i (seeded) and o (top-1 or gold);
    2. per-query attributions ``[k, n_layers, d_mlp]``: ``attributions[fact.key]`` (a tensor or an object
       with ``.scores``) or one ``attribute_neurons`` call over the fact's queries (gold answer);
    3. per-query KN sets (fraction of max ``kn_threshold``); the class: ``classes[fact.key]`` or, when
       ``classes`` is None, ``consistency_score`` of the KN sets against ``cs_threshold`` (facts with
       ``nan`` CS — no KN at all — are skipped);
    4. neuron sets N_i, N_u, CAS; o' = a seeded random other object of the same relation (drawn from the
       pool, ``unrelated_facts`` or ``facts``) that is a single token;
    5. for each method × edit: apply the edit in a context, evaluate all the fact's queries, ``n_unrelated``
       queries of facts of other relations, ``n_same_relation`` queries of other facts of its relation and
       the PPL texts, restore; :func:`edit_metrics` and ``loc_same``.

    An empty neuron set is not edited: its row holds the unedited model's metrics and ``n_neurons = 0``.

    Args:
        model: an eval-mode TL model.
        facts: the facts to edit (unique ``Fact.key``).
        config: :class:`EditingConfig` (default: all defaults).
        classes: optional ``{fact_key: "K_C" | "K_I" | "excluded"}`` — e.g.
            ``run_consistency(...).classes("ig", "otsu")``; facts missing from it or excluded are skipped.
            ``None``: each fact is classified on the fly with the static ``config.cs_threshold``.
        attributions: optional precomputed per-query attributions by fact key.
        unrelated_facts: the fact pool that Locality queries and o' are drawn from (default: ``facts``).
            Both depend on the pool, so it is part of the run's fingerprint: pass a fixed pool to extend a
            run directory with more facts later.
        ppl_texts: held-out sentences for PPL (``None``: PPL columns are ``nan``).
        out_dir: run directory (:class:`~qloc_tl.core.store.RunStore`); parts per chunk of facts, final tables
            ``editing_rows`` and ``editing_table``.
        resume: reuse stored facts of the same configuration (see ``RunStore.open``).
        show_progress: a tqdm bar over facts.
        known_only: restrict facts to the queries the model answers top-1 (:func:`qloc_tl.methods.known.filter_known`;
            ``attributions`` follow their queries). ``None`` (default): on every model but the built-in one.

    Returns:
        :class:`EditingResult`.
    """
    cfg = config or EditingConfig()
    if not isinstance(cfg, EditingConfig):
        raise InvalidInputError(f"config must be an EditingConfig, got {type(cfg).__name__}")
    check_model(model)
    require_eval(model)
    facts = list(facts)
    if not all(isinstance(f, Fact) for f in facts):
        raise InvalidInputError("facts must be qloc_tl.Fact objects")
    keys = [f.key for f in facts]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise InvalidInputError(f"duplicate fact keys {dup}; give each fact once")
    facts, known = restrict_to_known(model, facts, known_only, what="run_editing_experiment")
    if known is not None and attributions is not None:
        kept = known.kept_queries()
        attributions = {k: _scores_of(v)[list(kept[k])] for k, v in attributions.items() if k in kept}
    if classes is not None:
        bad = {k: v for k, v in classes.items() if v not in (*CLASSES, "excluded")}
        if bad:
            raise InvalidInputError(
                f"classes must map fact keys to 'K_C', 'K_I' or 'excluded' (e.g. ConsistencyResult.classes()), "
                f"got {dict(list(bad.items())[:3])}"
            )
    pool = list(unrelated_facts) if unrelated_facts is not None else facts
    texts = list(ppl_texts) if ppl_texts is not None else []

    store = None
    if out_dir is not None:
        from qloc_tl.core.store import RunStore

        store_cfg = {
            "editing": cfg.to_dict(),
            "model": {
                "class": type(model).__name__,
                "n_layers": n_layers(model),
                "d_model": int(model.cfg.d_model),
                "d_mlp": d_mlp(model),
                "d_vocab": int(model.cfg.d_vocab),
                "compat": bool(getattr(model, "compatibility_mode", False)),
            },
            "ppl_texts": _digest(texts),
            "unrelated": _digest(sorted(f.key for f in pool)),
            "classes": _digest(sorted(classes.items())) if classes is not None else None,
            "attributions": "given" if attributions is not None else "computed",
        }
        store = RunStore.open(out_dir, store_cfg, resume=resume)
    done = store.done("rows") if store is not None else set()
    old_rows = store.read("rows") if store is not None else pd.DataFrame()
    state = _RunState()
    if len(old_rows):
        ok = old_rows[old_rows["status"] == "ok"].drop_duplicates("fact_key")
        for cls in CLASSES:
            state.counts[cls] = int((ok["class"] == cls).sum())

    ppl_batches = _tokenize_texts(model, texts, cfg.batch_size) if texts else []
    ppl_before = _ppl(model, ppl_batches) if texts else math.nan
    objects_by_rel: dict[str, list[str]] = {}
    for f in pool:
        lst = objects_by_rel.setdefault(f.relation, [])
        if f.object not in lst:
            lst.append(f.object)

    todo = [f for f in facts if f.key not in done]
    if done:
        logger.info(
            "resuming: %d of %d facts already stored in %s", len(facts) - len(todo), len(facts), out_dir
        )
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="editing", unit="fact")
    new_rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(todo), cfg.chunk_size):
            if _all_full(cfg, state):
                break
            chunk = todo[start : start + cfg.chunk_size]
            chunk_rows: list[dict[str, Any]] = []
            chunk_keys: list[str] = []
            for fact in chunk:
                if _all_full(cfg, state):
                    break
                rows = _process_fact(
                    model,
                    fact,
                    cfg,
                    state,
                    classes,
                    attributions,
                    pool,
                    objects_by_rel,
                    ppl_batches,
                    ppl_before,
                )
                chunk_rows += rows
                chunk_keys.append(fact.key)
                if rows and rows[0]["status"] == "ok":
                    state.counts[rows[0]["class"]] += 1
                if bar is not None:
                    bar.update(1)
            if store is not None and chunk_keys:
                store.write_part("rows", chunk_keys, _frame(chunk_rows))
            new_rows += chunk_rows
    finally:
        if bar is not None:
            bar.close()

    if store is not None:
        all_rows = store.read("rows")
        if len(all_rows):
            all_rows = all_rows.drop_duplicates(["fact_key", "method", "edit", "status"], keep="last")
    else:
        all_rows = _frame(new_rows)
    all_rows = _frame(all_rows.to_dict("records") if len(all_rows) else [])
    ok_rows = all_rows[all_rows["status"] == "ok"].reset_index(drop=True)
    skipped = all_rows[all_rows["status"] != "ok"][["fact_key", "relation", "subject", "object", "status"]]
    skipped = skipped.rename(columns={"status": "reason"}).reset_index(drop=True)
    table = summarize(ok_rows, cfg)
    present = set(ok_rows["class"].dropna()) if len(ok_rows) else set()
    if present and present != set(CLASSES):
        missing_cls = sorted(set(CLASSES) - present)
        hint = (
            f" (every CS was on one side of the static cs_threshold={cfg.cs_threshold}; classify with "
            f"classify_facts(fact_attributions(...), threshold='otsu') and pass classes=)"
            if classes is None
            else ""
        )
        logger.warning("no edited facts in class %s%s", ", ".join(missing_cls), hint)
    if store is not None:
        store.write_table("editing_rows", all_rows)
        store.write_table("editing_table", table)
    logger.info(
        "editing: %d facts edited (K_C %d, K_I %d), %d skipped",
        ok_rows["fact_key"].nunique() if len(ok_rows) else 0, state.counts["K_C"], state.counts["K_I"], len(skipped),
    )  # fmt: skip
    return EditingResult(table, ok_rows, skipped, cfg, Path(out_dir) if out_dir is not None else None)


_ROW_COLS = [
    "fact_key", "relation", "subject", "object", "status", "class", "cs", "method", "edit", "n_neurons",
    "n_layers_touched", "edited_query", "old_token", "new_token", "old_object", "new_object", "n_queries",
    "n_neighbors", "n_unrelated", "n_same_relation", "rel", "gen", "loc", "loc_same", "avg", "ppl_before", "ppl_after", "ppl_delta",
    "ppl_rel_delta", "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors",
]  # fmt: skip


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in _ROW_COLS:
        if c not in df.columns:
            df[c] = None
    df = df[_ROW_COLS]
    for c in ("fact_key", "relation", "subject", "object", "status", "class", "method", "edit", "edited_query",
              "old_object", "new_object"):  # fmt: skip
        df[c] = df[c].astype("string")
    for c in ("cs", "rel", "gen", "loc", "loc_same", "avg", "ppl_before", "ppl_after", "ppl_delta", "ppl_rel_delta",
              "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors"):  # fmt: skip
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in (
        "n_neurons",
        "n_layers_touched",
        "old_token",
        "new_token",
        "n_queries",
        "n_neighbors",
        "n_unrelated",
        "n_same_relation",
    ):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    return df


def _all_full(cfg: EditingConfig, state: _RunState) -> bool:
    m = cfg.max_facts_per_class
    return m is not None and all(state.counts[c] >= m for c in CLASSES)


def _unrelated_prompts(fact: Fact, pool: Sequence[Fact], cfg: EditingConfig) -> list[str]:
    if cfg.n_unrelated == 0:
        return []
    rng = _fact_rng(cfg.seed, fact.key, "unrelated")
    others = [f for f in pool if f.relation != fact.relation]
    if not others:  # one relation only: fall back to other subjects of the same relation
        others = [f for f in pool if f.key != fact.key and f.subject != fact.subject]
    if not others:
        return []
    chosen = rng.sample(others, min(cfg.n_unrelated, len(others)))
    return [rng.choice(f.queries).text for f in chosen]


def _same_relation_prompts(fact: Fact, pool: Sequence[Fact], cfg: EditingConfig) -> list[str]:
    """One query each of up to ``n_same_relation`` other facts of the fact's relation, with another subject
    and another object (a fact sharing the object would make an erase of o look like a Locality failure)."""
    if cfg.n_same_relation == 0:
        return []
    rng = _fact_rng(cfg.seed, fact.key, "same_relation")
    others = [
        f for f in pool
        if f.relation == fact.relation and f.key != fact.key and f.subject != fact.subject and f.object != fact.object
    ]  # fmt: skip
    chosen = rng.sample(others, min(cfg.n_same_relation, len(others)))
    return [rng.choice(f.queries).text for f in chosen]


def _top1_kept(before: Tensor | None, after: Tensor | None) -> float:
    """The fraction of rows whose argmax is unchanged (``nan`` for no rows)."""
    if before is None or after is None or before.shape[0] == 0:
        return math.nan
    return float((before.argmax(-1) == after.argmax(-1)).double().mean())


def _new_object(
    model: Any, fact: Fact, prompt: str, old_token: int, gold: int, objects: Sequence[str], cfg: EditingConfig
) -> tuple[str, int] | None:
    rng = _fact_rng(cfg.seed, fact.key, "new_object")
    cands = [o for o in objects if o != fact.object]
    rng.shuffle(cands)
    for obj in cands:
        try:
            t = answer_token_id(model, prompt, obj)
        except InvalidInputError:
            continue
        if t not in (old_token, gold):
            return obj, t
    return None


def _check_fact_scores(model: Any, fact: Fact, scores: Tensor) -> Tensor:
    if scores.ndim == 2:
        scores = scores.unsqueeze(0)
    expected = (len(fact.queries), n_layers(model), d_mlp(model))
    if tuple(scores.shape) != expected:
        raise InvalidInputError(
            f"attributions of fact {fact.key!r} have shape {tuple(scores.shape)}, expected {expected} "
            f"(one [n_layers, d_mlp] map per query, in the order of fact.queries)"
        )
    return scores


def _attribute_fact(model: Any, fact: Fact, cfg: EditingConfig) -> Tensor:
    from qloc_tl.methods.attribution import attribute_neurons

    prompts = list(fact.prompts)
    attr = attribute_neurons(
        model, prompts, [fact.object] * len(prompts), method=cfg.attribution_method, steps=cfg.steps,
        site=cfg.site, show_progress=False,
    )  # fmt: skip
    return _check_fact_scores(model, fact, _scores_of(attr))


def fact_attributions(
    model: Any,
    facts: Sequence[Fact],
    *,
    config: EditingConfig | None = None,
    show_progress: bool = False,
) -> dict[str, Float[Tensor, "k n_layers d_mlp"]]:
    """Per-query attributions of each fact (one ``attribute_neurons`` call per fact over its queries, gold
    object; ``config.attribution_method`` / ``steps`` / ``site``), keyed by ``Fact.key``.

    Pass the result to :func:`classify_facts` and as ``attributions=`` to :func:`run_editing_experiment` to
    classify every fact first (e.g. with Otsu's threshold) without attributing twice. Memory: ``k · n_layers ·
    d_mlp`` floats per fact (CPU).
    """
    cfg = config or EditingConfig()
    check_model(model)
    require_eval(model)
    out: dict[str, Tensor] = {}
    it: Iterable[Fact] = facts
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(facts, desc="attribution", unit="fact")
    for f in it:
        out[f.key] = _attribute_fact(model, f, cfg)
    return out


@dataclass(frozen=True)
class FactClasses:
    """K_C / K_I classes of facts from the consistency of their per-query KN sets.

    Attributes:
        classes: ``{fact_key: "K_C" | "K_I" | "excluded"}`` (``"excluded"``: CS is ``nan`` — fewer than two
            queries, or no query has a KN).
        cs: ``{fact_key: CS}``.
        threshold: the τ used (CS ≥ τ → K_C).
    """

    classes: dict[str, str]
    cs: dict[str, float]
    threshold: float


def classify_facts(
    attributions: Mapping[str, Any],
    *,
    kn_threshold: float = 0.2,
    cs_mode: Literal["relaxed", "strict"] = "relaxed",
    threshold: Literal["static", "otsu"] | float = "static",
    static: float = 0.3,
) -> FactClasses:
    """Classify facts into K_C / K_I from per-query attributions ``{fact_key: [k, n_layers, d_mlp]}``:
    KN sets by fraction of max ``kn_threshold`` per query, CS by :func:`~qloc_tl.experiments.consistency.consistency_score`,
    τ by :func:`~qloc_tl.experiments.consistency.split_facts` (``"static"`` = ``static``, ``"otsu"`` over all facts' CS,
    or a number).

    Examples:
        >>> s = torch.zeros(2, 1, 4); s[:, 0, 0] = 1.0; s[1, 0, 3] = 0.9
        >>> classify_facts({"f": s}).classes     # CS = 1 shared of 2 = 0.5 >= 0.3
        {'f': 'K_C'}
    """
    from qloc_tl.experiments.consistency import split_facts

    keys = list(attributions)
    cs = []
    for k in keys:
        scores = _check_scores(_scores_of(attributions[k]), f"attributions[{k!r}]")
        sets = [_select_query(scores[j], kn_threshold) for j in range(scores.shape[0])]
        cs.append(consistency_score(sets, mode=cs_mode))
    labels, tau = split_facts(np.asarray(cs, dtype=float), threshold, static=static)
    return FactClasses(dict(zip(keys, (str(x) for x in labels))), dict(zip(keys, cs)), float(tau))


def _process_fact(
    model: Any,
    fact: Fact,
    cfg: EditingConfig,
    state: _RunState,
    classes: Mapping[str, str] | None,
    attributions: Mapping[str, Any] | None,
    pool: Sequence[Fact],
    objects_by_rel: Mapping[str, Sequence[str]],
    ppl_batches: Sequence[tuple[Tensor, Tensor]],
    ppl_before: float,
) -> list[dict[str, Any]]:
    k = len(fact.queries)
    if k < 2:
        return _skip(fact, "too_few_queries")
    cls = None
    if classes is not None:
        cls = classes.get(fact.key)
        if cls is None:
            return _skip(fact, "no_class")
        if cls == "excluded":
            return _skip(fact, "excluded")
        if cfg.max_facts_per_class is not None and state.counts[cls] >= cfg.max_facts_per_class:
            return _skip(fact, "class_full", **{"class": cls})
    prompts = list(fact.prompts)
    # the object's first token, as in every stage (see qloc_tl.methods.known for the multi-token policy)
    gold = answer_token_id(model, prompts[0], fact.object, multi_token="first")
    before = last_token_logprobs(model, prompts, batch_size=cfg.batch_size)  # [k, V]
    top1 = before.argmax(-1)
    known = [j for j in range(k) if int(top1[j]) == gold]
    if cfg.require_known and not known:
        return _skip(fact, "not_known")
    candidates = known if cfg.require_known else list(range(k))
    i = (
        candidates[0]
        if cfg.edit_query == "first"
        else _fact_rng(cfg.seed, fact.key, "edit_query").choice(candidates)
    )
    o = int(top1[i]) if cfg.old_object == "top1" else gold

    if attributions is not None and fact.key in attributions:
        scores = _check_fact_scores(model, fact, _scores_of(attributions[fact.key]))
    else:
        scores = _attribute_fact(model, fact, cfg)
    sets, per_query = fact_neuron_sets(
        scores, i, kn_threshold=cfg.kn_threshold, beta1=cfg.cas_beta1, beta2=cfg.cas_beta2, spread=cfg.cas_spread,
        normalize=cfg.cas_normalize, cas_method=cfg.cas_method, cas_value=cfg.cas_value,
    )  # fmt: skip
    cs = consistency_score(per_query, mode=cfg.cs_mode)
    if cls is None:
        if math.isnan(cs):
            return _skip(fact, "no_kn", cs=cs)
        cls = "K_C" if cs >= cfg.cs_threshold else "K_I"
        if cfg.max_facts_per_class is not None and state.counts[cls] >= cfg.max_facts_per_class:
            return _skip(fact, "class_full", cs=cs, **{"class": cls})

    new = None
    if "update" in cfg.edits:
        new = _new_object(model, fact, prompts[i], o, gold, objects_by_rel.get(fact.relation, []), cfg)
        if new is None:
            return _skip(fact, "no_new_object", cs=cs, **{"class": cls})

    unrelated = _unrelated_prompts(fact, pool, cfg)
    same = _same_relation_prompts(fact, pool, cfg)
    missing = [p for p in dict.fromkeys(unrelated + same) if p not in state.logits_cache]
    if missing:
        lp = last_token_logprobs(model, missing, batch_size=cfg.batch_size)
        for p, row in zip(missing, lp):
            state.logits_cache[p] = row
    unrel_before = torch.stack([state.logits_cache[p] for p in unrelated]) if unrelated else None
    same_before = torch.stack([state.logits_cache[p] for p in same]) if same else None
    neighbors = [j for j in range(k) if j != i]

    base = {
        "fact_key": fact.key, "relation": fact.relation, "subject": fact.subject, "object": fact.object,
        "status": "ok", "class": cls, "cs": cs, "edited_query": prompts[i], "old_token": o,
        "old_object": _decode(model, o), "n_queries": k, "n_unrelated": len(unrelated), "n_same_relation": len(same),
    }  # fmt: skip
    rows = []
    for method in cfg.methods:
        neurons = list(sets[method])
        for edit in cfg.edits:
            after_q, after_u, ppl_after = _evaluate_edit(
                model,
                cfg,
                edit,
                neurons,
                o,
                new[1] if new else None,
                prompts,
                unrelated + same,
                ppl_batches,
                ppl_before,
            )
            same_after = after_u[len(unrelated) :] if (same and after_u is not None) else None
            after_u = after_u[: len(unrelated)] if (unrelated and after_u is not None) else None
            m = edit_metrics(
                edit,  # type: ignore[arg-type]
                edited_before=before[i], edited_after=after_q[i],
                neighbors_before=before[neighbors], neighbors_after=after_q[neighbors],
                unrelated_before=unrel_before, unrelated_after=after_u,
                old_token=o, new_token=new[1] if (new and edit == "update") else None,
                ppl_before=ppl_before, ppl_after=ppl_after,
            )  # fmt: skip
            d = m.as_dict()
            row = dict(base)
            row.update(
                method=method, edit=edit, n_neurons=len(neurons), n_layers_touched=len({n.layer for n in neurons}),
                new_token=new[1] if (new and edit == "update") else None,
                new_object=new[0] if (new and edit == "update") else None,
                n_neighbors=d["n_neighbors"], rel=d["reliability"], gen=d["generalization"], loc=d["locality"],
                loc_same=_top1_kept(same_before, same_after), avg=d["avg"], ppl_before=d["ppl_before"], ppl_after=d["ppl_after"], ppl_delta=d["ppl_delta"],
                ppl_rel_delta=d["ppl_rel_delta"], dprob_old_edited=d["dprob_old_edited"],
                dprob_new_edited=d["dprob_new_edited"], dprob_old_neighbors=d["dprob_old_neighbors"],
                dprob_new_neighbors=d["dprob_new_neighbors"],
            )  # fmt: skip
            rows.append(row)
    return rows


def _evaluate_edit(
    model: Any,
    cfg: EditingConfig,
    edit: str,
    neurons: list[Neuron],
    old_token: int,
    new_token: int | None,
    prompts: list[str],
    unrelated: list[str],
    ppl_batches: Sequence[tuple[Tensor, Tensor]],
    ppl_before: float,
) -> tuple[Tensor, Tensor | None, float]:
    if not neurons:
        ctx: Any = contextlib.nullcontext()
    elif edit == "erase":
        ctx = erase(model, neurons, value=cfg.erase_value, site=cfg.site, verify=cfg.verify_edits)
    else:
        ctx = update(
            model, neurons, old_token, new_token, lambda1=cfg.lambda1, lambda2=cfg.lambda2, rule=cfg.rule,  # type: ignore[arg-type]
            embedding=cfg.embedding, site=cfg.site, verify=cfg.verify_edits,
        )  # fmt: skip
    with ctx:
        lp = last_token_logprobs(model, prompts + unrelated, batch_size=cfg.batch_size)
        if not neurons:
            ppl_after = ppl_before
        else:
            ppl_after = _ppl(model, ppl_batches) if ppl_batches else math.nan
    after_q = lp[: len(prompts)]
    after_u = lp[len(prompts) :] if unrelated else None
    return after_q, after_u, ppl_after


def _bootstrap_mean_ci(
    values: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI (resampling facts, i.e. rows) of the mean over columns of the column means of
    ``values`` (``[n_facts]`` or ``[n_facts, n_cols]``; NaN entries skipped per column, as in :func:`summarize`).
    NaN bounds with fewer than two facts."""
    import warnings

    v = np.asarray(values, dtype=float)
    v = v[:, None] if v.ndim == 1 else v
    if v.shape[0] < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stat = np.nanmean(v[idx], axis=1).mean(axis=1)
    stat = stat[np.isfinite(stat)]
    if stat.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    return float(np.quantile(stat, a)), float(np.quantile(stat, 1 - a))


def claims(
    out_dir: str | Path, *, min_facts: int | None = None, n_boot: int = 1000, seed: int = 0
) -> list[tuple[str, str, str]]:
    """Verdicts on the paper's editing claims from a run directory's ``editing_table``:
    ``[(claim, status, evidence)]`` with status ``supported`` / ``partial`` / ``not supported`` /
    ``too few facts`` / ``not run``.

    A claim is checked per (edit, class) cell (K_I vs K_C per (edit, method)); ``supported`` when it holds
    in every cell, ``partial`` in some, ``not supported`` in none. Differences under ``margin = 0.02`` count
    as ties (not holding). A cell counts only when each class it involves holds ≥ ``min_facts`` facts
    (default :data:`qloc_tl.reporting.report.MIN_FACTS_PER_CLASS`); cells with fewer are named in the evidence, and a
    claim with no such cell is ``too few facts``. Evidence gives each cell's n and a 95 % percentile
    bootstrap CI over facts (:func:`_bootstrap_mean_ci`, ``n_boot`` resamples, seeded per cell from ``seed``)
    of the compared metric, computed from ``editing_rows`` (``CI n/a`` without that table).
    """
    import zlib

    from qloc_tl.reporting.report import TOO_FEW, _need

    need = _need(min_facts)
    path = Path(out_dir) / "editing_table.parquet"
    names = [
        "Edits of inconsistent facts (K_I) generalise worse than of consistent ones (K_C)",
        "Editing the query's own KNs (N_i) generalises poorly to neighbor queries",
        "Editing the union over neighbor queries (N_u) hurts locality / perplexity most",
        "CAS gives the best balance (highest Avg = (Rel+Gen+Loc)/3)",
    ]
    if not path.is_file():
        return [(n, "not run", f"no {path.name} in {out_dir}") for n in names]
    t = pd.read_parquet(path)
    t = t[t["n_facts"] > 0]
    rows_path = Path(out_dir) / "editing_rows.parquet"
    rows = pd.read_parquet(rows_path) if rows_path.is_file() else None
    if rows is not None and "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    margin = 0.02

    def cell(edit: str, cls: str, method: str, col: str) -> float:
        sel = t[(t["edit"] == edit) & (t["class"] == cls) & (t["method"] == method)]
        return float(sel[col].iloc[0]) if len(sel) else math.nan

    def n_of(edit: str, cls: str, method: str) -> int:
        return int(cell(edit, cls, method, "n_facts")) if not math.isnan(cell(edit, cls, method, "n_facts")) else 0

    def ci(edit: str, cls: str, method: str, col: str) -> str:
        cols = ["rel", "gen", "loc"] if col == "avg" else [col]
        if rows is None or not set(cols) <= set(rows.columns):
            return "CI n/a"
        g = rows[(rows["edit"] == edit) & (rows["class"] == cls) & (rows["method"] == method)]
        cell_seed = zlib.crc32(f"{seed}|{edit}|{cls}|{method}|{col}".encode())
        lo, hi = _bootstrap_mean_ci(g[cols].to_numpy(dtype=float), n_boot=n_boot, seed=cell_seed)
        return f"95% CI [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else "CI n/a"

    def verdict(results: list[tuple[bool, str]], short: list[str]) -> tuple[str, str]:
        if not results:
            if short:
                return TOO_FEW, f"a verdict needs ≥ {need} facts in each class it compares; this run has " + "; ".join(short)
            return "not run", "no cells with data"
        held = sum(ok for ok, _ in results)
        status = "supported" if held == len(results) else ("partial" if held else "not supported")
        ev = f"holds in {held}/{len(results)} cells: " + "; ".join(e for _, e in results)
        if short:
            ev += f"; too few facts (< {need}) in: " + "; ".join(short)
        return status, ev

    edits = list(dict.fromkeys(t["edit"]))
    out = []
    res1: list[tuple[bool, str]] = []
    short1: list[str] = []
    for edit in edits:
        for m in ("N_i", "N_u", "CAS"):
            c, i = cell(edit, "K_C", m, "gen"), cell(edit, "K_I", m, "gen")
            if math.isnan(c) or math.isnan(i):
                continue
            nc, ni = n_of(edit, "K_C", m), n_of(edit, "K_I", m)
            if nc < need or ni < need:
                short1.append(f"{edit}/{m} K_I n={ni}, K_C n={nc}")
                continue
            res1.append((i < c - margin, f"{edit}/{m} Gen K_I {i:.2f} (n={ni}, {ci(edit, 'K_I', m, 'gen')}) vs "
                         f"K_C {c:.2f} (n={nc}, {ci(edit, 'K_C', m, 'gen')})"))  # fmt: skip
    out.append((names[0], *verdict(res1, short1)))
    res2: list[tuple[bool, str]] = []
    short2: list[str] = []
    for edit in edits:
        for cls in CLASSES:
            rel, gen, gen_u = (
                cell(edit, cls, "N_i", "rel"),
                cell(edit, cls, "N_i", "gen"),
                cell(edit, cls, "N_u", "gen"),
            )
            if math.isnan(rel) or math.isnan(gen):
                continue
            n = n_of(edit, cls, "N_i")
            if n < need:
                short2.append(f"{edit}/{cls} n={n}")
                continue
            ok = gen < rel - margin and (math.isnan(gen_u) or gen < gen_u - margin)
            res2.append((ok, f"{edit}/{cls} (n={n}) N_i Rel {rel:.2f} ({ci(edit, cls, 'N_i', 'rel')}) Gen {gen:.2f} "
                         f"({ci(edit, cls, 'N_i', 'gen')}) (N_u Gen {gen_u:.2f})"))  # fmt: skip
    out.append((names[1], *verdict(res2, short2)))
    res3: list[tuple[bool, str]] = []
    short3: list[str] = []
    for edit in edits:
        for cls in CLASSES:
            loc = {m: cell(edit, cls, m, "loc") for m in ("N_i", "N_u", "CAS")}
            ppl = {m: cell(edit, cls, m, "ppl_rel_delta") for m in ("N_i", "N_u", "CAS")}
            if math.isnan(loc["N_u"]):
                continue
            n = n_of(edit, cls, "N_u")
            if n < need:
                short3.append(f"{edit}/{cls} n={n}")
                continue
            others = [m for m in ("N_i", "CAS") if not math.isnan(loc[m])]
            worst_loc = all(loc["N_u"] < loc[m] - margin for m in others)
            worst_ppl = not math.isnan(ppl["N_u"]) and all(
                ppl["N_u"] > ppl[m] + margin for m in others if not math.isnan(ppl[m])
            )
            res3.append((worst_loc or worst_ppl, f"{edit}/{cls} (n={n}) Loc N_u {loc['N_u']:.2f} "
                         f"({ci(edit, cls, 'N_u', 'loc')}) vs " + ", ".join(f"{m} {loc[m]:.2f}" for m in others)
                         + f"; rel.ΔPPL N_u {ppl['N_u']:.3g}"))  # fmt: skip
    out.append((names[2], *verdict(res3, short3)))
    res4: list[tuple[bool, str]] = []
    short4: list[str] = []
    for edit in edits:
        for cls in CLASSES:
            avg = {m: cell(edit, cls, m, "avg") for m in ("N_i", "N_u", "CAS")}
            if math.isnan(avg["CAS"]):
                continue
            n = n_of(edit, cls, "CAS")
            if n < need:
                short4.append(f"{edit}/{cls} n={n}")
                continue
            others = [m for m in ("N_i", "N_u") if not math.isnan(avg[m])]
            ok = all(avg["CAS"] > avg[m] + margin for m in others)
            res4.append(
                (ok, f"{edit}/{cls} (n={n}) Avg " + ", ".join(
                    f"{m} {avg[m]:.2f} ({ci(edit, cls, m, 'avg')})" for m in ("N_i", "N_u", "CAS")))
            )  # fmt: skip
    out.append((names[3], *verdict(res4, short4)))
    return out


# ==================================================================================================
# 5. Plot
# ==================================================================================================


def plot_editing(result: EditingResult | pd.DataFrame, path: str | Path | None = None) -> Any:
    """Bar chart of the editing table: one panel per (edit, metric), K_C / K_I groups, one bar per method.

    Metrics: Rel, Gen, Loc (other relations), Loc (same relation), Avg and the median relative ΔPPL (log scale when it spans orders of magnitude).

    matplotlib is imported lazily (``pip install qloc-tl[vis]``). Returns the ``Figure``; saved to ``path``
    when given.
    """
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("plot_editing needs matplotlib: pip install 'qloc-tl[vis]'") from exc
    table = result.table if isinstance(result, EditingResult) else result
    if not isinstance(table, pd.DataFrame) or not {"edit", "class", "method"}.issubset(table.columns):
        raise InvalidInputError(
            "plot_editing needs an EditingResult or its table (edit, class, method columns)"
        )
    ppl_col = "ppl_rel_delta_median" if "ppl_rel_delta_median" in table.columns else "ppl_rel_delta"
    ppl_label = "ΔPPL/PPL (median)" if ppl_col.endswith("median") else "ΔPPL/PPL (mean)"
    metrics = [("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc (other rel.)"), ("loc_same", "Loc (same rel.)"), ("avg", "Avg"),
               (ppl_col, ppl_label)]  # fmt: skip
    metrics = [(c, lab) for c, lab in metrics if c in table.columns]
    edits = list(dict.fromkeys(table["edit"]))
    methods = list(dict.fromkeys(table["method"]))
    classes = [c for c in CLASSES if c in set(table["class"])]
    fig, axes = plt.subplots(
        len(edits), len(metrics), figsize=(3.1 * len(metrics), 2.8 * len(edits)), squeeze=False
    )
    width = 0.8 / max(len(methods), 1)
    for r, edit in enumerate(edits):
        for c, (col, label) in enumerate(metrics):
            ax = axes[r][c]
            for m_i, method in enumerate(methods):
                vals = []
                for cls in classes:
                    sel = table[
                        (table["edit"] == edit) & (table["class"] == cls) & (table["method"] == method)
                    ]
                    vals.append(float(sel[col].iloc[0]) if len(sel) else math.nan)
                xs = np.arange(len(classes)) + (m_i - (len(methods) - 1) / 2) * width
                ax.bar(xs, vals, width, label=method)
            ax.set_xticks(np.arange(len(classes)))
            ax.set_xticklabels(classes)
            ax.set_title(f"{edit}: {label}", fontsize=9)
            if col != ppl_col:
                ax.set_ylim(0, 1.05)
            elif all(v > 0 for v in table[col].dropna()) and table[col].max() > 100 * max(
                table[col].min(), 1e-12
            ):
                ax.set_yscale("log")
            ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), dpi=120)
    return fig
