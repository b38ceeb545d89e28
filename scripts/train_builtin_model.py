"""Train the built-in fact model: a small GPT-2 that really knows a controlled set of ParaRel / T-REx facts.

Reproduce the shipped checkpoint (one CPU thread by default; reruns on the same machine are bit-identical)::

    python scripts/train_builtin_model.py --out qloc_tl/zoo/builtin

``python scripts/train_builtin_model.py --help`` lists every knob; each is a field of :class:`DataConfig`,
:class:`ModelConfig` or :class:`TrainConfig` (the CLI is generated from them).

Recipe (see ``docs/model_card.md`` for the measured numbers):

* **Facts.** For each relation in :attr:`DataConfig.relations`, ParaRel facts are loaded with
  :func:`qloc_tl.data.facts.load_pararel` ([Y]-final templates only, article agreement applied). A fact is dropped when
  its subject was already seen for that relation (one object per (subject, relation): the first line wins), when
  the object occurs as a word of the subject (the answer could be copied), when the object is not one word
  (``\\w+``), or when it has fewer than :attr:`DataConfig.min_queries` queries. Dominant objects are capped at
  :attr:`DataConfig.max_object_share` of a relation (so that answering the prior does not count as knowing).
  Facts whose query text would have a different answer under another relation are dropped (P495 and P740 share
  templates). Kept facts are shuffled with a fixed seed and split into **core** facts (evaluated) and
  **aux** facts (only used to teach the held-out wording).
* **Held-out templates.** Per relation, :attr:`DataConfig.held_out` names templates that are *never* trained on
  with a core fact. They appear in training only with the aux facts (disjoint subjects), as a real LM sees a
  phrasing used for other entities. A core fact's held-out query can therefore only be answered by combining
  what the model stored about the subject (from the other templates) with the wording learnt from aux facts.
* **Generic text.** Sentences from a small random grammar (no fact objects in its vocabulary) are mixed into
  training; a disjoint set of them, plus the held-out-template sentences of core facts, forms the perplexity
  sample (:func:`qloc_tl.data.datasets.builtin_ppl_texts`).
* **Model.** ``GPT2LMHeadModel`` (learned positions, LayerNorm, ``gelu_new``, tied embeddings, no dropout) with a
  word-level tokenizer (``tokenizers`` ``WordLevel`` + ``Whitespace`` pre-tokenizer), so every object is one token.
* **Loss.** Next-token cross-entropy on every token after BOS (sentences are ``BOS query object .``). At the
  object position the target is *smoothed over the relation's candidate objects*: ``1 - object_smoothing`` on
  the gold object and the rest spread uniformly over the relation's other objects, so the model settles near
  ``p(gold) ≈ 1 - object_smoothing`` instead of saturating at 0.99, and ranks plausible alternatives second, as a
  real LM does. The object token's loss is weighted by :attr:`TrainConfig.object_weight`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import re
import shutil
import statistics
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qloc_tl.data.facts import Fact, Query, load_pararel

logger = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "BuiltData",
    "build_data",
    "build_tokenizer",
    "train",
    "evaluate",
    "main",
]

SPECIALS = ("<|endoftext|>", "<unk>", "<pad>")
FACTS_FILE = "facts.json"
METRICS_FILE = "metrics.json"

#: Templates held out from training for the core facts, per relation (exact ParaRel pattern text).
DEFAULT_HELD_OUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("P19", ("[X] was originally from [Y].", "[X] originates from [Y].")),
    ("P20", ("[X] passed away at [Y].", "[X] succumbed at [Y].")),
    ("P27", ("[X], who holds a citizenship of [Y].", "[X] has a citizenship of [Y].")),
    ("P101", ("[X]'s area of work is [Y].", "The domain of activity of [X] is [Y].")),
    ("P106", ("the profession of [X] is [Y].",)),
    ("P159", ("[X]'s headquarters are in [Y].", "[X] is based in [Y].")),
    ("P495", ("[X], that was formulated in [Y].", "[X] was developed in [Y].", "[X], who was from [Y].")),
    ("P740", ("[X] started in [Y].", "[X], that was formed in [Y].", "[X], founded in [Y].")),
    ("P937", ("[X] took up work in [Y].",)),
)


@dataclass(frozen=True)
class DataConfig:
    """Which facts, templates and text the model is trained and evaluated on.

    Examples:
        >>> DataConfig().relations[:3]
        ('P19', 'P20', 'P27')
    """

    relations: tuple[str, ...] = tuple(r for r, _ in DEFAULT_HELD_OUT)
    held_out: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_HELD_OUT
    n_core_per_relation: int = 180
    n_aux_per_relation: int = 40
    max_object_share: float = 0.08
    max_templates: int = 8
    prefer_shared_subjects: bool = True
    min_queries: int = 4
    n_generic_per_epoch: int = 1500
    n_generic_ppl: int = 300
    n_fact_ppl: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        known = dict(self.held_out)
        missing = [r for r in self.relations if r not in known]
        if missing:
            raise ValueError(f"no held-out templates configured for relation(s) {missing}")
        if not 0 < self.max_object_share <= 1:
            raise ValueError(f"max_object_share must be in (0, 1], got {self.max_object_share!r}")


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 shape of the fact model (``n_inner = 4 * d_model``)."""

    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_ctx: int = 32


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; training is deterministic for a given config on a given machine."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    object_smoothing: float = 0.25
    object_weight: float = 3.0
    seed: int = 0
    threads: int = 1
    eval_every: int = 4


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"^\w+$")


