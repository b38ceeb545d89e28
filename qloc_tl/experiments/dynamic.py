"""Dynamic KN selection: do knowledge synapses steer which knowledge neurons fire?

For a query q_i of a fact, with its knowledge synapses (KS, :mod:`qloc_tl.methods.synapses`) and the fact's per-query
KN sets N_1..N_k, the KS pattern entries (answer row, KS key columns) are **suppressed** (× 0) and
**enhanced** (× 2) with :func:`~qloc_tl.core.hooks.scale_attention` (``renormalize`` optional: rows rescaled to
sum to 1), and the **irrelevant-KS control** scales the same number of random *non*-KS columns in the same
heads (seeded per (seed, fact, query)). The neuron activations at the answer position are read in the same
pass with :func:`~qloc_tl.core.hooks.record_neurons` (composed after the attention hooks), for three groups:

================ ==================================================================================
group            neurons
================ ==================================================================================
``query``        N_i, the query's own KNs
``neighbor``     (∪_{j≠i} N_j) \\ N_i: KNs of the neighbor queries that are not the query's
``random``       random neurons outside ∪_j N_j, matched to N_i in count and per-layer distribution
================ ==================================================================================

Which synapses are edited is decided by their selection (:func:`qloc_tl.methods.synapses.select_synapses`; in
:class:`qloc_tl.experiments.query_localization.QLConfig` the ``ks_*`` fields). The default is global: one threshold over
every head's key columns at the answer row, so only the model's strongest entries are edited. Per-head
selection (``per_head=True`` / ``ks_per_head=True``) keeps a column in nearly every head of a deep model, and
the edit then scales hundreds of weak entries at once, which blurs which neurons the synapses steer.

Metrics per (intervention, op, group), ``v`` = activation at the answer position before / after:

* ``dvalue_rel`` = mean over the group of ``(v_after − v_before) / |v_before|`` (mean relative change; large
  for neurons that were near zero) and ``dvalue_rel_agg`` = ``Σ (v_after − v_before) / Σ |v_before|`` (robust);
* ``dvalue_abs`` = mean of ``v_after − v_before`` and ``dvalue_mag`` = mean of ``|v_after − v_before|``;
* ``dprob`` = ``p_after − p_before`` of the answer under the KS edit (the same for all three groups) and
  ``dprob_ratio`` = ``dprob / p_before``;
* ``dprob_via`` = the change of P(answer) when **only** the group's neurons are set to their post-edit values
  (:func:`~qloc_tl.core.hooks.set_neurons`, no attention edit): how much of the KS effect flows through the group.

Empty groups (no KNs, or no neighbor-only KNs) are recorded with ``n_neurons = 0``, NaN ΔValue and
``dprob_via = 0``; a query without synapses gets ``n_synapses = 0`` and Δ = 0. Nothing is dropped.

"Enh < Sup" (the paper's saturation claim) compares |Δ| under enhance with |Δ| under suppress:
:func:`enh_vs_sup`.

Examples:
    >>> from qloc_tl import Neuron, Synapse
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> rows = dynamic_kn_selection(
    ...     model, "alice was born in", " paris", [Synapse(1, 0, 1), Synapse(2, 3, 0)],
    ...     query_kns=[Neuron(2, 5), Neuron(1, 7)], neighbor_kns=[Neuron(0, 3)])
    >>> sorted(set(rows["group"]))
    ['neighbor', 'query', 'random']
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.hooks import HookList, intervene, record_neurons, scale_attention, set_neurons
from qloc_tl.core.identities import Head, Neuron, Synapse
from qloc_tl.core.model import TLModel, check_model, d_mlp, n_heads, n_layers, require_eval
from qloc_tl.core.stats import bootstrap_summary, derive_seed
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.core.validation import as_neuron_set, as_neuron_sets, check_int, check_nonempty
from qloc_tl.data.facts import Fact
from qloc_tl.experiments.mapping import RowBatch, check_ops, fact_answers, random_matched_neurons
from qloc_tl.methods.synapses import SynapseResult, synapse_columns

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "INTERVENTIONS",
    "irrelevant_synapses",
    "dynamic_kn_selection",
    "measure_dynamic_selection",
    "summarize_dynamic",
    "enh_vs_sup",
]

GROUPS: tuple[str, ...] = ("query", "neighbor", "random")
INTERVENTIONS: tuple[str, ...] = ("KS", "irrelevant")
_EPS = 1e-8


def irrelevant_synapses(
    synapses: Iterable[Synapse],
    *,
    query_position: int,
    seed: int = 0,
    exclude_keys: Sequence[int] = (),
) -> tuple[tuple[Synapse, ...], bool]:
    """The irrelevant-KS control: per head, as many random non-KS key columns (≤ ``query_position``) as KS.

    Returns:
        ``(synapses, short)``; ``short`` is True when some head had fewer free columns than KS (all free
        columns are then used).

    Examples:
        >>> ctrl, short = irrelevant_synapses([Synapse(0, 1, 2)], query_position=4, seed=0)
        >>> len(ctrl), ctrl[0].head, ctrl[0].key_position != 2, short
        (1, 1, True, False)
    """
    check_int("query_position", query_position)
    rng = np.random.default_rng(check_int("seed", seed))
    out: list[Synapse] = []
    short = False
    excl = {check_int("exclude_keys entry", j, None) for j in exclude_keys}
    for head, keys in synapse_columns(synapses).items():
        free = [j for j in range(query_position + 1) if j not in keys and j not in excl]
        k = len(keys)
        if len(free) < k:
            short = True
            k = len(free)
        pick: Any = rng.choice(len(free), size=k, replace=False) if k else []
        out.extend(Synapse(head.layer, head.head, free[int(j)]) for j in pick)
    return tuple(sorted(out)), short


def _attention_edits(
    model: TLModel,
    batch: RowBatch,
    edits: Sequence[tuple[int, Sequence[Synapse], float]],
    renormalize: bool,
) -> HookList:
    """:func:`scale_attention` hooks scaling row ``row``'s synapse entries by ``factor`` (rows share hooks
    when they edit the same heads, keys and factor)."""
    groups: dict[tuple[int, tuple[int, ...], tuple[int, ...], float], list[int]] = defaultdict(list)
    for row, syn, factor in edits:
        by_layer_keys: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
        for head, cols in synapse_columns(syn).items():
            by_layer_keys[(head.layer, cols)].append(head.head)
        for (layer, keys), heads in by_layer_keys.items():
            groups[(layer, tuple(sorted(heads)), keys, float(factor))].append(int(row))
    hooks = HookList()
    for (layer, head_ids, keys, factor), members in sorted(groups.items()):
        hooks += scale_attention(
            [Head(layer, h) for h in head_ids], factor, key_positions=list(keys), renormalize=renormalize,
            row_positions=batch.row_positions(members), model=model,
        )  # fmt: skip
    return hooks


def _as_synapses(s: SynapseResult | Iterable[Synapse], what: str) -> tuple[tuple[Synapse, ...], int | None]:
    if isinstance(s, SynapseResult):
        return s.synapses, s.query_position
    out = tuple(sorted(s))
    for x in out:
        if not isinstance(x, Synapse):
            raise InvalidInputError(f"{what} must contain Synapse objects or be a SynapseResult, got {x!r}")
    return out, None


def _group_stats(before: Tensor, after: Tensor) -> dict[str, float]:
    if before.numel() == 0:
        return {k: math.nan for k in ("dvalue_rel", "dvalue_rel_agg", "dvalue_abs", "dvalue_mag")}
    b, a = before.double(), after.double()
    d = a - b
    return {
        "dvalue_rel": float((d / b.abs().clamp_min(_EPS)).mean()),
        "dvalue_rel_agg": float(d.sum() / b.abs().sum().clamp_min(_EPS)),
        "dvalue_abs": float(d.mean()),
        "dvalue_mag": float(d.abs().mean()),
    }


_DYN_COLUMNS = [
    "fact_key", "relation", "query_index", "query", "class", "intervention", "op", "factor", "group",
    "n_synapses", "empty_ks", "irrelevant_short", "n_neurons", "empty_group", "p_before", "p_after", "dprob",
    "dprob_ratio", "p_via", "dprob_via", "dvalue_rel", "dvalue_rel_agg", "dvalue_abs", "dvalue_mag",
]  # fmt: skip


def _measure_queries(
    model: TLModel,
    prompts: Sequence[str],
    answers: Sequence[int],
    synapses: Sequence[tuple[Synapse, ...]],
    qpos: Sequence[int],
    groups: Sequence[dict[str, tuple[Neuron, ...]]],
    ops: dict[str, float],
    renormalize: bool,
    site: str,
    seeds: Sequence[int],
    exclude_keys: Sequence[int],
    meta: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    k = len(prompts)
    L = n_layers(model)
    H = n_heads(model)
    controls = []
    for i in range(k):
        for s in synapses[i]:
            if s.layer >= L or s.head >= H or s.key_position > qpos[i]:
                raise InvalidInputError(f"{s!r} is outside the model or after the answer position {qpos[i]} of query {i}")
        controls.append(irrelevant_synapses(synapses[i], query_position=qpos[i], seed=seeds[i], exclude_keys=exclude_keys))
    # pass 1: clean row + one row per (intervention, op) with synapses, all neurons recorded
    jobs: list[tuple[int, str, str]] = []
    for i in range(k):
        for inter in INTERVENTIONS:
            syn = synapses[i] if inter == "KS" else controls[i][0]
            if syn:
                jobs.extend((i, inter, op) for op in ops)
    rows = list(range(k)) + [i for i, _, _ in jobs]
    batch = RowBatch(model, prompts, answers, rows)
    edits = []
    for r, (i, inter, op) in enumerate(jobs, start=k):
        edits.append((r, synapses[i] if inter == "KS" else controls[i][0], ops[op]))
    store: dict[int, Tensor] = {}
    hooks = _attention_edits(model, batch, edits, renormalize) + record_neurons(range(L), store, site=site)
    with torch.no_grad(), intervene(model, hooks) as m:
        logits = m(batch.tokens)
        p = batch.probs(logits).cpu()
    idx = torch.arange(len(batch), device=batch.last.device)
    values = torch.stack([store[layer][idx, batch.last] for layer in range(L)], dim=1).cpu()  # [rows, L, d_mlp]
    del store

    def gather(row: int, neurons: tuple[Neuron, ...]) -> Tensor:
        if not neurons:
            return torch.empty(0, dtype=values.dtype)
        li = torch.tensor([n.layer for n in neurons])
        ni = torch.tensor([n.index for n in neurons])
        return values[row, li, ni]

    # pass 2: dprob_via — set each group's neurons to their post-edit values (no attention edit)
    via_jobs = []
    for r, (i, _inter, _op) in enumerate(jobs, start=k):
        for g in GROUPS:
            if groups[i][g]:
                via_jobs.append((r, i, g))
    p_via: dict[tuple[int, str], float] = {}
    if via_jobs:
        vbatch = RowBatch(model, prompts, answers, [i for _, i, _ in via_jobs])
        vhooks = HookList()
        for vr, (r, i, g) in enumerate(via_jobs):
            neurons = groups[i][g]
            vhooks += set_neurons(
                neurons, gather(r, neurons).to(torch.float64), row_positions=vbatch.row_positions([vr]), site=site,
                model=model,
            )  # fmt: skip
        with torch.no_grad(), intervene(model, vhooks) as m:
            pv = vbatch.probs(m(vbatch.tokens)).cpu()
        p_via = {(r, g): float(pv[vr]) for vr, (r, _, g) in enumerate(via_jobs)}
    job_row = {job: r for r, job in enumerate(jobs, start=k)}
    out = []
    for i in range(k):
        pb = float(p[i])
        for inter in INTERVENTIONS:
            syn = synapses[i] if inter == "KS" else controls[i][0]
            for op, factor in ops.items():
                jr = job_row.get((i, inter, op))
                pa = float(p[jr]) if jr is not None else pb
                for g in GROUPS:
                    neurons = groups[i][g]
                    if jr is None or not neurons:
                        stats = _group_stats(gather(i, neurons), gather(i, neurons))
                        pvia = pb
                    else:
                        stats = _group_stats(gather(i, neurons), gather(jr, neurons))
                        pvia = p_via[(jr, g)]
                    rec = dict(meta[i])
                    rec.update(
                        intervention=inter, op=op, factor=factor, group=g, n_synapses=len(syn), empty_ks=not syn,
                        irrelevant_short=bool(controls[i][1]) if inter == "irrelevant" else False,
                        n_neurons=len(neurons), empty_group=not neurons, p_before=pb, p_after=pa, dprob=pa - pb,
                        dprob_ratio=(pa - pb) / pb if pb > 0 else math.nan, p_via=pvia, dprob_via=pvia - pb, **stats,
                    )  # fmt: skip
                    out.append(rec)
    return out


def _groups_for(
    kn_sets: list[frozenset[Neuron]], i: int, width: int, seed: int
) -> dict[str, tuple[Neuron, ...]]:
    own = kn_sets[i]
    union = frozenset().union(*kn_sets)
    others = frozenset().union(*(s for j, s in enumerate(kn_sets) if j != i)) if len(kn_sets) > 1 else frozenset()
    return {
        "query": tuple(sorted(own)),
        "neighbor": tuple(sorted(others - own)),
        "random": random_matched_neurons(own, d_mlp=width, exclude=union, seed=seed),
    }


def dynamic_kn_selection(
    model: TLModel,
    query: str,
    answer: str | int,
    synapses: SynapseResult | Iterable[Synapse],
    *,
    query_kns: Iterable[Neuron],
    neighbor_kns: Iterable[Neuron] = (),
    ops: Mapping[str, float] | None = None,
    renormalize: bool = False,
    seed: int = 0,
    site: str = "post",
    exclude_keys: Sequence[int] = (),
    multi_token: Literal["error", "first"] = "first",
) -> pd.DataFrame:
    """Dynamic-KN-selection rows of one query (see the module docstring for the metrics).

    Args:
        model: a TL model in eval mode that honours ``attn.hook_pattern`` edits.
        query, answer: the prompt and its answer (continuation string or token id).
        synapses: the query's knowledge synapses (a :class:`SynapseResult` or Synapse objects).
        query_kns: the query's KNs; ``neighbor_kns``: KNs of its neighbor queries (the query's own are removed).
        ops: op name → factor (default suppress 0, enhance 2).
        renormalize: rescale each edited attention row to sum to 1.
        seed: seeds the irrelevant-KS columns and the random neurons.
        site: neuron site.
        exclude_keys: key positions the irrelevant-KS control never picks.

    Returns:
        A DataFrame with one row per (intervention, op, group).
    """
    check_model(model)
    require_eval(model)
    ops = check_ops(ops)
    syn, qp = _as_synapses(synapses, "synapses")
    answer_id = answer_token_id(model, query, answer, multi_token=multi_token)
    if qp is None:
        qp = int(model.to_tokens(query).shape[1]) - 1
    own = as_neuron_set(query_kns, "query_kns")
    nb = as_neuron_set(neighbor_kns, "neighbor_kns")
    groups = _groups_for([own, nb], 0, d_mlp(model), derive_seed(seed, "", 0, "random"))
    meta = [{"fact_key": "", "relation": "", "query_index": 0, "query": query, "class": ""}]
    rows = _measure_queries(
        model, [query], [answer_id], [syn], [qp], [groups], ops, renormalize, site,
        [derive_seed(seed, "", 0, "irrelevant")], exclude_keys, meta,
    )  # fmt: skip
    return pd.DataFrame.from_records(rows, columns=_DYN_COLUMNS)


def measure_dynamic_selection(
    model: TLModel,
    facts: Sequence[Fact],
    synapses: Mapping[str, Sequence[SynapseResult | Iterable[Synapse]]],
    kn_sets: Mapping[str, Sequence[Iterable[Neuron]]],
    *,
    ops: Mapping[str, float] | None = None,
    renormalize: bool = False,
    seed: int = 0,
    site: str = "post",
    exclude_keys: Sequence[int] = (),
    classes: Mapping[str, str] | None = None,
    multi_token: Literal["error", "first"] = "first",
    show_progress: bool = False,
) -> pd.DataFrame:
    """Dynamic-KN-selection rows for every query of every fact (queries of a fact share forward passes).

    Args:
        facts: the facts.
        synapses: fact key → one synapse set (or :class:`SynapseResult`) per query.
        kn_sets: fact key → one KN set per query.
        classes: optional fact key → class label for the ``class`` column.
        Other arguments: see :func:`dynamic_kn_selection`.

    Returns:
        A long DataFrame, one row per (fact, query, intervention, op, group).
    """
    check_model(model)
    require_eval(model)
    ops = check_ops(ops)
    facts = list(check_nonempty("facts", facts))
    width = d_mlp(model)
    records: list[dict[str, Any]] = []
    it: Iterable[Fact] = facts
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(facts, desc="dynamic KN selection", unit="fact")
    for fact in it:
        for name, mp in (("synapses", synapses), ("kn_sets", kn_sets)):
            if fact.key not in mp or len(mp[fact.key]) != len(fact.queries):
                raise InvalidInputError(
                    f"{name} must map fact {fact.key!r} to one entry per query ({len(fact.queries)} queries)"
                )
        sets = as_neuron_sets(kn_sets[fact.key], f"kn_sets[{fact.key!r}]")
        answers = fact_answers(model, fact, multi_token)
        syns, qps = [], []
        for i, s in enumerate(synapses[fact.key]):
            sy, qp = _as_synapses(s, f"synapses[{fact.key!r}][{i}]")
            syns.append(sy)
            qps.append(qp if qp is not None else int(model.to_tokens(fact.prompts[i]).shape[1]) - 1)
        groups = [_groups_for(sets, i, width, derive_seed(seed, fact.key, i, "random")) for i in range(len(sets))]
        cls = classes.get(fact.key, "excluded") if classes is not None else "excluded"
        meta = [
            {"fact_key": fact.key, "relation": fact.relation, "query_index": i, "query": q, "class": cls}
            for i, q in enumerate(fact.prompts)
        ]
        seeds = [derive_seed(seed, fact.key, i, "irrelevant") for i in range(len(sets))]
        records.extend(
            _measure_queries(
                model, list(fact.prompts), answers, syns, qps, groups, ops, renormalize, site, seeds, exclude_keys, meta
            )
        )
    return pd.DataFrame.from_records(records, columns=_DYN_COLUMNS)


_DYN_STATS = {
    "dvalue_rel": ("dvalue_rel", None),
    "dvalue_rel_agg": ("dvalue_rel_agg", None),
    "dvalue_abs": ("dvalue_abs", None),
    "dvalue_mag": ("dvalue_mag", None),
    "dprob": ("dprob", None),
    "dprob_ratio": ("dprob_ratio", None),
    "dprob_via": ("dprob_via", None),
}


def summarize_dynamic(
    rows: pd.DataFrame,
    *,
    by: Sequence[str] = ("class", "intervention", "op", "group"),
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Aggregate dynamic-KN-selection rows: means with fact-bootstrap CIs per group.

    Columns: the ``by`` keys, ``n_rows``, ``n_facts``, ``n_empty_group``, ``n_empty_ks``, ``mean_n_neurons``,
    and ``dvalue_rel``, ``dvalue_rel_agg``, ``dvalue_abs``, ``dvalue_mag``, ``dprob``, ``dprob_ratio``,
    ``dprob_via`` (NaN entries — empty groups' ΔValue — are skipped) each with ``_lo`` / ``_hi``.
    """
    by = list(by)
    missing = [c for c in by if c not in rows.columns]
    if missing:
        raise InvalidInputError(f"cannot group by {missing}: the rows have columns {list(rows.columns)}")
    out = []
    for gkey, g in rows.groupby(by, sort=True, dropna=False):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        rec: dict[str, Any] = dict(zip(by, gkey))
        rec.update(
            n_rows=len(g), n_facts=g["fact_key"].nunique(), n_empty_group=int(g["empty_group"].sum()),
            n_empty_ks=int(g["empty_ks"].sum()), mean_n_neurons=float(g["n_neurons"].mean()),
        )  # fmt: skip
        rec.update(bootstrap_summary(g, ratios=_DYN_STATS, n_bootstrap=n_bootstrap, ci=ci, seed=derive_seed(seed, *gkey)))
        out.append(rec)
    res = pd.DataFrame.from_records(out)
    if "group" in by and len(res):
        order = {g: i for i, g in enumerate(GROUPS)}
        keys = [c for c in by if c != "group"]
        res = res.assign(_o=res["group"].map(order)).sort_values(keys + ["_o"]).drop(columns="_o").reset_index(drop=True)
    return res


