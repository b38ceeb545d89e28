"""The result object of :func:`~qloc_tl.methods.attribution.attribute_neurons`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.identities import Neuron
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.selection import NeuronSet, select_neurons

__all__ = ["NeuronAttribution"]


@dataclass(frozen=True, eq=False)
class NeuronAttribution:
    """Attribution scores of every MLP neuron at the answer position, per prompt.

    Shapes (n = number of prompts, L = n_layers, d = d_mlp). ``scores`` drops the prompt axis when a single
    prompt was passed (a string or a 1-D token tensor) or for the per-prompt view ``res[i]``; every other
    per-prompt field always keeps it (n = 1 then). ``scores_batched`` is always ``[n, L, d]``.

    Layers that were not requested (``layers=``) hold **NaN** in ``scores``, ``baseline_prob``,
    ``baseline_objective`` and ``completeness_delta``; ``activations`` are filled for every layer.

    Attributes:
        scores: ``[L, d]`` or ``[n, L, d]`` attribution (float32, or float64 for float64 models).
        clean_prob: ``[n]`` P(answer | prompt).
        baseline_prob: ``[n, L]`` P(answer) with layer l's neurons at the answer position set to the baseline
            (SIG: mean over the per-token baselines).
        baseline_objective: ``[n, L]`` the objective (prob or logprob) at the baseline (SIG: mean over j).
        completeness_delta: ``[n, L]`` ``Σ_i scores[l, i] − (objective(clean) − baseline_objective[l])``;
            ≈ 0 up to quadrature error for IG and SIG (and AMIG with ``multiply_by="difference"``).
        activations: ``[n, L, d]`` clean neuron values at the answer position (at ``config.site``).
        prompts: the prompts as given (strings or token tensors).
        answer_ids: ``[n]`` answer token ids.
        positions: ``[n]`` index of the answer position (last real prompt token) in each prompt.
        n_tokens: ``[n]`` prompt lengths in tokens.
        config: the :class:`AttributionConfig`.
        path: which engine produced the numbers (``"reference"``, ``"kv-hooked"``, ``"blockwise"``, ``"packed"``,
            ``"full"``; see the engines section of the attribution docs).
        single: whether this is a single-prompt result (``scores`` is 2-D).
    """

    scores_batched: Float[Tensor, "n n_layers d_mlp"]
    clean_prob: Float[Tensor, " n"]
    baseline_prob: Float[Tensor, "n n_layers"]
    baseline_objective: Float[Tensor, "n n_layers"]
    completeness_delta: Float[Tensor, "n n_layers"]
    activations: Float[Tensor, "n n_layers d_mlp"]
    prompts: tuple[Any, ...]
    answer_ids: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    n_tokens: Int[Tensor, " n"]
    config: AttributionConfig
    path: str = "reference"
    single: bool = False

    # -- shape conveniences -----------------------------------------------------------------------
    @property
    def scores(self) -> Tensor:
        """``[n_layers, d_mlp]`` for a single prompt, else ``[n_prompts, n_layers, d_mlp]``."""
        return self.scores_batched[0] if self.single else self.scores_batched

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def rule(self) -> str:
        return self.config.rule

    @property
    def site(self) -> str:
        return self.config.site

    @property
    def objective(self) -> str:
        return self.config.objective

    @property
    def layers(self) -> tuple[int, ...]:
        """The attributed layers."""
        L = self.scores_batched.shape[1]
        return self.config.layers if self.config.layers is not None else tuple(range(L))

    def __len__(self) -> int:
        return int(self.scores_batched.shape[0])

    def __getitem__(self, i: int) -> NeuronAttribution:
        """The single-prompt view of prompt ``i`` (``scores`` is ``[n_layers, d_mlp]``)."""
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"prompt index {i!r} out of range for {n} prompts")
        i = i % n
        sl = slice(i, i + 1)
        return replace(
            self,
            scores_batched=self.scores_batched[sl],
            clean_prob=self.clean_prob[sl],
            baseline_prob=self.baseline_prob[sl],
            baseline_objective=self.baseline_objective[sl],
            completeness_delta=self.completeness_delta[sl],
            activations=self.activations[sl],
            prompts=(self.prompts[i],),
            answer_ids=self.answer_ids[sl],
            positions=self.positions[sl],
            n_tokens=self.n_tokens[sl],
            single=True,
        )

    def __iter__(self):  # noqa: ANN204
        return (self[i] for i in range(len(self)))

    # -- analysis ---------------------------------------------------------------------------------
    def top_k(self, k: int = 10, prompt: int = 0, *, by_abs: bool = False) -> list[tuple[Neuron, float]]:
        """The ``k`` highest-scoring neurons of one prompt as ``(Neuron, score)``, best first.

        Ranked by signed score (knowledge neurons have positive attribution), or by ``|score|`` with
        ``by_abs=True``. NaN (unattributed layers) are skipped; ties go to the lower (layer, index).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidInputError(f"k must be an int >= 0, got {k!r}")
        s = self[prompt].scores_batched[0].detach().to("cpu", torch.float64)
        key = s.abs() if by_abs else s
        key = torch.where(torch.isfinite(key), key, torch.full_like(key, -float("inf")))
        flat = key.reshape(-1)
        k = min(k, int(torch.isfinite(s).sum()))
        # stable descending order: sort by index first is implicit in torch.sort(stable=True)
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        d = s.shape[1]
        return [(Neuron(int(j) // d, int(j) % d), float(s.reshape(-1)[j])) for j in order]

    def neurons(
        self, method: str = "fraction_of_max", value: float | None = None, *, strict: bool = False
    ) -> NeuronSet | list[NeuronSet]:
        """Coarse KNs via :func:`~qloc_tl.methods.attribution.select_neurons` (one set, or a list for several prompts)."""
        return select_neurons(self.scores, method=method, value=value, strict=strict)

    def to_dataframe(self) -> Any:
        """Long form: one row per (prompt, layer, neuron) with ``score`` and ``activation``."""
        import numpy as np
        import pandas as pd

        n, L, d = self.scores_batched.shape
        prompt = np.repeat(np.arange(n), L * d)
        layer = np.tile(np.repeat(np.arange(L), d), n)
        neuron = np.tile(np.arange(d), n * L)
        return pd.DataFrame(
            {
                "prompt": prompt,
                "layer": layer,
                "neuron": neuron,
                "score": self.scores_batched.detach().to("cpu", torch.float64).reshape(-1).numpy(),
                "activation": self.activations.detach().to("cpu", torch.float64).reshape(-1).numpy(),
            }
        )

    def summary_dataframe(self) -> Any:
        """One row per (prompt, layer): clean/baseline probability and completeness delta."""
        import pandas as pd

        rows = []
        for i in range(len(self)):
            for l in range(self.scores_batched.shape[1]):
                rows.append(
                    (
                        i,
                        l,
                        float(self.clean_prob[i]),
                        float(self.baseline_prob[i, l]),
                        float(self.completeness_delta[i, l]),
                    )
                )
        return pd.DataFrame(
            rows, columns=["prompt", "layer", "clean_prob", "baseline_prob", "completeness_delta"]
        )

    def __repr__(self) -> str:
        return (
            f"NeuronAttribution(method={self.method!r}, n_prompts={len(self)}, "
            f"shape={tuple(self.scores.shape)}, steps={self.steps}, rule={self.rule!r}, site={self.site!r}, "
            f"path={self.path!r})"
        )