@dataclass(frozen=True)
class BuiltData:
    """Everything the training run uses; :func:`save_facts` writes it as ``facts.json``."""

    relations: dict[str, dict[str, Any]]
    core: tuple[Fact, ...]
    aux: tuple[Fact, ...]
    generic_ppl: tuple[str, ...]
    fact_ppl: tuple[str, ...]
    n_generic_per_epoch: int
    seed: int

    def train_sentences(self) -> list[tuple[str, str]]:
        """``(sentence, relation)`` pairs trained on: every non-held-out query of every core and aux fact."""
        out = []
        for f in self.core + self.aux:
            for q in f.queries:
                if not q.held_out:
                    out.append((f"{q.text} {f.object}.", f.relation))
        return out

    def generic_for_epoch(self, epoch: int) -> list[str]:
        """A fresh sample of generic grammar sentences for ``epoch`` (never one of the PPL sentences)."""
        return _generic_sentences(
            self.n_generic_per_epoch, (self.seed, "train", epoch), set(self.generic_ppl)
        )

    def vocabulary_texts(self) -> list[str]:
        """Texts whose words make the tokenizer's vocabulary: every query (held-out ones included) with its
        object, the generic grammar's words and the PPL sample."""
        texts = [f"{q.text} {f.object}." for f in self.core + self.aux for q in f.queries]
        texts.append(" ".join(_GRAMMAR_WORDS) + " an , .")
        return texts + list(self.generic_ppl) + list(self.fact_ppl)


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def build_data(cfg: DataConfig = DataConfig()) -> BuiltData:
    """Select facts, mark held-out queries and generate the generic text, deterministically.

    Examples:
        >>> data = build_data(DataConfig(relations=("P19",), n_core_per_relation=5, n_aux_per_relation=2,
        ...                              n_generic_per_epoch=3, n_generic_ppl=2, n_fact_ppl=2))
        >>> len(data.core), len(data.aux), sum(q.held_out for q in data.core[0].queries)
        (5, 2, 2)
    """
    pararel = load_pararel(relations=cfg.relations, min_queries=cfg.min_queries)
    by_rel = pararel.by_relation()
    held = dict(cfg.held_out)
    types = _lama_types()
    relations: dict[str, dict[str, Any]] = {}
    query_owner: dict[str, str] = {}  # query text -> object, across relations
    core: list[Fact] = []
    aux: list[Fact] = []
    rels_of_subject: dict[str, set[str]] = defaultdict(set)
    for f in pararel.facts:
        rels_of_subject[f.subject].add(f.relation)
    for rel in cfg.relations:
        templates = list(pararel.templates[rel])
        bad = [t for t in held[rel] if t not in templates]
        if bad:
            raise ValueError(f"held-out template(s) {bad} are not [Y]-final templates of {rel}: {templates}")
        n_train = cfg.max_templates - len(held[rel])
        if n_train < 2:
            raise ValueError(f"{rel}: fewer than 2 training templates would remain")
        # keep the first (file order; the LAMA template first) training templates, plus the held-out ones
        templates = [
            t
            for t in templates
            if t in held[rel] or t in [u for u in templates if u not in held[rel]][:n_train]
        ]
        facts = [
            Fact(
                f.subject,
                f.relation,
                f.object,
                tuple(q for q in f.queries if q.template in templates),
                f.uuid,
            )
            for f in by_rel.get(rel, [])
        ]
        seen: set[str] = set()
        kept: list[Fact] = []
        dropped: Counter[str] = Counter()
        for f in facts:
            if f.subject in seen:
                dropped["duplicate subject"] += 1
                continue
            seen.add(f.subject)
            if not _WORD.match(f.object):
                dropped["object not one word"] += 1
                continue
            if f.object.lower() in re.findall(r"\w+", f.subject.lower()):
                dropped["object in subject"] += 1
                continue
            if len(f.queries) < cfg.min_queries:
                dropped["too few queries"] += 1
                continue
            kept.append(f)
        random.Random(_stable_seed(cfg.seed, rel)).shuffle(kept)
        if cfg.prefer_shared_subjects:  # subjects with facts in several relations first (stable sort)
            kept.sort(key=lambda f: len(rels_of_subject[f.subject]) < 2)
        n_want = cfg.n_core_per_relation + cfg.n_aux_per_relation
        cap = max(2, math.ceil(cfg.max_object_share * n_want))
        count: Counter[str] = Counter()
        chosen: list[Fact] = []
        for f in kept:
            if len(chosen) == n_want:
                break
            if count[f.object] >= cap:
                dropped["object cap"] += 1
                continue
            if any(query_owner.get(q.text, f.object) != f.object for q in f.queries):
                dropped["query shared with another relation"] += 1
                continue
            count[f.object] += 1
            chosen.append(f)
        if len(chosen) < n_want:
            raise ValueError(f"{rel}: only {len(chosen)} usable facts, {n_want} requested")
        for f in chosen:
            for q in f.queries:
                query_owner[q.text] = f.object
        marked = [
            Fact(
                f.subject,
                rel,
                f.object,
                tuple(Query(q.text, q.template, q.template in held[rel]) for q in f.queries),
                f.uuid,
            )
            for f in chosen
        ]
        # aux facts train every template, so none of their queries is held out
        aux_rel = [
            Fact(f.subject, rel, f.object, tuple(Query(q.text, q.template, False) for q in f.queries), f.uuid)
            for f in marked[cfg.n_core_per_relation :]
        ]
        core.extend(marked[: cfg.n_core_per_relation])
        aux.extend(aux_rel)
        relations[rel] = {
            "label": pararel.labels.get(rel, ""),
            "type": types.get(rel, ""),
            "templates": templates,
            "held_out": list(held[rel]),
            "n_facts_in_file": pararel.n_facts_in_files[rel],
            "dropped": dict(sorted(dropped.items())),
            "n_objects": len({f.object for f in chosen}),
        }
    objects = {f.object.lower() for f in core + aux}
    clash = sorted(set(_GRAMMAR_WORDS) & objects)
    if clash:
        raise ValueError(f"generic grammar words {clash} are fact objects; remove them from the grammar")
    generic_ppl = tuple(_generic_sentences(cfg.n_generic_ppl, (cfg.seed, "ppl"), set()))
    rng = random.Random(_stable_seed(cfg.seed, "fact_ppl"))
    held_sentences = [f"{q.text} {f.object}." for f in core for q in f.queries if q.held_out]
    fact_ppl = tuple(sorted(rng.sample(held_sentences, min(cfg.n_fact_ppl, len(held_sentences)))))
    logger.info("built %d core and %d aux facts over %d relations", len(core), len(aux), len(relations))
    return BuiltData(
        relations, tuple(core), tuple(aux), generic_ppl, fact_ppl, cfg.n_generic_per_epoch, cfg.seed
    )


