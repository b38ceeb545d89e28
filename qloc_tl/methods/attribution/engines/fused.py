"""Fused tanh-GELU for the fast attribution paths.

GPT-2-family models compute their activation, the tanh approximation of GELU
``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``, one tensor operation at a time: HF's
``NewGELUActivation`` (``activation_function="gelu_new"``, also behind TL 4 bridges) and TL 3's
``gelu_new`` function each launch about eight elementwise kernels forward, keep their intermediates for
autograd and launch about ten more backward. ``torch.nn.functional.gelu(x, approximate="tanh")`` is the
same formula (the same constants) in one kernel each way. On the CPU the elementwise chain is memory-bound,
so on small models it is a visible share of the fast paths' time.

:func:`fused_activations` swaps the one for the other inside a context (through
:func:`~qloc_tl.methods.attribution.engines.patching.swapped`) and puts the model's own back on exit, also
when an exception is raised. Only exact matches are swapped: a module whose type is exactly
``NewGELUActivation`` and that has no hooks of its own, and a TL 3 component whose ``act_fn`` attribute is
TL's ``gelu_new`` function. Values differ from the model's own activation by rounding only (the two
evaluate the same expression in a different order: ~1e-7 relative in float32, ~1e-16 in float64).
``attribute_neurons(..., implementation="reference")`` never swaps anything.

:func:`fused_layer_norms` does the same for TL 3's ``LayerNorm`` and ``LayerNormPre`` components, which
compute ``x − mean``, ``(mean(x²) + ε)^½`` and the division as separate operations (about seven forward and
a dozen backward on every normalisation): within the context each is replaced by :class:`FusedLayerNorm`,
``torch.nn.functional.layer_norm`` with the component's own weight, bias and ε — the same formula (biased
variance, ε inside the root), one kernel each way. Only components of exactly those types whose hook points
(``hook_scale``, ``hook_normalized``) and the component itself carry no hooks are replaced; a replacement
hands any input that is not float32/float64 (TL normalises those in float32 and casts back) to the original.
TL 4 bridges compute a LayerNorm the same op-by-op way (``NormalizationBridge._python_norm_forward``, ε from
the bridge's config); there each such bridge (exact type, wrapping an ``nn.LayerNorm``, no RMS norm, no weight
offset, not on the native-autograd or folded path, no hook on its hook points) keeps its object and its own
PyTorch hooks (the bridge's capture hooks for ``hook_mlp_in`` and the split-qkv fork are forward pre-hooks on
it) and gets an instance-level ``forward`` computing ``F.layer_norm`` for the call, deleted on exit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qloc_tl.core.model import TLModel
from qloc_tl.methods.attribution.engines.patching import Swap, has_hooks, swapped

logger = logging.getLogger(__name__)

__all__ = [
    "fused_activations",
    "fused_gelu_tanh",
    "FusedGELUTanh",
    "fused_layer_norms",
    "FusedLayerNorm",
    "activation_swaps",
    "layer_norm_swaps",
]


def fused_gelu_tanh(x: Tensor) -> Tensor:
    """``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` in one kernel (``F.gelu(x, approximate="tanh")``)."""
    return F.gelu(x, approximate="tanh")


class FusedGELUTanh(torch.nn.Module):
    """Stateless module form of :func:`fused_gelu_tanh` (what replaces a ``NewGELUActivation``)."""

    def forward(self, x: Tensor) -> Tensor:
        return fused_gelu_tanh(x)


def _unfused_module_types() -> tuple[type, ...]:
    try:
        from transformers.activations import NewGELUActivation
    except Exception:  # transformers missing or reorganised: nothing to swap
        return ()
    return (NewGELUActivation,)


def _unfused_functions() -> tuple[Any, ...]:
    fns = []
    for mod in ("transformer_lens.utilities.activation_functions", "transformer_lens.utils"):
        try:
            fn = getattr(__import__(mod, fromlist=["gelu_new"]), "gelu_new", None)
        except Exception:
            continue
        if fn is not None and fn not in fns:
            fns.append(fn)
    return tuple(fns)


@contextlib.contextmanager
def fused_activations(model: torch.nn.Module | TLModel) -> Iterator[int]:
    """Within the context, compute the model's tanh-GELU activations with the fused kernel.

    Yields the number of activations swapped (0 when the model has none of the unfused forms). Everything
    swapped is restored on exit, in reverse order, even on error.

    Examples:
        >>> import torch
        >>> from transformers.activations import NewGELUActivation
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8).double(), NewGELUActivation())
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> with fused_activations(mlp) as n:
        ...     y = mlp(x)
        >>> n, type(mlp[1]).__name__, torch.allclose(y, mlp(x), rtol=1e-12, atol=1e-15)
        (1, 'NewGELUActivation', True)
    """
    swaps = activation_swaps(model)
    if swaps:
        logger.debug("fused %d tanh-GELU activations of %s", len(swaps), type(model).__name__)
    with swapped(swaps) as n:
        yield n


def activation_swaps(model: torch.nn.Module | TLModel) -> list[Swap]:
    """What :func:`fused_activations` replaces: every child ``NewGELUActivation`` without hooks of its own,
    and every ``act_fn`` attribute holding TL's ``gelu_new``."""
    types = _unfused_module_types()
    fns = _unfused_functions()
    swaps: list[Swap] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if types and type(child) in types and not has_hooks(child):
                swaps.append(Swap(parent, name, FusedGELUTanh()))
        fn = vars(parent).get("act_fn")
        if fn is not None and any(fn is g for g in fns):
            swaps.append(Swap(parent, "act_fn", fused_gelu_tanh))
    return swaps


def _tl_layer_norm_types() -> tuple[type, ...]:
    try:
        from transformer_lens.components import LayerNorm, LayerNormPre
    except Exception:  # TL 4 has neither (its bridges normalise in NormalizationBridge)
        return ()
    return (LayerNorm, LayerNormPre)


class FusedLayerNorm(torch.nn.Module):
    """``F.layer_norm`` with the weight, bias (``LayerNorm``; none for ``LayerNormPre``) and ε of a TL 3
    normalisation component — what replaces it within :func:`fused_layer_norms`. The original is referenced,
    not registered as a submodule. Inputs other than float32/float64 go to the original."""

    original: torch.nn.Module

    def __init__(self, original: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)

    def forward(self, x: Tensor) -> Tensor:
        o: Any = self.original  # a TL 3 LayerNorm / LayerNormPre: ``w``, ``b`` and ``eps`` are its own attributes
        if x.dtype not in (torch.float32, torch.float64):
            return o(x)
        return F.layer_norm(x, (x.shape[-1],), getattr(o, "w", None), getattr(o, "b", None), o.eps)


def _hooked(m: torch.nn.Module) -> bool:
    """PyTorch hooks on ``m``, or (a TL hook point) hooks in its own lists."""
    return has_hooks(m) or bool(getattr(m, "fwd_hooks", None) or getattr(m, "bwd_hooks", None))


def _hooked_anywhere(module: torch.nn.Module) -> bool:
    return any(_hooked(m) for m in module.modules())


def _bridge_norm_type() -> type | None:
    try:
        from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    except Exception:  # TL 3
        return None
    return NormalizationBridge


def _bridge_layer_norm_args(bridge: Any) -> tuple[Tensor, Tensor | None, float] | None:
    """``(weight, bias, eps)`` of a TL 4 ``NormalizationBridge`` whose forward is the op-by-op LayerNorm of
    ``_python_norm_forward`` with no hook that could act, else ``None``."""
    try:
        ln = bridge.original_component
        if type(ln) is not torch.nn.LayerNorm or ln.weight is None or len(ln.normalized_shape) != 1:
            return None
        if bridge.uses_rms_norm or bridge.uses_weight_offset or bridge.use_native_layernorm_autograd:
            return None
        if getattr(bridge.config, "layer_norm_folding", False) or bridge.weight is not ln.weight:
            return None
        # the bridge's own forward (pre-)hooks stay and still run: only its hook points must be bare
        if "forward" in vars(bridge) or any(_hooked(m) for name, m in bridge.named_modules() if name):
            return None
        if any(getattr(bridge, h, None) for h in ("_backward_hooks", "_backward_pre_hooks")):
            return None
        return ln.weight, ln.bias, float(getattr(bridge.config, "eps", 1e-05))
    except Exception:
        return None


def _fused_bridge_forward(bridge: Any, weight: Tensor, bias: Tensor | None, eps: float) -> Any:
    original = type(bridge).forward

    def forward(hidden_states: Tensor, **kwargs: Any) -> Tensor:
        if hidden_states.dtype not in (torch.float32, torch.float64) or kwargs:
            return original(bridge, hidden_states, **kwargs)
        return F.layer_norm(hidden_states, (hidden_states.shape[-1],), weight, bias, eps)

    return forward


@contextlib.contextmanager
def fused_layer_norms(model: torch.nn.Module | TLModel) -> Iterator[int]:
    """Within the context, compute the model's LayerNorms with ``F.layer_norm``: TL 3 ``LayerNorm`` /
    ``LayerNormPre`` components are replaced by :class:`FusedLayerNorm`; TL 4 LayerNorm bridges on the
    op-by-op path get an instance-level ``forward`` (see the module docstring).

    Yields the number changed (0 on models with other normalisations). A component with a hook on itself or
    on one of its hook points is left alone (a TL 4 bridge may keep its own forward pre-hooks). Everything is
    put back on exit, in reverse order, even on error.
    """
    swaps = layer_norm_swaps(model)
    if swaps:
        logger.debug("fused %d layer norms of %s", len(swaps), type(model).__name__)
    with swapped(swaps) as n:
        yield n


def layer_norm_swaps(model: torch.nn.Module | TLModel) -> list[Swap]:
    """What :func:`fused_layer_norms` replaces: TL 3 normalisation children (by :class:`FusedLayerNorm`),
    then the ``forward`` of TL 4 LayerNorm bridges."""
    types = _tl_layer_norm_types()
    bridge_type = _bridge_norm_type()
    swaps: list[Swap] = []
    if types:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) in types and not _hooked_anywhere(child):
                    swaps.append(Swap(parent, name, FusedLayerNorm(child)))
    if bridge_type is not None:
        for mod in list(model.modules()):
            if type(mod) is bridge_type:
                args = _bridge_layer_norm_args(mod)
                if args is not None:
                    swaps.append(Swap(mod, "forward", _fused_bridge_forward(mod, *args), "forward"))
    return swaps
