"""What an engine is to the method: :class:`Engine`, the samples' path (:class:`NeuronLine`) and the result
of one pass (:class:`Evaluation`).

The method (:mod:`qloc_tl.methods.attribution.ig`) integrates ``∇F`` along straight paths from baselines to
the clean activations. An engine evaluates ``F`` and ``∇F`` for a chunk of samples: sample s of prompt g is
the prompt run with layer ``layer_of[s]``'s neurons at the answer position replaced by ``x[g, s]``. The
method calls an engine only through the methods of :class:`Engine`, with explicit arguments; an engine's
per-prompt state lives inside :meth:`Engine.prompts` and is dropped in its ``finally``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from qloc_tl.core.errors import NumericalError
from qloc_tl.core.memory import memory_cap
from qloc_tl.core.model import TLModel, d_mlp, model_device, model_dtype, n_heads, n_layers
from qloc_tl.methods.attribution.config import AttributionConfig

if TYPE_CHECKING:  # clean.py builds on the helpers here
    from qloc_tl.methods.attribution.engines.clean import CleanPass

__all__ = [
    "Engine",
    "PromptEngine",
    "Evaluation",
    "NeuronLine",
    "PathMismatch",
    "ShortcutMismatch",
    "acc_dtype",
    "objective_of_logits",
    "check_finite",
    "row_hooks",
    "sample_elements",
]


class PathMismatch(Exception):
    """An engine does not reproduce the clean forward pass on this model (``err``: the relative logit error,
    NaN when its forward raised or its hooks did not fire); the method goes on with the next path."""

    def __init__(self, err: float) -> None:
        super().__init__(err)
        self.err = err


class ShortcutMismatch(PathMismatch):
    """The MLP-out shortcut did not reproduce block outputs: the path itself is fine, the call goes on with
    it, without the shortcut."""


class Evaluation(NamedTuple):
    """The result of one pass: ``objective``, ``prob`` ``[G, S]`` (detached), ``grad`` ``[G, S, D]`` (w.r.t. the
    ``x`` passed in), and with validation the logits of each prompt's last two samples ``[G, 2, d_vocab]``
    (``None`` otherwise)."""

    objective: Tensor
    prob: Tensor
    grad: Tensor
    tail_logits: Tensor | None


def acc_dtype(model: TLModel) -> torch.dtype:
    """The dtype the method accumulates in: float64 for a float64 model, float32 otherwise."""
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def objective_of_logits(
    logits_last: Tensor, answers: Tensor, objective: str, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(objective [S], prob [S])`` of answer tokens from last-position logits ``[S, V]``."""
    lp = torch.log_softmax(logits_last.to(acc), dim=-1)
    lp_y = lp.gather(-1, answers.view(-1, 1)).squeeze(-1)
    prob = lp_y.exp()
    return (prob if objective == "prob" else lp_y), prob


def sample_elements(model: TLModel, positions: int, keys: int) -> int:
    """About how many elements one sample keeps through a pass that runs ``positions`` positions of it, each
    attending to ``keys`` keys: per block and position what autograd saves for the backward (≈ 12·d_model +
    4·d_mlp, and 2 per head and key for the attention scores and pattern), and per position 3·d_vocab (the
    logits, their log-softmax and its gradient). An estimate to size passes by, not an exact count."""
    cfg = model.cfg
    per_block = 12 * int(cfg.d_model) + 4 * d_mlp(model) + 2 * n_heads(model) * keys
    return positions * (n_layers(model) * per_block + 3 * int(cfg.d_vocab))


def check_finite(t: Tensor, what: str, model: TLModel) -> None:
    """Raise :class:`~qloc_tl.core.errors.NumericalError` when ``t`` holds inf/NaN."""
    # one reduction first: an inf/NaN makes the sum non-finite; a sum that overflows from finite values goes on
    # to the element-wise test, which decides
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise NumericalError(
            f"{what} became inf/NaN (model dtype {model_dtype(model)}); fp16 activations overflow easily — run "
            f"the attribution in bfloat16 or float32 (model.to(torch.float32))"
        )


def row_hooks(names: dict[int, str], layer_of: Tensor, x: Tensor, place: Any) -> list[tuple[str, Any]]:
    """One hook per layer present in ``layer_of``; ``place(act, rows, values)`` writes the rows' values."""
    hooks = []
    for l in torch.unique(layer_of).tolist():
        rows = (layer_of == l).nonzero().squeeze(-1)

        def fn(act: Tensor, hook: Any, rows: Tensor = rows) -> Tensor:
            return place(act, rows, x.index_select(0, rows).to(act.dtype))

        hooks.append((names[int(l)], fn))
    return hooks


class NeuronLine:
    """The samples' inputs on the straight paths ``x(α) = b + α (w̄ − b)`` of prompts ``[G]``, in neuron
    coordinates: ``bases [G, J, L, D]`` (J paths per prompt), ``wbar [G, L, D]`` the clean activations."""

    def __init__(self, prep: CleanPass, bases: Tensor, wbar: Tensor) -> None:
        self.bases, self.wbar = bases, wbar
        self.layers = torch.tensor(prep.layers, dtype=torch.long, device=wbar.device)
        self.width = bases.shape[-1]
        self.dtype = prep.acts.dtype  # what the engine is fed

    def at(self, li: Tensor, j: Tensor, alpha: Tensor) -> Tensor:
        """``[G, S, D]``: sample s at node ``alpha[s]`` of path ``j[s]`` of requested layer number ``li[s]``."""
        lay = self.layers[li]
        b = self.bases[:, j, lay]
        return b + alpha.view(1, -1, 1) * (self.wbar[:, lay] - b)

    def clean(self, layers: Tensor) -> Tensor:
        """``[G, n, D]``: unedited samples (``x = w̄``) at the given layers (the validation samples)."""
        return self.wbar[:, layers]

    def to_neurons(self, integral: Tensor) -> Tensor:
        """The weighted gradient sum w.r.t. the engine's inputs, as a sum w.r.t. the neurons (here: itself)."""
        return integral