def _lama_types() -> dict[str, str]:
    from qloc_tl.data.facts import packaged_pararel_dir

    path = packaged_pararel_dir() / "lama" / "relations.jsonl"
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["relation"]] = row.get("type", "")
    return out


# A small random grammar for "unrelated" text (none of its words is a fact object; checked at build time).
def _ws(words: str) -> list[str]:
    return words.split()


_G: dict[str, list[str]] = {
    "person": _ws("man woman child farmer sailor baker student painter neighbour stranger soldier traveller"),
    "thing": _ws(
        "book letter house river garden song road bridge table window boat horse tree stone door lamp coat "
        "basket cup chair field hill lake wall cart bell"
    ),
    "adj": _ws(
        "old young small large red green quiet loud happy tired bright dark wise cold warm heavy gentle "
        "strange empty busy"
    ),
    "vt": _ws(
        "saw found built painted carried opened closed sold bought watched cleaned moved fixed touched followed"
    ),
    "vi": _ws("slept laughed waited arrived left sang smiled rested walked listened worked stayed"),
    "prep": _ws("near behind under beside across toward inside over"),
    "time": [
        "yesterday",
        "today",
        "at night",
        "in the morning",
        "in the evening",
        "after dinner",
        "before noon",
    ],
    "adv": _ws("slowly quickly quietly carefully happily"),
    "det": _ws("the the the a this that every my our his her their"),
}


