"""Quadrature rules against independent oracles: exact monomial integrals ∫_0^1 α^p dα = 1/(p+1), SciPy's
Gauss–Legendre roots, and hand-derived Riemann errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import roots_legendre

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.methods.attribution.quadrature import RULES, exactness_degree, quadrature


def _integrate(rule: str, m: int, p: int) -> float:
    a, w = quadrature(rule, m)
    return float((w * a**p).sum())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("m", [2, 3, 5, 8, 20])
def test_exact_up_to_degree_and_not_beyond(rule, m):
    deg = exactness_degree(rule, m)
    for p in range(0, deg + 1):
        assert _integrate(rule, m, p) == pytest.approx(1.0 / (p + 1), abs=1e-13), (rule, m, p)
    # the stated degree is tight
    a, w = quadrature(rule, m)
    if rule == "gauss_legendre":
        # Π_k (α − α_k)² has degree 2m = deg + 1, vanishes at every node, but has a positive integral
        q = lambda x: torch.prod((x.unsqueeze(-1) - a) ** 2, dim=-1)  # noqa: E731
        fine, fw = quadrature("gauss_legendre", 4 * m)
        assert float((w * q(a)).sum()) == 0.0 and float((fw * q(fine)).sum()) > 0
    else:
        assert abs(_integrate(rule, m, deg + 1) - 1.0 / (deg + 2)) > 1e-12


@pytest.mark.parametrize("rule", RULES)
def test_weights_sum_to_one_and_nodes_in_unit_interval(rule):
    for m in (2, 7, 20):
        a, w = quadrature(rule, m)
        assert a.dtype == torch.float64 and w.dtype == torch.float64
        assert a.shape == w.shape == (m,)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_riemann_errors_match_hand_derivation():
    # ∫ α dα = 1/2; left sum Σ_{k<m} (k/m)/m = (m−1)/(2m): error −1/(2m); right: +1/(2m)
    for m in (1, 4, 20):
        assert _integrate("left", m, 1) == pytest.approx(0.5 - 1 / (2 * m), abs=1e-15)
        assert _integrate("right", m, 1) == pytest.approx(0.5 + 1 / (2 * m), abs=1e-15)
    # ∫ α² = 1/3; midpoint error −1/(12 m²); trapezoid (h = 1/(m−1)) error +h²/6; eleuther: (2m−1)/(6(m−1))
    for m in (2, 5, 20):
        assert _integrate("midpoint", m, 2) == pytest.approx(1 / 3 - 1 / (12 * m**2), abs=1e-15)
        h = 1 / (m - 1)
        assert _integrate("trapezoid", m, 2) == pytest.approx(1 / 3 + h**2 / 6, abs=1e-15)
        assert _integrate("eleuther", m, 2) == pytest.approx((2 * m - 1) / (6 * (m - 1)), abs=1e-15)


def test_dai_and_eleuther_grids():
    a, w = quadrature("left", 20)
    assert a.tolist() == [k / 20 for k in range(20)] and torch.all(w == 1 / 20)
    a, w = quadrature("eleuther", 20)
    assert torch.allclose(a, torch.from_numpy(np.linspace(0, 1, 20))) and torch.all(w == 1 / 20)


@pytest.mark.parametrize("m", [1, 4, 20, 33])
def test_gauss_legendre_matches_scipy(m):
    x, w = roots_legendre(m)
    a, wt = quadrature("gauss_legendre", m)
    order = np.argsort(x)
    assert np.allclose(a.numpy(), (x[order] + 1) / 2, atol=1e-14)
    assert np.allclose(wt.numpy(), w[order] / 2, atol=1e-14)


def test_smooth_integrand_convergence_orders():
    # ∫_0^1 e^α dα = e − 1: trapezoid error ~ m⁻², Gauss–Legendre is machine-exact at m = 8
    exact = math.e - 1
    errs = []
    for m in (5, 10, 20):
        a, w = quadrature("trapezoid", m)
        errs.append(abs(float((w * a.exp()).sum()) - exact))
    assert errs[0] / errs[2] > 10  # (19/4)² ≈ 22
    a, w = quadrature("gauss_legendre", 8)
    assert float((w * a.exp()).sum()) == pytest.approx(exact, abs=1e-14)


@pytest.mark.parametrize(
    "rule, steps",
    [("simpson", 5), ("left", 0), ("left", -1), ("left", 2.5), ("left", True), ("trapezoid", 1)],
)
def test_invalid(rule, steps):
    with pytest.raises(InvalidInputError):
        quadrature(rule, steps)
