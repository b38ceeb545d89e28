"""The qloc-tl command line: argument errors, settings, fact capping, and (when the built-in model is
shipped) the --quick main job end to end, its report, and kill-and-resume."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qloc_tl import Fact
from qloc_tl.cli import build_parser, cap_facts, main, round_robin, run_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["run", "--methods", "ig,lrp"], "unknown method"),
        (["run", "--max-facts", "0"], "positive integer"),
        (["run", "--shard", "3/3"], "0 <= i < n"),
        (["run", "--shard", "x"], "expected i/n"),
        (["run", "--device", "tpu"], "invalid choice"),
        (["fly"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qloc-tl") and "error:" in err[0] and msg in err[0]


def test_library_errors_become_one_line_exit_2(tmp_path, capsys):
    rc = main(["run", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such directory" in err[0]


def test_help_documents_every_option():
    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    for opt in ("--model", "--facts", "--relations", "--max-facts", "--methods", "--device", "--out", "--quick", "--resume",
                "--shard", "--all-queries", "--min-facts"):  # fmt: skip
        assert opt in text


def test_help_and_code_agree_on_quick_steps():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["run"].format_help().split())  # type: ignore[union-attr]
    steps = run_settings(build_parser().parse_args(["run", "--quick"]))["steps"]
    assert f"--quick: {steps})" in text


def test_settings_per_model_kind():
    p = build_parser()
    b = run_settings(p.parse_args(["run"]))
    assert (b["facts"], b["known"]) == ("builtin", "off")  # the toy was trained on its facts: no filter
    s = run_settings(p.parse_args(["run", "--model", "smollm2-135m"]))
    assert (s["facts"], s["known"], s["methods"], s["lambda2"]) == ("pararel", "top1", ["ig", "amig"], 2.0)
    assert b["lambda2"] == 8.0 and run_settings(p.parse_args(["run", "--lambda2", "1.5"]))["lambda2"] == 1.5
    a = run_settings(p.parse_args(["run", "--model", "smollm2-135m", "--all-queries", "--facts", "builtin"]))
    assert (a["facts"], a["known"]) == ("builtin", "off")


def test_round_robin_interleaves_relations_in_file_order():
    facts = [Fact(f"s{i}", rel, "o", ["q a", "q b"]) for i, rel in enumerate(["P1", "P1", "P1", "P2", "P3", "P3"])]
    assert [f.subject for f in round_robin(facts)] == ["s0", "s3", "s4", "s1", "s5", "s2"]


def test_settings_defaults_and_quick():
    p = build_parser()
    s = run_settings(p.parse_args(["run"]))
    assert s["methods"] == ["ig", "sig", "amig"] and s["steps"] == 20 and s["model"] == "builtin"
    q = run_settings(p.parse_args(["run", "--quick", "--shard", "1/4"]))
    assert q["quick"] and q["steps"] < 20 and q["max_facts"] < s["max_facts"] and q["shard"] == [1, 4]


def test_cap_facts_spreads_over_relations_deterministically():
    facts = [Fact(f"s{i}", "P1" if i < 10 else "P2", "o", ["q a", "q b"]) for i in range(14)]
    capped = cap_facts(facts, 6)
    assert [f.relation for f in capped].count("P2") == 3
    assert capped == cap_facts(facts, 6)
    assert [f.subject for f in capped] == ["s0", "s1", "s2", "s10", "s11", "s12"]  # file order kept


def _has_builtin() -> bool:
    try:
        from qloc_tl.zoo import builtin_model_dir

        return (builtin_model_dir() / "config.json").is_file()
    except Exception:
        return False


needs_builtin = pytest.mark.skipif(not _has_builtin(), reason="built-in model not shipped yet")


@needs_builtin
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "quick"
    proc = subprocess.run(
        [sys.executable, "-m", "qloc_tl.cli", "run", "--quick", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["n_facts"] > 0
    for name in ("consistency_summary", "consistency_facts", "consistency_per_relation", "consistency_sweep"):
        assert (out / "consistency" / f"{name}.parquet").is_file() and (out / "consistency" / f"{name}.csv").is_file()
    assert list((out / "figures").glob("*.png"))
    page = (out / "report.html").read_text()
    from qloc_tl.reporting.report import SECTIONS

    for section in SECTIONS:
        assert section in page
    assert "report:" in proc.stdout and "[" in proc.stdout  # the one-screen summary with claim verdicts
    # issue #26's acceptance on the --quick run, read from the page (tests/integration/test_report_page.py)
    from test_report_page import page_census

    census = page_census(page)
    assert census["figures_outside"] >= 8, census["figures_outside"]
    assert census["tables_outside"] <= 8, census["tables_outside"]
    assert census["uuids_outside"] == [], census["uuids_outside"][:3]
    assert census["max_ratio"] <= 1000, census["max_ratio"]
    assert census["order"][:2] == ["headline", "claims"] and not census["dead_links"]


def _tables(out: Path) -> dict[str, "object"]:
    import pandas as pd

    return {str(p.relative_to(out)): pd.read_parquet(p) for p in sorted(out.glob("*/*.parquet"))}


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qloc_tl.cli", "run", "--quick", "--max-facts", "4", "--no-progress", "--out", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    if not _has_builtin():
        pytest.skip("built-in model not shipped yet")
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@needs_builtin
def test_same_seed_gives_bitwise_identical_tables(reference_run, tmp_path):
    import pandas as pd

    proc = _run(tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _tables(reference_run), _tables(tmp_path / "again")
    assert a.keys() == b.keys() and len(a) >= 10
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


@needs_builtin
@pytest.mark.parametrize("kill_when", ["consistency", "ql"])
def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, tmp_path, kill_when):
    """SIGKILL the main job once a stage has persisted results, then --resume: identical final tables."""
    import os
    import signal
    import time

    import pandas as pd

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qloc_tl.cli", "run", "--quick", "--max-facts", "4", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / kill_when / "parts"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (marker.is_dir() and any(marker.rglob("*.parquet"))):
        time.sleep(0.2)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "run.json").read_text())["status"] == "running" or proc.returncode == 0
    done = _run(out, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _tables(reference_run), _tables(out)
    assert a.keys() == b.keys()
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-9, obj=name)
    q = b["consistency/consistency_queries.parquet"]
    assert not q.duplicated(["method", "fact_key", "query_index"]).any()
    earlier = json.loads((out / "run.json").read_text())["earlier_invocations"]
    assert len(earlier) == 1 and earlier[0]["status"] in ("running", "finished")
    if earlier[0]["status"] == "running":  # killed: its time was never recorded, and the headline says so
        from qloc_tl.reporting.run_tables import headline_items

        assert earlier[0]["total_s"] is None
        assert "1 earlier (1 interrupted before finishing, not timed)" in dict(headline_items(out))["Time"]


@needs_builtin
def test_report_html_is_well_formed(reference_run):
    from html.parser import HTMLParser

    class Checker(HTMLParser):
        VOID = {"meta", "img", "br", "hr", "input", "link"}

        def __init__(self):
            super().__init__()
            self.stack: list[str] = []
            self.errors: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag not in self.VOID:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            if tag in self.VOID:
                return
            if not self.stack or self.stack[-1] != tag:
                self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
            else:
                self.stack.pop()

    page = (reference_run / "report.html").read_text()
    # circuitsvis widgets carry their own scripts; check our markup around them
    from qloc_tl.reporting.report import SECTIONS

    head = page.split("<div class='cv'>")[0]
    c = Checker()
    c.feed(head)
    assert not c.errors, c.errors[:5]
    for s in SECTIONS:
        assert s in page
    assert page.count("data:image/png;base64,") >= 5


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [  # offline machine: no background networking, no sandbox as root
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _browser_or_skip():
    """Playwright driving Debian's Chromium; skipped when either is missing, unless QLOC_REQUIRE_BROWSER=1
    (set by .ci/run after it installed both), where a missing browser is a failure."""
    import os

    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        if os.environ.get("QLOC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"QLOC_REQUIRE_BROWSER=1 but missing: {', '.join(missing)}")
        pytest.skip(f"headless browser test needs {', '.join(missing)}")


@contextlib.contextmanager
def headless_page(errors: list[str], requests: list[str]):
    """A 1280 × 800 page of headless Chromium that appends page errors and console errors to ``errors`` and every
    requested URL to ``requests``; the browser is closed on exit, also on error."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("console", lambda m: errors.append(f"console.error: {m.text}") if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            yield page
        finally:
            browser.close()


