"""Numbers as the report shows them: one significant-digit rule for every number, guarded ratios, and the
readable names that replace fact keys.

* :func:`fmt_num` writes every float with the same number of significant digits (3 by default), in fixed
  notation between 10⁻³ and 10⁵ and as ``1.23e+17`` outside it, so a column of numbers reads alike.
* A relative change ``Δ / base`` over a base near zero is noise, not a measurement (a neuron whose activation
  was 1e-6 before an edit "changes by −292,335"). :func:`guarded_ratio` returns NaN where ``|base|`` is below
  a floor, and the HTML tables show no value of a relative column (:func:`is_relative_column`) beyond
  ±:data:`RATIO_LIMIT`: such a cell reads :data:`GUARDED`, and the table's note points at the absolute Δ.
* :func:`readable_facts` maps fact keys (UUIDs) to ``subject → object``; :func:`with_readable_keys` puts that
  name in the first column of a table in place of the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "RATIO_LIMIT",
    "GUARDED",
    "fmt_num",
    "fmt_pct",
    "fmt_ci",
    "guarded_ratio",
    "is_relative_column",
    "guard_value",
    "readable_facts",
    "with_readable_keys",
]

RATIO_LIMIT = 1000.0
"""Largest |value| a ratio or relative-change column may show; beyond it the denominator was near zero (or the
quantity exploded, e.g. perplexity after an edit that wrecked the model), and the absolute Δ says more."""

GUARDED = "n/a†"
"""What a guarded cell shows (the dagger refers to the table's note)."""

_RELATIVE = re.compile(r"(^|_)(ratio|ratios|rel)(_|$)")


def fmt_num(v: Any, digits: int = 3, *, signed: bool = False) -> str:
    """``v`` with ``digits`` significant digits: ``0.707``, ``12.3``, ``1,230``, ``0.00480``, ``6.72e+17``.

    Integers (and bools) are written exactly, with thousands separators; NaN, None and ±inf read ``–``.
    ``signed`` prefixes positive values with ``+`` (for Δ columns).

    Examples:
        >>> [fmt_num(x) for x in (0.70654, 12.345, 1234.5, 0.0048, 6.7218e17, -0.5, 0.0, 7)]
        ['0.707', '12.3', '1,230', '0.00480', '6.72e+17', '-0.500', '0', '7']
        >>> fmt_num(0.25, 2, signed=True), fmt_num(float("nan"))
        ('+0.25', '–')
    """
    if v is None or v is pd.NA:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (int, np.integer)):
        return f"{int(v):+,d}" if signed else f"{int(v):,d}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return "–"
    sign = "+" if signed and x > 0 else ""
    if x == 0:
        return "0"
    mag = abs(x)
    if mag < 1e-3 or mag >= 1e5:
        return f"{sign}{x:.{digits - 1}e}"
    exp = math.floor(math.log10(mag))
    places = digits - 1 - exp
    r = round(x, places)
    if r != 0 and math.floor(math.log10(abs(r))) > exp:  # 9.996 -> 10.0: one decimal place fewer
        places -= 1
        r = round(x, places)
    return f"{sign}{r:,.{max(0, places)}f}"


