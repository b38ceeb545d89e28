"""Figures of the knowledge-editing experiment: the editing table as bars (:func:`plot_editing`) and the
update-strength sweep as lines (:func:`plot_strength_sweep`).

Both take computed tables (from :func:`qloc_tl.experiments.editing.run_editing_experiment` and
:func:`qloc_tl.experiments.strength.update_strength_sweep`) and return a matplotlib ``Figure``, saved to
``path`` when given. matplotlib is imported lazily (``pip install qloc-tl[vis]``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.store import atomic_save_figure
from qloc_tl.experiments.editing import EditingResult
from qloc_tl.experiments.editing_config import CLASSES

__all__ = ["plot_editing", "plot_strength_sweep"]


def plot_editing(result: EditingResult | pd.DataFrame, path: str | Path | None = None) -> Any:
    """Bar chart of the editing table: one panel per (edit, metric), K_C / K_I groups, one bar per method.

    Metrics: Rel, Gen, Loc (other relations), Loc (same relation), Avg and the median relative ΔPPL (log
    scale when it spans orders of magnitude). Returns the ``Figure``; saved to ``path`` when given.
    """
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("plot_editing needs matplotlib: pip install 'qloc-tl[vis]'") from exc
    table = result.table if isinstance(result, EditingResult) else result
    if not isinstance(table, pd.DataFrame) or not {"edit", "class", "method"}.issubset(table.columns):
        raise InvalidInputError(
            "plot_editing needs an EditingResult or its table (edit, class, method columns)"
        )
    ppl_col = "ppl_rel_delta_median" if "ppl_rel_delta_median" in table.columns else "ppl_rel_delta"
    ppl_label = "ΔPPL/PPL (median)" if ppl_col.endswith("median") else "ΔPPL/PPL (mean)"
    metrics = [("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc (other rel.)"), ("loc_same", "Loc (same rel.)"), ("avg", "Avg"),
               (ppl_col, ppl_label)]  # fmt: skip
    metrics = [(c, lab) for c, lab in metrics if c in table.columns]
    edits = list(dict.fromkeys(table["edit"]))
    methods = list(dict.fromkeys(table["method"]))
    classes = [c for c in CLASSES if c in set(table["class"])]
    fig, axes = plt.subplots(
        len(edits), len(metrics), figsize=(3.1 * len(metrics), 2.8 * len(edits)), squeeze=False
    )
    width = 0.8 / max(len(methods), 1)
    for r, edit in enumerate(edits):
        for c, (col, label) in enumerate(metrics):
            ax = axes[r][c]
            for m_i, method in enumerate(methods):
                vals = []
                for cls in classes:
                    sel = table[
                        (table["edit"] == edit) & (table["class"] == cls) & (table["method"] == method)
                    ]
                    vals.append(float(sel[col].iloc[0]) if len(sel) else math.nan)
                xs = np.arange(len(classes)) + (m_i - (len(methods) - 1) / 2) * width
                ax.bar(xs, vals, width, label=method)
            ax.set_xticks(np.arange(len(classes)))
            ax.set_xticklabels(classes)
            ax.set_title(f"{edit}: {label}", fontsize=9)
            if col != ppl_col:
                ax.set_ylim(0, 1.05)
            elif all(v > 0 for v in table[col].dropna()) and table[col].max() > 100 * max(
                table[col].min(), 1e-12
            ):
                ax.set_yscale("log")
            ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        atomic_save_figure(fig, path, dpi=120)
    return fig


def plot_strength_sweep(df: pd.DataFrame, path: str | Path | None = None) -> Any:
    """Rel, Gen, Loc (other relations) and Loc (same relation) against λ2 (log axis), one line per neuron
    set, pooled over classes (weighted by ``n_facts``). Returns the Figure; saved to ``path`` when given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    need = {"lambda2", "method", "n_facts", "rel", "gen", "loc"}
    if not need <= set(df.columns):
        raise InvalidInputError(f"plot_strength_sweep needs the columns {sorted(need)}")
    cols = [c for c in ("rel", "gen", "loc", "loc_same") if c in df.columns]
    d = df[df["n_facts"] > 0]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.8), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for method, g in d.groupby("method", sort=False):
            pooled = g.groupby("lambda2").apply(
                lambda x, c=col: (x[c] * x["n_facts"]).sum() / x.loc[x[c].notna(), "n_facts"].sum(),
                include_groups=False,
            )
            ax.plot(pooled.index, pooled.values, marker="o", label=str(method))
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("λ2")
        ax.set_title({"rel": "Rel", "gen": "Gen", "loc": "Loc (other rel.)", "loc_same": "Loc (same rel.)"}[col], fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        atomic_save_figure(fig, path, dpi=120)
    return fig