@needs_builtin
def test_report_opens_in_headless_chromium_without_errors(reference_run):
    """Load report.html in headless Chromium: no script error, no console error, nothing fetched from the
    network (the page is self-contained), every section present, every image decoded, and every circuitsvis
    widget rendered by its script."""
    _browser_or_skip()
    from qloc_tl.reporting.report import SECTIONS

    page_path = (reference_run / "report.html").resolve()
    errors: list[str] = []
    requests: list[str] = []
    with headless_page(errors, requests) as page:
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:120]}"))
        page.goto(page_path.as_uri(), wait_until="load")
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.cv')).every(d => d.querySelector('svg, canvas'))",
            timeout=30_000,
        )
        # the first screen (1280 × 800) holds the headline and the whole claims table
        first = page.evaluate(
            "() => ({h: innerHeight, head: document.querySelector('dl.headline').getBoundingClientRect().bottom, "
            "claims: document.querySelector('#claims table').getBoundingClientRect().bottom, "
            "rows: document.querySelectorAll('#claims tbody tr').length})"
        )
        headings = page.evaluate("() => Array.from(document.querySelectorAll('section > h2')).map(h => h.textContent)")
        images = page.evaluate("() => Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        n_views = page.evaluate("() => document.querySelectorAll('.cv').length")
    assert not errors, errors[:5]
    external = [u for u in requests if not u.startswith(("file:", "data:", "blob:"))]
    assert not external, f"the report fetched from the network: {external[:3]}"
    assert headings == list(SECTIONS)
    assert len(images) >= 5 and all(images), images
    assert n_views >= 1
    assert first["rows"] >= 6 and first["head"] <= first["h"] and first["claims"] <= first["h"], first


@needs_builtin
def test_shards_merge_to_the_unsharded_tables(reference_run, tmp_path):
    import pandas as pd

    for i in (0, 1):
        proc = _run(tmp_path / f"shard{i}", "--shard", f"{i}/2")
        assert proc.returncode == 0, proc.stderr[-3000:]
    merged = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-m", "qloc_tl.cli", "merge", str(merged), str(tmp_path / "shard0"), str(tmp_path / "shard1")],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _tables(reference_run), _tables(merged)
    assert a.keys() == b.keys()
    for name in a:
        # shards batch other prompts together: float32 sums differ in the last bits (padding is exact in theory).
        # A completeness delta is a difference of O(1) terms (Σ scores − ΔP), so its float32 noise is absolute:
        # up to 1.0e-5 (2026-11-26 code) and 1.2e-5 (2026-11-27) between these two runs, on deltas of 0.01–7
        x, y = a[name], b[name]
        deltas = [c for c in x.columns if "completeness_delta" in c]
        pd.testing.assert_frame_equal(x[deltas], y[deltas], check_exact=False, rtol=1e-4, atol=5e-5, obj=name)
        x, y = x.drop(columns=deltas), y.drop(columns=deltas)
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-4, atol=1e-6, obj=name)


