"""Quadrature rules for the path integral of integrated gradients.

IG approximates ``∫_0^1 g(α) dα`` by ``Σ_k w_k g(α_k)``. Every rule here returns the nodes ``α_k`` and the
weights ``w_k`` as float64 tensors; nothing else in qloc_tl builds a grid.

======================= =================================== ======================= =====================
rule                    nodes α_k (m = ``steps``)           weights w_k             exact for polynomials
======================= =================================== ======================= =====================
``"left"`` (default)    k/m, k = 0..m−1                     1/m                     degree 0
``"right"``             k/m, k = 1..m                       1/m                     degree 0
``"midpoint"``          (k + ½)/m, k = 0..m−1               1/m                     degree 1
``"trapezoid"``         k/(m−1), k = 0..m−1 (m ≥ 2)         1/(m−1), ends halved    degree 1
``"gauss_legendre"``    Gauss–Legendre nodes mapped to      Gauss weights / 2       degree 2m−1
                        [0, 1]
``"eleuther"``          linspace(0, 1, m) (both ends)       1/m                     degree 1 (m ≥ 2), by
                                                                                    symmetry; O(1/m) error
                                                                                    beyond
======================= =================================== ======================= =====================

``"left"`` is Dai et al.'s official code (points ``k·w̄/m``, ``k = 0..m−1``, then ``Σ grad · w̄/m``).
``"eleuther"`` is EleutherAI ``knowledge-neurons``' ``scaled_input``: ``linspace(0, 1, m)`` times
``w̄/m`` — both endpoints *and* equal weights ``1/m``; it overweights the end points, so its error on
smooth integrands is O(1/m) (the trapezoid rule on the same nodes is O(1/m²)). It is provided to reproduce
that code.

Examples:
    >>> alphas, weights = quadrature("left", 4)
    >>> alphas.tolist(), weights.tolist()
    ([0.0, 0.25, 0.5, 0.75], [0.25, 0.25, 0.25, 0.25])
    >>> a, w = quadrature("gauss_legendre", 3)
    >>> round(float((w * a**5).sum()), 12)  # ∫_0^1 α^5 dα = 1/6, exact up to degree 5
    0.166666666667
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError

__all__ = ["RULES", "Rule", "quadrature", "exactness_degree"]

Rule = Literal["left", "right", "midpoint", "trapezoid", "gauss_legendre", "eleuther"]
RULES: tuple[str, ...] = ("left", "right", "midpoint", "trapezoid", "gauss_legendre", "eleuther")


def quadrature(
    rule: str, steps: int | Any  # a positive int; checked below (InvalidInputError)
) -> tuple[Float[Tensor, " steps"], Float[Tensor, " steps"]]:
    """Nodes and weights of ``rule`` with ``steps`` points on [0, 1] (float64, CPU).

    Args:
        rule: one of :data:`RULES`.
        steps: number of nodes m (≥ 1; ≥ 2 for ``"trapezoid"``).

    Returns:
        ``(alphas [steps], weights [steps])``.

    Raises:
        InvalidInputError: unknown rule, or too few steps.
    """
    if rule not in RULES:
        raise InvalidInputError(f"unknown quadrature rule {rule!r}; choose one of {list(RULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise InvalidInputError(f"steps must be a positive int, got {steps!r}")
    m = steps
    k = torch.arange(m, dtype=torch.float64)
    if rule == "left":
        return k / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "right":
        return (k + 1) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "midpoint":
        return (k + 0.5) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "trapezoid":
        if m < 2:
            raise InvalidInputError("the trapezoid rule needs steps >= 2 (both end points)")
        w = torch.full((m,), 1.0 / (m - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (m - 1)
        return k / (m - 1), w
    if rule == "gauss_legendre":
        gx, gw = np.polynomial.legendre.leggauss(m)
        return torch.from_numpy((gx + 1.0) / 2.0), torch.from_numpy(gw / 2.0)
    # eleuther
    return torch.linspace(0.0, 1.0, m, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)


def exactness_degree(rule: str, steps: int) -> int:
    """The highest polynomial degree ``rule`` integrates exactly on [0, 1].

    Examples:
        >>> exactness_degree("gauss_legendre", 5), exactness_degree("trapezoid", 5), exactness_degree("left", 5)
        (9, 1, 0)
    """
    quadrature(rule, steps)  # validates
    if rule in ("left", "right"):
        return 0
    if rule in ("midpoint", "trapezoid"):
        return 1
    if rule == "gauss_legendre":
        return 2 * steps - 1
    return 0 if steps == 1 else 1  # eleuther: symmetric nodes, equal weights summing to 1
