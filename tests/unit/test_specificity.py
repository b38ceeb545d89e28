"""KN specificity: pair overlaps and their summary by hand; the suppression control against unbatched forwards
with a hand-written zeroing hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qloc_tl import Fact, Neuron
from qloc_tl.core.model import neuron_hook_name
from qloc_tl.experiments.specificity import control_summary, kn_overlap, overlap_summary, suppression_control
from qloc_tl.zoo.tiny import tiny_model


def test_overlap_summary_means_by_hand():
    sets = {
        "a": [{Neuron(0, 1), Neuron(1, 2)}, {Neuron(2, 2)}],
        "b": [{Neuron(0, 1)}],
        "c": [{Neuron(2, 3), Neuron(0, 1)}],
        "d": [{Neuron(2, 3)}],
    }
    rel = {"a": "P1", "b": "P1", "c": "P2", "d": "P2"}
    pairs = kn_overlap(sets, rel)
    ab = pairs[(pairs.fact_a == "a") & (pairs.fact_b == "b")].iloc[0]
    assert ab.jaccard == pytest.approx(1 / 3) and ab.shared == 1 and ab.n_a == 3  # a = {(0,1), (1,2), (2,2)}
    s = overlap_summary(pairs, n_boot=200).set_index("pairs")
    within = np.mean([1 / 3, 1 / 2])  # a-b, c-d
    across = np.mean([1 / 4, 0.0, 1 / 2, 0.0])  # a-c, a-d, b-c, b-d
    assert s.loc["within", "mean_jaccard"] == pytest.approx(within)
    assert s.loc["across", "mean_jaccard"] == pytest.approx(across)
    assert s.loc["within − across", "mean_jaccard"] == pytest.approx(within - across)
    assert s.loc["within", "n_pairs"] == 2 and s.loc["across", "share_sharing"] == pytest.approx(0.5)


def _hand_prob(model, prompt, answer, neurons):
    toks = model.to_tokens(prompt)
    pos = toks.shape[1] - 1
    by_layer: dict[int, list[int]] = {}
    for n in neurons:
        by_layer.setdefault(n.layer, []).append(n.index)

    def make(idx):
        def fn(act, hook):
            act = act.clone()
            act[0, pos, idx] = 0.0
            return act

        return fn

    hooks = [(neuron_hook_name(model, l), make(ix)) for l, ix in by_layer.items()]
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
    return logits[0, -1].double().softmax(-1)


def test_suppression_control_by_hand():
    model = tiny_model("gpt2", dtype=torch.float64)
    facts = [
        Fact("alice", "P19", "paris", ["alice was born in", "alice lives in"]),
        Fact("bob", "P19", "london", ["bob was born in", "bob lives in the city of"]),
        Fact("carol", "P37", "french", ["carol speaks", "carol speaks the language"]),
    ]
    kn = {facts[0].key: [{Neuron(0, 1), Neuron(1, 3)}], facts[1].key: [{Neuron(1, 3)}, {Neuron(2, 5)}],
          facts[2].key: [{Neuron(0, 7)}]}  # fmt: skip
    rows = suppression_control(model, facts, kn, seed=0)
    from qloc_tl.core.tokens import answer_token_id

    for _, r in rows.iterrows():
        f = next(x for x in facts if x.key == r.fact_key)
        src = next(x for x in facts if x.key == r.source_key)
        neurons = {n for s in kn[src.key] for n in s}
        rel = []
        for p in f.prompts:
            a = answer_token_id(model, p, f.object, multi_token="first")
            clean = _hand_prob(model, p, f.object, [])[a]
            after = _hand_prob(model, p, f.object, neurons)[a]
            rel.append(float((after - clean) / clean))
        assert r.rel_change == pytest.approx(np.mean(rel), rel=1e-9)
        assert r.n_neurons == len(neurons)
    assert set(rows[rows.fact_key == facts[0].key].control) == {"own", "same_relation", "other_relation"}
    assert rows[(rows.fact_key == facts[0].key) & (rows.control == "same_relation")].source_key.iloc[0] == facts[1].key
    summ = control_summary(rows, n_boot=100).set_index("control")
    assert summ.loc["own", "n_facts"] == 3
    assert summ.loc["own", "mean_rel_change"] == pytest.approx(rows[rows.control == "own"].rel_change.mean())
