"""Views: pure ``_prepare_*`` functions, the circuitsvis synapse widget, standalone HTML, matplotlib charts.

Oracles: literal expected lists; the model's cached attention patterns (parsed back out of the widget's
props); the summary tables' numbers read back from the drawn bars / image.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from qloc_tl import Head, Synapse
from qloc_tl.core.errors import InvalidInputError
from qloc_tl.reporting.views import (
    KS_MARK,
    _prepare_attention_heads,
    _prepare_dynamic_bars,
    _prepare_mapping_bars,
    _prepare_trace_heatmap,
    plot_causal_trace,
    plot_dynamic,
    plot_mapping,
    robust_limits,
    save_html,
    synapse_heads_view,
)

pytest.importorskip("matplotlib")


def test_prepare_attention_heads():
    pats = {Head(0, 1): torch.eye(3), Head(2, 0): torch.full((3, 3), 0.5)}
    syn = [Synapse(2, 0, 1), Synapse(0, 1, 0), Synapse(1, 1, 2)]  # L1H1 is not shown: its column is not marked
    att, toks, names = _prepare_attention_heads(pats, ["a", "b", "c"], syn, heads=[Head(2, 0), Head(0, 1)])
    assert names == ["L2H0", "L0H1"]
    assert toks == [f"a{KS_MARK}", f"b{KS_MARK}", "c"]
    assert att[0] == [[0.5] * 3] * 3 and att[1] == torch.eye(3).tolist()
    with pytest.raises(InvalidInputError, match="no heads"):
        _prepare_attention_heads({}, ["a"], [])
    with pytest.raises(InvalidInputError, match="shape"):
        _prepare_attention_heads({Head(0, 0): torch.eye(2)}, ["a", "b", "c"])
    with pytest.raises(InvalidInputError, match="no pattern"):
        _prepare_attention_heads(pats, ["a", "b", "c"], heads=[Head(5, 5)])


def _mapping_summary():
    recs = []
    for cls in ("K_C", "K_I"):
        for op in ("suppress", "enhance"):
            for k, s in enumerate(("Unrelated", "Self", "Union")):  # deliberately out of SET_NAMES order
                v = (k + 1) * (-0.1 if op == "suppress" else 0.05) * (2 if cls == "K_I" else 1)
                recs.append({"class": cls, "op": op, "set": s, "mean_of_ratios": v,
                             "mean_of_ratios_lo": v - 0.01, "mean_of_ratios_hi": v + 0.02})  # fmt: skip
    return pd.DataFrame(recs)


def test_prepare_mapping_bars():
    s = _mapping_summary()
    d = _prepare_mapping_bars(s)
    assert d["x"] == ["Self", "Union", "Unrelated"]
    labels = [lab for lab, *_ in d["series"]]
    assert labels == ["K_C enhance", "K_C suppress", "K_I enhance", "K_I suppress"]
    lab, vals, lo, hi = d["series"][3]
    assert vals == pytest.approx([-0.4, -0.6, -0.2])
    assert lo == pytest.approx([0.01] * 3) and hi == pytest.approx([0.02] * 3)
    d2 = _prepare_mapping_bars(s[~((s["class"] == "K_C") & (s["set"] == "Union"))])
    assert math.isnan(d2["series"][0][1][1])
    with pytest.raises(InvalidInputError, match="no column"):
        _prepare_mapping_bars(s, metric="nope")


def test_prepare_dynamic_bars():
    s = pd.DataFrame({"class": ["K_I"] * 3, "intervention": ["KS"] * 3, "op": ["suppress"] * 3,
                      "group": ["random", "query", "neighbor"], "dprob": [-0.01, -0.3, -0.1]})  # fmt: skip
    d = _prepare_dynamic_bars(s, metric="dprob")
    assert d["x"] == ["query", "neighbor", "random"]
    ((label, vals, lo, hi),) = d["series"]
    assert label == "K_I KS suppress" and vals == [-0.3, -0.1, -0.01]
    assert all(math.isnan(x) for x in lo + hi)  # no CI columns: no error bars


def _trace():
    from qloc_tl.methods.tracing import TraceResult

    ie = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 8  # [layers, positions]
    return TraceResult(ie={"mlp": ie}, p_restored={"mlp": ie + 0.1}, p_clean=0.5, p_corrupt=0.1,
                       tokens=torch.tensor([0, 1, 2]), str_tokens=("<s>", "alice", "was"), subject_positions=(1,),
                       answer_id=3, noise_std=0.3, samples=2, window={"mlp": 10})  # fmt: skip


def test_prepare_trace_heatmap():
    d = _prepare_trace_heatmap(_trace(), "mlp")
    assert d["matrix"].tolist() == [[0.0, 0.375], [0.125, 0.5], [0.25, 0.625]]
    assert d["rows"] == ["<s>", "alice*", "was"] and d["cols"] == ["0", "1"]
    assert "window 10" in d["title"]
    with pytest.raises(InvalidInputError, match="no kind"):
        _prepare_trace_heatmap(_trace(), "resid")


def test_plots_draw_the_numbers():
    s = _mapping_summary()
    fig = plot_mapping(s)
    heights = [p.get_height() for p in fig.axes[0].patches]
    want = [v for _, vals, _, _ in _prepare_mapping_bars(s)["series"] for v in vals]
    assert heights == pytest.approx(want)
    dyn = pd.DataFrame({"class": ["K_I"] * 2, "intervention": ["KS"] * 2, "op": ["suppress"] * 2,
                        "group": ["query", "random"], "dvalue_rel_agg": [-0.5, -0.05]})  # fmt: skip
    fig = plot_dynamic(dyn)
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx([-0.5, -0.05])
    fig = plot_causal_trace(_trace(), "mlp")
    arr = np.asarray(fig.axes[0].images[0].get_array())
    assert arr.tolist() == [[0.0, 0.375], [0.125, 0.5], [0.25, 0.625]]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["<s>", "alice*", "was"]


def test_robust_limits_ignore_an_outlier_row():
    """40 rows of values in [-1, 1] and one row of -50: the limits are ±(numpy's 99th percentile of |values|),
    which the outlier row (< 1 % of the cells) does not reach."""
    rng = np.random.default_rng(0)
    m = rng.uniform(-1, 1, size=(200, 30))
    m[7, :] = -50.0  # one row of extremes: 30 of 6000 cells (0.5 %)
    lo, hi = robust_limits(m)
    want = np.percentile(np.abs(m), 99)
    assert (lo, hi) == pytest.approx((-want, want)) and hi <= 1.0
    assert robust_limits(m, None) == pytest.approx((-50.0, 50.0))
    p90 = np.percentile(np.abs(m), 90)
    assert robust_limits(torch.tensor(m), 90.0) == pytest.approx((-p90, p90))
    assert robust_limits(np.zeros((2, 2))) == (-1.0, 1.0)
    assert robust_limits(np.array([[np.nan, 2.0], [-1.0, np.inf]]), None) == (-2.0, 2.0)
    with pytest.raises(InvalidInputError, match="percentile"):
        robust_limits(m, 0)


def test_causal_trace_colour_scale_is_robust():
    from qloc_tl.methods.tracing import TraceResult

    rng = np.random.default_rng(1)
    ie = rng.uniform(-0.05, 0.3, size=(12, 10))  # [layers, positions]: 120 cells
    ie[4, 3] = 5.0  # one extreme cell
    r = TraceResult(ie={"attn": torch.tensor(ie)}, p_restored={"attn": torch.tensor(ie)}, p_clean=0.5, p_corrupt=0.1,
                    tokens=torch.arange(10), str_tokens=tuple("abcdefghij"), subject_positions=(1,), answer_id=3,
                    noise_std=0.3, samples=2, window={"attn": 10})  # fmt: skip
    fig = plot_causal_trace(r, "attn")
    im = fig.axes[0].images[0]
    want = np.percentile(np.abs(ie), 99)
    assert im.get_clim() == pytest.approx((-want, want)) and want < 5.0
    assert fig.axes[-1] is not fig.axes[0] and im.colorbar.extend == "both"
    assert plot_causal_trace(r, "attn", percentile=None).axes[0].images[0].get_clim() == pytest.approx((-5.0, 5.0))


def _props(html: str) -> dict:
    start = html.index('{"attention"')
    obj, _ = json.JSONDecoder().raw_decode(html[start:])
    return obj


def test_synapse_heads_view_and_offline_html(tmp_path):
    pytest.importorskip("circuitsvis")
    from qloc_tl.methods.synapses import find_synapses, synapse_patterns
    from qloc_tl.zoo.tiny import tiny_model

    model = tiny_model("gpt2")
    res = find_synapses(model, "alice was born in the city of", " paris", method="raw", exclude_keys=(0,))
    view = synapse_heads_view(res, synapse_patterns(model, res, max_heads=3))
    props = _props(view.local_src)
    assert len(props["attentionHeadNames"]) == 3
    heads = [Head(int(n[1 : n.index("H")]), int(n[n.index("H") + 1 :])) for n in props["attentionHeadNames"]]
    assert set(heads) <= set(res.heads)
    toks = model.to_tokens("alice was born in the city of")
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    for h, att in zip(heads, props["attention"]):
        want = cache[f"blocks.{h.layer}.attn.hook_pattern"][0, h.head]
        assert np.allclose(np.asarray(att), want.numpy(), atol=1e-6)
    marked = {i for i, t in enumerate(props["tokens"]) if t.endswith(KS_MARK)}
    assert marked == {s.key_position for s in res.synapses if s.as_head() in set(heads)}
    path = save_html([view, view], tmp_path / "ks.html", title="KS")
    text = open(path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>") and text.count("CircuitsVis.AttentionHeads") == 2
    assert "unpkg.com" not in text and "<script src" not in text  # the JS bundle is inlined: works offline
    with pytest.raises(InvalidInputError, match="RenderedHTML"):
        save_html("<p>not a widget</p>", tmp_path / "x.html")
