"""Consistency of knowledge neurons across neighbor queries (the paper's experiment 1).

For a fact with k neighbor queries and their KN sets N_1..N_k (U = ∪ N_i, c(n) = #{i : n ∈ N_i}):

* **strict** CS = |∩ N_i| / |U| (the Jaccard index of k sets);
* **relaxed** CS (the paper's) = |{n ∈ U : c(n) > 1}| / |U| — the intersection relaxed to neurons that
  appear in more than one query's set.

Edge cases (documented choices):

* k = 1: one query cannot be consistent *with another*; the score is ``nan`` and the fact is excluded from
  the K_C / K_I split (it needs neighbors). Callers that want an error call ``Fact.require_neighbors``.
* empty union (no query has any KN): ``nan`` ("no-KN" facts; excluded and counted separately).
* k = 2: strict and relaxed coincide.

Always strict ≤ relaxed, both in [0, 1], and both invariant to the order of the queries.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from .errors import InvalidInputError
from .identities import Neuron

__all__ = ["consistency_score", "neuron_counts"]

CSMode = Literal["relaxed", "strict"]


def _as_sets(neuron_sets: Iterable[Iterable[Neuron]]) -> list[frozenset[Neuron]]:
    if isinstance(neuron_sets, (str, bytes)):
        raise InvalidInputError("neuron_sets must be a sequence of neuron sets, not a string")
    out = []
    for s in neuron_sets:
        fs = frozenset(s)
        bad = [n for n in fs if not isinstance(n, Neuron)]
        if bad:
            raise InvalidInputError(f"neuron sets must contain Neuron objects, got {bad[0]!r}")
        out.append(fs)
    return out


def neuron_counts(neuron_sets: Iterable[Iterable[Neuron]]) -> Counter[Neuron]:
    """c(n): in how many of the sets each neuron appears."""
    c: Counter[Neuron] = Counter()
    for s in _as_sets(neuron_sets):
        c.update(s)
    return c


def consistency_score(neuron_sets: Sequence[Iterable[Neuron]], mode: CSMode = "relaxed") -> float:
    """Consistency Score of one fact from its queries' KN sets.

    Args:
        neuron_sets: one iterable of :class:`Neuron` per neighbor query.
        mode: ``"relaxed"`` (default; the paper's) or ``"strict"``.

    Returns:
        CS in [0, 1], or ``nan`` for fewer than two sets or an empty union (see module docstring).

    Examples:
        >>> a, b, c, d = Neuron(0, 1), Neuron(0, 2), Neuron(1, 3), Neuron(2, 4)
        >>> consistency_score([{a, b}, {a, c}, {a, d}], mode="strict")   # |{a}| / |{a,b,c,d}|
        0.25
        >>> consistency_score([{a, b}, {a, c}, {b, d}])                  # |{a,b}| / 4
        0.5
    """
    if mode not in ("relaxed", "strict"):
        raise InvalidInputError(f"mode must be 'relaxed' or 'strict', got {mode!r}")
    sets = _as_sets(neuron_sets)
    if len(sets) < 2:
        return math.nan
    union = frozenset().union(*sets)
    if not union:
        return math.nan
    if mode == "strict":
        inter = frozenset.intersection(*sets)
        return len(inter) / len(union)
    counts = neuron_counts(sets)
    return sum(1 for n in union if counts[n] > 1) / len(union)
