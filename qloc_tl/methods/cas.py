"""Neuron sets to edit for one fact: CAS (consistency-aware selection) and the N_i / N_u baselines.

Input: per-query attributions ``S [k, n_layers, d_mlp]`` of one fact's k neighbor queries.

* **N_i**: the edited query's KNs (fraction of max of its own map; :func:`query_kn_sets`).
* **N_u**: the union of all k queries' KNs — the "global" baseline.
* **CAS** (:func:`cas_scores`, :func:`select_cas`): per neuron, with ``ŝ_j = S_j / max(S_j)`` (per-query max
  normalisation, so queries are comparable), ``CAS = β1·mean_j ŝ_j − β2·var_j ŝ_j`` (population variance; or
  the standard deviation), β1 = β2 = 1; selected by fraction of max (0.2·max CAS, the rule Dai et al. use for
  KNs) or top-k, never selecting CAS ≤ 0. The paper does not state β1, β2 or the selection rule; these are
  this package's defaults.
* **CAS_k**: the top-``|N_i|`` CAS neurons, an optional size-matched control that separates "which neurons"
  from "how many".

:func:`fact_neuron_sets` returns all four for one fact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.validation import check_float, check_int, check_tensor
from qloc_tl.methods.attribution import NeuronSet, select_neurons

__all__ = ["cas_scores", "select_by_cas", "select_cas", "query_kn_sets", "fact_neuron_sets"]


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
    return check_tensor(what, scores, kind="real")


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


def _neuron_set(neurons: Iterable[Neuron]) -> NeuronSet:
    return NeuronSet(sorted(set(neurons)))


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
    check_tensor("cas", cas, kind="real")
    value = check_float("value", value)
    pos = cas > 0
    if method == "fraction_of_max":
        if not 0 <= value <= 1:
            raise InvalidInputError(f"fraction_of_max value must lie in [0, 1], got {value!r}")
        if not bool(pos.any()):
            return _neuron_set([])
        keep = pos & (cas >= value * cas.max())
    elif method == "topk":
        if int(value) != value or int(value) < 0:
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


def query_kn_sets(
    scores: Float[Tensor, "k n_layers d_mlp"], kn_threshold: float = 0.2, *, what: str = "scores"
) -> list[NeuronSet]:
    """Each query's KN set: the neurons scoring ≥ ``kn_threshold``·max of that query's map (Dai et al.'s
    t = 0.2; a map with no positive score gives an empty set).

    Examples:
        >>> s = torch.tensor([[[1.0, 0.1, 0.5]], [[0.0, 0.0, 0.0]]])
        >>> [[str(n) for n in q] for q in query_kn_sets(s)]
        [['L0N0', 'L0N2'], []]
    """
    s = _check_scores(scores, what)
    return [select_neurons(s[j], method="fraction_of_max", value=kn_threshold) for j in range(s.shape[0])]


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

    ``N_i`` = KNs of query ``edited`` (:func:`query_kn_sets`, fraction of max ``kn_threshold``); ``N_u`` = union of
    every query's KNs; ``CAS`` = :func:`select_cas`; ``CAS_k`` = the ``|N_i|`` neurons of highest positive
    CAS — a size-matched control that separates "which neurons" from "how many".
    """
    s = _check_scores(scores)
    check_int("edited", edited)
    if not 0 <= edited < s.shape[0]:
        raise InvalidInputError(f"edited query index {edited} out of range for {s.shape[0]} queries")
    per_query = query_kn_sets(s, kn_threshold)
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