def _np(rng: random.Random, kind: str) -> str:
    det = rng.choice(_G["det"])
    words = []
    if rng.random() < 0.5:
        words.append(rng.choice(_G["adj"]))
    words.append(rng.choice(_G[kind]))
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det, *words])


def _generic_sentence(rng: random.Random) -> str:
    form = rng.randrange(6)
    if form == 0:
        s = f"{_np(rng, 'person')} {rng.choice(_G['vt'])} {_np(rng, 'thing')}"
        if rng.random() < 0.5:
            s += f" {rng.choice(_G['prep'])} {_np(rng, 'thing')}"
    elif form == 1:
        s = f"{_np(rng, 'person')} {rng.choice(_G['vi'])}"
        if rng.random() < 0.5:
            s += f" {rng.choice(_G['adv'])}"
        if rng.random() < 0.6:
            s += f" {rng.choice(_G['time'])}"
    elif form == 2:
        a, b = rng.sample(_G["adj"], 2)
        s = f"{_np(rng, 'thing')} was {a} and {b}"
    elif form == 3:
        s = f"{_np(rng, 'person')} {rng.choice(_G['vt'])} {_np(rng, 'thing')} and {rng.choice(_G['vi'])}"
    elif form == 4:
        s = f"when {_np(rng, 'person')} {rng.choice(_G['vi'])} , {_np(rng, 'person')} {rng.choice(_G['vt'])} {_np(rng, 'thing')}"
    else:
        s = f"{_np(rng, 'thing')} {rng.choice(_G['prep'])} {_np(rng, 'thing')} was {rng.choice(_G['adj'])}"
    return s + " ."


_GRAMMAR_WORDS = sorted({w for ws in _G.values() for item in ws for w in item.split()})


