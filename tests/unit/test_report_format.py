"""The report's number rules (qloc_tl.reporting.formatting, html_page): significant digits against Python's
own rounding, the ratio guard on a hand-made table whose denominator is near zero, and readable fact names
in place of fact keys."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from qloc_tl.reporting.formatting import (
    GUARDED,
    RATIO_LIMIT,
    fmt_num,
    guard_value,
    is_relative_column,
    readable_facts,
    with_readable_keys,
)
from qloc_tl.reporting.html_page import raw_table_html

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.mark.parametrize("x", [0.70654, -12.345, 1234.5, 0.0048, 99.96, 0.0010049, 54321.0, -0.5, 3.0])
def test_fmt_num_keeps_three_significant_digits(x):
    """Oracle: the value rounded to 3 significant digits by ``%.2e``, read back; the text has at most 3
    significant digits (thousands separators aside) and equals that value."""
    text = fmt_num(x)
    want = float(f"{x:.2e}")
    assert float(text.replace(",", "")) == pytest.approx(want, rel=1e-12)
    digits = re.sub(r"[^0-9]", "", text).lstrip("0")
    assert len(digits.rstrip("0") or "0") <= 3


def test_fmt_num_outside_the_fixed_range_uses_an_exponent_and_keeps_integers_exact():
    assert fmt_num(6.7218e17) == "6.72e+17" and fmt_num(-3.3e-5) == "-3.30e-05"
    assert fmt_num(123456789) == "123,456,789" and fmt_num(np.int64(7)) == "7"
    assert fmt_num(float("nan")) == fmt_num(None) == fmt_num(math.inf) == "–"
    assert fmt_num(0.25, signed=True) == "+0.250"


def test_ratio_guard_on_a_hand_made_table_with_a_near_zero_denominator():
    """A relative change over activations of 1e-6 explodes; the table shows it as guarded and keeps the
    absolute Δ and every ratio within ±1,000."""
    before = np.array([0.5, 1e-6, -0.25, 2.0])
    after = np.array([0.4, 0.29, -0.30, 1.0])
    df = pd.DataFrame({"neuron": ["a", "b", "c", "d"], "dvalue_abs": after - before,
                       "dvalue_rel": (after - before) / np.abs(before)})  # fmt: skip
    assert abs(df["dvalue_rel"]).max() > 1e5  # the hand-made ratio: 289,999
    page = raw_table_html(df)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", page)
    rel_cells = cells[2::3]
    assert rel_cells[1] == GUARDED and "289" not in page
    shown = [float(c.replace(",", "")) for c in rel_cells if c != GUARDED]
    assert len(shown) == 3 and max(map(abs, shown)) <= RATIO_LIMIT
    assert cells[4] == fmt_num(0.29 - 1e-6)  # the absolute change of the guarded neuron stays readable
    assert "1 ratio cell(s) beyond ±1,000" in page


def test_relative_columns_are_recognised_by_name():
    rel = [
        "dprob_ratio",
        "mean_of_ratios",
        "ratio_of_means_hi",
        "dvalue_rel",
        "dvalue_rel_agg_lo",
        "ppl_rel_delta",
    ]
    other = ["rel", "relation", "dprob", "loc_same", "dvalue_abs", "n_rows"]
    assert all(is_relative_column(c) for c in rel)
    assert not any(is_relative_column(c) for c in other)
    assert guard_value(-292335.0) == (GUARDED, True) and guard_value(-0.5) == ("-0.500", False)


def test_fact_keys_become_subject_arrow_object(tmp_path):
    keys = ["70a70189-88bd-46fa-bbcb-cd8e2d78f96f", "8699df43-1d04-4e44-bf22-50b08c1c8141"]
    (tmp_path / "ql").mkdir()
    pd.DataFrame(
        {"fact_key": keys, "subject": ["Lou Reed", "Jack Wong Sue"], "object": ["Brooklyn", "Perth"]}
    ).to_parquet(tmp_path / "ql" / "facts.parquet")
    names = readable_facts(tmp_path)
    assert names == {keys[0]: "Lou Reed → Brooklyn", keys[1]: "Jack Wong Sue → Perth"}
    rows = pd.DataFrame(
        {"fact_key": keys * 2, "query": ["q1", "q2", "q3", "q4"], "dprob": [0.1, 0.2, 0.3, 0.4]}
    )
    out = with_readable_keys(rows, names)
    assert list(out.columns) == ["fact", "query", "dprob"]
    assert out["fact"].tolist() == ["Lou Reed → Brooklyn", "Jack Wong Sue → Perth"] * 2
    assert not UUID.search(raw_table_html(out))
