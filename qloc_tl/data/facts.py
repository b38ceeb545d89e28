"""Facts, neighbor queries and the ParaRel loader.

A **fact** is a triple ⟨subject, relation, object⟩ with its **neighbor queries**: paraphrased prompts that
all ask for the object and end right before it (a causal LM predicts the object as the next token).

ParaRel templates are cloze patterns with ``[X]`` (subject) and ``[Y]`` (object). Only templates whose
``[Y]`` is final (ignoring a trailing period) can be asked of a causal LM; the others are excluded and
reported. Queries are the template text before ``[Y]`` with ``[X]`` filled and trailing space removed,
e.g. ``"[X] was born in [Y]."`` → ``"Allan Peiper was born in"``; the answer is the continuation
``" Alexandra"``.

Article agreement: a query ending in ``" a"`` is skipped for an object that starts with a vowel, and one
ending in ``" an"`` for an object that starts with a consonant (as ParaRel's own evaluation does).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qloc_tl.core.errors import DataError, InvalidInputError
from qloc_tl.core.validation import check_int

logger = logging.getLogger(__name__)

__all__ = ["Template", "Query", "Fact", "ParaRelData", "load_pararel", "packaged_pararel_dir"]


_FINAL_Y = re.compile(r"\[Y\]\s*\.?\s*$")


def _normalise(pattern: str) -> str:
    return re.sub(r"\s+", " ", pattern).strip()


@dataclass(frozen=True)
class Template:
    """A cloze template with one ``[X]`` and one final ``[Y]``.

    Examples:
        >>> Template("[X] was born in [Y].").fill("Ada Lovelace")
        'Ada Lovelace was born in'
        >>> Template("[Y] is the birthplace of [X].")
        Traceback (most recent call last):
        ...
        qloc_tl.core.errors.InvalidInputError: template '[Y] is the birthplace of [X].' does not end with [Y] ...
    """

    pattern: str

    def __post_init__(self) -> None:
        p = _normalise(self.pattern) if isinstance(self.pattern, str) else self.pattern
        if not isinstance(p, str):
            raise InvalidInputError(f"template must be a string, got {type(self.pattern).__name__}")
        for slot in ("[X]", "[Y]"):
            if p.count(slot) != 1:
                raise InvalidInputError(
                    f"template {self.pattern!r} must contain {slot} exactly once (found {p.count(slot)})"
                )
        if not _FINAL_Y.search(p):
            raise InvalidInputError(
                f"template {self.pattern!r} does not end with [Y] (a trailing period is allowed); a causal "
                f"LM can only be asked for the object as the next token"
            )
        if not p[: p.index("[Y]")].strip():
            raise InvalidInputError(f"template {self.pattern!r} has no text before [Y]")
        object.__setattr__(self, "pattern", p)

    @staticmethod
    def is_usable(pattern: str) -> bool:
        """True when ``pattern`` has one ``[X]`` and a final ``[Y]``."""
        try:
            Template(pattern)
        except InvalidInputError:
            return False
        return True

    def fill(self, subject: str) -> str:
        """The query for ``subject``: the text before ``[Y]`` with ``[X]`` replaced, right-stripped."""
        return self.pattern[: self.pattern.index("[Y]")].replace("[X]", subject).rstrip()


@dataclass(frozen=True)
class Query:
    """One neighbor query: the prompt text, the template it came from and whether that template was held
    out of training (for the built-in model)."""

    text: str
    template: str | None = None
    held_out: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise InvalidInputError(f"query text must be a non-empty string, got {self.text!r}")


@dataclass(frozen=True)
class Fact:
    """A fact ⟨subject, relation, object⟩ and its neighbor queries.

    ``queries`` may be given as strings or :class:`Query` objects; they are stored as a tuple of ``Query``.

    Examples:
        >>> f = Fact("Ada Lovelace", "P19", "London", ["Ada Lovelace was born in", "Ada Lovelace is from"])
        >>> f.prompts
        ('Ada Lovelace was born in', 'Ada Lovelace is from')
        >>> f.answer
        ' London'
    """

    subject: str
    relation: str
    object: str
    queries: tuple[Query, ...] = field(default=())
    uuid: str | None = None

    def __post_init__(self) -> None:
        for name in ("subject", "relation", "object"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise InvalidInputError(f"Fact.{name} must be a non-empty string, got {v!r}")
        if isinstance(self.queries, (str, Query)):
            raise InvalidInputError("Fact.queries must be a sequence of queries, not a single query")
        qs = tuple(q if isinstance(q, Query) else Query(q) for q in self.queries)
        if not qs:
            raise InvalidInputError(f"fact {self.subject!r} / {self.object!r} has no queries")
        object.__setattr__(self, "queries", qs)

    @property
    def prompts(self) -> tuple[str, ...]:
        """The query texts."""
        return tuple(q.text for q in self.queries)

    @property
    def answer(self) -> str:
        """The object as a continuation (leading space)."""
        return " " + self.object

    @property
    def key(self) -> str:
        """A stable identifier: the uuid when present, else ``relation|subject|object``."""
        return self.uuid or f"{self.relation}|{self.subject}|{self.object}"

    def require_neighbors(self, k: int = 2) -> None:
        """Raise unless the fact has at least ``k`` neighbor queries."""
        if len(self.queries) < k:
            raise InvalidInputError(
                f"fact {self.key!r} has {len(self.queries)} neighbor quer{'y' if len(self.queries) == 1 else 'ies'}; "
                f"at least {k} are needed"
            )


@dataclass(frozen=True)
class ParaRelData:
    """What :func:`load_pararel` read: the facts, the usable templates per relation, and what was excluded."""

    facts: tuple[Fact, ...]
    templates: dict[str, tuple[str, ...]]
    excluded_templates: dict[str, tuple[str, ...]]
    n_facts_in_files: dict[str, int]
    labels: dict[str, str]

    def by_relation(self) -> dict[str, list[Fact]]:
        out: dict[str, list[Fact]] = {}
        for f in self.facts:
            out.setdefault(f.relation, []).append(f)
        return out


def packaged_pararel_dir() -> Path:
    """The copy of the ParaRel patterns and T-REx facts shipped inside the package (see its NOTICE.md)."""
    return Path(__file__).parent / "pararel"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: malformed JSON line ({exc.msg})") from None
    return rows


def _article_ok(query: str, obj: str) -> bool:
    vowel = obj[:1].lower() in "aeiou"
    if query.endswith(" a") or query == "a":
        return not vowel
    if query.endswith(" an") or query == "an":
        return vowel
    return True


def load_pararel(
    path: str | os.PathLike[str] | None = None,
    *,
    relations: Iterable[str] | None = None,
    max_facts_per_relation: int | None = None,
    min_queries: int = 1,
) -> ParaRelData:
    """Load ParaRel patterns and T-REx facts into :class:`Fact` objects.

    Args:
        path: a ParaRel directory holding ``pattern_data/graphs_json/P*.jsonl`` and
            ``trex_lms_vocab/P*.jsonl`` (default: the copy shipped in the package).
        relations: relation ids to keep (default: every relation with patterns and facts).
        max_facts_per_relation: keep the first N facts of each relation file (file order).
        min_queries: drop facts with fewer usable queries (after article agreement).

    Returns:
        :class:`ParaRelData`; templates without a final ``[Y]`` are listed in ``excluded_templates``.

    Examples:
        >>> data = load_pararel(relations=["P19"], max_facts_per_relation=3)
        >>> len(data.facts), data.facts[0].relation
        (3, 'P19')
    """
    root = Path(path) if path is not None else packaged_pararel_dir()
    pat_dir = root / "pattern_data" / "graphs_json"
    fact_dir = root / "trex_lms_vocab"
    if not root.is_dir():
        raise DataError(f"ParaRel directory {str(root)!r} does not exist")
    if not pat_dir.is_dir() or not fact_dir.is_dir():
        raise DataError(
            f"{str(root)!r} is not a ParaRel directory: expected pattern_data/graphs_json/ and trex_lms_vocab/ inside"
        )
    check_int("max_facts_per_relation", max_facts_per_relation, 1, allow_none=True)
    check_int("min_queries", min_queries, 1)
    available = sorted(p.stem for p in pat_dir.glob("P*.jsonl") if (fact_dir / p.name).is_file())
    if relations is None:
        wanted = available
    else:
        if isinstance(relations, str):
            relations = [relations]
        wanted = list(dict.fromkeys(relations))
        if not wanted:
            raise InvalidInputError(
                "relations is empty: pass None for every relation, or at least one relation id"
            )
        unknown = [r for r in wanted if r not in available]
        if unknown:
            raise InvalidInputError(f"unknown relation(s) {unknown}; available: {', '.join(available)}")
    labels = _labels(root)
    facts: list[Fact] = []
    templates: dict[str, tuple[str, ...]] = {}
    excluded: dict[str, tuple[str, ...]] = {}
    counts: dict[str, int] = {}
    for rel in wanted:
        pats = []
        for row in _read_jsonl(pat_dir / f"{rel}.jsonl"):
            if "pattern" not in row:
                raise DataError(f"{pat_dir / (rel + '.jsonl')}: a line has no 'pattern' field")
            pats.append(_normalise(row["pattern"]))
        pats = list(dict.fromkeys(pats))
        usable = tuple(p for p in pats if Template.is_usable(p))
        templates[rel] = usable
        excluded[rel] = tuple(p for p in pats if p not in usable)
        rows = _read_jsonl(fact_dir / f"{rel}.jsonl")
        counts[rel] = len(rows)
        if max_facts_per_relation is not None:
            rows = rows[:max_facts_per_relation]
        tmpl = [Template(p) for p in usable]
        for row in rows:
            try:
                subj, obj = row["sub_label"], row["obj_label"]
            except KeyError as exc:
                raise DataError(f"{fact_dir / (rel + '.jsonl')}: a fact line lacks {exc.args[0]!r}") from None
            qs = []
            for t in tmpl:
                text = t.fill(subj)
                if _article_ok(text, obj):
                    qs.append(Query(text, t.pattern))
            if len(qs) >= min_queries and qs:
                facts.append(Fact(subj, rel, obj, tuple(qs), row.get("uuid")))
    logger.info("loaded %d facts from %d relations in %s", len(facts), len(wanted), root)
    return ParaRelData(tuple(facts), templates, excluded, counts, labels)


def _labels(root: Path) -> dict[str, str]:
    path = root / "lama" / "relations.jsonl"
    if not path.is_file():
        return {}
    return {r["relation"]: r.get("label", "") for r in _read_jsonl(path) if "relation" in r}


def facts_from_templates(
    triples: Sequence[tuple[str, str, str]], templates: dict[str, Sequence[str]]
) -> list[Fact]:
    """Build facts from ``(subject, relation, object)`` triples and per-relation templates."""
    out = []
    for subj, rel, obj in triples:
        if rel not in templates:
            raise InvalidInputError(f"no templates for relation {rel!r}")
        qs = [Query(Template(p).fill(subj), Template(p).pattern) for p in templates[rel]]
        out.append(Fact(subj, rel, obj, tuple(qs)))
    return out