def test_report_text_names_the_model_of_the_run(tmp_path):
    """A report rebuilt from a run of another model names that model (run.json settings["model"]) in its
    heading and claim texts, and never speaks of the built-in model."""
    import numpy as np
    import pandas as pd

    from qloc_tl.experiments.dynamic import enh_vs_sup, summarize_dynamic
    from qloc_tl.reporting.report import claim_verdicts, write_report

    out = tmp_path / "run"
    (out / "ql").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"settings": {"model": "smollm2-135m"}, "status": "finished"}))
    rng = np.random.default_rng(0)
    rows = []
    for cls in ("K_C", "K_I"):
        for f in range(20):
            for inter in ("KS", "irrelevant"):
                for op, dp in (("suppress", -0.3), ("enhance", 0.05)):
                    d = dp * (1.0 if inter == "KS" else 0.1) + rng.normal(0, 0.01)
                    for g in ("query", "neighbor", "random"):
                        rows.append({"fact_key": f"{cls}{f}", "class": cls, "query_index": 0, "intervention": inter,
                                     "op": op, "group": g, "n_neurons": 2, "empty_group": False, "empty_ks": False,
                                     "p_before": 0.4, "dprob": d, "dprob_ratio": d / 0.4, "dprob_via": d / 2,
                                     "dvalue_rel": d, "dvalue_rel_agg": d, "dvalue_abs": d, "dvalue_mag": abs(d)})  # fmt: skip
    rows = pd.DataFrame(rows)
    rows.to_parquet(out / "ql" / "dynamic_rows.parquet")
    summarize_dynamic(rows, n_bootstrap=50).to_parquet(out / "ql" / "dynamic_summary.parquet")
    enh_vs_sup(rows).to_parquet(out / "ql" / "dynamic_enh_vs_sup.parquet")
    enh = {c: v for c, v in claim_verdicts(out)}["Enh < Sup: enhancing moves P(answer) less than suppressing"]
    assert enh["status"] == "supported"
    assert "smollm2-135m answers at mean p≈0.40" in enh["evidence"]
    page = write_report(out).read_text()
    assert "qloc-tl report — smollm2-135m" in page and "smollm2-135m answers at mean p≈0.40" in page
    assert "built-in model" not in page and "builtin" not in page
    # neuron sets whose enhancement moves P(answer) more than their suppression (as on SmolLM2) turn the verdict
    # into "partial"; sets where it moves less keep it "supported"
    for enh_dp, want in ((0.5, "partial"), (0.1, "supported")):
        mrows = pd.DataFrame([
            {"class": cls, "set": st, "n_pairs": 20, "dprob_sup": 0.3, "dprob_enh": enh_dp, "dprob_enh_lt_sup": enh_dp < 0.3}
            for cls in ("K_C", "K_I") for st in ("Self", "Union")
        ])  # fmt: skip
        mrows.to_parquet(out / "ql" / "mapping_enh_vs_sup.parquet")
        enh = {c: v for c, v in claim_verdicts(out)}["Enh < Sup: enhancing moves P(answer) less than suppressing"]
        assert enh["status"] == want and f"K_I Self: |Δp| enh {enh_dp:.2f} vs sup 0.30" in enh["evidence"]


