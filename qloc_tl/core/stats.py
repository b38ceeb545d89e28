"""Statistics and seeding shared by every experiment: derived seeds, bootstrap CIs and permutation tests.

One seeding scheme for the whole package: every random draw of an experiment is seeded by the run's seed and
a path of labels (the draw's purpose, the fact's key ...) — :func:`derive_seed` ``(seed, *labels)`` for numpy
and torch generators, :func:`seeded_random` ``(seed, *labels)`` for Python's ``random`` — so a fact's draw
does not depend on which other facts ran, in which order, or in which shard.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pandas as pd

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.validation import check_float, check_int

__all__ = ["derive_seed", "seeded_random", "bootstrap_proportion_ci", "permutation_p", "bootstrap_summary"]


def derive_seed(seed: int, *parts: Hashable) -> int:
    """A 63-bit seed derived from ``seed`` and a path of labels (stable across processes and runs).

    Examples:
        >>> derive_seed(0, "fact", 1) == derive_seed(0, "fact", 1) != derive_seed(1, "fact", 1)
        True
    """
    text = repr((check_int("seed", seed, None),) + tuple(str(p) for p in parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)



def seeded_random(seed: int, *parts: Hashable) -> random.Random:
    """A :class:`random.Random` for one draw of an experiment, seeded by ``seed`` and a path of labels (e.g.
    ``("unrelated", fact.key)``): the same labels give the same stream in any process, order or shard.

    Examples:
        >>> seeded_random(0, "unrelated", "P36:France").random() == seeded_random(0, "unrelated", "P36:France").random()
        True
    """
    return random.Random("|".join([str(check_int("seed", seed, None)), *(str(p) for p in parts)]))

def bootstrap_proportion_ci(
    flags: Sequence[bool] | np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the proportion of True in ``flags`` (resampling items); ``(nan, nan)`` when
    ``flags`` is empty (a class with no member has no proportion to bound)."""
    check_int("n_boot", n_boot, 1)
    check_float("level", level, 0.0, 1.0, open_lo=True, open_hi=True)
    check_int("seed", seed, 0)
    x = np.asarray(flags, dtype=float)
    if x.ndim != 1:
        raise InvalidInputError(f"flags must be a 1-D sequence of booleans, got shape {x.shape}")
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(n_boot, x.size), replace=True).mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def permutation_p(a: np.ndarray, b: np.ndarray, n_perm: int, seed: int) -> float:
    """Two-sided permutation p-value of the difference of means of ``a`` and ``b`` (add-one smoothed)."""
    check_int("n_perm", n_perm, 1)
    check_int("seed", seed, 0)
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    for name, x in (("a", a), ("b", b)):
        if x.size == 0:
            raise InvalidInputError(f"permutation test: sample {name} is empty")
        if not np.isfinite(x).all():
            raise InvalidInputError(f"permutation test: sample {name} contains inf/NaN")
    rng = np.random.default_rng(seed)
    obs = abs(a.mean() - b.mean())
    pooled = np.concatenate([a, b])
    hits = 0
    for _ in range(n_perm):
        rng.shuffle(pooled)
        if abs(pooled[: a.size].mean() - pooled[a.size :].mean()) >= obs - 1e-15:
            hits += 1
    return (hits + 1) / (n_perm + 1)


def _cluster_weights(n_clusters: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_bootstrap).astype(np.float64)


def bootstrap_summary(
    df: pd.DataFrame,
    *,
    ratios: Mapping[str, tuple[str, str | None]],
    cluster: str = "fact_key",
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Point estimates and cluster-bootstrap percentile CIs of ratio statistics of ``df``'s rows.

    Each entry of ``ratios`` is ``name -> (numerator column, denominator column or None)``: the statistic is
    ``Σ num / Σ den`` over rows (``None``: ``Σ num / #rows``, i.e. a mean), NaN numerators skipped together
    with their row. Bootstrap samples resample whole clusters (facts) with replacement.

    Returns:
        ``{name: value, name_lo: ..., name_hi: ...}`` (CI bounds NaN with fewer than two clusters).

    Examples:
        >>> df = pd.DataFrame({"fact_key": ["a", "a", "b"], "x": [1.0, 3.0, 5.0]})
        >>> bootstrap_summary(df, ratios={"mean_x": ("x", None)}, n_bootstrap=50)["mean_x"]
        3.0
    """
    check_float("ci", ci, 0.0, 1.0, open_lo=True, open_hi=True)
    check_int("n_bootstrap", n_bootstrap, 0)
    check_int("seed", seed, 0)
    if not ratios:
        raise InvalidInputError("ratios is empty: give at least one name -> (numerator, denominator) statistic")
    keys, inverse = np.unique(df[cluster].astype(str).to_numpy(), return_inverse=True)
    nc = len(keys)
    rng = np.random.default_rng(seed)
    W = _cluster_weights(nc, n_bootstrap, rng) if nc >= 2 and n_bootstrap > 0 else None
    out: dict[str, float] = {}
    for name, (num_col, den_col) in ratios.items():
        num = df[num_col].to_numpy(dtype=np.float64)
        ok = np.isfinite(num)
        den = np.ones_like(num) if den_col is None else df[den_col].to_numpy(dtype=np.float64)
        ok &= np.isfinite(den)
        sn = np.bincount(inverse[ok], weights=num[ok], minlength=nc)
        sd = np.bincount(inverse[ok], weights=den[ok], minlength=nc)
        tot = sd.sum()
        out[name] = float(sn.sum() / tot) if tot != 0 else math.nan
        if W is None:
            out[f"{name}_lo"] = out[f"{name}_hi"] = math.nan
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = (W @ sn) / (W @ sd)
        boot = boot[np.isfinite(boot)]
        if boot.size == 0:
            out[f"{name}_lo"] = out[f"{name}_hi"] = math.nan
        else:
            a = (1 - ci) / 2
            out[f"{name}_lo"] = float(np.quantile(boot, a))
            out[f"{name}_hi"] = float(np.quantile(boot, 1 - a))
    return out
