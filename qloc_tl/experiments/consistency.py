"""The consistency experiment (the paper's experiment 1): KN sets of every neighbor query of many facts,
their Consistency Score, the K_C / K_I split per method, threshold and relation, and the sweeps over the KN
threshold and the CS threshold τ. The score itself is :mod:`qloc_tl.methods.consistency_score`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import SITES, TLModel
from qloc_tl.core.stats import bootstrap_proportion_ci
from qloc_tl.core.validation import check_choice, check_float, check_int
from qloc_tl.methods.attribution.quadrature import RULES
from qloc_tl.methods.consistency_score import (
    CLASS_KC,
    CLASS_KI,
    CLASS_NONE,
    ThresholdKind,
    class_statistics,
    consistency_score,
    split_facts,
)

logger = logging.getLogger(__name__)

THRESHOLD_KINDS: tuple[ThresholdKind, ...] = ("static", "otsu")

__all__ = ["fact_uid", "ConsistencyConfig", "ConsistencyResult", "run_consistency", "analyze_scores"]

# ==================================================================================================
# Runner
# ==================================================================================================


@dataclass(frozen=True)
class ConsistencyConfig:
    """Settings of :func:`run_consistency`.

    Attributes:
        methods: localisation methods (``"ig"``, ``"sig"``, ``"amig"``).
        steps, rule, site, batch_size, multi_token: passed to :func:`~qloc_tl.methods.attribution.attribute_neurons`
            (``multi_token="first"``: an object of several tokens is asked for by its first token, the policy
            of every stage; :func:`qloc_tl.methods.known.filter_known` keeps such a fact only when the model generates
            the whole object).
        kn_fraction: KN threshold t: a query's KNs are its neurons with score ≥ t · max (Dai: 0.2).
        sweep: KN thresholds for the threshold sweep (each ≥ ``keep_fraction``).
        keep_fraction: scores ≥ keep_fraction · max are persisted per query (enough for any t ≥ it).
        cs_mode: ``"relaxed"`` (paper) or ``"strict"``; the other is reported too.
        cs_static: static CS threshold τ (default 0.3; see :func:`cs_threshold`).
        chunk_facts: facts attributed per call / persisted per part.
        n_boot, n_perm, seed: statistics settings.
    """

    methods: tuple[str, ...] = ("ig", "sig", "amig")
    steps: int = 20
    rule: str = "left"
    site: str = "post"
    batch_size: int | None = None
    multi_token: str = "first"
    kn_fraction: float = 0.2
    sweep: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    keep_fraction: float = 0.05
    cs_mode: str = "relaxed"
    cs_static: float = 0.3
    chunk_facts: int = 16
    n_boot: int = 1000
    n_perm: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        methods = tuple(self.methods) if not isinstance(self.methods, str) else (self.methods,)
        object.__setattr__(self, "methods", methods)
        if isinstance(self.sweep, (str, bytes)):
            raise InvalidInputError(f"sweep must be a sequence of KN thresholds, got {self.sweep!r}")
        object.__setattr__(self, "sweep", tuple(check_float("sweep entry", x) for x in self.sweep))
        check_float("keep_fraction", self.keep_fraction)
        check_float("kn_fraction", self.kn_fraction)
        check_float("cs_static", self.cs_static)
        check_choice("rule", self.rule, RULES)
        check_choice("site", self.site, tuple(SITES))
        check_choice("multi_token", self.multi_token, ("error", "first"))
        check_int("batch_size", self.batch_size, 1, allow_none=True)
        check_int("seed", self.seed)
        if not methods:
            raise InvalidInputError("methods is empty; give at least one of 'ig', 'sig', 'amig'")
        for m in methods:
            if m not in ("ig", "sig", "amig"):
                raise InvalidInputError(f"unknown attribution method {m!r}; choose from 'ig', 'sig', 'amig'")
        if len(set(methods)) != len(methods):
            raise InvalidInputError(f"methods listed twice: {methods}")
        if self.cs_mode not in ("relaxed", "strict"):
            raise InvalidInputError(f"cs_mode must be 'relaxed' or 'strict', got {self.cs_mode!r}")
        if not 0 < self.keep_fraction <= 1:
            raise InvalidInputError(f"keep_fraction must lie in (0, 1], got {self.keep_fraction}")
        for t in (self.kn_fraction, *self.sweep):
            if not self.keep_fraction <= t <= 1:
                raise InvalidInputError(
                    f"KN threshold {t} must lie in [keep_fraction={self.keep_fraction}, 1]; lower keep_fraction to use it"
                )
        if not 0 <= self.cs_static <= 1:
            raise InvalidInputError(f"cs_static must lie in [0, 1], got {self.cs_static}")
        for name in ("chunk_facts", "n_boot", "n_perm", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class ConsistencyResult:
    """Tables of the consistency experiment (all pandas DataFrames, long form).

    Attributes:
        facts: one row per (method, fact) — CS (relaxed and strict), union size, class under the static and
            Otsu thresholds; ``method == "∩"`` rows hold the facts that *all* methods classify as K_I.
        summary: per (model, method, threshold kind) — proportions with bootstrap CI, mean CS, Welch's t,
            permutation p, Cohen's d, τ.
        per_relation: per (model, method, threshold kind, relation) — n, proportion of K_I, mean CS.
        sweep: per (model, method, KN threshold) — proportion of K_I (static and Otsu τ), mean CS.
        queries: one row per (method, fact, query) — text, template, held-out flag, P(answer), top-1 hit,
            number of KNs.
        scores: persisted sparse scores (≥ keep_fraction · max) per (method, fact, query, layer, neuron).
        kn_sets: ``{(method, fact_key): [NeuronSet per query]}`` at ``config.kn_fraction``.
        config: the :class:`ConsistencyConfig`.
        timings: seconds per method.
    """

    facts: pd.DataFrame
    summary: pd.DataFrame
    per_relation: pd.DataFrame
    sweep: pd.DataFrame
    queries: pd.DataFrame
    scores: pd.DataFrame
    kn_sets: Mapping[tuple[str, str], list[Any]]
    config: ConsistencyConfig
    timings: Mapping[str, float] = field(default_factory=dict)

    def dense_scores(self, method: str, fact_key: str, n_queries: int, n_layers: int, d_mlp: int) -> Any:
        """The fact's per-query attributions as a ``[n_queries, n_layers, d_mlp]`` float64 tensor rebuilt from
        :attr:`scores`: the persisted entries (≥ ``keep_fraction`` · max of their query) in place, zero
        elsewhere. Exact for any selection at a fraction of max ≥ ``keep_fraction`` (KN sets at 0.2 · max);
        a statistic over all entries (CAS) sees the small entries as zero."""
        import torch

        out = torch.zeros(n_queries, n_layers, d_mlp, dtype=torch.float64)
        sc = self.scores
        if len(sc):
            sel = sc[(sc["method"] == method) & (sc["fact_key"] == fact_key)]
            if len(sel):
                q = torch.tensor(sel["query_index"].to_numpy(dtype="int64"))  # copies: pandas' arrays are read-only
                lay = torch.tensor(sel["layer"].to_numpy(dtype="int64"))
                neu = torch.tensor(sel["neuron"].to_numpy(dtype="int64"))
                out[q, lay, neu] = torch.tensor(sel["score"].to_numpy(dtype="float64"))
        return out

    def tau_sweep(
        self, taus: Sequence[float] | None = None, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
    ) -> pd.DataFrame:
        """The share of inconsistent knowledge as the **CS threshold τ** varies (K_I: CS < τ), per method.

        This is the sweep of the paper's "threshold as a variable" figure (a fact with CS 0.15 counts as
        consistent at τ = 0.1); :attr:`sweep` varies the KN threshold t instead.

        Args:
            taus: thresholds in [0, 1] (default 0.0, 0.05, ..., 1.0).
            n_boot, level, seed: percentile bootstrap over facts for the CI of each share.

        Returns:
            One row per (method, τ): ``n_facts`` (facts with a finite CS), ``prop_KI``, ``ci_low``, ``ci_high``.
        """
        grid = np.round(np.linspace(0.0, 1.0, 21), 4) if taus is None else np.asarray(list(taus), dtype=float)
        if grid.size == 0 or not np.all(np.isfinite(grid)) or (grid < 0).any() or (grid > 1).any():
            raise InvalidInputError(f"taus must be non-empty numbers in [0, 1], got {taus!r}")
        rows = []
        for m, g in self.facts[self.facts["method"] != "∩"].groupby("method", sort=False):
            cs = g["cs"].to_numpy(dtype=float)
            cs = cs[np.isfinite(cs)]
            for tau in grid:
                flags = cs < tau
                lo, hi = bootstrap_proportion_ci(flags, n_boot=n_boot, level=level, seed=seed)
                rows.append({"method": m, "tau": float(tau), "n_facts": int(cs.size),
                             "prop_KI": float(flags.mean()) if cs.size else math.nan, "ci_low": lo, "ci_high": hi})  # fmt: skip
        return pd.DataFrame(rows, columns=["method", "tau", "n_facts", "prop_KI", "ci_low", "ci_high"])

    def classes(self, method: str = "ig", kind: ThresholdKind = "static") -> dict[str, str]:
        """``{fact_key: "K_C" | "K_I" | "excluded"}`` for one method (or ``"∩"``) and threshold kind."""
        df = self.facts[self.facts["method"] == method]
        if df.empty:
            raise InvalidInputError(f"no results for method {method!r}; have {sorted(self.facts['method'].unique())}")
        return dict(zip(df["fact_key"], df[f"class_{kind}"]))


def _kn_sets_from_sparse(sc: pd.DataFrame, fraction: float) -> dict[tuple[str, str, int], frozenset[Neuron]]:
    """Per (method, fact_key, query_index): neurons with score ≥ fraction · (that query's max score)."""
    out: dict[tuple[str, str, int], frozenset[Neuron]] = {}
    if sc.empty:
        return out
    mx = sc.groupby(["method", "fact_key", "query_index"])["score"].transform("max")
    sel = sc[(mx > 0) & (sc["score"] >= fraction * mx)]
    for (m, fk, qi), g in sel.groupby(["method", "fact_key", "query_index"], sort=False):
        out[(m, fk, int(qi))] = frozenset(Neuron(int(a), int(b)) for a, b in zip(g["layer"], g["neuron"]))
    return out


def analyze_scores(
    scores: pd.DataFrame,
    queries: pd.DataFrame,
    facts: Sequence[Any],
    config: ConsistencyConfig,
    *,
    model_name: str = "model",
) -> ConsistencyResult:
    """Build every table of :class:`ConsistencyResult` from the persisted sparse scores and query rows."""
    from qloc_tl.methods.attribution.selection import NeuronSet

    fact_by_key = {f.key: f for f in facts}
    methods = [m for m in config.methods if m in set(queries.get("method", pd.Series(dtype=str)))]
    nq = {f.key: len(f.queries) for f in facts}

    def fact_rows(fraction: float) -> tuple[pd.DataFrame, dict[tuple[str, str], list[Any]]]:
        sets = _kn_sets_from_sparse(scores, fraction)
        rows, kn = [], {}
        for m in methods:
            for f in facts:
                per_q = [sets.get((m, f.key, i), frozenset()) for i in range(nq[f.key])]
                kn[(m, f.key)] = [NeuronSet(s) for s in per_q]
                union = frozenset().union(*per_q)
                rows.append(
                    {
                        "model": model_name,
                        "method": m,
                        "fact_key": f.key,
                        "relation": f.relation,
                        "subject": f.subject,
                        "object": f.object,
                        "n_queries": nq[f.key],
                        "n_union": len(union),
                        "n_kn_mean": float(np.mean([len(s) for s in per_q])),
                        "cs_relaxed": consistency_score(per_q, "relaxed"),
                        "cs_strict": consistency_score(per_q, "strict"),
                    }
                )
        df = pd.DataFrame(rows)
        if not df.empty:
            df["cs"] = df[f"cs_{config.cs_mode}"]
        return df, kn

    fdf, kn_sets = fact_rows(config.kn_fraction)
    summary_rows, rel_rows = [], []
    if not fdf.empty:
        for kind in THRESHOLD_KINDS:
            col = f"class_{kind}"
            fdf[col] = CLASS_NONE
            fdf[f"tau_{kind}"] = math.nan
            for m in methods:
                idx = fdf["method"] == m
                labels, tau = split_facts(fdf.loc[idx, "cs"].to_numpy(), kind, static=config.cs_static)
                fdf.loc[idx, col] = labels
                fdf.loc[idx, f"tau_{kind}"] = tau
        # "∩": inconsistent under every method
        if len(methods) > 1:
            inter = []
            for f in facts:
                sub = fdf[fdf["fact_key"] == f.key]
                row = {
                    "model": model_name, "method": "∩", "fact_key": f.key, "relation": f.relation,
                    "subject": f.subject, "object": f.object, "n_queries": nq[f.key],
                    "n_union": math.nan, "n_kn_mean": math.nan, "cs_relaxed": math.nan, "cs_strict": math.nan,
                    "cs": float(sub["cs"].mean()),
                }  # fmt: skip
                for kind in THRESHOLD_KINDS:
                    cl = sub[f"class_{kind}"]
                    row[f"class_{kind}"] = (
                        CLASS_NONE if (cl == CLASS_NONE).any() else (CLASS_KI if (cl == CLASS_KI).all() else CLASS_KC)
                    )
                    row[f"tau_{kind}"] = math.nan
                inter.append(row)
            fdf = pd.concat([fdf, pd.DataFrame(inter)], ignore_index=True)
        for m in list(methods) + (["∩"] if len(methods) > 1 else []):
            sub = fdf[fdf["method"] == m]
            for kind in THRESHOLD_KINDS:
                labels = sub[f"class_{kind}"].to_numpy()
                st = class_statistics(
                    sub["cs"].to_numpy(), labels, n_boot=config.n_boot, n_perm=config.n_perm, seed=config.seed
                )
                if m == "∩":  # proportions only: the ∩ class is not a CS threshold split
                    kept = labels != CLASS_NONE
                    st["prop_KI"] = float(np.mean(labels[kept] == CLASS_KI)) if kept.any() else math.nan
                    st["prop_KC"] = 1 - st["prop_KI"]
                    for k in ("welch_t", "welch_p", "perm_p", "cohens_d"):
                        st[k] = math.nan
                tau = sub[f"tau_{kind}"].iloc[0] if len(sub) else math.nan
                summary_rows.append({"model": model_name, "method": m, "threshold": kind, "tau": tau, **st})
                for rel, g in sub.groupby("relation"):
                    lab = g[f"class_{kind}"].to_numpy()
                    kept = lab != CLASS_NONE
                    rel_rows.append(
                        {
                            "model": model_name, "method": m, "threshold": kind, "relation": rel,
                            "n_facts": int(kept.sum()),
                            "prop_KI": float(np.mean(lab[kept] == CLASS_KI)) if kept.any() else math.nan,
                            "mean_cs": float(np.nanmean(g["cs"])) if g["cs"].notna().any() else math.nan,
                        }
                    )  # fmt: skip
    sweep_rows = []
    for t in config.sweep:
        sdf, _ = fact_rows(t)
        for m in methods:
            cs = sdf[sdf["method"] == m]["cs"].to_numpy()
            row = {"model": model_name, "method": m, "kn_fraction": t, "mean_cs": float(np.nanmean(cs)) if np.isfinite(cs).any() else math.nan}
            for kind in THRESHOLD_KINDS:
                if np.isfinite(cs).any():
                    lab, _tau = split_facts(cs, kind, static=config.cs_static)
                    kept = lab != CLASS_NONE
                    row[f"prop_KI_{kind}"] = float(np.mean(lab[kept] == CLASS_KI))
                else:
                    row[f"prop_KI_{kind}"] = math.nan
            sweep_rows.append(row)
    qdf = queries.copy()
    if not qdf.empty:
        sets = _kn_sets_from_sparse(scores, config.kn_fraction)
        qdf["n_kn"] = [len(sets.get((m, fk, int(qi)), ())) for m, fk, qi in zip(qdf["method"], qdf["fact_key"], qdf["query_index"])]
    del fact_by_key
    return ConsistencyResult(
        facts=fdf,
        summary=pd.DataFrame(summary_rows),
        per_relation=pd.DataFrame(rel_rows),
        sweep=pd.DataFrame(sweep_rows),
        queries=qdf,
        scores=scores,
        kn_sets=kn_sets,
        config=config,
    )


def _check_facts(facts: Sequence[Any]) -> list[Any]:
    from qloc_tl.data.facts import Fact

    facts = list(facts)
    if not facts:
        raise InvalidInputError("no facts given")
    seen: set[str] = set()
    for f in facts:
        if not isinstance(f, Fact):
            raise InvalidInputError(f"facts must be qloc_tl.Fact objects, got {type(f).__name__}")
        f.require_neighbors(2)
        if f.key in seen:
            raise InvalidInputError(f"fact {f.key!r} is listed twice")
        seen.add(f.key)
    return facts


def fact_uid(fact: Any) -> str:
    """``fact.key`` plus a short hash of its object and queries: a stored result is reused only for the very
    same fact (the same key with edited queries is recomputed)."""
    import hashlib

    h = hashlib.sha256("\x1f".join([fact.object, *fact.prompts]).encode()).hexdigest()[:10]
    return f"{fact.key}#{h}"


def run_consistency(
    model: TLModel,
    facts: Sequence[Any],
    config: ConsistencyConfig | None = None,
    *,
    model_name: str = "model",
    out_dir: str | Path | None = None,
    resume: bool = True,
    show_progress: bool = False,
    known_only: bool | None = None,
) -> ConsistencyResult:
    """Attribute every neighbor query of every fact with each method, and analyse KN consistency.

    One call runs the paper's experiment 1: per-query KNs (fraction-of-max threshold), CS per fact, the
    K_C / K_I split (static and Otsu), statistics, per-relation numbers and the KN-threshold sweep.

    With ``out_dir``, each chunk of facts is persisted (atomically) as soon as it is done; rerunning with
    the same settings resumes without recomputing or duplicating facts (results are keyed by fact and its
    queries, so a run over more facts — or shards merged into one directory — reuses what is there), and a
    directory written with other settings is refused (:class:`~qloc_tl.core.errors.ResumeMismatchError`). Final
    tables are written there as parquet and CSV.

    Args:
        model: a TL model in eval mode.
        facts: :class:`~qloc_tl.data.facts.Fact` objects with ≥ 2 neighbor queries each.
        config: :class:`ConsistencyConfig` (defaults: IG, SIG and AMIG, m = 20, t = 0.2, relaxed CS, τ = 0.3).
        model_name: label used in the tables.
        out_dir: run directory for incremental, resumable persistence (``None``: in memory only).
        resume: reuse matching results in ``out_dir`` (False refuses a non-empty directory).
        show_progress: tqdm bars per method.
        known_only: restrict facts to the queries the model answers top-1 (:func:`qloc_tl.methods.known.filter_known`;
            facts left with < 2 are dropped). ``None`` (default): on every model but the built-in one.

    Returns:
        :class:`ConsistencyResult`.
    """
    import torch
    from tqdm.auto import tqdm

    from qloc_tl.core.model import check_model, require_eval
    from qloc_tl.core.store import RunStore
    from qloc_tl.methods.attribution import attribute_neurons
    from qloc_tl.methods.known import restrict_to_known

    config = config or ConsistencyConfig()
    check_model(model)
    require_eval(model)
    facts = _check_facts(facts)
    facts, _ = restrict_to_known(model, facts, known_only, what="run_consistency")
    store = None
    if out_dir is not None:
        # parts are keyed by method, so the methods are not part of the fingerprint: a run directory can be
        # extended with another method later (its parts are added; the others are reused)
        cfg = {"experiment": "consistency", "model": model_name, **asdict(config)}
        del cfg["methods"]
        store = RunStore.open(out_dir, cfg, resume=resume)
    mem: dict[str, list[pd.DataFrame]] = {"scores": [], "queries": []}
    order = {f.key: i for i, f in enumerate(facts)}
    timings: dict[str, float] = {}
    for method in config.methods:
        done = (store.done("scores") & store.done("queries")) if store else set()
        todo = [f for f in facts if f"{method}::{fact_uid(f)}" not in done]
        t0 = time.perf_counter()
        bar = tqdm(total=len(facts), initial=len(facts) - len(todo), desc=f"consistency [{method}]", disable=not show_progress)
        for start in range(0, len(todo), config.chunk_facts):
            chunk = todo[start : start + config.chunk_facts]
            prompts = [q.text for f in chunk for q in f.queries]
            answers = [f.answer for f in chunk for _ in f.queries]
            res = attribute_neurons(
                model, prompts, answers, method=method, steps=config.steps, rule=config.rule, site=config.site,
                batch_size=config.batch_size, multi_token=config.multi_token,
            )  # fmt: skip
            scores = res.scores_batched.detach().to("cpu", torch.float64)
            with torch.no_grad():
                top1 = _top1(model, res)
            srows: dict[str, list[Any]] = {k: [] for k in ("fact_key", "fact_index", "method", "query_index", "layer", "neuron", "score")}
            qrows = []
            i = 0
            for f in chunk:
                for qi, q in enumerate(f.queries):
                    s = scores[i]
                    mx = float(torch.nan_to_num(s, nan=-math.inf).max())
                    keep = (s >= config.keep_fraction * mx) & torch.isfinite(s) if mx > 0 else torch.zeros_like(s, dtype=torch.bool)
                    li, ni = keep.nonzero(as_tuple=True)
                    k = len(li)
                    srows["fact_key"] += [f.key] * k
                    srows["fact_index"] += [order[f.key]] * k
                    srows["method"] += [method] * k
                    srows["query_index"] += [qi] * k
                    srows["layer"] += li.tolist()
                    srows["neuron"] += ni.tolist()
                    srows["score"] += s[li, ni].tolist()
                    qrows.append(
                        {
                            "fact_key": f.key, "fact_index": order[f.key], "method": method, "query_index": qi,
                            "relation": f.relation, "text": q.text, "template": q.template, "held_out": q.held_out,
                            "clean_prob": float(res.clean_prob[i]), "top1": bool(top1[i]), "max_score": mx,
                            "max_abs_completeness_delta": float(torch.nan_to_num(res.completeness_delta[i].abs(), nan=0.0).max()),
                        }
                    )  # fmt: skip
                    i += 1
            sdf, qdf = pd.DataFrame(srows), pd.DataFrame(qrows)
            uid = {f.key: fact_uid(f) for f in chunk}
            keys = [f"{method}::{uid[f.key]}" for f in chunk]
            if store is not None:
                store.write_part("scores", keys, sdf.assign(fact_key=[f"{method}::{uid[k]}" for k in sdf["fact_key"]]))
                store.write_part("queries", keys, qdf.assign(fact_key=[f"{method}::{uid[k]}" for k in qdf["fact_key"]]))
            else:
                mem["scores"].append(sdf)
                mem["queries"].append(qdf)
            bar.update(len(chunk))
        bar.close()
        timings[method] = time.perf_counter() - t0
    if store is not None:
        # keep only the rows of exactly these facts (a shared run directory may hold other facts too)
        wanted = {f"{m}::{fact_uid(f)}" for m in config.methods for f in facts}
        sc, qu = store.read("scores"), store.read("queries")
        for df in (sc, qu):
            if not df.empty:
                df.drop(df.index[~df["fact_key"].isin(wanted)], inplace=True)
                df["fact_key"] = df["fact_key"].str.split("::", n=1).str[1].str.rsplit("#", n=1).str[0]
                df["fact_index"] = df["fact_key"].map(order)
    else:
        sc = pd.concat(mem["scores"], ignore_index=True) if mem["scores"] else pd.DataFrame()
        qu = pd.concat(mem["queries"], ignore_index=True) if mem["queries"] else pd.DataFrame()
    kept_keys = set(order)
    if not sc.empty:
        sc = sc[sc["fact_key"].isin(kept_keys)].sort_values(["method", "fact_index", "query_index", "layer", "neuron"], kind="stable").reset_index(drop=True)
    if not qu.empty:
        qu = qu[qu["fact_key"].isin(kept_keys)].sort_values(["method", "fact_index", "query_index"], kind="stable").reset_index(drop=True)
    result = analyze_scores(sc, qu, facts, config, model_name=model_name)
    result = ConsistencyResult(**{**result.__dict__, "timings": timings})
    if store is not None:
        for name in ("facts", "summary", "per_relation", "sweep", "queries"):
            store.write_table(f"consistency_{name}", getattr(result, name))
    return result


def _top1(model: TLModel, res: Any) -> list[bool]:
    """Whether the answer is the model's top-1 prediction for each attributed prompt."""
    import torch

    from qloc_tl.core.tokens import tokenize_prompts

    toks, last = tokenize_prompts(model, list(res.prompts), prepend_bos=res.config.prepend_bos)
    logits = model(toks)
    pred = logits[torch.arange(len(last)), last].argmax(-1).cpu()
    return (pred == res.answer_ids.cpu()).tolist()
