"""The one place the package replaces parts of a model: :func:`swapped`, for the duration of a fast call.

qloc_tl reads and edits activations through TL hook points. The fast engines additionally swap a few
modules and attributes of the model for faster equivalents while a call runs, and every such
swap goes through :func:`swapped`, which puts the original objects back in a ``finally`` block (in reverse
order, also when the call raises). What is swapped, and by whom:

* a child ``NewGELUActivation`` (HF, also under TL 4 bridges) → :class:`~.fused.FusedGELUTanh`, and the
  ``act_fn`` attribute of a TL 3 component holding TL's ``gelu_new`` → :func:`~.fused.fused_gelu_tanh`
  (planned by :func:`~.fused.fused_activations`);
* a child TL 3 ``LayerNorm`` / ``LayerNormPre`` → :class:`~.fused.FusedLayerNorm`, and on a TL 4
  ``NormalizationBridge`` an instance-level ``forward`` computing ``F.layer_norm``, deleted again on exit
  (planned by :func:`~.fused.fused_layer_norms`);
* each TL 3 attention's ``forward`` → :class:`~.prefix_attention.PrefixAttention`, per group of prompts of
  the kv-hooked engine (:class:`~.kv_hooked.HookedKVEngine`).

All of them compute the same function (rounding differences only). ``attribute_neurons`` applies the first
two for ``implementation="fast"``; the reference implementations swap nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["Swap", "swapped", "has_hooks"]


@dataclass(frozen=True)
class Swap:
    """One replacement: ``owner.<name>`` becomes ``new`` for the duration of :func:`swapped`.

    ``kind``: ``"attribute"`` (``setattr``: a child module or a plain attribute such as ``act_fn``) or
    ``"forward"`` (an instance-level ``forward`` set on ``owner`` and deleted on exit, so that the class's
    own ``forward`` applies again)."""

    owner: Any
    name: str
    new: Any
    kind: Literal["attribute", "forward"] = "attribute"


@contextlib.contextmanager
def swapped(swaps: Sequence[Swap]) -> Iterator[int]:
    """Apply ``swaps`` in order, yield how many, and restore every original on exit, in reverse order, even
    on error.

    Examples:
        >>> import torch
        >>> seq = torch.nn.Sequential(torch.nn.ReLU())
        >>> with swapped([Swap(seq, "0", torch.nn.Tanh())]) as n:
        ...     inside = type(seq[0]).__name__
        >>> n, inside, type(seq[0]).__name__
        (1, 'Tanh', 'ReLU')
    """
    undo: list[tuple[Swap, Any]] = []
    try:
        for s in swaps:
            if s.kind == "forward":
                old = None
                object.__setattr__(s.owner, "forward", s.new)
            else:
                old = getattr(s.owner, s.name)
                setattr(s.owner, s.name, s.new)
            undo.append((s, old))
        yield len(undo)
    finally:
        for s, old in reversed(undo):
            if s.kind == "forward":
                vars(s.owner).pop("forward", None)
            else:
                setattr(s.owner, s.name, old)


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` carries PyTorch forward / backward (pre-)hooks of its own (a module with hooks is
    never swapped: its hooks would stop running)."""
    return any(
        getattr(module, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )
