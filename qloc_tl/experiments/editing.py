"""The knowledge-editing experiment of Chen et al. (ICLR 2025): erase and update K_C and K_I facts through
their N_i, N_u and CAS neuron sets, and score each edit.

The pieces it combines live in their own modules: the weight edits in :mod:`qloc_tl.core.edits`, the neuron
sets in :mod:`qloc_tl.methods.cas`, the metrics in :mod:`qloc_tl.methods.edit_metrics`. The bar chart is
:func:`qloc_tl.reporting.editing_plots.plot_editing` and the verdicts on the paper's editing claims are
:func:`qloc_tl.reporting.claims.editing_claims`.

:func:`run_editing_experiment` edits each fact with every configured method × edit and writes one row per
(fact, method, edit) with Rel, Gen, Loc (facts of other relations), ``loc_same`` (other facts of the same
relation: on a real model a relation's facts share KNs, so the two Localities can differ widely), Avg (with
the other-relation Loc, the lineage's definition) and ΔPPL; :func:`summarize` aggregates the rows into the (edit × class × method) table of
:class:`EditingResult`. With ``out_dir`` the rows are stored per chunk of facts and a rerun resumes where
the last one stopped.

To split facts into K_C / K_I over all facts first (e.g. with Otsu's threshold) rather than per fact with
the static threshold: :func:`fact_attributions` → :func:`kn_sets_from_attributions` →
:func:`qloc_tl.methods.consistency_score.classify_facts`, then pass ``classes=`` and ``attributions=``.
Measured numbers on the built-in model and on SmolLM2 are on the documentation's editing page.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from qloc_tl.core.edits import erase, update
from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import TLModel, check_model, d_mlp, n_layers, require_eval
from qloc_tl.core.stats import seeded_random
from qloc_tl.core.store import RunStore
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.core.validation import check_nonempty
from qloc_tl.data.facts import Fact
from qloc_tl.experiments.editing_config import ALL_METHODS, CLASSES, EDITS, METHODS, EditingConfig
from qloc_tl.methods.attribution import NeuronSet, attribute_neurons
from qloc_tl.methods.cas import fact_neuron_sets, query_kn_sets
from qloc_tl.methods.consistency_score import consistency_score
from qloc_tl.methods.edit_metrics import (
    TokenBatch,
    batch_perplexity,
    edit_metrics,
    last_token_logprobs,
    text_batches,
)
from qloc_tl.methods.known import restrict_to_known

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ALL_METHODS",
    "EDITS",
    "CLASSES",
    "EditingConfig",
    "EditingResult",
    "summarize",
    "fact_attributions",
    "kn_sets_from_attributions",
    "run_editing_experiment",
]


@dataclass(frozen=True)
class EditingResult:
    """What :func:`run_editing_experiment` produced.

    Attributes:
        table: one row per (edit, class, method): ``n_facts``, mean ``rel``, ``gen``, ``loc``, ``avg``
            (= (rel+gen+loc)/3 of the means), ``ppl_delta``, ``ppl_rel_delta`` (and its median),
            ``n_neurons`` and the mean probability changes.
        rows: one row per (fact, method, edit).
        skipped: one row per skipped fact with its ``reason``.
        config: the configuration.
        out_dir: the run directory (``None`` when not persisted).
    """

    table: pd.DataFrame
    rows: pd.DataFrame
    skipped: pd.DataFrame
    config: EditingConfig
    out_dir: Path | None = None

    def to_markdown(self, digits: int = 3) -> str:
        """The table as a Markdown pipe table (no extra dependency)."""
        cols = [
            "edit",
            "class",
            "method",
            "n_facts",
            "rel",
            "gen",
            "loc",
            "avg",
            "ppl_delta",
            "ppl_rel_delta",
            "n_neurons",
        ]
        cols = [c for c in cols if c in self.table.columns]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in self.table[cols].iterrows():
            cells = []
            for c in cols:
                v = r[c]
                cells.append(f"{v:.{digits}f}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def summarize(rows: pd.DataFrame, config: EditingConfig | None = None) -> pd.DataFrame:
    """Aggregate per-fact rows into the (edit × class × method) table: means over facts (ignoring ``nan``),
    ``avg`` = (rel + gen + loc) / 3 of those means, plus the median relative ΔPPL (ΔPPL is heavy-tailed)."""
    cfg = config or EditingConfig()
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    out = []
    for edit in cfg.edits:
        for cls in CLASSES:
            for method in cfg.methods:
                g = (
                    ok[(ok["edit"] == edit) & (ok["class"] == cls) & (ok["method"] == method)]
                    if len(ok)
                    else ok
                )
                rec: dict[str, Any] = {"edit": edit, "class": cls, "method": method, "n_facts": int(len(g))}
                for c in ("rel", "gen", "loc", "loc_same", "ppl_delta", "ppl_rel_delta", "n_neurons",
                          "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors"):  # fmt: skip
                    has = c in g.columns and len(g) and g[c].notna().any()  # given rows may lack a column
                    rec[c] = float(g[c].astype(float).mean()) if has else math.nan
                rec["avg"] = (rec["rel"] + rec["gen"] + rec["loc"]) / 3
                v = g["ppl_rel_delta"].astype(float).dropna() if len(g) else pd.Series(dtype=float)
                rec["ppl_rel_delta_median"] = float(v.median()) if len(v) else math.nan
                out.append(rec)
    cols = ["edit", "class", "method", "n_facts", "rel", "gen", "loc", "loc_same", "avg", "ppl_delta", "ppl_rel_delta",
            "ppl_rel_delta_median", "n_neurons", "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors"]  # fmt: skip
    return pd.DataFrame(out, columns=cols)



def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scores_of(obj: Any) -> Tensor:
    scores = getattr(obj, "scores", obj)
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(np.asarray(scores))
    return scores.detach().float().cpu()


def _decode(model: TLModel, t: int) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return str(t)
    try:
        return tok.decode([t]).strip()
    except Exception:  # noqa: BLE001
        return str(t)


@dataclass
class _RunState:
    """Caches shared across facts within one run (never persisted)."""

    logits_cache: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))


def _skip(fact: Fact, reason: str, **extra: Any) -> list[dict[str, Any]]:
    row = {"fact_key": fact.key, "relation": fact.relation, "subject": fact.subject, "object": fact.object,
           "status": reason}  # fmt: skip
    row.update(extra)
    return [row]


def run_editing_experiment(
    model: TLModel,
    facts: Sequence[Fact],
    *,
    config: EditingConfig | None = None,
    classes: Mapping[str, str] | None = None,
    attributions: Mapping[str, Any] | None = None,
    unrelated_facts: Sequence[Fact] | None = None,
    ppl_texts: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    show_progress: bool = False,
    known_only: bool | None = None,
) -> EditingResult:
    """Erase and update K_C and K_I facts with N_i, N_u and CAS neuron sets; score Rel/Gen/Loc/ΔPPL.

    Per fact (in order, skipping facts already stored in ``out_dir``):

    1. next-token predictions of all its queries; skip it unless some query predicts the gold object
       (``require_known``); pick the edited query q_i (seeded) and o (top-1 or gold);
    2. per-query attributions ``[k, n_layers, d_mlp]``: ``attributions[fact.key]`` (a tensor or an object
       with ``.scores``) or one ``attribute_neurons`` call over the fact's queries (gold answer);
    3. per-query KN sets (fraction of max ``kn_threshold``); the class: ``classes[fact.key]`` or, when
       ``classes`` is None, ``consistency_score`` of the KN sets against ``cs_threshold`` (facts with
       ``nan`` CS — no KN at all — are skipped);
    4. neuron sets N_i, N_u, CAS; o' = a seeded random other object of the same relation (drawn from the
       pool, ``unrelated_facts`` or ``facts``) that is a single token;
    5. for each method × edit: apply the edit in a context, evaluate all the fact's queries, ``n_unrelated``
       queries of facts of other relations, ``n_same_relation`` queries of other facts of its relation and
       the PPL texts, restore; :func:`~qloc_tl.methods.edit_metrics.edit_metrics` and ``loc_same``.

    An empty neuron set is not edited: its row holds the unedited model's metrics and ``n_neurons = 0``.

    Args:
        model: an eval-mode TL model.
        facts: the facts to edit (unique ``Fact.key``).
        config: :class:`EditingConfig` (default: all defaults).
        classes: optional ``{fact_key: "K_C" | "K_I" | "excluded"}`` — e.g.
            ``run_consistency(...).classes("ig", "otsu")``; facts missing from it or excluded are skipped.
            ``None``: each fact is classified on the fly with the static ``config.cs_threshold``.
        attributions: optional precomputed per-query attributions by fact key.
        unrelated_facts: the fact pool that Locality queries and o' are drawn from (default: ``facts``).
            Both depend on the pool, so it is part of the run's fingerprint: pass a fixed pool to extend a
            run directory with more facts later.
        ppl_texts: held-out sentences for PPL (``None``: PPL columns are ``nan``).
        out_dir: run directory (:class:`~qloc_tl.core.store.RunStore`); parts per chunk of facts, final tables
            ``editing_rows`` and ``editing_table``.
        resume: reuse stored facts of the same configuration (see ``RunStore.open``).
        show_progress: a tqdm bar over facts.
        known_only: restrict facts to the queries the model answers top-1 (:func:`qloc_tl.methods.known.filter_known`;
            ``attributions`` follow their queries). ``None`` (default): on every model but the built-in one.

    Returns:
        :class:`EditingResult`.
    """
    cfg = config or EditingConfig()
    if not isinstance(cfg, EditingConfig):
        raise InvalidInputError(f"config must be an EditingConfig, got {type(cfg).__name__}")
    check_model(model)
    require_eval(model)
    facts = list(facts)
    if not all(isinstance(f, Fact) for f in facts):
        raise InvalidInputError("facts must be qloc_tl.Fact objects")
    keys = [f.key for f in facts]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise InvalidInputError(f"duplicate fact keys {dup}; give each fact once")
    facts, known = restrict_to_known(model, facts, known_only, what="run_editing_experiment")
    if known is not None and attributions is not None:
        kept = known.kept_queries()
        attributions = {k: _scores_of(v)[list(kept[k])] for k, v in attributions.items() if k in kept}
    if classes is not None:
        bad = {k: v for k, v in classes.items() if v not in (*CLASSES, "excluded")}
        if bad:
            raise InvalidInputError(
                f"classes must map fact keys to 'K_C', 'K_I' or 'excluded' (e.g. ConsistencyResult.classes()), "
                f"got {dict(list(bad.items())[:3])}"
            )
    pool = list(unrelated_facts) if unrelated_facts is not None else facts
    texts = list(ppl_texts) if ppl_texts is not None else []

    store = None
    if out_dir is not None:
        store_cfg = {
            "editing": cfg.to_dict(),
            "model": {
                "class": type(model).__name__,
                "n_layers": n_layers(model),
                "d_model": int(model.cfg.d_model),
                "d_mlp": d_mlp(model),
                "d_vocab": int(model.cfg.d_vocab),
                "compat": bool(getattr(model, "compatibility_mode", False)),
            },
            "ppl_texts": _digest(texts),
            "unrelated": _digest(sorted(f.key for f in pool)),
            "classes": _digest(sorted(classes.items())) if classes is not None else None,
            "attributions": "given" if attributions is not None else "computed",
        }
        store = RunStore.open(out_dir, store_cfg, resume=resume)
    done = store.done("rows") if store is not None else set()
    old_rows = store.read("rows") if store is not None else pd.DataFrame()
    state = _RunState()
    if len(old_rows):
        ok = old_rows[old_rows["status"] == "ok"].drop_duplicates("fact_key")
        for cls in CLASSES:
            state.counts[cls] = int((ok["class"] == cls).sum())

    ppl_batches = text_batches(model, texts, batch_size=cfg.batch_size) if texts else []
    ppl_before = batch_perplexity(model, ppl_batches) if texts else math.nan
    objects_by_rel: dict[str, list[str]] = {}
    for f in pool:
        lst = objects_by_rel.setdefault(f.relation, [])
        if f.object not in lst:
            lst.append(f.object)

    todo = [f for f in facts if f.key not in done]
    if done:
        logger.info(
            "resuming: %d of %d facts already stored in %s", len(facts) - len(todo), len(facts), out_dir
        )
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="editing", unit="fact")
    new_rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(todo), cfg.chunk_size):
            if _all_full(cfg, state):
                break
            chunk = todo[start : start + cfg.chunk_size]
            chunk_rows: list[dict[str, Any]] = []
            chunk_keys: list[str] = []
            for fact in chunk:
                if _all_full(cfg, state):
                    break
                rows = _process_fact(
                    model,
                    fact,
                    cfg,
                    state,
                    classes,
                    attributions,
                    pool,
                    objects_by_rel,
                    ppl_batches,
                    ppl_before,
                )
                chunk_rows += rows
                chunk_keys.append(fact.key)
                if rows and rows[0]["status"] == "ok":
                    state.counts[rows[0]["class"]] += 1
                if bar is not None:
                    bar.update(1)
            if store is not None and chunk_keys:
                store.write_part("rows", chunk_keys, _frame(chunk_rows))
            new_rows += chunk_rows
    finally:
        if bar is not None:
            bar.close()

    if store is not None:
        all_rows = store.read("rows")
        if len(all_rows):
            all_rows = all_rows.drop_duplicates(["fact_key", "method", "edit", "status"], keep="last")
    else:
        all_rows = _frame(new_rows)
    all_rows = _frame(all_rows.to_dict("records") if len(all_rows) else [])
    ok_rows = all_rows[all_rows["status"] == "ok"].reset_index(drop=True)
    skipped = all_rows[all_rows["status"] != "ok"][["fact_key", "relation", "subject", "object", "status"]]
    skipped = skipped.rename(columns={"status": "reason"}).reset_index(drop=True)
    table = summarize(ok_rows, cfg)
    present = set(ok_rows["class"].dropna()) if len(ok_rows) else set()
    if present and present != set(CLASSES):
        missing_cls = sorted(set(CLASSES) - present)
        hint = (
            f" (every CS was on one side of the static cs_threshold={cfg.cs_threshold}; classify with "
            f"classify_facts(kn_sets_from_attributions(fact_attributions(...)), threshold='otsu') and pass classes=)"
            if classes is None
            else ""
        )
        logger.warning("no edited facts in class %s%s", ", ".join(missing_cls), hint)
    if store is not None:
        store.write_table("editing_rows", all_rows)
        store.write_table("editing_table", table)
    logger.info(
        "editing: %d facts edited (K_C %d, K_I %d), %d skipped",
        ok_rows["fact_key"].nunique() if len(ok_rows) else 0, state.counts["K_C"], state.counts["K_I"], len(skipped),
    )  # fmt: skip
    return EditingResult(table, ok_rows, skipped, cfg, Path(out_dir) if out_dir is not None else None)


_ROW_COLS = [
    "fact_key", "relation", "subject", "object", "status", "class", "cs", "method", "edit", "n_neurons",
    "n_layers_touched", "edited_query", "old_token", "new_token", "old_object", "new_object", "n_queries",
    "n_neighbors", "n_unrelated", "n_same_relation", "rel", "gen", "loc", "loc_same", "avg", "ppl_before", "ppl_after", "ppl_delta",
    "ppl_rel_delta", "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors",
]  # fmt: skip


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in _ROW_COLS:
        if c not in df.columns:
            df[c] = None
    df = df[_ROW_COLS]
    for c in ("fact_key", "relation", "subject", "object", "status", "class", "method", "edit", "edited_query",
              "old_object", "new_object"):  # fmt: skip
        df[c] = df[c].astype("string")
    for c in ("cs", "rel", "gen", "loc", "loc_same", "avg", "ppl_before", "ppl_after", "ppl_delta", "ppl_rel_delta",
              "dprob_old_edited", "dprob_new_edited", "dprob_old_neighbors", "dprob_new_neighbors"):  # fmt: skip
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in (
        "n_neurons",
        "n_layers_touched",
        "old_token",
        "new_token",
        "n_queries",
        "n_neighbors",
        "n_unrelated",
        "n_same_relation",
    ):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    return df


def _all_full(cfg: EditingConfig, state: _RunState) -> bool:
    m = cfg.max_facts_per_class
    return m is not None and all(state.counts[c] >= m for c in CLASSES)


def _unrelated_prompts(fact: Fact, pool: Sequence[Fact], cfg: EditingConfig) -> list[str]:
    if cfg.n_unrelated == 0:
        return []
    rng = seeded_random(cfg.seed, "unrelated", fact.key)
    others = [f for f in pool if f.relation != fact.relation]
    if not others:  # one relation only: fall back to other subjects of the same relation
        others = [f for f in pool if f.key != fact.key and f.subject != fact.subject]
    if not others:
        return []
    chosen = rng.sample(others, min(cfg.n_unrelated, len(others)))
    return [rng.choice(f.queries).text for f in chosen]


def _same_relation_prompts(fact: Fact, pool: Sequence[Fact], cfg: EditingConfig) -> list[str]:
    """One query each of up to ``n_same_relation`` other facts of the fact's relation, with another subject
    and another object (a fact sharing the object would make an erase of o look like a Locality failure)."""
    if cfg.n_same_relation == 0:
        return []
    rng = seeded_random(cfg.seed, "same_relation", fact.key)
    others = [
        f for f in pool
        if f.relation == fact.relation and f.key != fact.key and f.subject != fact.subject and f.object != fact.object
    ]  # fmt: skip
    chosen = rng.sample(others, min(cfg.n_same_relation, len(others)))
    return [rng.choice(f.queries).text for f in chosen]


def _top1_kept(before: Tensor | None, after: Tensor | None) -> float:
    """The fraction of rows whose argmax is unchanged (``nan`` for no rows)."""
    if before is None or after is None or before.shape[0] == 0:
        return math.nan
    return float((before.argmax(-1) == after.argmax(-1)).double().mean())


def _new_object(
    model: TLModel, fact: Fact, prompt: str, old_token: int, gold: int, objects: Sequence[str], cfg: EditingConfig
) -> tuple[str, int] | None:
    rng = seeded_random(cfg.seed, "new_object", fact.key)
    cands = [o for o in objects if o != fact.object]
    rng.shuffle(cands)
    for obj in cands:
        try:
            t = answer_token_id(model, prompt, obj)
        except InvalidInputError:
            continue
        if t not in (old_token, gold):
            return obj, t
    return None


def _check_fact_scores(model: TLModel, fact: Fact, scores: Tensor) -> Tensor:
    if scores.ndim == 2:
        scores = scores.unsqueeze(0)
    expected = (len(fact.queries), n_layers(model), d_mlp(model))
    if tuple(scores.shape) != expected:
        raise InvalidInputError(
            f"attributions of fact {fact.key!r} have shape {tuple(scores.shape)}, expected {expected} "
            f"(one [n_layers, d_mlp] map per query, in the order of fact.queries)"
        )
    return scores


def _attribute_fact(model: TLModel, fact: Fact, cfg: EditingConfig) -> Tensor:
    prompts = list(fact.prompts)
    attr = attribute_neurons(
        model, prompts, [fact.object] * len(prompts), method=cfg.attribution_method, steps=cfg.steps,
        site=cfg.site, show_progress=False,
    )  # fmt: skip
    return _check_fact_scores(model, fact, _scores_of(attr))


def fact_attributions(
    model: TLModel,
    facts: Sequence[Fact],
    *,
    config: EditingConfig | None = None,
    show_progress: bool = False,
) -> dict[str, Float[Tensor, "k n_layers d_mlp"]]:
    """Per-query attributions of each fact (one ``attribute_neurons`` call per fact over its queries, gold
    object; ``config.attribution_method`` / ``steps`` / ``site``), keyed by ``Fact.key``.

    Pass the result to :func:`kn_sets_from_attributions` (then ``classify_facts``) and as ``attributions=`` to
    :func:`run_editing_experiment` to classify every fact first (e.g. with Otsu's threshold) without
    attributing twice. Memory: ``k · n_layers ·
    d_mlp`` floats per fact (CPU).
    """
    cfg = config or EditingConfig()
    check_model(model)
    require_eval(model)
    facts = list(check_nonempty("facts", facts))
    out: dict[str, Tensor] = {}
    it: Iterable[Fact] = facts
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(facts, desc="attribution", unit="fact")
    for f in it:
        out[f.key] = _attribute_fact(model, f, cfg)
    return out


def kn_sets_from_attributions(
    attributions: Mapping[str, Any], kn_threshold: float = 0.2
) -> dict[str, list[NeuronSet]]:
    """Per-query KN sets of each fact, ``{fact_key: [NeuronSet per query]}``, from per-query attributions
    ``{fact_key: [k, n_layers, d_mlp]}`` (a tensor or an object with ``.scores``, e.g. :func:`fact_attributions`):
    the neurons scoring ≥ ``kn_threshold``·max of their query's map (:func:`qloc_tl.methods.cas.query_kn_sets`),
    the sets the experiment itself derives per fact.

    Classify the facts with :func:`qloc_tl.methods.consistency_score.classify_facts` on the result.

    Examples:
        >>> from qloc_tl.methods.consistency_score import classify_facts
        >>> s = torch.zeros(2, 1, 4); s[:, 0, 0] = 1.0; s[1, 0, 3] = 0.9
        >>> kn = kn_sets_from_attributions({"f": s})
        >>> [[str(n) for n in q] for q in kn["f"]]
        [['L0N0'], ['L0N0', 'L0N3']]
        >>> classify_facts(kn).classes     # CS = 1 shared of 2 = 0.5 >= 0.3
        {'f': 'K_C'}
    """
    return {
        k: query_kn_sets(_scores_of(v), kn_threshold, what=f"attributions[{k!r}]")
        for k, v in attributions.items()
    }


def _process_fact(
    model: TLModel,
    fact: Fact,
    cfg: EditingConfig,
    state: _RunState,
    classes: Mapping[str, str] | None,
    attributions: Mapping[str, Any] | None,
    pool: Sequence[Fact],
    objects_by_rel: Mapping[str, Sequence[str]],
    ppl_batches: Sequence[TokenBatch],
    ppl_before: float,
) -> list[dict[str, Any]]:
    k = len(fact.queries)
    if k < 2:
        return _skip(fact, "too_few_queries")
    cls = None
    if classes is not None:
        cls = classes.get(fact.key)
        if cls is None:
            return _skip(fact, "no_class")
        if cls == "excluded":
            return _skip(fact, "excluded")
        if cfg.max_facts_per_class is not None and state.counts[cls] >= cfg.max_facts_per_class:
            return _skip(fact, "class_full", **{"class": cls})
    prompts = list(fact.prompts)
    # the object's first token, as in every stage (see qloc_tl.methods.known for the multi-token policy)
    gold = answer_token_id(model, prompts[0], fact.object, multi_token="first")
    before = last_token_logprobs(model, prompts, batch_size=cfg.batch_size)  # [k, V]
    top1 = before.argmax(-1)
    known = [j for j in range(k) if int(top1[j]) == gold]
    if cfg.require_known and not known:
        return _skip(fact, "not_known")
    candidates = known if cfg.require_known else list(range(k))
    i = (
        candidates[0]
        if cfg.edit_query == "first"
        else seeded_random(cfg.seed, "edit_query", fact.key).choice(candidates)
    )
    o = int(top1[i]) if cfg.old_object == "top1" else gold

    if attributions is not None and fact.key in attributions:
        scores = _check_fact_scores(model, fact, _scores_of(attributions[fact.key]))
    else:
        scores = _attribute_fact(model, fact, cfg)
    sets, per_query = fact_neuron_sets(
        scores, i, kn_threshold=cfg.kn_threshold, beta1=cfg.cas_beta1, beta2=cfg.cas_beta2, spread=cfg.cas_spread,
        normalize=cfg.cas_normalize, cas_method=cfg.cas_method, cas_value=cfg.cas_value,
    )  # fmt: skip
    cs = consistency_score(per_query, mode=cfg.cs_mode)
    if cls is None:
        if math.isnan(cs):
            return _skip(fact, "no_kn", cs=cs)
        cls = "K_C" if cs >= cfg.cs_threshold else "K_I"
        if cfg.max_facts_per_class is not None and state.counts[cls] >= cfg.max_facts_per_class:
            return _skip(fact, "class_full", cs=cs, **{"class": cls})

    new = None
    if "update" in cfg.edits:
        new = _new_object(model, fact, prompts[i], o, gold, objects_by_rel.get(fact.relation, []), cfg)
        if new is None:
            return _skip(fact, "no_new_object", cs=cs, **{"class": cls})

    unrelated = _unrelated_prompts(fact, pool, cfg)
    same = _same_relation_prompts(fact, pool, cfg)
    missing = [p for p in dict.fromkeys(unrelated + same) if p not in state.logits_cache]
    if missing:
        lp = last_token_logprobs(model, missing, batch_size=cfg.batch_size)
        for p, row in zip(missing, lp):
            state.logits_cache[p] = row
    unrel_before = torch.stack([state.logits_cache[p] for p in unrelated]) if unrelated else None
    same_before = torch.stack([state.logits_cache[p] for p in same]) if same else None
    neighbors = [j for j in range(k) if j != i]

    base = {
        "fact_key": fact.key, "relation": fact.relation, "subject": fact.subject, "object": fact.object,
        "status": "ok", "class": cls, "cs": cs, "edited_query": prompts[i], "old_token": o,
        "old_object": _decode(model, o), "n_queries": k, "n_unrelated": len(unrelated), "n_same_relation": len(same),
    }  # fmt: skip
    rows = []
    for method in cfg.methods:
        neurons = list(sets[method])
        for edit in cfg.edits:
            after_q, after_u, ppl_after = _evaluate_edit(
                model,
                cfg,
                edit,
                neurons,
                o,
                new[1] if new else None,
                prompts,
                unrelated + same,
                ppl_batches,
                ppl_before,
            )
            same_after = after_u[len(unrelated) :] if (same and after_u is not None) else None
            after_u = after_u[: len(unrelated)] if (unrelated and after_u is not None) else None
            m = edit_metrics(
                edit,  # type: ignore[arg-type]
                edited_before=before[i], edited_after=after_q[i],
                neighbors_before=before[neighbors], neighbors_after=after_q[neighbors],
                unrelated_before=unrel_before, unrelated_after=after_u,
                old_token=o, new_token=new[1] if (new and edit == "update") else None,
                ppl_before=ppl_before, ppl_after=ppl_after,
            )  # fmt: skip
            d = m.as_dict()
            row = dict(base)
            row.update(
                method=method, edit=edit, n_neurons=len(neurons), n_layers_touched=len({n.layer for n in neurons}),
                new_token=new[1] if (new and edit == "update") else None,
                new_object=new[0] if (new and edit == "update") else None,
                n_neighbors=d["n_neighbors"], rel=d["reliability"], gen=d["generalization"], loc=d["locality"],
                loc_same=_top1_kept(same_before, same_after), avg=d["avg"], ppl_before=d["ppl_before"], ppl_after=d["ppl_after"], ppl_delta=d["ppl_delta"],
                ppl_rel_delta=d["ppl_rel_delta"], dprob_old_edited=d["dprob_old_edited"],
                dprob_new_edited=d["dprob_new_edited"], dprob_old_neighbors=d["dprob_old_neighbors"],
                dprob_new_neighbors=d["dprob_new_neighbors"],
            )  # fmt: skip
            rows.append(row)
    return rows


def _evaluate_edit(
    model: TLModel,
    cfg: EditingConfig,
    edit: str,
    neurons: list[Neuron],
    old_token: int,
    new_token: int | None,
    prompts: list[str],
    unrelated: list[str],
    ppl_batches: Sequence[TokenBatch],
    ppl_before: float,
) -> tuple[Tensor, Tensor | None, float]:
    if not neurons:
        ctx: Any = contextlib.nullcontext()
    elif edit == "erase":
        ctx = erase(model, neurons, value=cfg.erase_value, site=cfg.site, verify=cfg.verify_edits)
    else:
        ctx = update(
            model, neurons, old_token, new_token, lambda1=cfg.lambda1, lambda2=cfg.lambda2, rule=cfg.rule,  # type: ignore[arg-type]
            embedding=cfg.embedding, site=cfg.site, verify=cfg.verify_edits,
        )  # fmt: skip
    with ctx:
        lp = last_token_logprobs(model, prompts + unrelated, batch_size=cfg.batch_size)
        if not neurons:
            ppl_after = ppl_before
        else:
            ppl_after = batch_perplexity(model, ppl_batches) if ppl_batches else math.nan
    after_q = lp[: len(prompts)]
    after_u = lp[len(prompts) :] if unrelated else None
    return after_q, after_u, ppl_after
