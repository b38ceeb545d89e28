"""Matmul-ready weight layouts for TL 3 ``HookedTransformer`` in the fast attribution paths.

TL 3.9's components rearrange some weights into the layout ``F.linear`` wants on *every* call, and each
rearrangement of a standard-layout parameter is a copy:

* ``Attention`` / ``GroupedQueryAttention``: ``W_Q``, ``W_K``, ``W_V`` ``[head, d_model, d_head]`` become
  ``[(head d_head), d_model]`` (``_W_K`` / ``_W_V`` ``[kv_head, d_model, d_head]`` for grouped-query
  attention), ``W_O`` ``[head, d_head, d_model]`` becomes ``[d_model, (head d_head)]`` followed by
  ``.contiguous()``;
* ``GatedMLP`` (LLaMA and its family): ``W_gate.T.contiguous()``, ``W_in.T.contiguous()``,
  ``W_out.T.contiguous()``.

The fast paths call each block once per pass, so a call of several passes repeats these copies; storing the
weights in the rearranged order turns them into views. A single pass copies each weight once either way, so
only calls of several passes gain.

:func:`matmul_ready_weights` replaces, inside a context, each of these parameters by a new parameter holding
the **same values** whose storage is already in the rearranged order: the parameter keeps its shape
(``[head, d_model, d_head]`` and so on), it is a permuted view of a contiguous tensor, so the component's
own rearrangement becomes a view and ``F.linear`` multiplies by the same numbers in the same order (the
results are bitwise identical in TL's default attention and MLP code paths; the tests check it; the
optional ``use_split_qkv_input`` / ``use_attn_result`` einsum paths get the same values in a different
memory order, equal up to rounding). On exit, also on error, the original parameter objects are put back
(:func:`~qloc_tl.methods.attribution.engines.patching.swapped`): identity, storage and ``requires_grad``
are those the model had before the call.

What is swapped: only modules whose type is exactly one of those TL 3 components (a subclass may compute
differently), with no 4-bit weights, no forward override and no hooks of their own; only on the CPU (on a
GPU such copies are cheap next to the rest); and only while the new layouts together stay within
:data:`MAX_BYTES` (they are extra memory for the duration of the call). On TL 4 bridges, which have none of
these components, it does nothing. ``attribute_neurons(..., implementation="reference")`` never swaps
anything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from qloc_tl.core.model import TLModel
from qloc_tl.methods.attribution.engines.patching import Swap, has_hooks, swapped

logger = logging.getLogger(__name__)

__all__ = ["matmul_ready_weights", "weight_layout_swaps", "MAX_BYTES"]

MAX_BYTES = 2**32
"""The most memory (bytes) the re-laid-out copies may take together; above it nothing is swapped."""


def _permute_rule(dims: tuple[int, ...]) -> Any:
    """``p ↦`` a parameter equal to ``p`` stored so that ``p.permute(dims)`` is contiguous."""
    inverse = [dims.index(i) for i in range(len(dims))]

    def rule(p: torch.Tensor) -> torch.Tensor:
        return p.detach().permute(*dims).contiguous().permute(*inverse)

    return rule


_QKV = _permute_rule((0, 2, 1))  # [h, m, d] → (h d) m
_O = _permute_rule((2, 0, 1))  # [h, d, m] → m (h d)
_T = _permute_rule((1, 0))  # [a, b] → .T


def _targets() -> dict[type, dict[str, Any]]:
    """``{component type: {parameter name: rule}}`` for the TL 3 components this module knows."""
    try:
        from transformer_lens.components import Attention, GroupedQueryAttention
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
    except Exception:  # TL 4 (no HookedTransformer components) or a reorganised TL: nothing to swap
        return {}
    return {
        Attention: {"W_Q": _QKV, "W_K": _QKV, "W_V": _QKV, "W_O": _O},
        GroupedQueryAttention: {"W_Q": _QKV, "_W_K": _QKV, "_W_V": _QKV, "W_O": _O},
        GatedMLP: {"W_gate": _T, "W_in": _T, "W_out": _T},
    }


def _swappable(module: torch.nn.Module) -> bool:
    cfg = getattr(module, "cfg", None)
    if cfg is not None and getattr(cfg, "load_in_4bit", False):
        return False
    return "forward" not in vars(module) and not has_hooks(module)


@contextlib.contextmanager
def matmul_ready_weights(model: torch.nn.Module | TLModel) -> Iterator[int]:
    """Within the context, TL 3 attention and gated-MLP weights are stored in the order their components
    multiply by (the same values; see the module docstring). Yields the number of parameters swapped (0 when
    there is nothing to do, on a GPU, or above :data:`MAX_BYTES`); the originals are back on exit, even on
    error.

    Examples:
        >>> import torch
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model("llama")
        >>> tokens = torch.tensor([[1, 5, 9, 4]])
        >>> before = model(tokens)
        >>> with matmul_ready_weights(model) as n:  # n > 0 on TL 3; 0 on TL 4 (nothing to swap)
        ...     inside = model(tokens)
        >>> torch.equal(before, inside)  # the same numbers multiplied in the same order
        True
    """
    swaps = weight_layout_swaps(model)
    if swaps:
        total = sum(s.new.numel() * s.new.element_size() for s in swaps)
        logger.debug("re-laid out %d weights (%.1f MiB) of %s", len(swaps), total / 2**20, type(model).__name__)
    with swapped(swaps) as n:
        yield n


def weight_layout_swaps(model: torch.nn.Module | TLModel) -> list[Swap]:
    """What :func:`matmul_ready_weights` replaces: each swappable CPU parameter of the known TL 3 components,
    by a new parameter with the same values in the rearranged storage (none above :data:`MAX_BYTES`)."""
    targets = _targets()
    plan: list[tuple[torch.nn.Module, str, torch.nn.Parameter, Any]] = []
    for module in model.modules():
        rules = targets.get(type(module))
        if not rules or not _swappable(module):
            continue
        for name, rule in rules.items():
            p = module._parameters.get(name)
            if (
                isinstance(p, torch.nn.Parameter)
                and p.device.type == "cpu"
                and p.dim() == (2 if rule is _T else 3)
            ):
                plan.append((module, name, p, rule))
    total = sum(p.numel() * p.element_size() for _, _, p, _ in plan)
    if total > MAX_BYTES:
        logger.debug("weights not re-laid out: %.1f GiB of copies > MAX_BYTES", total / 2**30)
        return []
    return [
        Swap(module, name, torch.nn.Parameter(rule(p), requires_grad=p.requires_grad), "parameter")
        for module, name, p, rule in plan
    ]
