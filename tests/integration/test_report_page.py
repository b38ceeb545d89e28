"""The HTML report a researcher reads, checked on a hand-made run directory: the order of the page (headline,
claims, one figure and one paper-style table per experiment, raw tables collapsed, settings), the counts of
figures and of tables outside ``<details>``, no fact key (UUID) in sight, no ratio beyond ±1,000, the run's
model named, and two runs side by side (``qloc-tl report A B``).

The oracle is the page itself, parsed with :mod:`html.parser` (:func:`page_census`), independent of the code
that wrote it; ``tests/integration/test_cli.py`` applies the same census to a real ``--quick`` run."""

from __future__ import annotations

import json
import math
import re
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?", re.I)


def is_ratio_header(h: str) -> bool:
    """A header of a ratio or relative-change column, read from its text: ``…ratio…``, ``Δp/p``, ``Σ/Σ`` or a
    ``_rel`` / ``rel_`` name (the editing metric ``Rel`` / ``rel`` is reliability, not a ratio)."""
    h = h.strip()
    if h.lower() == "rel":
        return False
    return bool(re.search(r"ratio|/p\b|Σ/Σ|(^|_)rel(_|$)", h))


def numbers(text: str) -> list[float]:
    """Every number written in ``text`` (thousands separators, signs, exponents, percentages)."""
    out = []
    for m in NUMBER.finditer(text):
        out.append(float(m.group(0).replace(",", "").replace("−", "-")))
    return out