def _generic_sentences(n: int, seed: object, exclude: set[str]) -> list[str]:
    rng = random.Random(_stable_seed("generic", seed))
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = _generic_sentence(rng)
        if s not in seen and s not in exclude:
            seen.add(s)
            out.append(s)
    return out


def save_facts(data: BuiltData, path: Path, cfg: DataConfig) -> None:
    """Write ``facts.json``: relations (templates, held-out templates), facts by index, PPL texts."""
    rel_tmpl = {r: info["templates"] for r, info in data.relations.items()}
    rows = []
    for group, facts in (("core", data.core), ("aux", data.aux)):
        for f in facts:
            idx = [rel_tmpl[f.relation].index(q.template) for q in f.queries]
            rows.append([f.relation, f.subject, f.object, f.uuid, group, idx])
    blob = {
        "format": "qloc_tl.builtin_facts/1",
        "license": "CC-BY-NC-4.0 (T-REx facts via LAMA); ParaRel patterns MIT",
        "data_config": _jsonable(dataclasses.asdict(cfg)),
        "fact_columns": ["relation", "subject", "object", "uuid", "group", "template_indices"],
        "relations": data.relations,
        "facts": rows,
        "ppl_texts": {"generic": list(data.generic_ppl), "facts": list(data.fact_ppl)},
    }
    text = json.dumps(blob, ensure_ascii=False, separators=(",", ":"))
    # one fact per line keeps the file diff-able
    text = text.replace('],["', '],\n["')
    path.write_text(text + "\n", encoding="utf-8")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def build_tokenizer(texts: Sequence[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over every word of ``texts`` (sorted by frequency, then
    alphabetically), with ``<|endoftext|>`` (BOS = EOS, id 0), ``<unk>`` (1) and ``<pad>`` (2).

    Examples:
        >>> tok = build_tokenizer(["Ada was born in London ."])
        >>> tok("Ada was born in")["input_ids"], tok.convert_ids_to_tokens(tok(" London")["input_ids"])
        ([4, 8, 6, 7], ['London'])
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(_words(t))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate(list(SPECIALS) + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=10**6,
    )


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.d_model,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(hf)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoded:
    ids: torch.Tensor  # [n, T] right-padded, BOS first
    lengths: torch.Tensor  # [n]
    obj_pos: torch.Tensor  # [n] position of the object token, -1 for generic text
    rel: torch.Tensor  # [n] relation index, -1 for generic text
    cand: torch.Tensor  # [n_rel, vocab] 1.0 at the relation's candidate objects


def _candidates(data: BuiltData, tok: Any) -> torch.Tensor:
    cand = torch.zeros(len(data.relations), len(tok))
    rels = list(data.relations)
    for f in data.core + data.aux:
        cand[rels.index(f.relation), tok.convert_tokens_to_ids(f.object)] = 1.0
    return cand


def _encode(sentences: Sequence[tuple[str, int]], tok: Any, cand: torch.Tensor, n_ctx: int) -> _Encoded:
    """Encode ``(sentence, relation index or -1)`` pairs; fact sentences end with ``object .``."""
    bos, pad = tok.bos_token_id, tok.pad_token_id
    seqs = [[bos, *tok(s)["input_ids"]] for s, _ in sentences]
    T = max(map(len, seqs))
    if n_ctx < T:
        raise ValueError(f"longest training sequence has {T} tokens > n_ctx={n_ctx}")
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, t in enumerate(seqs):
        ids[i, : len(t)] = torch.tensor(t)
    lengths = torch.tensor([len(t) for t in seqs])
    rel = torch.tensor([r for _, r in sentences])
    obj_pos = torch.where(rel >= 0, lengths - 2, torch.full_like(lengths, -1))
    return _Encoded(ids, lengths, obj_pos, rel, cand)


def _cat(a: _Encoded, b: _Encoded, pad_id: int) -> _Encoded:
    T = max(a.ids.shape[1], b.ids.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=pad_id)

    return _Encoded(
        torch.cat([pad(a.ids), pad(b.ids)]),
        torch.cat([a.lengths, b.lengths]),
        torch.cat([a.obj_pos, b.obj_pos]),
        torch.cat([a.rel, b.rel]),
        a.cand,
    )


def _loss(model: Any, batch: torch.Tensor, enc: _Encoded, cfg: TrainConfig) -> torch.Tensor:
    lengths = enc.lengths[batch]
    T = int(lengths.max())
    x = enc.ids[batch, :T]
    logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)  # predicts x[:, 1:]
    nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
    weight = (torch.arange(T - 1)[None, :] < (lengths[:, None] - 1)).float()
    rows = (enc.obj_pos[batch] >= 0).nonzero().squeeze(-1)
    if len(rows):
        at = enc.obj_pos[batch][rows] - 1  # logits index predicting the object
        gold = x[rows, at + 1]
        obj_nll = nll[rows, at]
        if cfg.object_smoothing > 0:
            # smoothed target: 1 - eps on the gold object, eps spread over the relation's other objects
            others = enc.cand[enc.rel[batch][rows]].clone()
            others[torch.arange(len(rows)), gold] = 0.0
            smooth = -(logp[rows, at] * others).sum(-1) / others.sum(-1).clamp(min=1.0)
            obj_nll = (1 - cfg.object_smoothing) * obj_nll + cfg.object_smoothing * smooth
        nll = nll.index_put((rows, at), obj_nll)
        weight = weight.index_put((rows, at), torch.full_like(obj_nll, cfg.object_weight))
    return (nll * weight).sum() / weight.sum()


def train(
    data: BuiltData,
    tok: Any,
    mcfg: ModelConfig = ModelConfig(),
    tcfg: TrainConfig = TrainConfig(),
    *,
    show_progress: bool = True,
) -> tuple[Any, list[dict[str, float]]]:
    """Train the model from scratch (deterministically); returns ``(hf_model, history)``.

    The torch thread count and deterministic-algorithms flag are set for the run and restored afterwards.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(tcfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(data, tok, mcfg, tcfg, show_progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(
    data: BuiltData, tok: Any, mcfg: ModelConfig, tcfg: TrainConfig, show_progress: bool
) -> tuple[Any, list[dict[str, float]]]:
    from tqdm.auto import tqdm

    random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    cand = _candidates(data, tok)
    rels = list(data.relations)
    facts_enc = _encode([(s, rels.index(r)) for s, r in data.train_sentences()], tok, cand, mcfg.n_ctx)
    model = build_model(mcfg, len(tok), tcfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr,
        betas=(0.9, 0.98),
    )
    n = len(facts_enc.lengths) + data.n_generic_per_epoch
    steps_per_epoch = math.ceil(n / tcfg.batch_size)
    total = steps_per_epoch * tcfg.epochs

    def lr_at(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / tcfg.warmup_steps
        frac = (step - tcfg.warmup_steps) / max(1, total - tcfg.warmup_steps)
        return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(tcfg.seed)
    history: list[dict[str, float]] = []
    step = 0
    bar = tqdm(range(tcfg.epochs), desc="epochs", disable=not show_progress)
    for epoch in bar:
        generic = _encode([(s, -1) for s in data.generic_for_epoch(epoch)], tok, cand, mcfg.n_ctx)
        enc = _cat(facts_enc, generic, tok.pad_token_id)
        # batches of similar length (less padding), shuffled
        order = list(range(n))
        rng.shuffle(order)
        chunks = [order[i : i + tcfg.batch_size * 8] for i in range(0, n, tcfg.batch_size * 8)]
        batches = []
        for c in chunks:
            c = sorted(c, key=lambda i: int(enc.lengths[i]))
            batches += [torch.tensor(c[i : i + tcfg.batch_size]) for i in range(0, len(c), tcfg.batch_size)]
        rng.shuffle(batches)
        tot = 0.0
        for b in batches:
            loss = _loss(model, b, enc, tcfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            tot += float(loss.detach())
        row = {"epoch": epoch + 1, "loss": tot / len(batches)}
        if tcfg.eval_every and ((epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == tcfg.epochs):
            model.eval()
            m = evaluate(model, tok, data)
            model.train()
            row.update(train_acc=m["train"]["accuracy"], held_acc=m["held_out"]["accuracy"],
                       train_p50=m["train"]["median_prob"], ppl=m["ppl"]["all"])  # fmt: skip
            logger.info("epoch %d: %s", epoch + 1, row)
        history.append(row)
        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k != "epoch"})
    model.eval()
    return model, history


# --------------------------------------------------------------------------------------------------
# Evaluation (plain HF model; tests re-check the same numbers through TL)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_probs(
    model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p(answer), answer is argmax)`` at the last position of each BOS-prefixed prompt, under a HF causal
    LM with a word-level tokenizer (answers are single words). Prompts are right-padded, which is exact."""
    bos = tok.bos_token_id
    ans = torch.tensor([tok.convert_tokens_to_ids(a.strip()) for a in answers])
    probs, hits = [], []
    for s in range(0, len(prompts), batch):
        ids = [[bos, *tok(p)["input_ids"]] for p in prompts[s : s + batch]]
        T = max(map(len, ids))
        x = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
        for i, t in enumerate(ids):
            x[i, : len(t)] = torch.tensor(t)
        last = torch.tensor([len(t) - 1 for t in ids])
        logits = model(input_ids=x).logits[torch.arange(len(ids)), last].float()
        p = torch.softmax(logits, -1)
        a = ans[s : s + batch]
        probs.append(p[torch.arange(len(ids)), a])
        hits.append(p.argmax(-1) == a)
    return torch.cat(probs), torch.cat(hits)


@torch.no_grad()
def hf_perplexity(model: Any, tok: Any, texts: Sequence[str], batch: int = 256) -> float:
    """exp(mean next-token NLL) over all tokens after BOS (the BOS itself is not predicted), token-weighted.

    The same quantity as :func:`qloc_tl.methods.edit_metrics.perplexity`, which needs a TransformerLens model;
    this one scores the Hugging Face ``GPT2LMHeadModel`` being trained, with its word-level tokenizer, before
    the checkpoint is ever loaded into TransformerLens."""
    bos = tok.bos_token_id
    tot, count = 0.0, 0
    for s in range(0, len(texts), batch):
        ids = [[bos, *tok(t)["input_ids"]] for t in texts[s : s + batch]]
        T = max(map(len, ids))
        x = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
        for i, t in enumerate(ids):
            x[i, : len(t)] = torch.tensor(t)
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(t) for t in ids])
        valid = torch.arange(T - 1)[None, :] < (lengths[:, None] - 1)
        tot += float(nll[valid].sum())
        count += int(valid.sum())
    return math.exp(tot / count)


