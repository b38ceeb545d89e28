"""Argument validation shared by every public function: one helper family, one error type.

Each helper either returns the value in its canonical form or raises :class:`~qloc_tl.core.errors.InvalidInputError`
naming the argument. Choices are given as a ``Literal`` type (read with :func:`typing.get_args`, as
TransformerLens's ``EdgeAttributionConfig`` does) or as a plain tuple, so a config's annotation and its check
cannot drift apart.

Examples:
    >>> from typing import Literal
    >>> check_choice("site", "post", Literal["pre", "post"])
    'post'
    >>> check_float("fraction", 0.2, lo=0.0, hi=1.0)
    0.2
    >>> as_neurons([(0, 1), (2, 3)])
    [Neuron(layer=0, index=1), Neuron(layer=2, index=3)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, get_args

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import SITES, TLModel, check_layer, d_mlp

__all__ = [
    "check_choice",
    "check_int",
    "check_float",
    "check_nonempty",
    "as_neurons",
    "as_neuron_set",
    "as_neuron_sets",
    "validate_neurons",
]


def check_choice(name: str, value: Any, choices: Any) -> Any:
    """``value`` if it is one of ``choices`` (a ``Literal[...]`` type or an iterable of allowed values)."""
    allowed = get_args(choices) or tuple(choices)
    if value not in allowed:
        raise InvalidInputError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_int(name: str, value: Any, lo: int = 0, hi: int | None = None, *, allow_none: bool = False) -> Any:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[lo, hi]`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidInputError(f"{name} must be an int {rng}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_float(
    name: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *, allow_none: bool = False
) -> Any:
    """``float(value)`` if it is a finite real number in ``[lo, hi]`` (or ``None`` when ``allow_none``).

    NaN and ±inf are refused even when the range is unbounded: no argument of this package means anything there.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    if not lo <= float(value) <= hi:
        raise InvalidInputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_nonempty(name: str, items: Any) -> Any:
    """``items`` if it has at least one element (strings are refused: they are never a collection here)."""
    if isinstance(items, (str, bytes)):
        raise InvalidInputError(f"{name} must be a collection, got a string {items!r}")
    if len(items) == 0:
        raise InvalidInputError(f"{name} is empty: give at least one item")
    return items


def _neuron(n: Any, what: str) -> Neuron:
    if isinstance(n, Neuron):
        return n
    if isinstance(n, (tuple, list)) and len(n) == 2:
        return Neuron(*n)
    raise InvalidInputError(f"{what} must contain Neuron(layer, index) objects or (layer, index) pairs, got {n!r}")


def as_neurons(neurons: Iterable[Neuron] | Neuron, what: str = "neurons") -> list[Neuron]:
    """A non-empty list of :class:`Neuron` from a neuron, neurons or ``(layer, index)`` pairs."""
    if isinstance(neurons, Neuron):
        return [neurons]
    if isinstance(neurons, (str, bytes)):
        raise InvalidInputError(f"{what} must be Neuron objects, got a string {neurons!r}")
    out = [_neuron(n, what) for n in neurons]
    if not out:
        raise InvalidInputError(f"empty neuron list: give at least one Neuron(layer, index) in {what}")
    return out


def as_neuron_set(neurons: Iterable[Neuron], what: str = "neurons") -> frozenset[Neuron]:
    """A (possibly empty) frozenset of :class:`Neuron`: a KN set may legitimately be empty."""
    if isinstance(neurons, (str, bytes)):
        raise InvalidInputError(f"{what} must be an iterable of Neuron, got a string {neurons!r}")
    return frozenset(_neuron(n, what) for n in neurons)


def as_neuron_sets(kn_sets: Sequence[Iterable[Neuron]], what: str = "kn_sets") -> list[frozenset[Neuron]]:
    """One frozenset per query from a sequence of neuron iterables."""
    if isinstance(kn_sets, (str, bytes)) or not isinstance(kn_sets, Sequence):
        raise InvalidInputError(f"{what} must be a sequence with one neuron set per query, got {type(kn_sets).__name__}")
    return [as_neuron_set(s, f"{what}[{i}]") for i, s in enumerate(kn_sets)]


def validate_neurons(model: TLModel, neurons: Sequence[Neuron], site: str) -> None:
    """Every neuron's layer and index exist in ``model`` and the model has the hook of ``site``."""
    width = d_mlp(model)
    for n in neurons:
        check_layer(model, n.layer, what=f"layer of {n!r}")
        if n.index >= width:
            raise InvalidInputError(f"neuron index of {n!r} is out of range: d_mlp={width}")
        name = f"blocks.{n.layer}.{SITES[site]}"
        if name not in model.hook_dict:
            raise InvalidInputError(f"model has no hook {name!r} for site {site!r}")
