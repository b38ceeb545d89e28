"""The ``"full"`` engine: rows of the repeated prompt, batched, samples of several layers per pass.

The fallback where no prefix-reusing path runs (TL 4 ``boot_native`` bridges, which ignore 4-D attention
masks; a HookedTransformer whose KV-cache probes failed), and what ``fast_path="full"`` asks for. Every row
is the whole prompt; a hook per layer writes the samples' ``x`` at the answer position of their rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qloc_tl.methods.attribution.engines.base import Evaluation, PromptEngine, row_hooks

__all__ = ["FullEngine"]


class FullEngine(PromptEngine):
    """Batched full-sequence rows of one prompt, mixed layers per chunk."""

    path = "full"
    full_rows = True

    def evaluate_prompt(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        S, t = x.shape[0], self.t

        def place(act: Tensor, rows: Tensor, vals: Tensor) -> Tensor:
            pos = torch.full_like(rows, t)
            return act.index_put((rows, pos), vals)

        toks = self.row.unsqueeze(0).expand(S, -1)
        hooks: list[tuple[str, Any]] = row_hooks(self.prep.names, layer_of, x, place)
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(toks)
        return self.finish(logits[:, t], x, check)