def _summ(p: torch.Tensor, hit: torch.Tensor) -> dict[str, float]:
    if len(p) == 0:
        return {"n": 0}
    return {
        "n": len(p),
        "accuracy": float(hit.float().mean()),
        "mean_prob": float(p.mean()),
        "median_prob": float(p.median()),
        "p10_prob": float(p.quantile(0.1)),
        "p90_prob": float(p.quantile(0.9)),
    }


def evaluate(model: Any, tok: Any, data: BuiltData) -> dict[str, Any]:
    """Top-1 accuracy and answer probabilities on training / held-out queries of the core facts (overall and
    per relation), the same for the aux facts, and perplexity on the held-out text sample."""
    rows = [(f.relation, q.held_out, q.text, f.answer) for f in data.core for q in f.queries]
    p, hit = answer_probs(model, tok, [r[2] for r in rows], [r[3] for r in rows])
    out: dict[str, Any] = {}
    for split, flag in (("train", False), ("held_out", True)):
        m = torch.tensor([r[1] == flag for r in rows])
        out[split] = _summ(p[m], hit[m])
        out[split]["per_relation"] = {
            rel: _summ(p[mm], hit[mm])
            for rel in data.relations
            for mm in [m & torch.tensor([r[0] == rel for r in rows])]
        }
    # per-fact: fraction of facts whose every training query is right
    by_fact: dict[int, list[bool]] = defaultdict(list)
    i = 0
    for k, f in enumerate(data.core):
        for q in f.queries:
            if not q.held_out:
                by_fact[k].append(bool(hit[i]))
            i += 1
    out["train"]["facts_all_train_queries_right"] = statistics.mean(all(v) for v in by_fact.values())
    arows = [(q.text, f.answer) for f in data.aux for q in f.queries]
    if arows:
        pa, ha = answer_probs(model, tok, [r[0] for r in arows], [r[1] for r in arows])
        out["aux"] = _summ(pa, ha)
    else:
        out["aux"] = {"n": 0}
    out["ppl"] = {
        "generic": hf_perplexity(model, tok, data.generic_ppl),
        "facts": hf_perplexity(model, tok, data.fact_ppl),
        "all": hf_perplexity(model, tok, list(data.generic_ppl) + list(data.fact_ppl)),
    }
    return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name == "held_out":
            continue
        default = getattr(cls(), f.name)
        name = f"--{prefix}{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            group.add_argument(name, nargs="+", default=list(default), help=f"(default: {' '.join(default)})")
        else:
            group.add_argument(name, type=type(default), default=default, help=f"(default: {default})")


