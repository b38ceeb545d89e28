"""Query-KN mapping (Chen et al., ICLR 2025, §4.5 of the method spec): which neuron sets control a query?

For a fact with neighbor queries q_1..q_k and their knowledge-neuron (KN) sets N_1..N_k
(c(n) = #{j : n ∈ N_j}), each query q_i is intervened on with five sets. The neighbor sets are built from the
other queries by default: with q_i's own KNs included, Intersection ⊆ Self ⊆ Union by construction, and the
paper's finding for inconsistent knowledge (Self clearly above every other set, Intersection worst) could not
be tested.

================ ======================================================================================
set              definition
================ ======================================================================================
``Self``         N_i, the query's own KNs
``Union``        ∪_{j≠i} N_j: the *other* queries' KNs (default, ``include_self=False``); with
                 ``include_self=True`` j runs over all k queries
``Intersection`` ∩_{j≠i} N_j (strict; same ``include_self`` rule)
``Refine``       {n : c(n) ≥ ``refine_min_count``}, c counted over the same queries (default 2: "appears in
                 more than one query")
``Unrelated``    a placebo: random neurons matched to Self in count *and* per-layer distribution, drawn
                 from neurons outside the fact's Union; seeded per (seed, fact key, query index), so it
                 does not depend on chunking or on which other facts are in the run
================ ======================================================================================

Each set is **suppressed** (activations × 0) and **enhanced** (× 2) at the answer position (the last prompt
token, which predicts the object) with :func:`~qloc_tl.core.hooks.scale_neurons` inside
:func:`~qloc_tl.core.hooks.intervene`. Sign convention: ``dprob = p_after − p_before`` (so a suppression that
hurts the answer is negative) and ``dprob_ratio = dprob / p_before``. Aggregates report the **mean of
ratios**, the **ratio of means** (``Σ dprob / Σ p_before``, Dai et al.'s form) and the mean absolute change,
each with a bootstrap CI that resamples *facts* (queries of one fact are not independent).

An empty set (e.g. an empty Intersection) is never dropped: its row has ``n_neurons = 0``, ``empty = True``,
``p_after = p_before`` and ``dprob = 0``; summaries count such rows in ``n_empty``.

Batching: all rows of a fact (k clean rows plus one row per (query, non-empty set, op)) run in one forward
pass. Each row gets its own neuron set through ``row_positions``: the batch carries one extra padding
column, and a hook that must not touch a row points that row at the padding column, which no real position
can attend to (causal attention), so the row's numbers are exactly those of running it alone.

Examples:
    >>> from qloc_tl import Fact, Neuron
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> fact = Fact("alice", "P19", "paris", ["alice was born in", "alice is from the city of"])
    >>> kns = {fact.key: [{Neuron(0, 1), Neuron(2, 5)}, {Neuron(2, 5)}]}
    >>> rows = measure_query_kn_mapping(model, [fact], kns)
    >>> sorted(set(rows["set"])) == sorted(SET_NAMES)
    True
    >>> bool((rows.loc[rows.op == "suppress", "factor"] == 0).all())
    True
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.hooks import HookList, intervene, scale_neurons
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import TLModel, check_model, d_mlp, n_layers, require_eval
from qloc_tl.core.stats import bootstrap_summary, derive_seed
from qloc_tl.core.tokens import answer_token_id, tokenize_prompts
from qloc_tl.core.validation import as_neuron_set, as_neuron_sets, check_int, check_nonempty
from qloc_tl.data.facts import Fact
from qloc_tl.methods.consistency_score import neuron_counts

logger = logging.getLogger(__name__)

__all__ = [
    "SET_NAMES",
    "OPS",
    "random_matched_neurons",
    "query_neuron_sets",
    "measure_query_kn_mapping",
    "summarize_mapping",
    "set_order",
]

SET_NAMES: tuple[str, ...] = ("Self", "Union", "Intersection", "Refine", "Unrelated")
#: The default interventions: name -> activation factor (Dai et al. 2022: suppress = 0, enhance = ×2).
OPS: dict[str, float] = {"suppress": 0.0, "enhance": 2.0}
CLASS_NONE = "excluded"


# --------------------------------------------------------------------------------------------------
# Seeds and neuron sets
# --------------------------------------------------------------------------------------------------





def random_matched_neurons(
    like: Iterable[Neuron],
    *,
    d_mlp: int,
    exclude: Iterable[Neuron] = (),
    seed: int = 0,
) -> tuple[Neuron, ...]:
    """Random neurons with the same count per layer as ``like``, avoiding ``exclude`` (a placebo set).

    When a layer has fewer free neurons than needed, all free ones are taken (and a warning is logged).

    Examples:
        >>> s = random_matched_neurons([Neuron(0, 1), Neuron(2, 3), Neuron(2, 4)], d_mlp=8, seed=1)
        >>> [n.layer for n in s]
        [0, 2, 2]
    """
    check_int("d_mlp", d_mlp, 1)
    check_int("seed", seed)
    per_layer = Counter(n.layer for n in as_neuron_set(like, "like"))
    excl: dict[int, set[int]] = defaultdict(set)
    for n in as_neuron_set(exclude, "exclude"):
        excl[n.layer].add(n.index)
    rng = np.random.default_rng(seed)
    out: list[Neuron] = []
    for layer in sorted(per_layer):
        free = np.setdiff1d(np.arange(d_mlp), np.fromiter(excl[layer], dtype=np.int64, count=len(excl[layer])))
        k = per_layer[layer]
        if len(free) < k:
            logger.warning("layer %d has only %d free neurons for a placebo of %d", layer, len(free), k)
            k = len(free)
        pick = rng.choice(free, size=k, replace=False) if k else np.empty(0, dtype=np.int64)
        out.extend(Neuron(layer, int(i)) for i in sorted(pick.tolist()))
    return tuple(out)


def query_neuron_sets(
    kn_sets: Sequence[Iterable[Neuron]],
    *,
    d_mlp: int,
    refine_min_count: int = 2,
    include_self: bool = False,
    seed: int = 0,
    key: str = "",
) -> list[dict[str, tuple[Neuron, ...]]]:
    """The five neuron sets (see the module docstring) of every query of one fact.

    Args:
        kn_sets: one KN set per query, in query order.
        d_mlp: neurons per layer (for the Unrelated placebo).
        refine_min_count: Refine keeps neurons appearing in at least this many queries' sets.
        include_self: Union / Intersection / Refine over the other queries only (False, default: the paper's
            reading) or over all queries including query i (True).
        seed, key: the Unrelated placebo of query i is drawn with ``derive_seed(seed, key, i)``.

    Returns:
        One dict per query mapping each name of :data:`SET_NAMES` to a sorted tuple of neurons.

    Examples:
        >>> a, b, c = Neuron(0, 1), Neuron(0, 2), Neuron(1, 3)
        >>> sets = query_neuron_sets([{a, b}, {a, c}, {a}], d_mlp=8)
        >>> [str(n) for n in sets[0]["Intersection"]], [str(n) for n in sets[0]["Refine"]]
        (['L0N1'], ['L0N1'])
        >>> len(sets[1]["Unrelated"]) == len(sets[1]["Self"])
        True
    """
    if isinstance(refine_min_count, bool) or not isinstance(refine_min_count, int) or refine_min_count < 1:
        raise InvalidInputError(f"refine_min_count must be an int >= 1, got {refine_min_count!r}")
    check_int("d_mlp", d_mlp, 1)
    sets = as_neuron_sets(kn_sets)
    if not sets:
        raise InvalidInputError("kn_sets is empty: give one neuron set per query")
    full_union = frozenset().union(*sets)
    out = []
    for i, own in enumerate(sets):
        group = sets if include_self else [s for j, s in enumerate(sets) if j != i]
        union = frozenset().union(*group) if group else frozenset()
        inter = frozenset.intersection(*group) if group else frozenset()
        counts = neuron_counts(group) if group else Counter()
        refine = frozenset(n for n in union if counts[n] >= refine_min_count)
        unrelated = random_matched_neurons(own, d_mlp=d_mlp, exclude=full_union, seed=derive_seed(seed, key, i))
        out.append(
            {
                "Self": tuple(sorted(own)),
                "Union": tuple(sorted(union)),
                "Intersection": tuple(sorted(inter)),
                "Refine": tuple(sorted(refine)),
                "Unrelated": unrelated,
            }
        )
    return out



# --------------------------------------------------------------------------------------------------
# Batched per-row interventions (shared with qloc_tl.experiments.dynamic and qloc_tl.methods.synapses)
# --------------------------------------------------------------------------------------------------


class RowBatch:
    """A right-padded batch of prompts with one extra padding column, for per-row interventions.

    Attributes:
        tokens: ``[batch, pos + 1]``; column ``pad`` is padding in every row.
        last: ``[batch]`` index of each row's answer position (last real prompt token).
        pad: index of the padding column.
        answers: ``[batch]`` answer token ids.
    """

    def __init__(
        self,
        model: TLModel,
        prompts: Sequence[str | Tensor],
        answers: Sequence[int],
        rows: Sequence[int],
    ) -> None:
        toks, last = tokenize_prompts(model, list(prompts))
        n_ctx = int(getattr(model.cfg, "n_ctx", 10**9) or 10**9)
        if toks.shape[1] + 1 > n_ctx:
            raise InvalidInputError(
                f"a prompt of {toks.shape[1]} tokens leaves no room for the padding column that batched "
                f"interventions need (n_ctx={n_ctx}); shorten the prompt"
            )
        pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        pad_col = torch.full((toks.shape[0], 1), int(pad_id) if pad_id is not None else 0, dtype=toks.dtype, device=toks.device)
        toks = torch.cat([toks, pad_col], dim=1)
        idx = torch.tensor(list(rows), dtype=torch.long, device=toks.device)
        self.tokens: Int[Tensor, "batch pos"] = toks.index_select(0, idx)
        self.last: Int[Tensor, " batch"] = last.index_select(0, idx)
        self.pad = int(toks.shape[1] - 1)
        self.answers: Int[Tensor, " batch"] = torch.tensor(
            [int(answers[r]) for r in rows], dtype=torch.long, device=toks.device
        )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def row_positions(self, rows: Iterable[int]) -> Int[Tensor, " batch"]:
        """Per-row positions: each row's answer position for ``rows``, the padding column for the others."""
        rp = torch.full((len(self),), self.pad, dtype=torch.long, device=self.tokens.device)
        idx = torch.tensor(sorted(set(rows)), dtype=torch.long, device=self.tokens.device)
        if idx.numel():
            rp[idx] = self.last[idx]
        return rp

    def probs(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """P(answer) at each row's answer position (softmax in float32, or float64 for float64 models)."""
        return _answer_probs(logits, self.last, self.answers)


def _answer_probs(
    logits: Float[Tensor, "batch pos d_vocab"], last: Int[Tensor, " batch"], answers: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    rows = torch.arange(logits.shape[0], device=logits.device)
    sel = logits[rows, last.to(logits.device)]
    sel = sel.double() if sel.dtype == torch.float64 else sel.float()
    return sel.softmax(-1).gather(-1, answers.to(logits.device).unsqueeze(-1)).squeeze(-1)


def row_neuron_hooks(
    model: TLModel,
    batch: RowBatch,
    edits: Sequence[tuple[int, Sequence[Neuron], float]],
    *,
    site: str = "post",
) -> HookList:
    """:func:`scale_neurons` hooks applying ``factor`` to ``neurons`` in batch row ``row`` only.

    ``edits`` is a list of ``(row, neurons, factor)``; rows that share the same neurons and factor share one
    hook (its ``row_positions`` point the other rows at the padding column).
    """
    groups: dict[tuple[tuple[Neuron, ...], float], list[int]] = defaultdict(list)
    for row, neurons, factor in edits:
        ns = tuple(sorted(neurons))
        if ns:
            groups[(ns, float(factor))].append(int(row))
    hooks = HookList()
    for (ns, factor), rows in groups.items():
        hooks += scale_neurons(ns, factor, row_positions=batch.row_positions(rows), site=site, model=model)
    return hooks


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def check_ops(ops: Mapping[str, float] | None) -> dict[str, float]:
    ops = dict(OPS if ops is None else ops)
    if not ops:
        raise InvalidInputError("ops is empty: give e.g. {'suppress': 0.0, 'enhance': 2.0}")
    for name, f in ops.items():
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
            raise InvalidInputError(f"factor of op {name!r} must be a finite number, got {f!r}")
    return {str(k): float(v) for k, v in ops.items()}


def fact_answers(model: TLModel, fact: Fact, multi_token: str) -> list[int]:
    return [answer_token_id(model, q, fact.answer, multi_token=multi_token) for q in fact.prompts]  # type: ignore[arg-type]


def _neuron_str(neurons: Iterable[Neuron]) -> str:
    return ";".join(str(n) for n in neurons)


def measure_query_kn_mapping(
    model: TLModel,
    facts: Sequence[Fact],
    kn_sets: Mapping[str, Sequence[Iterable[Neuron]]],
    *,
    ops: Mapping[str, float] | None = None,
    refine_min_count: int = 2,
    include_self: bool = False,
    seed: int = 0,
    site: str = "post",
    multi_token: Literal["error", "first"] = "first",
    classes: Mapping[str, str] | None = None,
    max_batch: int = 256,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Suppress / enhance the five neuron sets of every query of every fact and record Δprob per row.

    Args:
        model: a TL model in eval mode.
        facts: the facts; each query is asked for ``fact.answer`` (first token with ``multi_token="first"``).
        kn_sets: fact key → one KN set per query (in ``fact.queries`` order).
        ops: op name → factor (default :data:`OPS`: suppress 0, enhance 2).
        refine_min_count, include_self, seed: see :func:`query_neuron_sets`.
        site: the neuron site the KNs live at (``"post"`` default).
        classes: optional fact key → class label, copied into the ``class`` column.
        max_batch: at most this many rows per forward pass.
        show_progress: a tqdm bar over facts.

    Returns:
        A long DataFrame, one row per (fact, query, set, op): ``fact_key, relation, subject, object,
        query_index, query, class, set, op, factor, n_neurons, empty, neurons, answer_id, p_before, p_after,
        dprob, dprob_ratio``.
    """
    check_model(model)
    require_eval(model)
    ops = check_ops(ops)
    facts = list(check_nonempty("facts", facts))
    check_int("max_batch", max_batch, 1)
    width = d_mlp(model)
    L = n_layers(model)
    records: list[dict[str, Any]] = []
    it: Iterable[Fact] = facts
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(facts, desc="query-KN mapping", unit="fact")
    for fact in it:
        if not isinstance(fact, Fact):
            raise InvalidInputError(f"facts must be Fact objects, got {type(fact).__name__}")
        if fact.key not in kn_sets:
            raise InvalidInputError(f"no KN sets for fact {fact.key!r}; kn_sets must map every fact key")
        sets = as_neuron_sets(kn_sets[fact.key], f"kn_sets[{fact.key!r}]")
        if len(sets) != len(fact.queries):
            raise InvalidInputError(
                f"fact {fact.key!r} has {len(fact.queries)} queries but {len(sets)} KN sets; give one set per query"
            )
        for s in sets:
            for n in s:
                if n.layer >= L or n.index >= width:
                    raise InvalidInputError(f"{n!r} in the KN sets of {fact.key!r} is outside the model ({L} layers, d_mlp={width})")
        qsets = query_neuron_sets(
            sets, d_mlp=width, refine_min_count=refine_min_count, include_self=include_self, seed=seed, key=fact.key
        )
        records.extend(_measure_fact(model, fact, qsets, ops, site, multi_token, max_batch, classes))
    return pd.DataFrame.from_records(records, columns=_MAPPING_COLUMNS)


_MAPPING_COLUMNS = [
    "fact_key", "relation", "subject", "object", "query_index", "query", "class", "set", "op", "factor",
    "n_neurons", "empty", "neurons", "answer_id", "p_before", "p_after", "dprob", "dprob_ratio",
]  # fmt: skip


def _measure_fact(
    model: TLModel,
    fact: Fact,
    qsets: list[dict[str, tuple[Neuron, ...]]],
    ops: dict[str, float],
    site: str,
    multi_token: str,
    max_batch: int,
    classes: Mapping[str, str] | None,
) -> list[dict[str, Any]]:
    k = len(fact.queries)
    answers = fact_answers(model, fact, multi_token)
    # jobs: (query index, set name, op name); clean rows first
    jobs = [(i, name, op) for i in range(k) for name in SET_NAMES for op in ops if qsets[i][name]]
    p_before = _run_rows(model, list(fact.prompts), answers, [(i, (), 1.0) for i in range(k)], site, max_batch)
    p_after = _run_rows(
        model, list(fact.prompts), answers, [(i, qsets[i][name], ops[op]) for i, name, op in jobs], site, max_batch
    )
    after = {job: float(p) for job, p in zip(jobs, p_after)}
    cls = classes.get(fact.key, CLASS_NONE) if classes is not None else CLASS_NONE
    out = []
    for i, q in enumerate(fact.queries):
        pb = float(p_before[i])
        for name in SET_NAMES:
            neurons = qsets[i][name]
            for op, factor in ops.items():
                empty = not neurons
                pa = pb if empty else after[(i, name, op)]
                d = pa - pb
                out.append(
                    {
                        "fact_key": fact.key, "relation": fact.relation, "subject": fact.subject,
                        "object": fact.object, "query_index": i, "query": q.text, "class": cls, "set": name,
                        "op": op, "factor": factor, "n_neurons": len(neurons), "empty": empty,
                        "neurons": _neuron_str(neurons), "answer_id": answers[i], "p_before": pb, "p_after": pa,
                        "dprob": d, "dprob_ratio": d / pb if pb > 0 else math.nan,
                    }
                )  # fmt: skip
    return out


def _run_rows(
    model: TLModel,
    prompts: list[str],
    answers: list[int],
    rows: list[tuple[int, Sequence[Neuron], float]],
    site: str,
    max_batch: int,
) -> Tensor:
    """P(answer) of each row ``(prompt index, neurons, factor)`` (empty neurons: a clean row)."""
    out = []
    for start in range(0, len(rows), max_batch):
        chunk = rows[start : start + max_batch]
        batch = RowBatch(model, prompts, answers, [r[0] for r in chunk])
        hooks = row_neuron_hooks(model, batch, [(j, ns, f) for j, (_, ns, f) in enumerate(chunk)], site=site)
        with torch.no_grad(), intervene(model, hooks) as m:
            logits = m(batch.tokens)
            out.append(batch.probs(logits).cpu())
    return torch.cat(out) if out else torch.empty(0)


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------




_MAPPING_STATS = {
    "mean_of_ratios": ("dprob_ratio", None),
    "ratio_of_means": ("dprob", "p_before"),
    "mean_dprob": ("dprob", None),
    "mean_abs_dprob": ("abs_dprob", None),
}


def summarize_mapping(
    rows: pd.DataFrame,
    *,
    by: Sequence[str] = ("class", "set", "op"),
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    exclude_empty: bool = False,
) -> pd.DataFrame:
    """Aggregate :func:`measure_query_kn_mapping` rows per group (default: class × set × op).

    Columns: the ``by`` keys, ``n_rows`` (queries), ``n_facts``, ``n_empty`` (rows whose set was empty — they
    count with Δ = 0 unless ``exclude_empty``), ``mean_n_neurons``, ``mean_p_before``, and for each of
    ``mean_of_ratios`` (mean of Δp/p_before), ``ratio_of_means`` (ΣΔp / Σp_before), ``mean_dprob`` (mean Δp)
    and ``mean_abs_dprob`` (mean |Δp|) the value with ``_lo`` / ``_hi`` fact-bootstrap CI bounds.
    """
    by = list(by)
    missing = [c for c in by if c not in rows.columns]
    if missing:
        raise InvalidInputError(f"cannot group by {missing}: the rows have columns {list(rows.columns)}")
    df = rows.copy()
    if exclude_empty:
        df = df[~df["empty"]]
    df["abs_dprob"] = df["dprob"].abs()
    out = []
    order = {name: i for i, name in enumerate(SET_NAMES)}
    for gkey, g in df.groupby(by, sort=True, dropna=False):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        rec: dict[str, Any] = dict(zip(by, gkey))
        rec.update(
            n_rows=len(g), n_facts=g["fact_key"].nunique(), n_empty=int(g["empty"].sum()),
            mean_n_neurons=float(g["n_neurons"].mean()), mean_p_before=float(g["p_before"].mean()),
        )  # fmt: skip
        sub = seed if not by else derive_seed(seed, *gkey)
        rec.update(bootstrap_summary(g, ratios=_MAPPING_STATS, n_bootstrap=n_bootstrap, ci=ci, seed=sub))
        out.append(rec)
    res = pd.DataFrame.from_records(out)
    if "set" in by and len(res):
        res["_o"] = res["set"].map(order).fillna(len(order))
        res = res.sort_values([c for c in by if c != "set"] + ["_o"] if len(by) > 1 else ["_o"]).drop(columns="_o")
        res = res.reset_index(drop=True)
    return res


def set_order(
    summary: pd.DataFrame,
    *,
    metric: str = "mean_of_ratios",
    by: Sequence[str] = ("class", "op"),
) -> pd.DataFrame:
    """The order of the neuron sets by effect magnitude |``metric``| within each ``by`` group.

    Returns:
        One row per group: the ``by`` keys, ``order`` (e.g. ``"Self > Union > Refine > Intersection >
        Unrelated"``) and ``values`` (the metric per set, in that order).

    Examples:
        >>> s = pd.DataFrame({"op": ["suppress"] * 2, "set": ["Self", "Union"], "mean_of_ratios": [-0.1, -0.5]})
        >>> set_order(s, by=["op"])["order"].tolist()
        ['Union > Self']
    """
    by = list(by)
    out = []
    for gkey, g in summary.groupby(by, sort=True) if by else [((), summary)]:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        g = g.assign(_mag=g[metric].abs()).sort_values("_mag", ascending=False, kind="stable")
        rec: dict[str, Any] = dict(zip(by, gkey))
        rec["order"] = " > ".join(g["set"].tolist())
        rec["values"] = ", ".join(f"{s}={v:+.4g}" for s, v in zip(g["set"], g[metric]))
        out.append(rec)
    return pd.DataFrame.from_records(out)
