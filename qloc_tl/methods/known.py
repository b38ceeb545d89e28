"""Which facts a model knows: batched next-token predictions and :func:`filter_known`.

The paper's analyses assume the model knows the fact it is asked about. On a pretrained LM many ParaRel
queries are not answered (a query with p(answer) ≈ 0.0005 still gets dozens of "knowledge neurons", which
inflate the union of a fact's KN sets and lower its Consistency Score). :func:`filter_known` restricts every
fact to the neighbor queries the model answers and drops facts left with too few.

Multi-token objects — one policy for every stage. Every stage asks for the object's **first token** (the
target of attribution, mapping, synapses, dynamic selection and editing). So that the first token stands for
the whole object, :func:`filter_known` by default (``multi_token="whole"``) counts a query as known only when
*every* token of the object is the model's top-1 prediction under teacher forcing (the model would generate
the object greedily); ``multi_token="drop"`` drops facts whose object is several tokens, and
``multi_token="first"`` judges the first token alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.model import TLModel, check_model, require_eval
from qloc_tl.core.tokens import to_tokens, tokenize_prompts
from qloc_tl.core.validation import check_choice, require_finite_logits
from qloc_tl.data.facts import Fact

logger = logging.getLogger(__name__)

__all__ = [
    "Criterion", "MultiTokenPolicy", "KnownFacts", "next_token_probs", "filter_known", "object_tokens",
    "restrict_to_known",
]  # fmt: skip

Criterion = Literal["top1", "prob"]
MultiTokenPolicy = Literal["whole", "first", "drop"]

_QUERY_COLUMNS = [
    "fact_key", "relation", "subject", "object", "query_index", "text", "n_object_tokens", "prob", "rank",
    "top1_token", "known",
]  # fmt: skip
_DROP_COLUMNS = ["fact_key", "relation", "subject", "object", "n_queries", "n_known", "reason"]


def next_token_probs(
    model: TLModel,
    prompts: Sequence[str] | Sequence[Tensor] | Tensor,
    *,
    batch_size: int = 32,
    prepend_bos: bool | None = None,
) -> Float[Tensor, "n vocab"]:
    """The model's next-token distribution after each prompt (float32, on the CPU), in batches.

    Prompts of different lengths are right-padded within a batch; each row is read at its prompt's last real
    token, which for a causal model equals running the prompt alone.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> import torch
        >>> probs = next_token_probs(tiny_model(), [torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
        >>> probs.shape[0], bool(torch.allclose(probs.sum(-1), torch.ones(2)))
        (2, True)
    """
    check_model(model)
    require_eval(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows: list[Any] = list(prompts) if not isinstance(prompts, Tensor) else list(prompts if prompts.ndim == 2 else prompts[None])
    if not rows:
        raise InvalidInputError("no prompts given")
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            toks, last = tokenize_prompts(model, rows[start : start + batch_size], prepend_bos=prepend_bos)
            logits = model(toks)
            require_finite_logits(model, logits, toks)
            out.append(logits[torch.arange(len(last)), last].float().softmax(-1).cpu())
    return torch.cat(out)


def object_tokens(model: TLModel, prompt: str, obj: str) -> list[int]:
    """The tokens of ``obj`` as the continuation of ``prompt`` (``prompt + " " + obj`` minus the prompt's
    tokens; the same rule as :func:`qloc_tl.core.tokens.answer_token_id`, which returns the first of them)."""
    p = to_tokens(model, prompt)[0].tolist()
    full = to_tokens(model, prompt.rstrip() + " " + obj.strip())[0].tolist()
    if full[: len(p)] == p and len(full) > len(p):
        return full[len(p) :]
    return to_tokens(model, " " + obj.strip(), prepend_bos=False)[0].tolist()


@dataclass(frozen=True)
class KnownFacts:
    """What :func:`filter_known` kept and why.

    Attributes:
        facts: the kept facts, each restricted to its known queries (in their original order).
        queries: one row per asked query: ``fact_key, relation, subject, object, query_index, text,
            n_object_tokens, prob`` (p of the object's first token), ``rank`` (0 = top-1), ``top1_token``,
            ``known``.
        dropped: one row per dropped fact: ``fact_key, relation, subject, object, n_queries, n_known,
            reason`` (``"multi-token object"`` or ``"known queries n < min_queries"``).
        criterion, min_prob, min_queries, multi_token: the settings used.
    """

    facts: tuple[Fact, ...]
    queries: pd.DataFrame
    dropped: pd.DataFrame
    criterion: str
    min_prob: float
    min_queries: int
    multi_token: str

    def kept_queries(self) -> dict[str, tuple[int, ...]]:
        """Kept fact key → the indices of its known queries in the fact as it was given."""
        q = self.queries[self.queries["known"]]
        kept = {f.key for f in self.facts}
        out: dict[str, list[int]] = {}
        for key, qi in zip(q["fact_key"], q["query_index"]):
            if key in kept:
                out.setdefault(key, []).append(int(qi))
        return {k: tuple(v) for k, v in out.items()}

    def per_relation(self) -> pd.DataFrame:
        """Per relation: facts asked, facts kept, queries asked, queries known, share of known queries."""
        q = self.queries
        if q.empty:
            return pd.DataFrame(columns=["relation", "facts", "facts_kept", "queries", "queries_known", "known_share"])
        kept = pd.Series([f.relation for f in self.facts], dtype=object).value_counts()
        g = q.groupby("relation", sort=True)
        df = pd.DataFrame(
            {
                "facts": g["fact_key"].nunique(),
                "facts_kept": kept.reindex(g.size().index).fillna(0).astype(int),
                "queries": g.size(),
                "queries_known": g["known"].sum().astype(int),
            }
        )
        df["known_share"] = (df["queries_known"] / df["queries"]).round(4)
        return df.reset_index()



def filter_known(
    model: TLModel,
    facts: Sequence[Fact],
    *,
    criterion: Criterion = "top1",
    min_prob: float = 0.1,
    min_queries: int = 2,
    multi_token: MultiTokenPolicy = "whole",
    batch_size: int = 32,
    show_progress: bool = False,
) -> KnownFacts:
    """Restrict facts to the neighbor queries the model knows; drop facts with fewer than ``min_queries``.

    A query is known when the object's first token is the model's top-1 next token (``criterion="top1"``,
    the default) or has probability ≥ ``min_prob`` (``criterion="prob"``). For objects of several tokens see
    the module docstring (``multi_token``: ``"whole"`` — every token top-1 / ≥ ``min_prob`` under teacher
    forcing —, ``"first"`` or ``"drop"``).

    Args:
        model: a TL model in eval mode with a tokenizer.
        facts: :class:`~qloc_tl.data.facts.Fact` objects.
        criterion: ``"top1"`` or ``"prob"``.
        min_prob: the probability threshold of ``criterion="prob"`` (in (0, 1]).
        min_queries: facts with fewer known queries are dropped (≥ 1).
        multi_token: ``"whole"``, ``"first"`` or ``"drop"``.
        batch_size: prompts per forward pass.
        show_progress: a tqdm bar over batches.

    Returns:
        :class:`KnownFacts` (kept facts, a per-query table and a table of dropped facts with the reason).

    Examples:
        >>> import qloc_tl as q
        >>> model = q.load_model("builtin")
        >>> kept = filter_known(model, q.data.builtin_facts()[:3])
        >>> len(kept.facts) + len(kept.dropped)
        3
    """
    from tqdm.auto import tqdm

    check_model(model)
    require_eval(model)
    check_choice("criterion", criterion, get_args(Criterion))
    check_choice("multi_token", multi_token, get_args(MultiTokenPolicy))
    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or not 0 < float(min_prob) <= 1:
        raise InvalidInputError(f"min_prob must be a number in (0, 1], got {min_prob!r}")
    for name, value in (("min_queries", min_queries), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    facts = list(facts)
    if not facts:
        raise InvalidInputError("no facts given")
    for f in facts:
        if not isinstance(f, Fact):
            raise InvalidInputError(f"facts must be Fact objects, got {type(f).__name__}")
    if getattr(model, "tokenizer", None) is None:
        raise InvalidInputError("filter_known needs a model with a tokenizer (facts are text)")

    # One teacher-forced step per object token: step k asks prompt + first k tokens of the object.
    items = []  # (fact index, query index, object tokens)
    for fi, f in enumerate(facts):
        for qi, q in enumerate(f.queries):
            items.append((fi, qi, object_tokens(model, q.text, f.object)))
    steps: list[tuple[int, int, Tensor]] = []  # (item, token position in the object, prompt tokens)
    for ii, (fi, qi, obj) in enumerate(items):
        base = to_tokens(model, facts[fi].queries[qi].text)[0]
        n = len(obj) if multi_token == "whole" else 1
        for k in range(n):
            ext = torch.tensor(obj[:k], dtype=base.dtype, device=base.device)
            steps.append((ii, k, torch.cat([base, ext])))
    ok = [[True] * (len(obj) if multi_token == "whole" else 1) for _, _, obj in items]
    first: dict[int, tuple[float, int, int]] = {}  # item → (p, rank, top-1 id) of the first object token
    bar = tqdm(total=len(steps), desc="known facts", disable=not show_progress)
    for start in range(0, len(steps), batch_size):
        chunk = steps[start : start + batch_size]
        probs = next_token_probs(model, [s[2] for s in chunk], batch_size=batch_size)
        for (ii, k, _), row in zip(chunk, probs):
            target = items[ii][2][k]
            p = float(row[target])
            ok[ii][k] = bool(int(row.argmax()) == target) if criterion == "top1" else p >= float(min_prob)
            if k == 0:
                rank = int((row > row[target]).sum())
                first[ii] = (p, rank, int(row.argmax()))
        bar.update(len(chunk))
    bar.close()

    tok = model.tokenizer
    qrows = []
    known_q: dict[int, list[int]] = {}
    for ii, (fi, qi, obj) in enumerate(items):
        f = facts[fi]
        p, rank, top = first[ii]
        known = all(ok[ii]) and not (multi_token == "drop" and len(obj) > 1)
        if known:
            known_q.setdefault(fi, []).append(qi)
        qrows.append(
            {
                "fact_key": f.key, "relation": f.relation, "subject": f.subject, "object": f.object,
                "query_index": qi, "text": f.queries[qi].text, "n_object_tokens": len(obj), "prob": p, "rank": rank,
                "top1_token": tok.decode([top]), "known": known,
            }
        )  # fmt: skip
    kept: list[Fact] = []
    drows = []
    n_tokens = {fi: len(obj) for fi, _, obj in items}
    for fi, f in enumerate(facts):
        qs = known_q.get(fi, [])
        if multi_token == "drop" and n_tokens[fi] > 1:
            reason = "multi-token object"
        elif len(qs) < min_queries:
            reason = f"known queries {len(qs)} < min_queries {min_queries}"
        else:
            kept.append(Fact(f.subject, f.relation, f.object, tuple(f.queries[i] for i in qs), f.uuid))
            continue
        drows.append(
            {"fact_key": f.key, "relation": f.relation, "subject": f.subject, "object": f.object,
             "n_queries": len(f.queries), "n_known": len(qs), "reason": reason}
        )  # fmt: skip
    logger.info("filter_known: kept %d of %d facts (%d of %d queries known)", len(kept), len(facts),
                sum(len(v) for v in known_q.values()), len(items))  # fmt: skip
    return KnownFacts(
        facts=tuple(kept),
        queries=pd.DataFrame(qrows, columns=_QUERY_COLUMNS),
        dropped=pd.DataFrame(drows, columns=_DROP_COLUMNS),
        criterion=criterion,
        min_prob=float(min_prob),
        min_queries=min_queries,
        multi_token=multi_token,
    )


def restrict_to_known(
    model: TLModel, facts: Sequence[Fact], known_only: bool | None, *, what: str = "the experiment"
) -> tuple[list[Fact], KnownFacts | None]:
    """The experiment runners' policy: with ``known_only=None`` facts are filtered by :func:`filter_known`
    (defaults) on every model except the built-in fact model, which was trained on its facts; ``True``
    always filters, ``False`` never does.

    Returns:
        ``(facts, known)``: the facts to use and the :class:`KnownFacts` (``None`` when not filtered).
    """
    from qloc_tl.zoo import is_builtin_model

    if known_only is not None and not isinstance(known_only, bool):
        raise InvalidInputError(f"known_only must be True, False or None, got {known_only!r}")
    facts = list(facts)
    if known_only is False or (known_only is None and is_builtin_model(model)):
        return facts, None
    known = filter_known(model, facts)
    if not known.facts:
        raise InvalidInputError(
            f"the model knows none of the {len(facts)} facts given to {what} (top-1 on at least 2 queries); "
            f"pass known_only=False to use them anyway"
        )
    if len(known.facts) < len(facts) or sum(len(f.queries) for f in known.facts) < sum(len(f.queries) for f in facts):
        logger.warning(
            "%s: kept %d of %d facts, %d of %d queries, that the model answers top-1 (known_only=False keeps all)",
            what, len(known.facts), len(facts), int(known.queries["known"].sum()), len(known.queries),
        )  # fmt: skip
    return list(known.facts), known