class _Census(HTMLParser):
    """Walks a page and records what is visible outside ``<details>`` and every table's header and cells."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "source", "col", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.details = 0
        self.hidden = 0  # inside <script> / <style>
        self.figures_outside = 0
        self.figures = 0
        self.tables_outside = 0
        self.visible: list[str] = []
        self.tables: list[dict[str, list]] = []  # each: {"header": [...], "rows": [[cell text]]}
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_head = False
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.order: list[str] = []  # "headline", section ids, in document order

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "dl" and "headline" in (a.get("class") or ""):
            self.order.append("headline")
        if tag == "section" and a.get("id"):
            self.order.append(a["id"])
        if tag in self.VOID:
            return
        self.stack.append(tag)
        if tag == "details":
            self.details += 1
        elif tag in ("script", "style"):
            self.hidden += 1
        elif tag == "figure":
            self.figures += 1
            self.figures_outside += self.details == 0
        elif tag == "table":
            if self.hidden == 0:
                self.tables_outside += self.details == 0
                self.tables.append({"header": [], "rows": []})
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self.tables:
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self.stack:
            top = self.stack.pop()
            if top == "details":
                self.details -= 1
            elif top in ("script", "style"):
                self.hidden -= 1
            elif top == "thead":
                self._in_head = False
            elif top in ("td", "th") and self._cell is not None and self._row is not None:
                self._row.append(" ".join(self._cell).strip())
                self._cell = None
            elif top == "tr" and self._row is not None and self.tables:
                t = self.tables[-1]
                if self._in_head:
                    t["header"] = self._row
                else:
                    t["rows"].append(self._row)
                self._row = None
            if top == tag:
                break

    def handle_data(self, data):
        if self.hidden:
            return
        if self._cell is not None:
            self._cell.append(data)
        if self.details == 0:
            self.visible.append(data)


def page_census(page: str) -> dict:
    """What a reader sees in ``page``: figures (all / outside ``<details>``), tables outside ``<details>``, UUIDs
    in visible text outside ``<details>``, the largest |number| in any ratio column of any table, the section
    order and the in-page links that lead nowhere."""
    c = _Census()
    c.feed(page)
    max_ratio = 0.0
    for t in c.tables:
        cols = [j for j, h in enumerate(t["header"]) if is_ratio_header(h)]
        for row in t["rows"]:
            for j in cols:
                if j < len(row):
                    for x in numbers(row[j]):
                        max_ratio = max(max_ratio, abs(x))
    visible = " ".join(c.visible)
    return {
        "figures": c.figures,
        "figures_outside": c.figures_outside,
        "tables_outside": c.tables_outside,
        "uuids_outside": UUID.findall(visible),
        "max_ratio": max_ratio,
        "order": c.order,
        "dead_links": [h for h in c.hrefs if h.startswith("#") and h[1:] not in c.ids],
        "visible": visible,
        "tables": c.tables,
    }


# --------------------------------------------------------------------------------------------------
# a hand-made run directory
# --------------------------------------------------------------------------------------------------

RELATIONS = ("P19", "P36", "P101")


def _png(path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot().imshow(np.eye(3))
    fig.savefig(path)


def make_run(out: Path, model: str, n_facts: int = 24, seed: int = 0) -> Path:
    """A finished run directory with every table the report reads, fact keys that are UUIDs, a dynamic-selection
    ratio over a near-zero base (−292,335) and an exploded perplexity ratio (1.3e16)."""
    rng = np.random.default_rng(seed)
    for d in ("consistency", "ql", "editing", "figures"):
        (out / d).mkdir(parents=True, exist_ok=True)
    keys = [str(uuid.UUID(int=int(rng.integers(1, 2**62)))) for _ in range(n_facts)]
    facts = [(k, RELATIONS[i % 3], f"Subject{i}", f"Object{i}") for i, k in enumerate(keys)]
    cs = rng.uniform(0.1, 1.0, size=(2, n_facts))
    rows = []
    for m_i, m in enumerate(("ig", "amig")):
        for (k, rel, s, o), c in zip(facts, cs[m_i]):
            rows.append({"model": model, "method": m, "fact_key": k, "relation": rel, "subject": s, "object": o,
                         "n_queries": 4, "cs": c, "class_static": "K_I" if c < 0.3 else "K_C", "tau_static": 0.3,
                         "class_otsu": "K_I" if c < 0.55 else "K_C", "tau_otsu": 0.55})  # fmt: skip
    cf = pd.DataFrame(rows)
    cf.to_parquet(out / "consistency" / "consistency_facts.parquet")
    summ, per = [], []
    for m in ("ig", "amig"):
        f = cf[cf["method"] == m]
        for th, tau in (("static", 0.3), ("otsu", 0.55)):
            ki = f["cs"] < tau
            summ.append({"model": model, "method": m, "threshold": th, "tau": tau, "n_facts": len(f), "n_KC": int((~ki).sum()),
                         "n_KI": int(ki.sum()), "prop_KI": float(ki.mean()), "mean_cs": float(f["cs"].mean()),
                         "mean_cs_KC": float(f.loc[~ki, "cs"].mean()), "mean_cs_KI": float(f.loc[ki, "cs"].mean()),
                         "prop_KC": float(1 - ki.mean()), "prop_KI_ci_lo": max(0.0, float(ki.mean()) - 0.15),
                         "prop_KI_ci_hi": min(1.0, float(ki.mean()) + 0.15), "welch_t": 5.0, "welch_p": 1e-4,
                         "perm_p": 0.005, "cohens_d": 2.0})  # fmt: skip
            for rel in RELATIONS:
                g = f[f["relation"] == rel]
                per.append({"model": model, "method": m, "threshold": th, "relation": rel, "n_facts": len(g),
                            "prop_KI": float((g["cs"] < tau).mean()), "mean_cs": float(g["cs"].mean())})  # fmt: skip
    pd.DataFrame(summ).to_parquet(out / "consistency" / "consistency_summary.parquet")
    pd.DataFrame(per).to_parquet(out / "consistency" / "consistency_per_relation.parquet")
    cls = {k: ("K_I" if c < 0.55 else "K_C") for (k, *_), c in zip(facts, cs[0])}
    pd.DataFrame([{"fact_key": k, "class": cls[k], "relation": r, "subject": s, "object": o, "n_queries": 4, "cs": c}
                  for (k, r, s, o), c in zip(facts, cs[0])]).to_parquet(out / "ql" / "facts.parquet")  # fmt: skip
    msum = []
    for c in ("K_C", "K_I"):
        for st in ("Self", "Union", "Intersection", "Refine", "Unrelated"):
            for op, sign in (("suppress", -1), ("enhance", 1)):
                dp = sign * rng.uniform(0.05, 0.5) if st != "Unrelated" else 0.001
                msum.append({"class": c, "set": st, "op": op, "n_rows": 40, "n_facts": 12, "n_empty": 0,
                             "mean_n_neurons": 20.0, "mean_p_before": 0.6, "mean_of_ratios": dp / 0.6,
                             "mean_of_ratios_lo": dp / 0.6 - 0.1, "mean_of_ratios_hi": dp / 0.6 + 0.1,
                             "ratio_of_means": dp / 0.6, "ratio_of_means_lo": dp / 0.6 - 0.1, "ratio_of_means_hi": dp / 0.6 + 0.1,
                             "mean_dprob": dp, "mean_dprob_lo": dp - 0.05, "mean_dprob_hi": dp + 0.05})  # fmt: skip
    pd.DataFrame(msum).to_parquet(out / "ql" / "mapping_summary.parquet")
    dsum, drows = [], []
    for c in ("K_C", "K_I"):
        for inter in ("KS", "irrelevant"):
            for op, sign in (("suppress", -1), ("enhance", 1)):
                for g in ("query", "neighbor", "random"):
                    v = sign * (0.4 if inter == "KS" else 0.01)
                    rel = -292335.0 if (g == "random" and op == "suppress") else v
                    dsum.append({"class": c, "intervention": inter, "op": op, "group": g, "n_rows": 40, "n_facts": 12,
                                 "mean_n_neurons": 15.0, "dvalue_rel": rel, "dvalue_rel_lo": rel * 1.5, "dvalue_rel_hi": rel / 2,
                                 "dvalue_rel_agg": v, "dvalue_rel_agg_lo": v - 0.1, "dvalue_rel_agg_hi": v + 0.1,
                                 "dvalue_abs": v * 3, "dvalue_abs_lo": v * 3 - 0.2, "dvalue_abs_hi": v * 3 + 0.2,
                                 "dprob": v / 2, "dprob_lo": v / 2 - 0.05, "dprob_hi": v / 2 + 0.05,
                                 "dprob_ratio": v, "dprob_ratio_lo": v - 0.1, "dprob_ratio_hi": v + 0.1,
                                 "dprob_via": v / 4, "dprob_via_lo": v / 4 - 0.02, "dprob_via_hi": v / 4 + 0.02})  # fmt: skip
                    for k in keys[:3]:
                        drows.append({"fact_key": k, "class": cls[k], "query_index": 0, "query": f"query of {k[:4]}",
                                      "intervention": inter, "op": op, "group": g, "p_before": 0.6, "dprob": v / 2,
                                      "dvalue_rel": rel, "dvalue_rel_agg": v})  # fmt: skip
    pd.DataFrame(dsum).to_parquet(out / "ql" / "dynamic_summary.parquet")
    pd.DataFrame(drows).to_parquet(out / "ql" / "dynamic_rows.parquet")
    et, er = [], []
    for edit in ("erase", "update"):
        for c in ("K_C", "K_I"):
            for m, base in (("N_i", 0.5), ("N_u", 0.7), ("CAS", 0.6)):
                et.append({"edit": edit, "class": c, "method": m, "n_facts": 12, "rel": base, "gen": base - 0.1,
                           "loc": 1 - base / 2, "loc_same": 0.9, "avg": (base + base - 0.1 + 1 - base / 2) / 3,
                           "ppl_delta": 6.7e17 if edit == "update" else 2.0, "ppl_rel_delta": 1.3e16 if edit == "update" else 0.2,
                           "ppl_rel_delta_median": 433.0})  # fmt: skip
                for k in keys[:4]:
                    er.append({"fact_key": k, "subject": "x", "object": "y", "status": "ok", "class": c, "method": m, "edit": edit,
                               "rel": base, "gen": base - 0.1, "loc": 1 - base / 2, "avg": 0.5, "ppl_before": 10.0,
                               "ppl_after": 10.0 + (5.0 if m == "CAS" else 8.0), "ppl_rel_delta": 1.3e16})  # fmt: skip
    pd.DataFrame(et).to_parquet(out / "editing" / "editing_table.parquet")
    pd.DataFrame(er).to_parquet(out / "editing" / "editing_rows.parquet")
    for p in out.glob("*/*.parquet"):
        pd.read_parquet(p).to_csv(p.with_suffix(".csv"), index=False)
    for name in ("heatmap_consistent", "heatmap_inconsistent"):
        _png(out / "figures" / f"{name}.png")
    info = {"settings": {"model": model, "facts": "pararel", "known": "top1", "methods": ["ig", "amig"], "steps": 6,
                         "quick": True, "seed": 0, "split": "otsu", "max_facts": n_facts},
            "versions": {"qloc-tl": "0.1.0"}, "stages": ["consistency", "ql", "edit"], "started": "2026-01-01T00:00:00",
            "status": "finished", "n_facts": n_facts, "timings_s": {"load": 1.0, "total": 12.5}}  # fmt: skip
    (out / "run.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    return make_run(base / "builtin_run", "builtin", seed=1), make_run(
        base / "smol_run", "smollm2-135m", seed=2
    )


@pytest.fixture(scope="module")
def report_page(runs):
    from qloc_tl.reporting.report import write_report

    return write_report(runs[1], min_facts=5).read_text()


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


def test_census_oracle_reads_figures_tables_details_and_ratios():
    page = (
        "<body><figure><img src='x'></figure><table><thead><tr><th>fact</th><th>Δp/p</th><th>Rel</th></tr></thead>"
        "<tbody><tr><td>a</td><td>-1,234.5</td><td>5000</td></tr></tbody></table>"
        "<details><summary>raw</summary><figure></figure><table><thead><tr><th>dvalue_rel</th></tr></thead>"
        "<tbody><tr><td>12</td></tr></tbody></table>70a70189-88bd-46fa-bbcb-cd8e2d78f96f</details>"
        "<p>8699df43-1d04-4e44-bf22-50b08c1c8141</p><script>'d89a246f-d3cf-45e0-87be-dbfa35c4a56a'</script></body>"
    )
    c = page_census(page)
    assert (c["figures"], c["figures_outside"], c["tables_outside"]) == (2, 1, 1)
    assert c["uuids_outside"] == ["8699df43-1d04-4e44-bf22-50b08c1c8141"]
    assert c["max_ratio"] == 1234.5  # Rel (reliability) is not a ratio column
    assert numbers("6.72e+17 and −0.5 [1,230, 33%]") == [6.72e17, -0.5, 1230.0, 33.0]


def test_report_reads_in_order_with_figures_and_few_open_tables(report_page):
    from qloc_tl.reporting.report import SECTIONS

    c = page_census(report_page)
    assert c["order"][0] == "headline" and c["order"][1] == "claims", c["order"]
    assert len(c["order"]) == 1 + len(SECTIONS)
    assert c["order"].index("raw-tables") < c["order"].index("run-settings")
    assert c["figures_outside"] >= 8, c["figures_outside"]
    assert 1 <= c["tables_outside"] <= 8, c["tables_outside"]
    assert not c["dead_links"], c["dead_links"]
    # every claim links to a figure or table that exists on the page
    claims = next(t for t in c["tables"] if t["header"][:1] == ["claim (Chen et al., ICLR 2025)"])
    assert len(claims["rows"]) >= 6 and all(r[-1] != "–" for r in claims["rows"])


def test_no_fact_key_in_sight_and_rows_keyed_by_readable_names(runs, report_page):
    c = page_census(report_page)
    assert c["uuids_outside"] == []
    assert not UUID.search(report_page.split("<script")[0]), "a fact key is written somewhere on the page"
    assert "Subject3 → Object3" in report_page
    # the raw tables are collapsed and each links its CSV file
    n_csv = len(list(runs[1].glob("*/*.csv")))
    assert report_page.count("<details class='raw'>") >= n_csv
    assert report_page.count(".csv'>CSV</a>") == n_csv


def test_no_ratio_beyond_a_thousand_and_near_zero_bases_are_guarded(report_page):
    c = page_census(report_page)
    assert c["max_ratio"] <= 1000, c["max_ratio"]
    assert "n/a†" in report_page  # the −292,335 of the random group and PPL × 1.3e16 are guarded, not shown
    for bad in ("292,335", "292335", "2.92e+05", "1.30e+16"):
        assert bad not in report_page
    # absolute Δ stays: the editing table shows the median ΔPPL (after − before = 8 for N_i)
    editing = next(t for t in c["tables"] if "ΔPPL (median)" in t["header"])
    j = editing["header"].index("ΔPPL (median)")
    assert {r[j] for r in editing["rows"]} == {"8.00", "5.00"}


def test_numbers_have_three_significant_digits(report_page):
    c = page_census(report_page)
    editing = next(t for t in c["tables"] if "ΔPPL (median)" in t["header"])
    for r in editing["rows"]:
        for cell in r[4:]:
            digits = re.sub(r"[^0-9]", "", cell.split("e")[0]).lstrip("0")
            assert len(digits) <= 3, (cell, r)


def test_best_cell_per_column_is_marked(runs):
    from qloc_tl.reporting.run_tables import editing_table

    t = editing_table(runs[0])
    assert t is not None
    rel = t.columns.index("Rel")
    dppl = t.columns.index("ΔPPL (median)")
    # in each edit × class block N_u has the highest Rel (0.7) and CAS the lowest ΔPPL (5)
    for i, row in enumerate(t.rows):
        assert ((i, rel) in t.best) == (row[2] == "N_u")
        assert ((i, dppl) in t.best) == (row[2] == "CAS")


def test_report_names_the_run_model_only(runs, report_page):
    assert "qloc-tl report — smollm2-135m" in report_page
    assert "builtin" not in report_page and "built-in model" not in report_page


def test_report_of_two_runs_puts_them_side_by_side(runs, tmp_path, capsys):
    from qloc_tl.cli import main

    a, b = runs
    path = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "--html", str(path), "--min-facts", "5"]) == 0
    assert str(path) in capsys.readouterr().out
    page = path.read_text()
    c = page_census(page)
    assert "builtin" in page and "smollm2-135m" in page
    claims = next(t for t in c["tables"] if t["header"][:1] == ["claim (Chen et al., ICLR 2025)"])
    assert claims["header"][1:] == ["builtin", "smollm2-135m"]
    assert all(len(r) == 3 for r in claims["rows"])
    # each headline table holds both runs' rows, one above the other
    share = next(t for t in c["tables"] if "K_I at Otsu's τ" in t["header"])
    run_col = share["header"].index("run")
    assert [r[run_col] for r in share["rows"][:2]] == ["builtin", "smollm2-135m"]
    assert c["max_ratio"] <= 1000 and c["uuids_outside"] == []
    # the default path is in the first run's directory
    assert main(["report", str(a), str(b)]) == 0
    assert (a / "compare_smol-run.html").is_file()


def test_report_command_rebuilds_one_run(runs, capsys):
    from qloc_tl.cli import main

    assert main(["report", str(runs[0]), "--min-facts", "5"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert "qloc-tl report — builtin" in (runs[0] / "report.html").read_text()


def test_interleave_keeps_rows_of_every_run_and_moves_sample_sizes():
    from qloc_tl.reporting.compare import interleave
    from qloc_tl.reporting.run_tables import Table

    a = Table(
        "t",
        ["class", "group", "x"],
        [["K_C (n=3)", "query", "1"], ["K_I (n=2)", "query", "2"]],
        best={(1, 2)},
    )
    b = Table("t", ["class", "group", "x"], [["K_C (n=30)", "query", "5"]])
    t = interleave([a, None, b], ["A", "skipped", "B"], 2)
    assert t is not None
    assert t.columns == ["class", "group", "run", "x"]
    assert t.rows == [
        ["K_C", "query", "A (n=3)", "1"],
        ["K_C", "query", "B (n=30)", "5"],
        ["K_I", "query", "A (n=2)", "2"],
    ]
    assert t.best == {(2, 3)}
    assert interleave([None], ["A"], 1) is None


def test_guarded_ratio_oracle():
    from qloc_tl.reporting.formatting import guarded_ratio

    num = np.array([1.0, -2.0, 3.0, 0.5])
    den = np.array([2.0, 1e-9, -4.0, 0.0])
    got = guarded_ratio(num, den, min_den=1e-3)
    want = [n / d if abs(d) >= 1e-3 else math.nan for n, d in zip(num, den)]
    assert np.allclose(got, want, equal_nan=True)


def test_report_and_comparison_in_headless_chromium(runs, report_page, tmp_path):
    """Both pages load in headless Chromium without errors or network requests; on the first screen (1280 × 800)
    of a run's report are the headline and every claim; every figure decodes."""
    from test_cli import _browser_or_skip, headless_page

    _browser_or_skip()
    from qloc_tl.reporting.compare import write_comparison

    cmp_path = write_comparison(runs, tmp_path / "cmp.html", min_facts=5)
    errors: list[str] = []
    requests: list[str] = []
    with headless_page(errors, requests) as page:
        page.goto((runs[1] / "report.html").resolve().as_uri(), wait_until="load")
        first = page.evaluate(
            "() => ({h: innerHeight, head: document.querySelector('dl.headline').getBoundingClientRect().bottom, "
            "claims: document.querySelector('#claims table').getBoundingClientRect().bottom, "
            "rows: document.querySelectorAll('#claims tbody tr').length, "
            "images: Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)})"
        )
        page.goto(cmp_path.resolve().as_uri(), wait_until="load")
        cmp_claims = page.evaluate("() => document.querySelectorAll('#claims tbody tr').length")
    assert not errors, errors[:5]
    assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests[:3]
    assert first["rows"] >= 6 and first["head"] <= first["h"] and first["claims"] <= first["h"], first
    assert len(first["images"]) >= 8 and all(first["images"])
    assert cmp_claims == first["rows"]