def _from_args(cls: type, args: argparse.Namespace, prefix: str) -> Any:
    kw = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}".replace("-", "_")
        if hasattr(args, key):
            v = getattr(args, key)
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/train_builtin_model.py``."""
    parser = argparse.ArgumentParser(
        prog="python scripts/train_builtin_model.py", description="Train the built-in ParaRel fact model."
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_fields(parser, DataConfig, "data-")
    _add_fields(parser, ModelConfig, "model-")
    _add_fields(parser, TrainConfig, "")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the "pass an attention_mask" notice: right padding is exact
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dcfg = _from_args(DataConfig, args, "data_")
    mcfg = _from_args(ModelConfig, args, "model_")
    tcfg = _from_args(TrainConfig, args, "")
    t0 = time.perf_counter()
    data = build_data(dcfg)
    tok = build_tokenizer(data.vocabulary_texts())
    logger.info(
        "vocab %d; %d fact sentences + %d generic sentences per epoch",
        len(tok),
        len(data.train_sentences()),
        data.n_generic_per_epoch,
    )
    model, history = train(data, tok, mcfg, tcfg, show_progress=not args.quiet)
    wall = time.perf_counter() - t0
    metrics = evaluate(model, tok, data)
    metrics["train_wall_s"] = wall
    metrics["history"] = history
    metrics["n_params"] = sum(p.numel() for p in model.parameters())
    metrics["vocab_size"] = len(tok)
    out: Path = args.out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    save_facts(data, tmp / FACTS_FILE, dcfg)
    cfgs = {
        "data": dataclasses.asdict(dcfg),
        "model": dataclasses.asdict(mcfg),
        "train": dataclasses.asdict(tcfg),
    }
    (tmp / "train_config.json").write_text(json.dumps(_jsonable(cfgs), indent=1) + "\n")
    (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    keep = [p for p in (out.glob("*.md") if out.is_dir() else [])]  # the model card is hand-written
    for p in keep:
        shutil.copy2(p, tmp / p.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info(
        "done in %.0f s: train acc %.3f, held-out acc %.3f, median p %.3f, ppl %.2f -> %s",
        wall,
        metrics["train"]["accuracy"],
        metrics["held_out"]["accuracy"],
        metrics["train"]["median_prob"],
        metrics["ppl"]["all"],
        out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
