"""Turning attribution scores into knowledge-neuron sets: thresholds, refining across prompts, adaptive p.

Conventions:

* **Coarse KNs of one prompt** — :func:`select_neurons` keeps neurons whose score passes a threshold τ;
  ``>=`` by default (Dai et al.'s rule), ``strict=True`` for ``>`` (EleutherAI). NaN scores (layers that were
  not attributed) never pass.

  ======================= ============================================================ =================
  ``method``              τ                                                            ``value``
  ======================= ============================================================ =================
  ``"fraction_of_max"``   ``value · max(scores)`` over all layers (Dai's t; if the max   0.2 (Dai code)
                          is ≤ 0 no neuron has positive attribution: empty set)
  ``"absolute"``          ``value``                                                    τ (required)
  ``"percentile"``        ``numpy.percentile(scores, value)`` (linear interpolation)   q in [0, 100]
  ``"topk"``              the ``value`` highest scores (ties: lower layer, then index)  k (int)
  ``"otsu"``              Otsu's threshold of a 256-bin histogram of the scores        bins (default 256)
                          (see :func:`otsu_threshold`)
  ======================= ============================================================ =================

* **Refining across the prompts of a fact** — :func:`refine_neurons` keeps neurons that appear in enough
  of the per-prompt sets: Dai: ``count >= max(p·n, 3)`` (``rule=">="``, ``min_count=3``); EleutherAI:
  ``count > p·n`` (``rule=">"``, ``min_count=0``).
* **Adaptive p** — :func:`refine_adaptive` reproduces Dai et al.'s per-relation loop: start at ``p0 = 0.7``
  and move p by ``step`` (down when facts have too few KNs on average, up when too many) until the mean
  number of refined KNs per fact lies in ``target`` = [2, 5], for at most ``max_iter`` adjustments.

Examples:
    >>> import torch
    >>> scores = torch.zeros(2, 4); scores[0, 1] = 1.0; scores[1, 3] = 0.3; scores[1, 0] = 0.1
    >>> [str(n) for n in select_neurons(scores)]          # ≥ 0.2 · max
    ['L0N1', 'L1N3']
    >>> [str(n) for n in select_neurons(scores, method="topk", value=1)]
    ['L0N1']
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.validation import check_float, check_int, check_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "SELECTION_METHODS",
    "NeuronSet",
    "select_neurons",
    "refine_neurons",
    "refine_adaptive",
    "AdaptiveRefinement",
    "otsu_threshold",
    "check_selection",
]

SelectionMethod = Literal["fraction_of_max", "absolute", "percentile", "topk", "otsu"]
SELECTION_METHODS: tuple[str, ...] = ("fraction_of_max", "absolute", "percentile", "topk", "otsu")
_DEFAULT_VALUE: dict[str, float | int | None] = {
    "fraction_of_max": 0.2,
    "absolute": None,
    "percentile": None,
    "topk": None,
    "otsu": 256,
}


class NeuronSet:
    """A frozen, sorted set of :class:`~qloc_tl.core.identities.Neuron` (ordered by layer, then index).

    Supports ``len``, iteration (in order), ``in``, ``==``, hashing, ``&``, ``|``, ``-`` and ``^`` (results
    are NeuronSets). ``threshold`` records the τ that produced it (``None`` for sets built by hand or by
    set operations).

    Examples:
        >>> a = NeuronSet([Neuron(1, 2), Neuron(0, 5)])
        >>> list(a)
        [Neuron(layer=0, index=5), Neuron(layer=1, index=2)]
        >>> len(a & NeuronSet([(0, 5)]))
        1
    """

    __slots__ = ("_neurons", "_set", "threshold")
    _neurons: tuple[Neuron, ...]
    _set: frozenset[Neuron]
    threshold: float | None

    def __init__(
        self,
        neurons: Iterable[Neuron | tuple[int, int] | Any] = (),  # other items: InvalidInputError below
        *,
        threshold: float | None = None,
    ) -> None:
        items = set()
        for n in neurons:
            if isinstance(n, Neuron):
                items.add(n)
            elif isinstance(n, (tuple, list)) and len(n) == 2:
                items.add(Neuron(*n))
            else:
                raise InvalidInputError(f"expected Neuron(layer, index) or a (layer, index) pair, got {n!r}")
        object.__setattr__(self, "_neurons", tuple(sorted(items)))
        object.__setattr__(self, "_set", frozenset(items))
        object.__setattr__(self, "threshold", None if threshold is None else float(threshold))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("NeuronSet is immutable")

    def __iter__(self) -> Iterator[Neuron]:
        return iter(self._neurons)

    def __len__(self) -> int:
        return len(self._neurons)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, tuple) and len(item) == 2:
            try:
                item = Neuron(*item)
            except InvalidInputError:
                return False
        return item in self._set

    def __getitem__(self, i: int) -> Neuron:
        return self._neurons[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NeuronSet):
            return self._set == other._set
        if isinstance(other, (set, frozenset)):
            return self._set == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._set)

    def __and__(self, other: Iterable[Neuron]) -> NeuronSet:
        return NeuronSet(self._set & _as_set(other))

    def __or__(self, other: Iterable[Neuron]) -> NeuronSet:
        return NeuronSet(self._set | _as_set(other))

    def __sub__(self, other: Iterable[Neuron]) -> NeuronSet:
        return NeuronSet(self._set - _as_set(other))

    def __xor__(self, other: Iterable[Neuron]) -> NeuronSet:
        return NeuronSet(self._set ^ _as_set(other))

    def __repr__(self) -> str:
        shown = ", ".join(str(n) for n in self._neurons[:8])
        more = f", … (+{len(self) - 8})" if len(self) > 8 else ""
        return f"NeuronSet([{shown}{more}])"

    @property
    def neurons(self) -> tuple[Neuron, ...]:
        return self._neurons

    def layers(self) -> list[int]:
        """Sorted distinct layers present."""
        return sorted({n.layer for n in self._neurons})

    def to_frozenset(self) -> frozenset[Neuron]:
        return self._set

    def to_dataframe(self) -> Any:
        """Columns ``layer``, ``neuron`` (one row per neuron, in order)."""
        import pandas as pd

        return pd.DataFrame(
            {"layer": [n.layer for n in self._neurons], "neuron": [n.index for n in self._neurons]},
            columns=["layer", "neuron"],
        )


def _as_set(other: Iterable[Neuron]) -> frozenset[Neuron]:
    return other.to_frozenset() if isinstance(other, NeuronSet) else NeuronSet(other).to_frozenset()


# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------


def otsu_threshold(values: Tensor | np.ndarray | Sequence[float], bins: int = 256) -> float:
    """Otsu's threshold of 1-D ``values`` (NaNs ignored), on a ``bins``-bin histogram over [min, max].

    The split "bins 0..k | bins k+1.." maximising the between-class variance ``w0·w1·(μ0 − μ1)²`` (bin
    centres as values; the first maximiser on ties) is found as in ``skimage.filters.threshold_otsu``. The
    returned τ is the **lower edge of bin k+1**, so ``values >= τ`` is exactly Otsu's upper class (skimage
    returns the centre of bin k, which can put the top of the lower class above τ). All-equal input returns
    that value.

    Examples:
        >>> otsu_threshold([0.0, 0.1, 0.05, 0.9, 1.0]) > 0.1
        True
    """
    v = np.asarray(
        values.detach().to("cpu", torch.float64) if isinstance(values, Tensor) else values, dtype=np.float64
    )
    v = v.ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InvalidInputError("otsu threshold of an empty (or all-NaN) score array")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise InvalidInputError(f"otsu needs an int number of bins >= 2, got {bins!r}")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    hist, edges = np.histogram(v, bins=int(bins), range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2.0
    hist = hist.astype(np.float64)
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = np.cumsum(hist * centers) / w1
        m2 = (np.cumsum((hist * centers)[::-1]) / w2[::-1])[::-1]
    var12 = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    var12 = np.nan_to_num(var12, nan=-1.0)
    # first maximiser, robust to rounding: splits anywhere inside an empty gap have equal variance
    best = int(np.nonzero(var12 >= var12.max() * (1 - 1e-12))[0][0])
    return float(edges[best + 1])


def check_selection(method: str, value: Any = None, strict: Any = False) -> Any:
    """The selection rule's ``value`` (its default when ``None``) if ``method`` is known and ``value`` lies in its
    meaningful range: a fraction in [0, 1] for ``"fraction_of_max"`` (above 1 nothing could pass, below 0 every
    negative score would), a finite τ, a percentile in [0, 100], an int k >= 0 or an int number of bins >= 2.

    Examples:
        >>> check_selection("fraction_of_max")
        0.2
        >>> check_selection("fraction_of_max", 1.5)
        Traceback (most recent call last):
        ...
        qloc_tl.core.errors.InvalidInputError: fraction_of_max value must lie in [0, 1], got 1.5
    """
    if method not in SELECTION_METHODS:
        raise InvalidInputError(
            f"unknown selection method {method!r}; choose one of {list(SELECTION_METHODS)}"
        )
    if not isinstance(strict, bool):
        raise InvalidInputError(f"strict must be True or False, got {strict!r}")
    if value is None:
        value = _DEFAULT_VALUE[method]
        if value is None:
            what = {"absolute": "a threshold τ", "percentile": "a percentile q in [0, 100]", "topk": "k"}[
                method
            ]
            raise InvalidInputError(f"method={method!r} needs value= ({what})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise InvalidInputError(f"value must be a finite number, got {value!r}")
    if method == "fraction_of_max" and not 0 <= value <= 1:
        raise InvalidInputError(f"fraction_of_max value must lie in [0, 1], got {value!r}")
    if method == "percentile" and not 0 <= value <= 100:
        raise InvalidInputError(f"percentile value must lie in [0, 100], got {value}")
    if method in ("topk", "otsu") and (int(value) != value or value < (0 if method == "topk" else 2)):
        raise InvalidInputError(
            f"value for {method!r} must be an int (k >= 0 for topk, bins >= 2 for otsu), got {value!r}"
        )
    return value


def _select_one(scores: Tensor, method: str, value: Any, strict: bool) -> NeuronSet:
    s = scores.detach().to("cpu", torch.float64)
    finite = torch.isfinite(s)
    if not bool(finite.any()):
        return NeuronSet(threshold=None)
    if method == "topk":
        k = int(value)
        flat = torch.where(finite, s, torch.full_like(s, -np.inf)).reshape(-1)
        k = min(k, int(finite.sum()))
        if k == 0:
            return NeuronSet()
        # stable: sort descending by score, ties by flat index (layer-major)
        order = np.lexsort((np.arange(flat.numel()), -flat.numpy()))[:k]
        d = s.shape[-1]
        return NeuronSet((Neuron(int(i) // d, int(i) % d) for i in order), threshold=float(flat[order[-1]]))
    vals = s[finite]
    if method == "fraction_of_max":
        mx = float(vals.max())
        if mx <= 0:
            return NeuronSet(threshold=None)
        tau = float(value) * mx
    elif method == "absolute":
        tau = float(value)
    elif method == "percentile":
        tau = float(np.percentile(vals.numpy(), float(value)))
    else:
        tau = otsu_threshold(vals, bins=int(value))
    keep = (s > tau) if strict else (s >= tau)
    keep &= finite
    idx = keep.nonzero().tolist()
    return NeuronSet((Neuron(l, i) for l, i in idx), threshold=tau)


def select_neurons(
    scores: Float[Tensor, "..."] | Any,  # [n_layers, d_mlp] or [n_prompts, n_layers, d_mlp]; checked below
    *,
    method: SelectionMethod | str = "fraction_of_max",
    value: float | int | None = None,
    strict: bool | Any = False,  # True or False; checked below (InvalidInputError)
) -> Any:  # NeuronSet | list[NeuronSet], by the number of dimensions, which a static checker cannot see
    """Select neurons whose attribution passes a threshold (coarse KNs of one prompt).

    Args:
        scores: ``[n_layers, d_mlp]`` for one prompt, or ``[n_prompts, n_layers, d_mlp]`` (one threshold per
            prompt). NaN entries are never selected. A :class:`NeuronAttribution` is accepted too.
        method: ``"fraction_of_max"`` (default), ``"absolute"``, ``"percentile"``, ``"topk"`` or ``"otsu"``.
        value: the fraction (default 0.2), τ, q, k or the number of Otsu bins (default 256).
        strict: ``False`` keeps ``score >= τ`` (Dai), ``True`` keeps ``score > τ`` (EleutherAI).

    Returns:
        One :class:`NeuronSet` (2-D input) or a list of them (3-D input).

    Examples:
        >>> import torch
        >>> s = torch.tensor([[[0.0, 1.0], [0.5, 0.2]], [[2.0, 0.0], [0.0, 0.0]]])
        >>> [len(x) for x in select_neurons(s, method="absolute", value=0.5)]
        [2, 1]
    """
    if hasattr(scores, "scores") and not isinstance(scores, Tensor):
        scores = scores.scores
    if not isinstance(scores, Tensor):
        try:
            scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"scores must be a tensor or an array of numbers, got {type(scores).__name__}"
            ) from None
    value = check_selection(method, value, strict)
    if scores.ndim not in (2, 3):
        raise InvalidInputError(
            f"scores must be [n_layers, d_mlp] or [n_prompts, n_layers, d_mlp], got shape {tuple(scores.shape)}"
        )
    check_tensor("scores", scores, kind="real", finite=False)  # NaN marks a layer that was not attributed
    if scores.ndim == 2:
        return _select_one(scores, method, value, strict)
    if scores.ndim == 3:
        return [_select_one(s, method, value, strict) for s in scores]
    raise InvalidInputError(
        f"scores must be [n_layers, d_mlp] or [n_prompts, n_layers, d_mlp], got shape {tuple(scores.shape)}"
    )


# --------------------------------------------------------------------------------------------------
# Refining
# --------------------------------------------------------------------------------------------------


def _check_refine(p: Any, rule: Any, min_count: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise InvalidInputError(f"p must be a fraction in [0, 1], got {p!r}")
    if rule not in (">=", ">"):
        raise InvalidInputError(f"rule must be '>=' (Dai) or '>' (EleutherAI), got {rule!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise InvalidInputError(f"min_count must be an int >= 0, got {min_count!r}")


def refine_neurons(
    neuron_sets: Sequence[Iterable[Neuron]],
    *,
    p: float | int = 0.7,
    rule: Literal[">=", ">"] | str = ">=",
    min_count: int = 3,
) -> NeuronSet:
    """Keep the neurons shared by enough of the per-prompt sets of one fact ("bag").

    With n sets and ``c(x)`` the number of sets containing neuron x, x is kept when
    ``c(x) >= max(p·n, min_count)`` (``rule=">="``, Dai et al.; defaults p = 0.7, min_count = 3), or when
    ``c(x) > p·n`` and ``c(x) >= min_count`` (``rule=">"``; EleutherAI is ``rule=">", min_count=0``).

    Examples:
        >>> A, B, C = Neuron(0, 1), Neuron(1, 2), Neuron(2, 3)
        >>> bag = [NeuronSet([A, B]), NeuronSet([A]), NeuronSet([A, C]), NeuronSet([A, B])]
        >>> list(refine_neurons(bag, p=0.5, min_count=2))   # A: 4, B: 2 ≥ max(2, 2)
        [Neuron(layer=0, index=1), Neuron(layer=1, index=2)]
        >>> list(refine_neurons(bag, p=0.5, rule=">", min_count=0))   # > 2 only
        [Neuron(layer=0, index=1)]
    """
    _check_refine(p, rule, min_count)
    if isinstance(neuron_sets, (str, bytes)):
        raise InvalidInputError("neuron_sets must be a sequence of neuron sets, not a string")
    sets = [s if isinstance(s, NeuronSet) else NeuronSet(s) for s in neuron_sets]
    n = len(sets)
    if n == 0:  # no prompt shares any neuron: the refined set is empty
        return NeuronSet()
    counts: Counter[Neuron] = Counter()
    for s in sets:
        counts.update(s)
    cut = p * n
    if rule == ">=":
        need = max(cut, float(min_count))
        kept = [x for x, c in counts.items() if c >= need]
    else:
        kept = [x for x, c in counts.items() if c > cut and c >= min_count]
    return NeuronSet(kept)


@dataclass(frozen=True)
class AdaptiveRefinement:
    """Result of :func:`refine_adaptive`.

    Attributes:
        neuron_sets: the refined set of every fact (bag), in input order, at the final ``p``.
        p: the final sharing fraction.
        mean_count: average refined-set size at ``p``.
        converged: whether ``mean_count`` lies in the target interval.
        history: ``(p, mean_count)`` for every p tried, in order.
    """

    neuron_sets: tuple[NeuronSet, ...]
    p: float
    mean_count: float
    converged: bool
    history: tuple[tuple[float, float], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.neuron_sets)

    def __getitem__(self, i: int) -> NeuronSet:
        return self.neuron_sets[i]

    def to_dataframe(self) -> Any:
        """Long form: ``fact``, ``layer``, ``neuron``, ``p``."""
        import pandas as pd

        rows = [(f, x.layer, x.index, self.p) for f, s in enumerate(self.neuron_sets) for x in s]
        return pd.DataFrame(rows, columns=["fact", "layer", "neuron", "p"])


def refine_adaptive(
    bags: Sequence[Sequence[Iterable[Neuron]]],
    p0: float | int = 0.7,
    step: float = 0.05,
    target: tuple[float | int, float | int] = (2, 5),
    max_iter: int = 6,
    *,
    rule: Literal[">=", ">"] | str = ">=",
    min_count: int = 3,
) -> AdaptiveRefinement:
    """Dai et al.'s adaptive sharing fraction for one relation.

    Starting from ``p = p0``, refine every bag (:func:`refine_neurons`); if the mean number of refined
    neurons per bag is below ``target[0]`` lower p by ``step``, if above ``target[1]`` raise it, and repeat —
    at most ``max_iter`` adjustments (so at most ``max_iter + 1`` values of p are tried). p is kept inside
    [0, 1]. The last p tried is returned, with ``converged`` telling whether it hit the target.

    Examples:
        >>> A, B, C, D = (Neuron(0, i) for i in range(4))
        >>> bag = [NeuronSet([A, B, C]), NeuronSet([A, B]), NeuronSet([A, B, D]), NeuronSet([A, C])]
        >>> r = refine_adaptive([bag], p0=0.9, step=0.1, target=(2, 5), min_count=0)
        >>> [round(p, 2) for p, _ in r.history], len(r[0])   # 0.9: {A} → 0.8: {A} → 0.7: {A, B}
        ([0.9, 0.8, 0.7], 2)
    """
    _check_refine(p0, rule, min_count)
    check_float("step", step, 0.0, 1.0, open_lo=True)  # p moves inside [0, 1]
    if isinstance(target, (str, bytes)) or len(target) != 2:
        raise InvalidInputError(f"target must be (low, high) with low <= high, got {target!r}")
    lo_t, hi_t = (check_float(f"target[{i}]", t, lo=0.0) for i, t in enumerate(target))
    if not lo_t <= hi_t:
        raise InvalidInputError(f"target must be (low, high) with low <= high, got {target!r}")
    check_int("max_iter", max_iter, 0)
    bags = [list(b) for b in bags]
    if not bags:
        raise InvalidInputError("no bags given: pass one sequence of per-prompt neuron sets per fact")
    p = float(p0)
    history: list[tuple[float, float]] = []
    for it in range(max_iter + 1):
        sets = tuple(refine_neurons(b, p=p, rule=rule, min_count=min_count) for b in bags)
        mean = float(np.mean([len(s) for s in sets]))
        history.append((p, mean))
        lo, hi = target
        if lo <= mean <= hi or it == max_iter:
            break
        new_p = p - step if mean < lo else p + step
        new_p = min(max(new_p, 0.0), 1.0)
        if new_p == p:
            break
        p = round(new_p, 12)
    lo, hi = target
    return AdaptiveRefinement(sets, p, mean, bool(lo <= mean <= hi), tuple(history))