class Engine(ABC):
    """Evaluates ``F`` and ``∇F`` for chunks of samples of a group of prompts (one prompt, unless
    :meth:`group_size` says more).

    The method drives it as: ``with engine.prompts(idxs):`` then, per chunk, ``engine.evaluate(layer_of, x,
    check)`` with ``x = engine.line(...).at(...)``. ``check`` (the first pass of a call on a validated path)
    adds nothing to the samples by itself: the method appends the unedited validation samples, and the engine
    turns an exception of a forward it cannot run on this backend into :class:`PathMismatch` instead of
    raising it.
    """

    path: str = ""
    single_layer_chunks = False  # every chunk holds samples of one layer only
    validated = False  # the first pass of a call is checked against the clean logits
    shortcut = False  # samples enter after their block as that block's output (the MLP-out shortcut)
    full_rows = False  # a sample is a whole row of the prompt (else one answer-position copy)
    chunk_cap: int | None = None  # samples per pass after an out-of-memory back-off (None: none so far)

    def __init__(self, model: TLModel, prep: CleanPass, config: AttributionConfig) -> None:
        self.model = model
        self.prep = prep
        self.config = config
        self.acc = acc_dtype(model)

    def chunk_size(self, n_tok: int, samples: int, prompts: int = 1) -> int:
        """Samples per prompt and pass for ``prompts`` prompts of up to ``n_tok`` tokens with ``samples`` samples
        each: ``config.batch_size`` or the engine's default, within :meth:`max_chunk`, within what an
        out-of-memory back-off left (:attr:`chunk_cap`), and within ``config.memory_fraction`` of the free
        memory at :meth:`sample_bytes` per sample (:func:`~qloc_tl.core.memory.memory_cap`)."""
        bs = self.config.batch_size if self.config.batch_size is not None else self.default_chunk(n_tok, samples)
        room = self.max_chunk(n_tok)
        bs = bs if room is None else max(1, min(bs, room))
        if self.chunk_cap is not None:
            bs = min(bs, self.chunk_cap)
        per = prompts * self.sample_bytes(n_tok, bs)
        return memory_cap(bs, per, model_device(self.model), self.config.memory_fraction)

    def sample_bytes(self, n_tok: int, chunk: int) -> int:
        """About how many bytes one sample of a prompt of ``n_tok`` tokens holds in a pass of ``chunk`` samples
        (:func:`sample_elements` in the accumulation dtype): a whole row of the prompt (:attr:`full_rows`), else
        one copy of the answer position attending to the prompt and, at most, the pass's other copies."""
        positions, keys = (n_tok, n_tok) if self.full_rows else (1, n_tok + chunk)
        return sample_elements(self.model, positions, keys) * (torch.finfo(self.acc).bits // 8)

    def default_chunk(self, n_tok: int, samples: int) -> int:
        """Samples per pass without ``batch_size``."""
        return max(1, min(samples, 2048 // max(n_tok, 1)))

    def max_chunk(self, n_tok: int) -> int | None:
        """The most samples one chunk may hold for prompts of up to ``n_tok`` tokens (``None``: no limit)."""
        return None

    def group_size(self, samples: int, left: int) -> int:
        """Prompts per pass, ``samples`` per prompt, ``left`` prompts to go."""
        return 1

    def line(self, idxs: list[int], bases: Tensor, wbar: Tensor) -> NeuronLine:
        """The samples' path in the coordinates :meth:`evaluate` takes (neurons here)."""
        return NeuronLine(self.prep, bases, wbar)

    @abstractmethod
    def prompts(self, idxs: list[int]) -> contextlib.AbstractContextManager[None]:
        """A context within which :meth:`evaluate` runs samples of the prompts ``idxs``."""

    @abstractmethod
    def evaluate(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        """``F``, ``P`` and ``∇_x F`` of the samples ``x [G, S, D]`` (the same ``layer_of [S]`` for every
        prompt)."""


class PromptEngine(Engine):
    """An engine that runs one prompt per pass: :meth:`evaluate_prompt` on ``x [S, D]``."""

    i: int
    t: int  # the answer position
    row: Tensor  # the prompt's tokens up to the answer position

    @contextlib.contextmanager
    def prompts(self, idxs: list[int]) -> Iterator[None]:
        (self.i,) = idxs
        self.t = int(self.prep.last[self.i])
        self.row = self.prep.tokens[self.i, : self.t + 1]
        try:
            yield
        finally:
            del self.i, self.t, self.row

    def evaluate(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        o, p, g, tail = self.evaluate_prompt(layer_of, x[0], check)
        return Evaluation(o.unsqueeze(0), p.unsqueeze(0), g.unsqueeze(0), None if tail is None else tail.unsqueeze(0))

    @abstractmethod
    def evaluate_prompt(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        """:meth:`evaluate` for one prompt: ``x [S, D]``, results without the prompt dimension."""

    def finish(self, logits_last: Tensor, x: Tensor, check: bool) -> Evaluation:
        """Objective, probability and gradient w.r.t. ``x`` of the samples (``logits_last [S, d_vocab]`` in the
        order of ``x``); with ``check`` the last two samples' logits."""
        tail = logits_last[-2:].detach() if check else None
        ans = self.prep.answers[self.i].expand(x.shape[0])
        obj, prob = objective_of_logits(logits_last, ans, self.config.objective, self.acc)
        (g,) = torch.autograd.grad(obj.sum(), x)
        return Evaluation(obj.detach(), prob.detach(), g, tail)
