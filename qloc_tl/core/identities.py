"""Identities of the units qloc_tl talks about.

Vocabulary (fixed once, used everywhere):

* a **neuron** ``Neuron(layer, index)`` is ``blocks.{layer}.mlp.hook_post[..., index]`` (or ``hook_pre``
  when the caller picks ``site="pre"``), read at one token position (the answer position);
* a **head** ``Head(layer, head)`` is ``blocks.{layer}.attn.hook_pattern[:, head]``;
* a **knowledge synapse** ``Synapse(layer, head, key_position)`` is column ``key_position`` of that head's
  pattern, read in the row of the answer (query) position.

All three are frozen, hashable and totally ordered (by layer first), so they can be put in sets, used as
dict keys and sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Neuron", "Head", "Synapse"]


def _check_int(name: str, value: object, owner: str) -> None:
    # bool is an int subclass; reject it explicitly, it is always a mistake here.
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        from qloc_tl.core.errors import InvalidInputError

        raise InvalidInputError(f"{owner}.{name} must be a non-negative int, got {value!r}")
    if value < 0:
        from qloc_tl.core.errors import InvalidInputError

        raise InvalidInputError(
            f"{owner}.{name} must be >= 0, got {value}; negative indices are not allowed in identities"
        )


@dataclass(frozen=True, order=True)
class Neuron:
    """One MLP neuron: ``blocks.{layer}.mlp.hook_post[..., index]``.

    Examples:
        >>> Neuron(2, 17)
        Neuron(layer=2, index=17)
        >>> sorted({Neuron(1, 5), Neuron(0, 9)})
        [Neuron(layer=0, index=9), Neuron(layer=1, index=5)]
    """

    layer: int
    index: int

    def __post_init__(self) -> None:
        _check_int("layer", self.layer, "Neuron")
        _check_int("index", self.index, "Neuron")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "index", int(self.index))

    def __str__(self) -> str:
        return f"L{self.layer}N{self.index}"


@dataclass(frozen=True, order=True)
class Head:
    """One attention head: ``blocks.{layer}.attn.hook_pattern[:, head]``.

    Examples:
        >>> str(Head(3, 5))
        'L3H5'
    """

    layer: int
    head: int

    def __post_init__(self) -> None:
        _check_int("layer", self.layer, "Head")
        _check_int("head", self.head, "Head")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "head", int(self.head))

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True, order=True)
class Synapse:
    """A knowledge synapse: key column ``key_position`` of head ``(layer, head)``'s attention pattern.

    Examples:
        >>> Synapse(1, 0, 3).as_head()
        Head(layer=1, head=0)
    """

    layer: int
    head: int
    key_position: int

    def __post_init__(self) -> None:
        _check_int("layer", self.layer, "Synapse")
        _check_int("head", self.head, "Synapse")
        _check_int("key_position", self.key_position, "Synapse")
        for f in ("layer", "head", "key_position"):
            object.__setattr__(self, f, int(getattr(self, f)))

    def as_head(self) -> Head:
        return Head(self.layer, self.head)

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}K{self.key_position}"
