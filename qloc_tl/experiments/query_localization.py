"""One call for the Query Localization experiments: the Query-KN mapping and dynamic-KN-selection tables.

:func:`run_query_localization` does, for each fact (in chunks of ``config.chunk_size`` facts):

1. **KNs per query** — given (``kn_sets``) or localized with :func:`qloc_tl.methods.attribution.attribute_neurons`
   (``kn_method``, ``kn_steps``, ``kn_rule``) and :func:`qloc_tl.methods.attribution.select_neurons`
   (``kn_threshold_method``, ``kn_threshold``);
2. **CS** of the fact (:func:`qloc_tl.experiments.consistency.consistency_score`, ``cs_mode``);
3. **Query-KN mapping** rows (:func:`qloc_tl.experiments.mapping.measure_query_kn_mapping`): Self / Union / Intersection /
   Refine / Unrelated × suppress / enhance;
4. **knowledge synapses** of each query (:func:`qloc_tl.methods.synapses.find_synapses`) and **dynamic KN selection**
   rows (:func:`qloc_tl.experiments.dynamic.measure_dynamic_selection`): query / neighbor / random neurons × KS /
   irrelevant-KS × suppress / enhance.

With ``out_dir``, each chunk's rows are stored with :class:`qloc_tl.core.store.RunStore` as parts keyed by
``Fact.key`` (tables ``facts``, ``kn``, ``mapping``, ``synapses``, ``dynamic``): a rerun with
``resume=True`` skips facts already stored, a killed run loses at most one chunk, and no fact is stored
twice. Classes are assigned at the end — from ``classes`` when given, otherwise by splitting the stored CS
values at ``cs_threshold`` (a number, default 0.3, or ``"otsu"``, which needs all facts' CS and is why the
split is not stored per chunk) — and the final tables are written with ``RunStore.write_table``:
``facts``, ``mapping_rows``, ``mapping_summary``, ``mapping_by_relation``, ``mapping_order``,
``mapping_enh_vs_sup``, ``dynamic_rows``, ``dynamic_summary``, ``dynamic_enh_vs_sup``.

Examples:
    >>> from qloc_tl import Fact, Neuron
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> facts = [Fact("alice", "P19", "paris", ["alice was born in", "alice is from"])]
    >>> kns = {facts[0].key: [{Neuron(0, 1), Neuron(2, 5)}, {Neuron(2, 5)}]}
    >>> cfg = QLConfig(ks_steps=2, n_bootstrap=10)
    >>> res = run_query_localization(model, facts, config=cfg, kn_sets=kns, known_only=False)
    >>> res.classes
    {'P19|alice|paris': 'K_C'}
    >>> sorted(res.mapping["set"].unique())
    ['Intersection', 'Refine', 'Self', 'Union', 'Unrelated']
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron, Synapse
from qloc_tl.core.model import TLModel, check_model, d_mlp, n_layers, require_eval
from qloc_tl.core.validation import as_neuron_sets, check_choice, check_float, check_int
from qloc_tl.data.facts import Fact
from qloc_tl.experiments.dynamic import enh_vs_sup, measure_dynamic_selection, summarize_dynamic
from qloc_tl.experiments.mapping import measure_query_kn_mapping, set_order, summarize_mapping
from qloc_tl.methods.attribution.quadrature import RULES
from qloc_tl.methods.attribution.selection import SELECTION_METHODS, check_selection
from qloc_tl.methods.consistency_score import consistency_score, split_facts
from qloc_tl.methods.known import restrict_to_known
from qloc_tl.methods.synapses import find_synapses

logger = logging.getLogger(__name__)

__all__ = ["QLConfig", "QLResult", "run_query_localization"]

_TABLES = ("facts", "kn", "mapping", "synapses", "dynamic")





@dataclass(frozen=True)
class QLConfig:
    """Settings of :func:`run_query_localization` (validated on construction).

    KN localization (used only when ``kn_sets`` is not given):
        kn_method: ``"ig"`` (default), ``"sig"`` or ``"amig"``; kn_steps (20), kn_rule (``"left"``),
        kn_threshold_method (``"fraction_of_max"``) and kn_threshold (0.2, Dai et al.'s t), site (``"post"``).
    K_C / K_I split (used only when ``classes`` is not given):
        cs_threshold: τ in [0, 1] (default 0.3) or ``"otsu"``; cs_mode: ``"relaxed"`` (default) or ``"strict"``.
    Query-KN mapping:
        refine_min_count (2: "appears in more than one query"), include_self (False: Union, Intersection and Refine
        of query i from the other queries j ≠ i), suppress (0.0), enhance (2.0).
    Knowledge synapses / dynamic KN selection:
        dynamic (True: run it), ks_method (``"attattr"``), ks_steps (20), ks_rule (``"left"``),
        ks_threshold_method (``"fraction_of_max"``), ks_threshold (0.2), ks_per_head (False: one threshold
        over every head's key columns at the answer row; True: one threshold per head; see
        :func:`qloc_tl.methods.synapses.select_synapses`), ks_head_threshold (None), ks_exclude_keys (()),
        renormalize (False).
    Data and run:
        max_queries_per_fact (None: all), multi_token (``"first"``), seed (0), chunk_size (8 facts per stored
        part), batch_size (64 rows per pass for the synapse IG), n_bootstrap (1000), ci (0.95).
    """

    kn_method: Literal["ig", "sig", "amig"] = "ig"
    kn_steps: int = 20
    kn_rule: str = "left"
    kn_threshold_method: str = "fraction_of_max"
    kn_threshold: float | None = 0.2
    site: Literal["post", "pre", "pre_linear"] = "post"
    cs_threshold: float | Literal["otsu"] = 0.3
    cs_mode: Literal["relaxed", "strict"] = "relaxed"
    refine_min_count: int = 2
    include_self: bool = False
    suppress: float = 0.0
    enhance: float = 2.0
    dynamic: bool = True
    ks_method: Literal["attattr", "raw"] = "attattr"
    ks_steps: int = 20
    ks_rule: str = "left"
    ks_threshold_method: str = "fraction_of_max"
    ks_threshold: float | None = 0.2
    ks_per_head: bool = False
    ks_head_threshold: float | None = None
    ks_exclude_keys: tuple[int, ...] = ()
    renormalize: bool = False
    max_queries_per_fact: int | None = None
    multi_token: Literal["error", "first"] = "first"
    seed: int = 0
    chunk_size: int = 8
    batch_size: int = 64
    n_bootstrap: int = 1000
    ci: float = 0.95

    def __post_init__(self) -> None:
        check_choice("kn_method", self.kn_method, ("ig", "sig", "amig"))
        check_int("kn_steps", self.kn_steps, 1)
        check_choice("kn_rule", self.kn_rule, RULES)
        check_choice("kn_threshold_method", self.kn_threshold_method, SELECTION_METHODS)
        check_float("kn_threshold", self.kn_threshold, allow_none=True)
        check_selection(self.kn_threshold_method, self.kn_threshold)
        check_choice("site", self.site, ("post", "pre", "pre_linear"))
        if self.cs_threshold != "otsu":
            check_float("cs_threshold", self.cs_threshold, 0.0, 1.0)
        check_choice("cs_mode", self.cs_mode, ("relaxed", "strict"))
        check_int("refine_min_count", self.refine_min_count, 1)
        check_float("suppress", self.suppress)
        check_float("enhance", self.enhance)
        check_choice("ks_method", self.ks_method, ("attattr", "raw"))
        check_int("ks_steps", self.ks_steps, 1)
        check_choice("ks_rule", self.ks_rule, RULES)
        check_choice("ks_threshold_method", self.ks_threshold_method, SELECTION_METHODS)
        check_float("ks_threshold", self.ks_threshold, allow_none=True)
        check_selection(self.ks_threshold_method, self.ks_threshold)
        check_float("ks_head_threshold", self.ks_head_threshold, 0.0, 1.0, allow_none=True)
        if isinstance(self.ks_exclude_keys, (int, str)):
            raise InvalidInputError(f"ks_exclude_keys must be a tuple of key positions, got {self.ks_exclude_keys!r}")
        object.__setattr__(self, "ks_exclude_keys", tuple(check_int("ks_exclude_keys entry", k, None) for k in self.ks_exclude_keys))
        for name in ("include_self", "dynamic", "ks_per_head", "renormalize"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int("max_queries_per_fact", self.max_queries_per_fact, 1, allow_none=True)
        check_choice("multi_token", self.multi_token, ("error", "first"))
        check_int("seed", self.seed, 0)
        check_int("chunk_size", self.chunk_size, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("n_bootstrap", self.n_bootstrap, 0)
        check_float("ci", self.ci, 0.0, 1.0)
        if not 0 < self.ci < 1:
            raise InvalidInputError(f"ci must lie strictly between 0 and 1, got {self.ci!r}")

    @property
    def ops(self) -> dict[str, float]:
        return {"suppress": float(self.suppress), "enhance": float(self.enhance)}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ks_exclude_keys"] = list(self.ks_exclude_keys)
        return d


@dataclass(frozen=True, eq=False)
class QLResult:
    """Everything :func:`run_query_localization` produced.

    Attributes:
        config: the :class:`QLConfig`.
        facts: one row per fact: key, relation, subject, object, n_queries, cs, class, n_kn (mean per query).
        classes: fact key → ``"K_C" | "K_I" | "excluded"``; ``tau``: the CS threshold used (NaN when given).
        kn_sets: fact key → one frozenset of :class:`~qloc_tl.Neuron` per query.
        mapping_rows / mapping / mapping_by_relation / mapping_order / mapping_enh_vs_sup: the Query-KN mapping
            rows, the class × set × op summary, the per-relation summary, the order of the sets per class × op
            (by |mean of ratios|), and the enhance-vs-suppress comparison.
        synapses: one row per selected synapse (fact_key, query_index, layer, head, key_position, score).
        dynamic_rows / dynamic / dynamic_enh_vs_sup: dynamic KN selection rows, the class × intervention × op ×
            group summary and the "Enh < Sup" table (empty frames when ``config.dynamic`` is False).
        out_dir: where the tables were written (None when not persisted).
        seconds: wall time of this call.
    """

    config: QLConfig
    facts: pd.DataFrame
    classes: dict[str, str]
    tau: float
    kn_sets: dict[str, tuple[frozenset[Neuron], ...]]
    mapping_rows: pd.DataFrame
    mapping: pd.DataFrame
    mapping_by_relation: pd.DataFrame
    mapping_order: pd.DataFrame
    mapping_enh_vs_sup: pd.DataFrame
    synapses: pd.DataFrame
    dynamic_rows: pd.DataFrame
    dynamic: pd.DataFrame
    dynamic_enh_vs_sup: pd.DataFrame
    out_dir: Path | None = None
    seconds: float = field(default=math.nan)

    def __repr__(self) -> str:
        counts = pd.Series(self.classes).value_counts().to_dict() if self.classes else {}
        return f"QLResult(n_facts={len(self.facts)}, classes={counts}, out_dir={self.out_dir})"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _model_id(model: TLModel) -> str:
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items())[:4]:
        h.update(p.detach().flatten()[:4096].to("cpu", torch.float64).numpy().tobytes())
    cfg = model.cfg
    return (
        f"{type(model).__name__}:L{cfg.n_layers}:d{cfg.d_model}:m{getattr(cfg, 'd_mlp', None)}:"
        f"v{cfg.d_vocab}:{h.hexdigest()[:16]}"
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _kn_json(kn: Mapping[str, Sequence[Iterable[Neuron]]]) -> dict[str, list[list[str]]]:
    return {k: [sorted(str(n) for n in s) for s in v] for k, v in sorted(kn.items())}


def _trim(fact: Fact, n: int | None) -> Fact:
    if n is None or len(fact.queries) <= n:
        return fact
    return Fact(fact.subject, fact.relation, fact.object, fact.queries[:n], fact.uuid)


def _localize(model: TLModel, facts: Sequence[Fact], cfg: QLConfig, show_progress: bool) -> dict[str, list[frozenset[Neuron]]]:
    from qloc_tl.methods.attribution import attribute_neurons, select_neurons

    prompts = [q for f in facts for q in f.prompts]
    answers = [f.answer for f in facts for _ in f.prompts]
    res = attribute_neurons(
        model, prompts, answers, method=cfg.kn_method, steps=cfg.kn_steps, rule=cfg.kn_rule, site=cfg.site,
        multi_token=cfg.multi_token, show_progress=show_progress,
    )  # fmt: skip
    sets = select_neurons(res.scores_batched, method=cfg.kn_threshold_method, value=cfg.kn_threshold)
    out: dict[str, list[frozenset[Neuron]]] = {}
    i = 0
    for f in facts:
        out[f.key] = [frozenset(sets[i + j]) for j in range(len(f.queries))]
        i += len(f.queries)
    return out


def _chunk_tables(
    model: TLModel,
    facts: list[Fact],
    kn: dict[str, list[frozenset[Neuron]]],
    cfg: QLConfig,
) -> dict[str, pd.DataFrame]:
    fact_rows, kn_rows = [], []
    for f in facts:
        sets = kn[f.key]
        fact_rows.append(
            {
                "fact_key": f.key, "relation": f.relation, "subject": f.subject, "object": f.object,
                "n_queries": len(f.queries), "cs": consistency_score(sets, mode=cfg.cs_mode),
                "cs_strict": consistency_score(sets, mode="strict"),
                "n_kn": float(sum(len(s) for s in sets)) / max(1, len(sets)),
                "n_union": len(frozenset().union(*sets)) if sets else 0,
            }
        )  # fmt: skip
        for i, s in enumerate(sets):
            for n in sorted(s):
                kn_rows.append({"fact_key": f.key, "query_index": i, "layer": n.layer, "index": n.index})
    tables = {
        "facts": pd.DataFrame(fact_rows),
        "kn": pd.DataFrame(kn_rows, columns=["fact_key", "query_index", "layer", "index"]),
    }
    tables["mapping"] = measure_query_kn_mapping(
        model, facts, kn, ops=cfg.ops, refine_min_count=cfg.refine_min_count, include_self=cfg.include_self,
        seed=cfg.seed, site=cfg.site, multi_token=cfg.multi_token,
    ).drop(columns=["class"])  # fmt: skip
    syn_rows: list[dict[str, Any]] = []
    if cfg.dynamic:
        synapses: dict[str, list[tuple[Synapse, ...]]] = {}
        for f in facts:
            synapses[f.key] = []
            for i, q in enumerate(f.prompts):
                r = find_synapses(
                    model, q, f.answer, method=cfg.ks_method, steps=cfg.ks_steps, rule=cfg.ks_rule,
                    threshold=cfg.ks_threshold, threshold_method=cfg.ks_threshold_method, per_head=cfg.ks_per_head,
                    head_threshold=cfg.ks_head_threshold, exclude_keys=cfg.ks_exclude_keys, batch_size=cfg.batch_size,
                    multi_token=cfg.multi_token,
                )  # fmt: skip
                synapses[f.key].append(r.synapses)
                delta = r.completeness_delta
                for syn in r.synapses:
                    syn_rows.append(
                        {
                            "fact_key": f.key, "query_index": i, "layer": syn.layer, "head": syn.head,
                            "key_position": syn.key_position, "token": r.str_tokens[syn.key_position],
                            "score": float(r.scores[syn.layer, syn.head, syn.key_position]),
                            "layer_completeness_delta": float(delta[syn.layer]) if delta.numel() else math.nan,
                        }
                    )  # fmt: skip
        tables["dynamic"] = measure_dynamic_selection(
            model, facts, synapses, kn, ops=cfg.ops, renormalize=cfg.renormalize, seed=cfg.seed, site=cfg.site,
            exclude_keys=cfg.ks_exclude_keys, multi_token=cfg.multi_token,
        ).drop(columns=["class"])  # fmt: skip
    else:
        tables["dynamic"] = pd.DataFrame(columns=["fact_key"])
    tables["synapses"] = pd.DataFrame(
        syn_rows,
        columns=["fact_key", "query_index", "layer", "head", "key_position", "token", "score", "layer_completeness_delta"],
    )
    return tables


def _with_class(df: pd.DataFrame, classes: Mapping[str, str]) -> pd.DataFrame:
    if df.empty:
        return df.assign(**{"class": pd.Series(dtype=object)})
    out = df.copy()
    out.insert(1, "class", out["fact_key"].map(classes).fillna("excluded"))
    return out


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------


def run_query_localization(
    model: TLModel,
    facts: Sequence[Fact],
    *,
    config: QLConfig | None = None,
    classes: Mapping[str, str] | None = None,
    kn_sets: Mapping[str, Sequence[Iterable[Neuron]]] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    show_progress: bool = False,
    known_only: bool | None = None,
) -> QLResult:
    """Run the Query-KN mapping and dynamic-KN-selection experiments on ``facts`` (see module docstring).

    Args:
        model: a TL model in eval mode (attention-pattern edits must be honoured when ``config.dynamic``).
        facts: :class:`~qloc_tl.Fact` objects with distinct keys; queries beyond
            ``config.max_queries_per_fact`` are dropped.
        config: a :class:`QLConfig` (default settings when None).
        classes: optional fact key → ``"K_C"`` / ``"K_I"`` (e.g. from the consistency experiment); every
            fact needs an entry. When None, facts are split by their CS at ``config.cs_threshold``.
        kn_sets: optional fact key → one KN set per query (in query order); when None, KNs are localized.
        out_dir: a run directory for :class:`~qloc_tl.core.store.RunStore` (parts per chunk and final tables).
        resume: reuse facts already stored in ``out_dir`` (a directory of another configuration is refused).
        show_progress: tqdm bars.
        known_only: restrict facts to the queries the model answers top-1 (:func:`qloc_tl.methods.known.filter_known`;
            ``kn_sets`` follow their queries). ``None`` (default): on every model but the built-in one.

    Returns:
        A :class:`QLResult`.
    """
    t0 = time.perf_counter()
    check_model(model)
    require_eval(model)
    cfg = config if config is not None else QLConfig()
    if not isinstance(cfg, QLConfig):
        raise InvalidInputError(f"config must be a QLConfig, got {type(cfg).__name__}")
    facts = list(facts)
    if not facts:
        raise InvalidInputError("no facts given")
    for f in facts:
        if not isinstance(f, Fact):
            raise InvalidInputError(f"facts must be qloc_tl.Fact objects, got {type(f).__name__}")
    keys = [f.key for f in facts]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise InvalidInputError(f"duplicate fact keys {dup[:3]}: each fact must appear once (give facts distinct uuids)")
    facts, known = restrict_to_known(model, facts, known_only, what="run_query_localization")
    if known is not None and kn_sets is not None:
        kept = known.kept_queries()
        kn_sets = {k: [list(v)[i] for i in kept[k]] for k, v in kn_sets.items() if k in kept}
    keys = [f.key for f in facts]
    facts = [_trim(f, cfg.max_queries_per_fact) for f in facts]
    given_kn: dict[str, list[frozenset[Neuron]]] | None = None
    if kn_sets is not None:
        missing = [k for k in keys if k not in kn_sets]
        if missing:
            raise InvalidInputError(f"kn_sets has no entry for {len(missing)} fact(s), e.g. {missing[:3]}")
        given_kn = {}
        width, L = d_mlp(model), n_layers(model)
        for f in facts:
            sets = as_neuron_sets(kn_sets[f.key], f"kn_sets[{f.key!r}]")
            if len(sets) < len(f.queries):
                raise InvalidInputError(f"kn_sets[{f.key!r}] has {len(sets)} sets for {len(f.queries)} queries")
            sets = sets[: len(f.queries)]
            bad = [n for s in sets for n in s if n.layer >= L or n.index >= width]
            if bad:
                raise InvalidInputError(f"{bad[0]!r} in kn_sets[{f.key!r}] is outside the model (L={L}, d_mlp={width})")
            given_kn[f.key] = sets
    if classes is not None:
        missing = [k for k in keys if k not in classes]
        if missing:
            raise InvalidInputError(f"classes has no entry for {len(missing)} fact(s), e.g. {missing[:3]}")
    if cfg.dynamic:
        from qloc_tl.core.model import capabilities

        if not capabilities(model).pattern_editable:
            from qloc_tl.core.errors import CapabilityError

            raise CapabilityError(
                "dynamic KN selection edits attn.hook_pattern, which this backend ignores; load the model with "
                "HookedTransformer or an HF-backed TransformerBridge, or set QLConfig(dynamic=False)"
            )
    store = None
    if out_dir is not None:
        from qloc_tl.core.store import RunStore

        store_cfg = {
            "qlconfig": cfg.as_dict(),
            "model": _model_id(model),
            "kn_sets": _digest(_kn_json(given_kn)) if given_kn is not None else "localized",
        }
        store = RunStore.open(out_dir, store_cfg, resume=resume)
    done: set[str] = set()
    if store is not None:
        done = set.intersection(*(store.done(t) for t in _TABLES))
    todo = [f for f in facts if f.key not in done]
    if done:
        logger.info("resuming: %d of %d facts already stored", len(facts) - len(todo), len(facts))
    memory: dict[str, list[pd.DataFrame]] = {t: [] for t in _TABLES}
    chunks = [todo[i : i + cfg.chunk_size] for i in range(0, len(todo), cfg.chunk_size)]
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="query localization", unit="fact")
    try:
        for chunk in chunks:
            kn = {f.key: given_kn[f.key] for f in chunk} if given_kn is not None else _localize(model, chunk, cfg, False)
            tables = _chunk_tables(model, chunk, kn, cfg)
            ckeys = [f.key for f in chunk]
            for t in _TABLES:
                if store is not None:
                    store.write_part(t, ckeys, tables[t])
                else:
                    memory[t].append(tables[t])
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    wanted = set(keys)
    data: dict[str, pd.DataFrame] = {}
    for t in _TABLES:
        if store is not None:
            df = store.read(t)
        else:
            frames = [x for x in memory[t] if len(x)]
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        data[t] = df[df["fact_key"].isin(wanted)].reset_index(drop=True) if len(df) else df
    return _finish(cfg, facts, data, classes, store, time.perf_counter() - t0)


def _finish(
    cfg: QLConfig,
    facts: list[Fact],
    data: dict[str, pd.DataFrame],
    classes: Mapping[str, str] | None,
    store: Any,
    seconds: float,
) -> QLResult:
    fdf = data["facts"]
    order = {f.key: i for i, f in enumerate(facts)}
    fdf = fdf.assign(_o=fdf["fact_key"].map(order)).sort_values("_o").drop(columns="_o").reset_index(drop=True)
    if classes is not None:
        cls = {k: str(classes[k]) for k in fdf["fact_key"]}
        tau = math.nan
    else:
        labels: Any
        labels, tau = split_facts(fdf["cs"].to_numpy(dtype=float), cfg.cs_threshold) if len(fdf) else ([], math.nan)
        cls = {k: str(v) for k, v in zip(fdf["fact_key"], labels)}
    fdf = _with_class(fdf, cls)
    kn_sets: dict[str, tuple[frozenset[Neuron], ...]] = {}
    knd = data["kn"]
    for _, fr in fdf.iterrows():
        sub = knd[knd["fact_key"] == fr["fact_key"]] if len(knd) else knd
        kn_sets[fr["fact_key"]] = tuple(
            frozenset(Neuron(int(a), int(b)) for a, b in zip(g["layer"], g["index"]))
            for g in (sub[sub["query_index"] == i] if len(sub) else sub for i in range(int(fr["n_queries"])))
        )
    mrows = _with_class(data["mapping"], cls)
    drows = _with_class(data["dynamic"], cls) if len(data["dynamic"]) else pd.DataFrame()
    kw: dict[str, Any] = dict(n_bootstrap=cfg.n_bootstrap, ci=cfg.ci, seed=cfg.seed)
    mapping = summarize_mapping(mrows, **kw) if len(mrows) else pd.DataFrame()
    by_rel = summarize_mapping(mrows, by=("relation", "class", "set", "op"), **kw) if len(mrows) else pd.DataFrame()
    morder = set_order(mapping) if len(mapping) else pd.DataFrame()
    m_es = (
        enh_vs_sup(mrows, metrics=("dprob", "dprob_ratio"), by=("class", "set")) if len(mrows) else pd.DataFrame()
    )
    dyn = summarize_dynamic(drows, **kw) if len(drows) else pd.DataFrame()
    d_es = enh_vs_sup(drows) if len(drows) else pd.DataFrame()
    out_dir = None
    if store is not None:
        out_dir = Path(store.root)
        for name, df in (
            ("facts", fdf), ("mapping_rows", mrows), ("mapping_summary", mapping), ("mapping_by_relation", by_rel),
            ("mapping_order", morder), ("mapping_enh_vs_sup", m_es), ("dynamic_rows", drows),
            ("dynamic_summary", dyn), ("dynamic_enh_vs_sup", d_es), ("synapses", data["synapses"]),
        ):  # fmt: skip
            store.write_table(name, df)
    return QLResult(
        config=cfg, facts=fdf, classes=cls, tau=float(tau), kn_sets=kn_sets, mapping_rows=mrows, mapping=mapping,
        mapping_by_relation=by_rel, mapping_order=morder, mapping_enh_vs_sup=m_es, synapses=data["synapses"],
        dynamic_rows=drows, dynamic=dyn, dynamic_enh_vs_sup=d_es, out_dir=out_dir, seconds=seconds,
    )  # fmt: skip
