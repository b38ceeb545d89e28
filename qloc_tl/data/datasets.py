"""Datasets shipped with qloc_tl: the facts and text the built-in fact model was trained and evaluated on.

The built-in model (:func:`qloc_tl.zoo.load_builtin_model`) was trained on ParaRel / T-REx facts of several
relations (see ``qloc_tl/zoo/builtin/MODEL_CARD.md``). Its facts come in two groups:

* ``"core"`` facts (the default): the evaluation set. Each has neighbor queries from the relation's training
  templates (``Query.held_out=False``, trained on) and from its held-out templates (``Query.held_out=True``,
  never trained on for any core fact; the model answers them by generalisation).
* ``"aux"`` facts: trained on *every* template, including the held-out ones, to teach the model the held-out
  wording (with other subjects). None of their queries is held out.

The facts are CC BY-NC 4.0 (LAMA T-REx): research use only.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from typing import Any, Literal

from qloc_tl.core.errors import DataError, InvalidInputError
from qloc_tl.core.validation import check_choice
from qloc_tl.data.facts import Fact, Query, Template

logger = logging.getLogger(__name__)

__all__ = ["builtin_facts", "builtin_ppl_texts", "builtin_relations", "generic_ppl_texts", "pararel_facts"]

Split = Literal["train", "held_out"]
Group = Literal["core", "aux", "all"]

_SPLITS = (None, "train", "held_out")
_GROUPS = ("core", "aux", "all")
_PPL_KINDS = ("all", "generic", "facts")


@functools.lru_cache(maxsize=1)
def _blob() -> dict[str, Any]:
    from qloc_tl.zoo import builtin_model_dir

    path = builtin_model_dir() / "facts.json"
    if not path.is_file():
        raise DataError(f"the built-in facts file {str(path)!r} is missing; reinstall qloc_tl")
    blob = json.loads(path.read_text(encoding="utf-8"))
    if blob.get("format") != "qloc_tl.builtin_facts/1":
        raise DataError(f"{str(path)!r} has unknown format {blob.get('format')!r}")
    return blob


@functools.lru_cache(maxsize=1)
def _all_facts() -> tuple[tuple[str, Fact], ...]:
    blob = _blob()
    rels = blob["relations"]
    templates = {r: [Template(p) for p in info["templates"]] for r, info in rels.items()}
    held = {r: set(info["held_out"]) for r, info in rels.items()}
    out = []
    for rel, subj, obj, uuid, group, idx in blob["facts"]:
        qs = tuple(
            Query(
                templates[rel][i].fill(subj),
                templates[rel][i].pattern,
                group == "core" and templates[rel][i].pattern in held[rel],
            )
            for i in idx
        )
        out.append((group, Fact(subj, rel, obj, qs, uuid)))
    return tuple(out)


def builtin_relations() -> dict[str, dict[str, Any]]:
    """Per relation of the built-in model: ``label``, LAMA ``type`` (``N-1``/``N-M``), ``templates`` (the
    ones used), ``held_out`` (templates never trained on with a core fact), ``n_objects`` and what was dropped
    when the facts were selected.

    Examples:
        >>> info = builtin_relations()["P19"]
        >>> info["label"], set(info["held_out"]) <= set(info["templates"])
        ('place of birth', True)
    """
    return json.loads(json.dumps(_blob()["relations"]))  # a deep copy


def builtin_facts(
    *,
    split: Split | None = None,
    relations: Iterable[str] | str | None = None,
    group: Group = "core",
) -> list[Fact]:
    """The facts the built-in model was trained and evaluated on, with their neighbor queries.

    Args:
        split: which queries to keep: ``None`` every query, ``"train"`` only those from training templates,
            ``"held_out"`` only those from held-out templates (answered by generalisation). Facts left with no
            query are dropped (so ``split="held_out"`` never returns aux facts).
        relations: relation ids to keep (default: all of the model's relations).
        group: ``"core"`` (the evaluation facts, default), ``"aux"`` (facts that teach the held-out
            wording) or ``"all"``.

    Returns:
        :class:`~qloc_tl.data.facts.Fact` objects in a fixed order (relation, then the training data order). Every
        object is a single token of the built-in model's tokenizer.

    Examples:
        >>> facts = builtin_facts(relations="P19")
        >>> f = facts[0]
        >>> f.relation, len(f.queries) >= 4, any(q.held_out for q in f.queries)
        ('P19', True, True)
        >>> all(not q.held_out for f in builtin_facts(split="train") for q in f.queries)
        True
    """
    check_choice("split", split, _SPLITS)
    check_choice("group", group, _GROUPS)
    known = list(_blob()["relations"])
    if relations is None:
        wanted = set(known)
    else:
        wanted = {relations} if isinstance(relations, str) else set(relations)
        if not wanted:
            raise InvalidInputError(
                "relations is empty: pass None for every relation, or at least one relation id"
            )
        unknown = sorted(wanted - set(known))
        if unknown:
            raise InvalidInputError(f"the built-in model has no relation(s) {unknown}; it has {known}")
    out = []
    for g, fact in _all_facts():
        if fact.relation not in wanted or (group != "all" and g != group):
            continue
        if split is not None:
            keep = tuple(q for q in fact.queries if q.held_out == (split == "held_out"))
            if not keep:
                continue
            fact = Fact(fact.subject, fact.relation, fact.object, keep, fact.uuid)
        out.append(fact)
    return out


def builtin_ppl_texts(kind: Literal["all", "generic", "facts"] = "all") -> list[str]:
    """The held-out text sample for perplexity (none of these sentences was trained on).

    Args:
        kind: ``"generic"``: sentences from the random grammar mixed into training (unrelated to the facts;
            a disjoint sample); ``"facts"``: held-out-template sentences of core facts (query + object + ".");
            ``"all"`` (default): both, generic first.

    Examples:
        >>> texts = builtin_ppl_texts()
        >>> len(texts) == len(builtin_ppl_texts("generic")) + len(builtin_ppl_texts("facts"))
        True
    """
    check_choice("kind", kind, _PPL_KINDS)
    texts = _blob()["ppl_texts"]
    if kind == "all":
        return list(texts["generic"]) + list(texts["facts"])
    return list(texts[kind])


def generic_ppl_texts() -> list[str]:
    """60 everyday English sentences for perplexity on any pretrained model (MIT, written for qloc_tl; see
    ``qloc_tl/data/text/README.md``). They name no entity of the bundled ParaRel facts.

    Examples:
        >>> texts = generic_ppl_texts()
        >>> len(texts), texts[0].endswith(".")
        (60, True)
    """
    from pathlib import Path

    path = Path(__file__).parent / "text" / "generic_en.txt"
    if not path.is_file():
        raise DataError(f"the text sample {str(path)!r} is missing; reinstall qloc_tl")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pararel_facts(relations: Iterable[str] | None = None, *, min_queries: int = 2) -> list[Fact]:
    """The bundled ParaRel / T-REx facts (every relation with ``[Y]``-final templates), with at least
    ``min_queries`` neighbor queries each. CC BY-NC 4.0: research use only.

    Examples:
        >>> facts = pararel_facts(["P36"])
        >>> facts[0].relation, len(facts[0].queries) >= 2
        ('P36', True)
    """
    from qloc_tl.data.facts import load_pararel

    return list(load_pararel(relations=relations, min_queries=min_queries).facts)
