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

The rows are located and written by :mod:`qloc_tl.core.value_slots` (where ``W_out`` really lives in each
backend, and a probe pass that checks the edit reached the forward pass); the contexts restore the touched
rows bit-exactly in ``finally``.

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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import TLModel, check_model
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.core.validation import check_float, check_tensor
from qloc_tl.core.value_slots import WeightEdit, prepare_neurons, value_rows, write_value_rows

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


def _erase_maker(value: Any, d_model: int) -> Any:
    if isinstance(value, str):
        if value != "zero":
            raise InvalidInputError(
                f"erase value must be 'zero' or a tensor of shape [d_model], got {value!r}"
            )
        return lambda old: torch.zeros_like(old)
    if not isinstance(value, Tensor):
        raise InvalidInputError(f"erase value must be 'zero' or a tensor, got {type(value).__name__}")
    check_tensor("erase value", value, kind="float")
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
    ns = prepare_neurons(model, neurons, site)
    return write_value_rows(model, "erase", ns, _erase_maker(value, int(model.cfg.d_model)), verify)


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
    l1 = d1 if lambda1 is None else check_float("lambda1", lambda1)
    l2 = d2 if lambda2 is None else check_float("lambda2", lambda2)
    check_tensor("rows", rows, kind="float", ndim=2, nonempty=False)
    for name, e in (("e_old", e_old), ("e_new", e_new)):
        check_tensor(name, e, kind="float", ndim=1)
        if e.shape[0] != rows.shape[1]:
            raise InvalidInputError(
                f"{name} has {e.shape[0]} entries for value rows of width {rows.shape[1]}"
            )
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
    ns = prepare_neurons(model, neurons, site)
    e_old = token_vector(model, old_token, embedding)
    e_new = token_vector(model, new_token, embedding)

    def make(old: Tensor) -> Tensor:
        return update_rows(old, e_old, e_new, rule=rule, lambda1=lambda1, lambda2=lambda2)

    if rule not in RULE_DEFAULTS:
        raise InvalidInputError(f"rule must be 'dai' or 'eleuther', got {rule!r}")
    return write_value_rows(model, "update", ns, make, verify)


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