def test_smollm2_consistency_run_uses_only_known_queries(tmp_path):
    """A short real-model CLI run: facts screened for what SmolLM2 knows, then the consistency stage."""
    from conftest import smollm2_or_skip

    smollm2_or_skip()
    import pandas as pd

    out = tmp_path / "smol"
    proc = subprocess.run(
        [sys.executable, "-m", "qloc_tl.cli", "consistency", "--model", "smollm2-135m", "--relations", "P36,P1376",
         "--max-facts", "2", "--methods", "ig", "--steps", "2", "--no-progress", "--threads", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    screened = pd.read_csv(out / "known" / "queries.csv")
    used = pd.read_parquet(out / "consistency" / "consistency_queries.parquet")
    assert len(used["fact_key"].unique()) == 2
    known_texts = set(screened.loc[screened["known"], "text"])
    assert set(used["text"]) <= known_texts  # no stage consumes a query the model does not answer
    assert used["top1"].all()
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["known"] == "top1" and info["status"] == "finished"
    assert "smollm2-135m" in (out / "report.html").read_text()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qloc_tl.cli", *args, "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=900
    )  # fmt: skip


@needs_builtin
def test_run_on_a_known_screening_uses_its_facts_and_queries(tmp_path):
    """--facts <'qloc-tl known' output>: the run's facts are the screening's known facts, each with exactly
    its known queries (no second screening)."""
    import pandas as pd

    known = tmp_path / "known"
    proc = _cli("known", "--model", "builtin", "--facts", "builtin", "--relations", "P36,P19", "--out", str(known))
    assert proc.returncode == 0, proc.stderr[-3000:]
    blob = json.loads((known / "known_facts.json").read_text())
    out = tmp_path / "run"
    proc = _cli("consistency", "--model", "builtin", "--facts", str(known), "--max-facts", "4", "--methods", "ig", "--steps", "2",
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = pd.read_parquet(out / "consistency" / "consistency_queries.parquet")
    got = {k: sorted(g["text"]) for k, g in used.groupby("fact_key")}
    assert len(got) == 4 and got == {k: sorted(blob[k]["queries"]) for k in got}
    proc = _cli("consistency", "--model", "smollm2-135m", "--facts", str(known), "--out", str(tmp_path / "other"))
    assert proc.returncode == 2 and "screened model 'builtin'" in proc.stderr


@needs_builtin
def test_resume_with_more_methods_adds_only_the_new_method(tmp_path):
    import pandas as pd

    out = tmp_path / "ext"
    base = ("consistency", "--model", "builtin", "--max-facts", "3", "--steps", "2", "--out", str(out))
    assert _cli(*base, "--methods", "ig").returncode == 0
    first = json.loads((out / "run.json").read_text())
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "consistency" / "parts").rglob("*.parquet")}
    before = pd.read_parquet(out / "consistency" / "consistency_facts.parquet")
    proc = _cli(*base, "--methods", "ig,amig", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = pd.read_parquet(out / "consistency" / "consistency_facts.parquet")
    now = {p.name: p.stat().st_mtime_ns for p in (out / "consistency" / "parts").rglob("*.parquet")}
    assert all(now[k] == v for k, v in parts.items()) and len(now) > len(parts)  # ig parts reused, amig added
    assert set(after["method"]) == {"ig", "amig", "∩"}  # ∩: K_I under every method
    # run.json keeps the first invocation's time; the report's headline adds it to the last one's
    from qloc_tl.reporting.run_tables import headline_items

    total = first["timings_s"]["total"]
    assert json.loads((out / "run.json").read_text())["earlier_invocations"] == [
        {"started": first["started"], "stages": ["consistency"], "status": "finished", "total_s": total}
    ]
    assert "in the last invocation; 1 earlier: " in dict(headline_items(out))["Time"]
    pd.testing.assert_frame_equal(
        before[before.method == "ig"].reset_index(drop=True), after[after.method == "ig"].reset_index(drop=True),
        check_dtype=False,  # the ∩ rows (no union size) make integer columns float
    )
    proc = _cli(*base, "--methods", "amig,ig", "--resume")  # another first method: QL / editing would change
    assert proc.returncode == 2 and "methods" in proc.stderr
