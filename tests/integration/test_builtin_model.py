"""The built-in fact model shipped in ``qloc_tl/zoo/builtin``: files, facts, tokenizer, offline loading,
TL ≡ HF numerics and the acceptance bar (accuracy, unsaturated probabilities, perplexity), measured on the
shipped checkpoint. Run under both TL majors (``.venv`` and ``.venv-tl3``)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TL_MAJOR

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.data.datasets import builtin_facts, builtin_ppl_texts, builtin_relations
from qloc_tl.data.facts import Fact, Template
from qloc_tl.zoo import builtin_model_dir, load_builtin_model

DIR = builtin_model_dir()
ROOT = Path(__file__).resolve().parents[2]
METRICS = json.loads((DIR / "metrics.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared 2-core machine, 2 threads per process oversubscribe the cores badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# fixtures: the HF model and tokenizer (independent oracle) and the TL model, loaded once
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(DIR), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(DIR), local_files_only=True)
    return model, tok


@pytest.fixture(scope="module")
def tl_model():
    return load_builtin_model()


def _hf_last_probs(model, tok, prompts: list[str], batch: int = 1024) -> torch.Tensor:
    """Next-token probabilities after each BOS-prefixed prompt, from the plain HF model."""
    out = []
    for s in range(0, len(prompts), batch):
        ids = [[tok.bos_token_id, *tok(p)["input_ids"]] for p in prompts[s : s + batch]]
        T = max(map(len, ids))
        x = torch.full((len(ids), T), tok.pad_token_id)
        for i, t in enumerate(ids):
            x[i, : len(t)] = torch.tensor(t)
        with torch.no_grad():
            logits = model(input_ids=x).logits
        last = torch.tensor([len(t) - 1 for t in ids])
        out.append(logits[torch.arange(len(ids)), last].softmax(-1))
    return torch.cat(out)


def _tl_last_probs(model, prompts: list[str], batch: int = 1024) -> torch.Tensor:
    """The same through the TL model's own tokenisation (``to_tokens``: BOS + right padding)."""
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        toks = model.to_tokens(chunk)
        # right padding; <pad> is never a real token
        last = (toks != model.tokenizer.pad_token_id).sum(-1) - 1
        with torch.no_grad():
            logits = model(toks)
        out.append(logits[torch.arange(len(chunk)), last].softmax(-1))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def test_shipped_files_are_one_small_hf_checkpoint():
    files = {p.name for p in DIR.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "facts.json",
                 "metrics.json", "MODEL_CARD.md"):  # fmt: skip
        assert name in files, name
    assert not [p for p in DIR.iterdir() if p.is_dir()], "no checkpoint sub-directories"
    assert not [n for n in files if n.endswith((".bin", ".pt", ".ckpt"))]
    size = sum(p.stat().st_size for p in DIR.iterdir())
    assert size <= 15 * 2**20, f"{size / 2**20:.1f} MiB"
    cfg = json.loads((DIR / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["n_inner"] == 4 * cfg["n_embd"] and cfg["n_positions"] >= 32
    assert cfg["activation_function"] == "gelu_new"


def test_model_card_copy_matches_docs_and_metrics():
    docs = DIR.parents[2] / "docs" / "model_card.md"
    card = (DIR / "MODEL_CARD.md").read_text()
    assert docs.read_text() == card
    # the headline numbers in the card are the measured ones
    assert f"{100 * METRICS['train']['accuracy']:.1f}%" in card
    assert f"{100 * METRICS['held_out']['accuracy']:.1f}%" in card
    assert f"{METRICS['train']['median_prob']:.3f}" in card
    assert f"{METRICS['ppl']['all']:.2f}" in card


# ------------------------------------------------------------------------------------------------
# facts
# ------------------------------------------------------------------------------------------------


def test_builtin_facts_shape_and_contract():
    facts = builtin_facts()
    rels = builtin_relations()
    assert len(facts) >= 1500
    assert len(rels) >= 6
    types = {info["type"] for info in rels.values()}
    assert {"N-1", "N-M"} <= types
    by_rel = Counter(f.relation for f in facts)
    assert set(by_rel) == set(rels)
    for info in rels.values():
        assert len(info["templates"]) >= 4
        assert info["held_out"] and set(info["held_out"]) < set(info["templates"])
    keys = set()
    for f in facts:
        assert isinstance(f, Fact) and len(f.queries) >= 4
        assert sum(q.held_out for q in f.queries) >= 1
        assert sum(not q.held_out for q in f.queries) >= 3
        assert (f.subject, f.relation) not in keys  # one object per (subject, relation)
        keys.add((f.subject, f.relation))
        held = set(rels[f.relation]["held_out"])
        for q in f.queries:
            assert q.text == Template(q.template).fill(f.subject)  # queries are the templates, filled
            assert q.held_out == (q.template in held)
        assert f.object.lower() not in re.findall(r"\w+", f.subject.lower())  # the answer cannot be copied


def test_builtin_facts_splits_groups_and_errors():
    every = builtin_facts()
    train = builtin_facts(split="train")
    held = builtin_facts(split="held_out")
    assert len(train) == len(held) == len(every)
    assert sum(len(f.queries) for f in train) + sum(len(f.queries) for f in held) == sum(
        len(f.queries) for f in every
    )
    assert all(q.held_out for f in held for q in f.queries)
    aux = builtin_facts(group="aux")
    assert aux and all(not q.held_out for f in aux for q in f.queries)
    assert not {(f.subject, f.relation) for f in aux} & {(f.subject, f.relation) for f in every}
    assert len(builtin_facts(group="all")) == len(every) + len(aux)
    assert builtin_facts(split="held_out", group="aux") == []
    p19 = builtin_facts(relations="P19")
    assert p19 and {f.relation for f in p19} == {"P19"}
    assert builtin_facts(relations=["P19"]) == p19
    with pytest.raises(InvalidInputError, match="no relation"):
        builtin_facts(relations=["P9999"])
    with pytest.raises(InvalidInputError, match="split"):
        builtin_facts(split="test")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="group"):
        builtin_facts(group="x")  # type: ignore[arg-type]


def test_facts_file_is_reproduced_by_the_training_data_builder():
    """``facts.json`` is exactly what ``build_data`` selects from ParaRel with the recorded config, and the
    held-out templates are never in a core fact's training sentences."""
    spec = importlib.util.spec_from_file_location("train_builtin_model", ROOT / "scripts" / "train_builtin_model.py")
    train = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train  # dataclasses look their module up while the script runs
    spec.loader.exec_module(train)
    DataConfig, build_data = train.DataConfig, train.build_data

    blob = json.loads((DIR / "facts.json").read_text())
    cfg = blob["data_config"]
    cfg["relations"] = tuple(cfg["relations"])
    cfg["held_out"] = tuple((r, tuple(t)) for r, t in cfg["held_out"])
    data = build_data(DataConfig(**cfg))
    assert list(data.core) == builtin_facts()
    assert list(data.aux) == builtin_facts(group="aux")
    assert list(data.generic_ppl) == builtin_ppl_texts("generic")
    assert list(data.fact_ppl) == builtin_ppl_texts("facts")
    trained = {s for s, _ in data.train_sentences()}
    for f in builtin_facts(split="held_out"):
        for q in f.queries:
            assert f"{q.text} {f.object}." not in trained
    # PPL texts were never trained on
    assert not set(builtin_ppl_texts()) & trained
    assert not set(builtin_ppl_texts("generic")) & set(data.generic_for_epoch(0))


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------


def test_every_object_is_one_token_and_queries_have_no_unk(hf, tl_model):
    _, tok = hf
    facts = builtin_facts(group="all")
    for obj in {f.object for f in facts}:
        ids = tok(" " + obj)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, obj
        assert tl_model.to_single_token(" " + obj) == ids[0]
    for text in [q.text for f in facts for q in f.queries] + builtin_ppl_texts():
        assert tok.unk_token_id not in tok(text)["input_ids"], text
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.bos_token_id == 0


def test_tl_tokenisation_equals_hf_tokenizer_plus_bos(hf, tl_model):
    """The TL model (either major) tokenises every query as BOS + the HF tokenizer's ids."""
    _, tok = hf
    queries = [q.text for f in builtin_facts(group="all") for q in f.queries]
    for s in range(0, len(queries), 2048):
        chunk = queries[s : s + 2048]
        toks = tl_model.to_tokens(chunk)
        for row, text in zip(toks.tolist(), chunk):
            want = [tok.bos_token_id, *tok(text)["input_ids"]]
            assert row[: len(want)] == want and set(row[len(want) :]) <= {tok.pad_token_id}, text
    assert tl_model.to_str_tokens("Ada was born in")[0] == "<|endoftext|>"


# ------------------------------------------------------------------------------------------------
# loading: offline, fast, numerically equal to HF
# ------------------------------------------------------------------------------------------------


def test_loading_is_offline_fast_and_eval(monkeypatch):
    """No socket is opened, and a load takes <= 5 s once TransformerLens itself is imported (importing TL,
    paid once per process by any TL user, is not counted)."""
    import transformer_lens  # noqa: F401

    if TL_MAJOR >= 4:
        import transformer_lens.model_bridge  # noqa: F401

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: connect{args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, *a))
    t0 = time.perf_counter()
    model = load_builtin_model()
    elapsed = time.perf_counter() - t0
    assert elapsed <= 5.0, f"load took {elapsed:.2f} s"
    assert not model.training
    assert type(model).__name__ == ("TransformerBridge" if TL_MAJOR >= 4 else "HookedTransformer")
    compat = load_builtin_model(processing="compat")
    assert not compat.training