def fmt_pct(v: Any) -> str:
    """A proportion as a whole percentage (``0.3333`` → ``33%``); NaN reads ``–``."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–"
    return f"{x:.0%}" if math.isfinite(x) else "–"


def fmt_ci(v: Any, lo: Any, hi: Any, *, pct: bool = False, signed: bool = False, digits: int = 2) -> str:
    """``"0.33 [0.17, 0.56]"`` (or ``"33% [17%, 56%]"``): a value with its confidence interval; the interval is
    left out when a bound is missing.

    Examples:
        >>> fmt_ci(1 / 3, 1 / 6, 5 / 9, pct=True), fmt_ci(-0.7065, -0.7206, -0.6873, signed=True)
        ('33% [17%, 56%]', '-0.71 [-0.72, -0.69]')
    """

    def one(x: Any, sgn: bool) -> str:
        return fmt_pct(x) if pct else fmt_num(x, digits, signed=sgn)

    head = one(v, signed)
    try:
        ok = math.isfinite(float(lo)) and math.isfinite(float(hi))
    except (TypeError, ValueError):
        ok = False
    return f"{head} [{one(lo, False)}, {one(hi, False)}]" if ok and head != "–" else head


def guarded_ratio(num: Any, den: Any, *, min_den: float = 1e-3) -> Any:
    """``num / den``, NaN where ``|den| < min_den`` (or either is NaN): a relative change is reported only over a
    base that is not near zero. Works on scalars and arrays (numpy broadcasting).

    Examples:
        >>> guarded_ratio(0.2, 0.4), math.isnan(guarded_ratio(0.2, 1e-7))
        (0.5, True)
        >>> guarded_ratio(np.array([1.0, 1.0]), np.array([2.0, 0.0])).tolist()
        [0.5, nan]
    """
    n = np.asarray(num, dtype=float)
    d = np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.abs(d) >= min_den, n / np.where(d == 0, 1.0, d), np.nan)
    return float(out) if out.ndim == 0 else out


def is_relative_column(name: str) -> bool:
    """Whether a column holds a ratio or a relative change (``dprob_ratio``, ``mean_of_ratios``, ``dvalue_rel``,
    ``ppl_rel_delta``, their ``_lo`` / ``_hi`` bounds...). The editing metric ``rel`` (reliability) is not one.

    Examples:
        >>> [is_relative_column(c) for c in ("dvalue_rel_lo", "mean_of_ratios", "ppl_rel_delta", "rel", "relation")]
        [True, True, True, False, False]
    """
    return name != "rel" and bool(_RELATIVE.search(name))


def guard_value(v: Any, limit: float = RATIO_LIMIT) -> tuple[str, bool]:
    """``(text, guarded)`` of a cell of a relative column: :data:`GUARDED` when ``|v| > limit``, else
    :func:`fmt_num` of ``v``."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return fmt_num(v), False
    if math.isfinite(x) and abs(x) > limit:
        return GUARDED, True
    return fmt_num(v), False


def _fact_rows(out: Path) -> Iterable[Mapping[str, Any]]:
    for rel in ("ql/facts.parquet", "consistency/consistency_facts.parquet", "editing/editing_rows.parquet"):
        p = out / rel
        if p.is_file():
            try:
                df = pd.read_parquet(p, columns=["fact_key", "subject", "object"])
            except (ValueError, KeyError, OSError):
                continue
            yield from df.drop_duplicates("fact_key").to_dict("records")


def readable_facts(out: str | Path) -> dict[str, str]:
    """``{fact key: "subject → object"}`` for every fact named in a run directory's tables (the QL facts, the
    consistency facts, the editing rows; the first table naming a key wins)."""
    names: dict[str, str] = {}
    for r in _fact_rows(Path(out)):
        key = str(r["fact_key"])
        if key not in names and isinstance(r["subject"], str) and isinstance(r["object"], str):
            names[key] = f"{r['subject']} → {r['object']}"
    return names


def with_readable_keys(df: pd.DataFrame, names: Mapping[str, str]) -> pd.DataFrame:
    """``df`` with its ``fact_key`` column replaced by a first column ``fact``: ``subject → object`` from
    ``names`` (else from the row's own ``subject`` / ``object``; else ``fact`` and the key's first 8
    characters), and its ``subject`` / ``object`` columns dropped (the name carries them). Tables without
    ``fact_key`` are returned unchanged.

    Examples:
        >>> df = pd.DataFrame({"fact_key": ["k1", "k2", "0123456789ab"], "subject": ["A", "B", None],
        ...                    "object": ["x", "y", None], "cs": [0.5, 0.2, 0.1]})
        >>> with_readable_keys(df, {"k1": "A → x"}).to_dict("list")
        {'fact': ['A → x', 'B → y', 'fact 01234567'], 'cs': [0.5, 0.2, 0.1]}
    """
    if "fact_key" not in df.columns:
        return df
    keys = df["fact_key"].astype(str).tolist()
    subj = df["subject"].tolist() if "subject" in df.columns else [None] * len(df)
    obj = df["object"].tolist() if "object" in df.columns else [None] * len(df)
    fact = [
        names.get(k) or (f"{s} → {o}" if isinstance(s, str) and isinstance(o, str) else f"fact {k[:8]}")
        for k, s, o in zip(keys, subj, obj)
    ]
    rest = df.drop(columns=["fact_key"] + [c for c in ("subject", "object") if c in df.columns])
    rest.insert(0, "fact", fact)
    return rest
