"""How strong an update must be: the editing experiment's update at a sweep of strengths λ2.

Dai et al.'s update ``v ← v − λ1·(‖v‖/‖e(o)‖)·e(o) + λ2·(‖v‖/‖e(o')‖)·e(o')`` (:func:`qloc_tl.core.edits.update`)
has one free strength, λ2 (8 in their code). Too strong, every neuron set reaches Rel = Gen = 1 and the
comparison of N_i, N_u and CAS says nothing (the built-in model saturates at λ2 = 8); too weak, no set moves
the prediction. :func:`update_strength_sweep` runs the update part of
:func:`~qloc_tl.experiments.editing.run_editing_experiment` once per λ2 on the same facts, neuron sets, o' and Locality
queries (attributions are computed once), so a reader can pick a strength where the sets differ and report
it beside the results; :func:`qloc_tl.reporting.editing_plots.plot_strength_sweep` draws Rel / Gen / Loc
against λ2.

Examples:
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> from qloc_tl import Fact
    >>> from qloc_tl.experiments.editing import EditingConfig
    >>> model = tiny_model()
    >>> facts = [Fact("alice", "P1", "paris", ["alice was born in", "alice speaks"]),
    ...          Fact("bob", "P1", "french", ["bob speaks", "bob was born in"])]
    >>> cfg = EditingConfig(require_known=False, steps=2, n_unrelated=1, n_same_relation=1)
    >>> df = update_strength_sweep(model, facts, lambdas=(1, 8), config=cfg, known_only=False)
    >>> sorted(df["lambda2"].unique().tolist())
    [1.0, 8.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.model import TLModel
from qloc_tl.data.facts import Fact
from qloc_tl.experiments.editing import EditingConfig, fact_attributions, run_editing_experiment
from qloc_tl.methods.known import restrict_to_known

__all__ = ["update_strength_sweep"]

METRICS = ("rel", "gen", "loc", "loc_same", "avg", "ppl_rel_delta_median", "dprob_new_edited")


def update_strength_sweep(
    model: TLModel,
    facts: Sequence[Fact],
    *,
    lambdas: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    config: EditingConfig | None = None,
    classes: Mapping[str, str] | None = None,
    attributions: Mapping[str, Any] | None = None,
    unrelated_facts: Sequence[Fact] | None = None,
    ppl_texts: Sequence[str] | None = None,
    show_progress: bool = False,
    known_only: bool | None = None,
) -> pd.DataFrame:
    """The editing table of the update at each strength λ2 in ``lambdas`` (λ1 and the rule from ``config``).

    Args:
        model, facts, classes, unrelated_facts, ppl_texts, known_only: as for
            :func:`~qloc_tl.experiments.editing.run_editing_experiment`.
        lambdas: the λ2 values (finite, > 0, distinct).
        config: an :class:`~qloc_tl.experiments.editing.EditingConfig`; its ``lambda2`` and ``edits`` are replaced.
        attributions: per-query attributions by fact key (computed once here when ``None``).

    Returns:
        One row per (λ2, class, method): ``lambda2``, ``class``, ``method``, ``n_facts`` and the means of
        ``rel``, ``gen``, ``loc``, ``loc_same``, ``avg``, ``ppl_rel_delta_median``, ``dprob_new_edited``.
    """
    lams = [float(x) for x in lambdas]
    if not lams or len(set(lams)) != len(lams) or any(not (x > 0 and x < float("inf")) for x in lams):
        raise InvalidInputError(f"lambdas must be distinct finite numbers > 0, got {list(lambdas)!r}")
    cfg = replace(config or EditingConfig(), edits=("update",))
    facts, known = restrict_to_known(model, list(facts), known_only, what="update_strength_sweep")
    if attributions is None:
        attributions = fact_attributions(model, facts, config=cfg, show_progress=show_progress)
    elif known is not None:
        kept = known.kept_queries()
        attributions = {k: v[list(kept[k])] for k, v in attributions.items() if k in kept}
    tables = []
    for lam in lams:
        res = run_editing_experiment(
            model, facts, config=replace(cfg, lambda2=lam), classes=classes, attributions=attributions,
            unrelated_facts=unrelated_facts, ppl_texts=ppl_texts, show_progress=show_progress, known_only=False,
        )  # fmt: skip
        t = res.table.copy()
        t.insert(0, "lambda2", lam)
        tables.append(t)
    df = pd.concat(tables, ignore_index=True)
    keep = ["lambda2", "class", "method", "n_facts", *[c for c in METRICS if c in df.columns]]
    return df[keep]