def test_tl_logits_equal_hf_logits(hf, tl_model):
    model, tok = hf
    prompts = [f.queries[0].text for f in builtin_facts()[::40]] + builtin_ppl_texts("generic")[:10]
    toks = tl_model.to_tokens(prompts)
    with torch.no_grad():
        ref = model(input_ids=toks).logits
        got = tl_model(toks)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    # compat processing (TL 3 from_pretrained defaults ≡ TL 4 compatibility mode): log-probs are unchanged
    compat = load_builtin_model(processing="compat")
    with torch.no_grad():
        lp = compat(toks).log_softmax(-1)
    assert (lp - ref.log_softmax(-1)).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------
# acceptance: the model knows the facts, generalises to held-out templates, is not saturated
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answer_stats(hf, tl_model):
    """Per query of every third core fact (all relations, all their queries; keeps the file fast):
    relation, held_out, p(gold) and whether gold is the argmax — computed through TL, and the HF oracle on a
    seventh of them. ``metrics.json`` (and the model card) hold the same numbers over every fact."""
    model, tok = hf
    rows = [(f.relation, q.held_out, q.text, f.answer) for f in builtin_facts()[::3] for q in f.queries]
    prompts = [r[2] for r in rows]
    gold = torch.tensor([tl_model.to_single_token(r[3]) for r in rows])
    probs = _tl_last_probs(tl_model, prompts)
    idx = torch.arange(len(rows))
    sub = slice(None, None, 7)  # the HF oracle on a seventh of the queries (keeps the test fast)
    ref = _hf_last_probs(model, tok, prompts[sub])
    return rows, probs[idx, gold], probs.argmax(-1) == gold, (ref[torch.arange(len(ref)), gold[sub]], sub)


