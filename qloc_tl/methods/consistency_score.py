"""The Consistency Score (CS) of a fact's knowledge neurons across its neighbor queries, and the K_C / K_I split.

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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.stats import bootstrap_proportion_ci, permutation_p
from qloc_tl.core.validation import as_neuron_sets, check_float, check_int

__all__ = [
    "CLASS_KC",
    "CLASS_KI",
    "CLASS_NONE",
    "consistency_score",
    "neuron_counts",
    "cs_threshold",
    "split_facts",
    "classify_facts",
    "FactClasses",
    "class_statistics",
]

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


# ==================================================================================================
# K_C / K_I split and statistics
# ==================================================================================================

ThresholdKind = Literal["static", "otsu"]
CLASS_KC, CLASS_KI, CLASS_NONE = "K_C", "K_I", "excluded"


def cs_threshold(cs: Sequence[float] | np.ndarray, kind: ThresholdKind | float = "static", *, static: float = 0.3) -> float:
    """The CS threshold τ separating K_C (CS ≥ τ) from K_I (CS < τ).

    Args:
        cs: the facts' CS values (NaNs ignored).
        kind: ``"static"`` (use ``static``), ``"otsu"`` (Otsu's threshold of the CS distribution, 256 bins) or a
            number (used as is).
        static: the static threshold (default 0.3, the example value of the paper's submission; with the
            relaxed CS it means "fewer than 30% of the fact's KNs are shared by two or more queries" is
            inconsistent).

    Examples:
        >>> cs_threshold([0.1, 0.12, 0.8, 0.82], "otsu") < 0.8
        True
    """
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        if not 0 <= float(kind) <= 1:
            raise InvalidInputError(f"a numeric CS threshold must lie in [0, 1], got {kind}")
        return float(kind)
    if not isinstance(kind, str):
        raise InvalidInputError(f"threshold kind must be 'static', 'otsu' or a number in [0, 1], got {kind!r}")
    if kind == "static":
        return check_float("static CS threshold", static, 0.0, 1.0)
    if kind == "otsu":
        from qloc_tl.methods.attribution.selection import otsu_threshold

        v = _cs_values(cs)
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise InvalidInputError("cannot compute an Otsu threshold: no fact has a finite CS")
        return otsu_threshold(v)
    raise InvalidInputError(f"threshold kind must be 'static', 'otsu' or a number in [0, 1], got {kind!r}")


def _cs_values(cs: Any) -> np.ndarray:
    """CS values as a 1-D float array: each in [0, 1], or NaN for a fact without a score."""
    try:
        v = np.asarray(cs, dtype=float)
    except (TypeError, ValueError):
        raise InvalidInputError(f"CS values must be numbers in [0, 1] (or NaN), got {cs!r}") from None
    if v.ndim != 1:
        raise InvalidInputError(f"CS values must be a 1-D sequence, got shape {v.shape}")
    bad = np.isinf(v) | (np.isfinite(v) & ((v < 0) | (v > 1)))
    if bad.any():
        raise InvalidInputError(f"CS values must lie in [0, 1] (NaN: no score), got {v[bad][0]!r}")
    return v


def split_facts(
    cs: Sequence[float] | np.ndarray, kind: ThresholdKind | float = "static", *, static: float = 0.3
) -> tuple[np.ndarray, float]:
    """Classify facts: ``"K_C"`` when CS ≥ τ, ``"K_I"`` when CS < τ, ``"excluded"`` when CS is NaN.

    Returns:
        ``(labels, tau)``.

    Examples:
        >>> labels, tau = split_facts([0.5, 0.1, float("nan")])
        >>> labels.tolist(), tau
        (['K_C', 'K_I', 'excluded'], 0.3)
    """
    v = _cs_values(cs)
    tau = cs_threshold(v, kind, static=static)
    labels = np.where(~np.isfinite(v), CLASS_NONE, np.where(v >= tau, CLASS_KC, CLASS_KI))
    return labels.astype(object), tau




def class_statistics(
    cs: Sequence[float] | np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    n_boot: int = 1000,
    n_perm: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Proportions, mean CS per class, Welch's t-test and a permutation test between K_C and K_I.

    Note: when the classes are defined by thresholding CS itself, the test is close to tautological (the
    paper reports it anyway); it is reported for parity, with Cohen's d as the effect size.
    """
    from scipy import stats

    check_int("n_boot", n_boot, 1)
    check_int("n_perm", n_perm, 1)
    check_int("seed", seed, 0)
    v = _cs_values(cs)
    lab = np.asarray(labels, dtype=object).ravel()
    if lab.shape != v.shape:
        raise InvalidInputError(f"got {v.size} CS values but {lab.size} labels; give one label per fact")
    unknown = sorted({str(x) for x in lab} - {CLASS_KC, CLASS_KI, CLASS_NONE})
    if unknown:
        raise InvalidInputError(f"labels must be {CLASS_KC!r}, {CLASS_KI!r} or {CLASS_NONE!r}, got {unknown}")
    keep = lab != CLASS_NONE
    v, lab = v[keep], lab[keep]
    kc, ki = v[lab == CLASS_KC], v[lab == CLASS_KI]
    out: dict[str, float] = {
        "n_facts": int(v.size),
        "n_KC": int(kc.size),
        "n_KI": int(ki.size),
        "prop_KI": float(ki.size / v.size) if v.size else math.nan,
        "mean_cs": float(v.mean()) if v.size else math.nan,
        "mean_cs_KC": float(kc.mean()) if kc.size else math.nan,
        "mean_cs_KI": float(ki.mean()) if ki.size else math.nan,
    }
    out["prop_KC"] = 1 - out["prop_KI"] if v.size else math.nan
    lo, hi = bootstrap_proportion_ci(lab == CLASS_KI, n_boot=n_boot, seed=seed)
    out["prop_KI_ci_lo"], out["prop_KI_ci_hi"] = lo, hi
    if kc.size >= 2 and ki.size >= 2 and (kc.std() > 0 or ki.std() > 0):
        t = stats.ttest_ind(kc, ki, equal_var=False)
        out["welch_t"], out["welch_p"] = float(t.statistic), float(t.pvalue)
        out["perm_p"] = permutation_p(kc, ki, n_perm, seed)
        sp = math.sqrt(((kc.size - 1) * kc.var(ddof=1) + (ki.size - 1) * ki.var(ddof=1)) / (kc.size + ki.size - 2))
        out["cohens_d"] = float((kc.mean() - ki.mean()) / sp) if sp > 0 else math.inf
    else:
        out["welch_t"] = out["welch_p"] = out["perm_p"] = out["cohens_d"] = math.nan
    return out


class FactClasses(NamedTuple):
    """Facts split by CS: ``classes`` (fact key → ``"K_C" | "K_I" | "excluded"``), ``cs`` and the threshold ``tau``."""

    classes: dict[str, str]
    cs: dict[str, float]
    tau: float


def classify_facts(
    kn_sets: Mapping[str, Sequence[Iterable[Neuron]]],
    *,
    threshold: ThresholdKind | float = "static",
    static: float = 0.3,
    mode: CSMode = "relaxed",
) -> FactClasses:
    """Split facts into K_C (CS ≥ τ) and K_I (CS < τ) by the Consistency Score of their per-query KN sets.

    τ is :func:`cs_threshold` of ``threshold`` over these facts (``"static"`` = ``static``, ``"otsu"``, or a
    number). Facts whose CS is NaN (one query, or no query has any KN) are ``"excluded"``.

    Examples:
        >>> a, b, c = Neuron(0, 1), Neuron(0, 2), Neuron(1, 3)
        >>> classify_facts({"f": [{a, b}, {a, b}], "g": [{a}, {c}]}).classes
        {'f': 'K_C', 'g': 'K_I'}
    """
    keys = list(kn_sets)
    scores = {k: consistency_score(as_neuron_sets(kn_sets[k], f"kn_sets[{k!r}]"), mode=mode) for k in keys}
    if not keys:
        tau = math.nan if threshold == "otsu" else cs_threshold([], threshold, static=static)
        return FactClasses({}, {}, float(tau))
    labels, tau = split_facts([scores[k] for k in keys], threshold, static=static)
    return FactClasses({k: str(lab) for k, lab in zip(keys, labels)}, scores, float(tau))
