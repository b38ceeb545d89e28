"""filter_known and the SmolLM2 loader on SmolLM2-135M (real tokenizer, multi-token objects, padding of real
prompts) against hand loops, and its IG against the committed cross-major reference (``tests/data``)."""

from __future__ import annotations

import pytest
import torch
from conftest import smollm2_or_skip  # noqa: F401

import qloc_tl as q
from qloc_tl.core.tokens import to_tokens
from qloc_tl.methods.known import filter_known, next_token_probs, object_tokens

# --------------------------------------------------------------------------------------------------
# SmolLM2 (brief): real tokenizer, multi-token objects, padding of real prompts
# --------------------------------------------------------------------------------------------------


def test_smollm2_filter_known_matches_hand_loop(smollm2_model):
    m = smollm2_model
    facts = [
        q.Fact("France", "P36", "Paris", ["The capital of France is", "France's capital city is", "The capital city of France is"]),
        q.Fact("Germany", "P36", "Berlin", ["The capital of Germany is", "Germany's capital city is"]),
        q.Fact("Italy", "P36", "Banana Republic", ["The capital of Italy is", "Italy's capital city is"]),
    ]
    known = filter_known(m, facts, batch_size=4)
    for f in facts:
        for i, t in enumerate(f.prompts):
            toks = object_tokens(m, t, f.object)
            # "whole": every object token top-1 under teacher forcing, checked by greedy decoding by hand
            ctx = to_tokens(m, t)
            ok = True
            with torch.no_grad():
                for tok in toks:
                    nxt = int(m(ctx)[0, -1].argmax())
                    ok = ok and nxt == tok
                    ctx = torch.cat([ctx, torch.tensor([[tok]])], dim=1)
            row = known.queries[(known.queries["fact_key"] == f.key) & (known.queries["query_index"] == i)].iloc[0]
            assert bool(row["known"]) == ok, (t, f.object)
            assert row["n_object_tokens"] == len(toks)
    kept = {f.key: f for f in known.facts}
    assert "P36|Italy|Banana Republic" not in kept  # a 3-token object the model does not generate
    # France: 2 of 3 phrasings answered (" Istanbul" for the possessive one), so kept with those two
    assert kept["P36|France|Paris"].prompts == ("The capital of France is", "The capital city of France is")


def test_smollm2_load_and_tl_conventions(smollm2_model):
    m = smollm2_model
    assert (m.cfg.n_layers, m.cfg.d_mlp, m.cfg.d_vocab) == (30, 1536, 49152)
    assert m.cfg.default_prepend_bos is False  # the GGUF tokenizer adds no BOS
    toks = m.to_tokens("The capital of France is")
    assert int(toks[0, 0]) != m.tokenizer.bos_token_id
    p = next_token_probs(m, ["The capital of France is"])[0]
    assert m.tokenizer.decode([int(p.argmax())]) == " Paris" and float(p.max()) > 0.5



def test_smollm2_ig_equal_across_tl_majors(smollm2_model):
    """IG of one known fact equals the committed reference, computed under the other TL major (the file names
    its version), within float32 tolerance: the two majors run the same model the same way."""
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).resolve().parents[1] / "data" / "smollm2_ig_reference.json").read_text())
    res = q.attribute_neurons(smollm2_model, ref["prompt"], ref["answer"], steps=ref["steps"])
    scores = res.scores.detach().double()
    assert float(res.clean_prob[0]) == pytest.approx(ref["clean_prob"], rel=1e-4)
    scale = max(abs(s) for s in ref["scores"])
    got = [float(scores[layer, i]) for layer, i in ref["neurons"]]
    assert max(abs(a - b) for a, b in zip(got, ref["scores"])) <= 1e-3 * scale
    torch.testing.assert_close(scores.sum(-1), torch.tensor(ref["layer_sums"], dtype=torch.float64), atol=1e-3 * scale, rtol=0)