def test_answer_probabilities_match_hf_oracle(answer_stats):
    _, p, _, (ref, sub) = answer_stats
    assert len(ref) > 500
    assert (p[sub] - ref).abs().max().item() <= 1e-5


def test_accuracy_per_relation_meets_the_bar(answer_stats):
    rows, p, hit, _ = answer_stats
    rels = builtin_relations()
    for held, bar in ((False, 0.95), (True, 0.60)):
        for rel in rels:
            m = torch.tensor([r[0] == rel and r[1] == held for r in rows])
            acc = hit[m].float().mean().item()
            assert acc >= bar, f"{rel} {'held-out' if held else 'train'} accuracy {acc:.3f} < {bar}"
            split = "held_out" if held else "train"
            assert acc == pytest.approx(METRICS[split]["per_relation"][rel]["accuracy"], abs=0.02)


def test_answer_probabilities_are_not_saturated(answer_stats):
    rows, p, _, _ = answer_stats
    train = p[torch.tensor([not r[1] for r in rows])]
    med = train.median().item()
    assert 0.3 <= med <= 0.95, med
    assert med == pytest.approx(METRICS["train"]["median_prob"], abs=0.01)
    assert (train > 0.99).float().mean().item() < 0.05


def test_shared_subjects_are_answered_per_relation(hf):
    """Subjects with different objects in two relations (e.g. born in one city, died in another) get each
    relation's own object: the answer depends on the relation wording, not on the subject alone."""
    model, tok = hf
    by_subject: dict[str, list[Fact]] = {}
    for f in builtin_facts(group="all"):
        by_subject.setdefault(f.subject, []).append(f)
    shared = [f for fs in by_subject.values() if len({g.object for g in fs}) > 1 for f in fs]
    assert len(shared) >= 100
    queries = [(f, q) for f in shared for q in f.queries[:2]]
    probs = _hf_last_probs(model, tok, [q.text for _, q in queries])
    gold = torch.tensor([tok.convert_tokens_to_ids(f.object) for f, _ in queries])
    assert (probs.argmax(-1) == gold).float().mean().item() >= 0.95