def enh_vs_sup(
    rows: pd.DataFrame,
    *,
    metrics: Sequence[str] = ("dprob", "dvalue_rel_agg", "dvalue_abs"),
    by: Sequence[str] = ("class", "intervention", "group"),
    suppress: str = "suppress",
    enhance: str = "enhance",
) -> pd.DataFrame:
    """The paper's "Enh < Sup" saturation check: |Δ| under enhance vs under suppress.

    Rows are paired per (fact, query, ``by``). For each metric: ``{m}_sup`` = mean |Δ| under suppress,
    ``{m}_enh`` = mean |Δ| under enhance, ``{m}_enh_lt_sup`` = whether the mean magnitudes satisfy Enh < Sup,
    and ``{m}_frac_enh_lt_sup`` = the fraction of paired queries with |Δ_enh| < |Δ_sup|.
    Works for mapping rows too (``by=("class", "set")``, ``metrics=("dprob", "dprob_ratio")``).

    Examples:
        >>> r = pd.DataFrame({"fact_key": ["f"] * 2, "query_index": [0, 0], "group": ["query"] * 2,
        ...                   "op": ["suppress", "enhance"], "dprob": [-0.3, 0.1]})
        >>> enh_vs_sup(r, metrics=["dprob"], by=["group"])["dprob_enh_lt_sup"].tolist()
        [True]
    """
    by = list(by)
    keys = ["fact_key", "query_index", *by]
    metrics = list(check_nonempty("metrics", metrics))
    missing = [c for c in [*keys, "op", *metrics] if c not in rows.columns]
    if missing:
        raise InvalidInputError(f"rows lack the columns {missing}: they have {list(rows.columns)}")
    sup = rows[rows["op"] == suppress].set_index(keys)
    enh = rows[rows["op"] == enhance].set_index(keys)
    joined = sup[list(metrics)].abs().join(enh[list(metrics)].abs(), lsuffix="_sup", rsuffix="_enh", how="inner")
    joined = joined.reset_index()
    out = []
    groups = joined.groupby(by, sort=True, dropna=False) if by else [((), joined)]
    for gkey, g in groups:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        rec: dict[str, Any] = dict(zip(by, gkey))
        rec["n_pairs"] = len(g)
        for mname in metrics:
            s, e = g[f"{mname}_sup"], g[f"{mname}_enh"]
            ok = s.notna() & e.notna()
            rec[f"{mname}_sup"] = float(s[ok].mean()) if ok.any() else math.nan
            rec[f"{mname}_enh"] = float(e[ok].mean()) if ok.any() else math.nan
            rec[f"{mname}_enh_lt_sup"] = bool(rec[f"{mname}_enh"] < rec[f"{mname}_sup"]) if ok.any() else None
            rec[f"{mname}_frac_enh_lt_sup"] = float((e[ok] < s[ok]).mean()) if ok.any() else math.nan
        out.append(rec)
    return pd.DataFrame.from_records(out)