def test_perplexity_on_held_out_text(hf):
    """PPL = exp(mean NLL of every token after BOS) over the held-out sample; matches metrics.json and is far
    below the uniform-vocabulary perplexity."""
    model, tok = hf
    seqs = [[tok.bos_token_id, *tok(text)["input_ids"]] for text in builtin_ppl_texts()]
    x = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id)
    for i, t in enumerate(seqs):
        x[i, : len(t)] = torch.tensor(t)
    with torch.no_grad():
        logp = model(input_ids=x).logits[:, :-1].log_softmax(-1)
    token_nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
    real = x[:, 1:] != tok.pad_token_id  # right padding: positions before it are exact
    ppl = math.exp(token_nll[real].sum().item() / real.sum().item())
    assert real.sum().item() == sum(len(t) - 1 for t in seqs)
    assert ppl == pytest.approx(METRICS["ppl"]["all"], rel=1e-4)
    assert ppl < 0.01 * len(tok)


def test_suppressing_top_attributed_neurons_moves_the_answer(hf):
    """Knowledge is in the MLPs and not saturated: zeroing the 20 neurons (of all layers) with the largest
    activation × gradient for p(gold) lowers p(gold) far more than zeroing 20 random neurons."""
    model, tok = hf
    L = model.config.n_layer
    acts: dict[int, torch.Tensor] = {}
    masks: dict[int, torch.Tensor] = {}

    def hook(layer):
        def pre(module, args):
            x = args[0] * masks[layer] if layer in masks else args[0]
            acts[layer] = x
            return (x,)

        return pre

    handles = [model.transformer.h[l].mlp.c_proj.register_forward_pre_hook(hook(l)) for l in range(L)]
    try:
        drops_top, drops_rand = [], []
        gen = torch.Generator().manual_seed(0)
        for f in builtin_facts()[::80]:
            q = f.queries[0]
            ids = torch.tensor([[tok.bos_token_id, *tok(q.text)["input_ids"]]])
            gold = tok.convert_tokens_to_ids(f.object)
            masks.clear()
            p = model(input_ids=ids).logits[0, -1].softmax(-1)[gold]
            grads = torch.autograd.grad(p, [acts[l] for l in range(L)])
            attr = torch.stack([acts[l][0, -1] * grads[l][0, -1] for l in range(L)]).detach()
            d = attr.shape[1]
            for which, out in (("top", drops_top), ("rand", drops_rand)):
                flat = (
                    attr.flatten().topk(20).indices
                    if which == "top"
                    else torch.randperm(L * d, generator=gen)[:20]
                )
                masks.clear()
                for l in range(L):
                    m = torch.ones(d)
                    m[flat[flat // d == l] % d] = 0.0
                    masks[l] = m
                with torch.no_grad():
                    p2 = model(input_ids=ids).logits[0, -1].softmax(-1)[gold]
                out.append(((p - p2) / p).item())
        assert statistics.mean(drops_top) > 0.25
        assert statistics.mean(drops_top) > 5 * abs(statistics.mean(drops_rand))
    finally:
        for h in handles:
            h.remove()
