"""When the blockwise engines may use the MLP-out shortcut, and what its remembered verdict rests on.

With ``site="post"`` a sample of layer l replaces ``hook_post`` of block l at the answer position; what block
l then outputs there is ``resid_post_l + (x − w̄_l) @ W_out_l`` in every block whose output adds the MLP's
output to the residual stream and does nothing after it. The blockwise engines then let the samples of
layer l join after block l with that output (:class:`~.grouped.GroupedEngine`). This module decides whether
a call tries it (:func:`shortcut_applies`, :func:`shortcut_blocker`) and computes the signature of the
blocks that the probes' verdict is remembered for (:func:`blocks_signature`).
"""

from __future__ import annotations

import weakref
from typing import Any

from qloc_tl.core.model import TLModel, d_mlp, mode_key, n_layers
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines.patching import has_hooks

__all__ = ["MLP_SHORTCUT", "blocks_signature", "call_signature", "shortcut_applies", "shortcut_blocker"]

MLP_SHORTCUT = True
"""Whether the blockwise engines try the MLP-out shortcut at all (turned off by tests and side-by-side
timings of what it saves)."""


def blocks_signature(model: TLModel) -> Any:
    """What the probes' verdict on the MLP-out shortcut rests on, or ``None`` (never remember it): the config
    (``str(model.cfg)``), :func:`~qloc_tl.core.model.mode_key`, and for every submodule of every block its
    name, a weak reference to it (equal while it is the same live object), its class, the class's ``forward``
    and the keys of its PyTorch forward (pre-)hooks. A block or submodule replaced, a class whose ``forward``
    was patched, a hook added or removed, a config changed: a different signature, so the probes run again. A
    module with an instance-level ``forward`` is never remembered."""
    try:
        parts: list[Any] = [str(model.cfg), mode_key(model)]
        for blk in model.blocks:
            for name, m in blk.named_modules():
                if "forward" in vars(m):
                    return None
                parts.append(
                    (name, weakref.ref(m), type(m), type(m).forward, tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
                )
    except Exception:  # no blocks / cfg on this backend
        return None
    return tuple(parts)


def call_signature(model: TLModel, config: AttributionConfig) -> Any:
    """:func:`blocks_signature` of the model as the user has it, taken before a fast call swaps in its fused
    modules (new modules on TL 4), when the call may use the shortcut (``site="post"``, :data:`MLP_SHORTCUT`);
    else ``None``."""
    if config.implementation != "fast" or config.site != "post" or not MLP_SHORTCUT:
        return None
    return blocks_signature(model)


def shortcut_applies(model: TLModel, config: AttributionConfig, kind: str) -> bool:
    """The shortcut is part of ``kind``'s normal schedule on this model (hooks aside): :data:`MLP_SHORTCUT`
    on, ``site="post"``, a blockwise path and ``blocks[l].mlp.W_out`` of shape ``[d_mlp, d_model]`` everywhere."""
    if not MLP_SHORTCUT or config.site != "post" or kind not in ("kv-hooked", "blockwise"):
        return False
    want = (d_mlp(model), int(model.cfg.d_model))
    try:
        return all(tuple(model.blocks[l].mlp.W_out.shape) == want for l in range(n_layers(model)))
    except Exception:  # no blocks[l].mlp.W_out on this backend
        return False


def shortcut_blocker(model: TLModel) -> str | None:
    """Why hooks keep the MLP-out shortcut off, else ``None``: a hook on ``hook_mlp_out``,
    ``hook_resid_post``, ... of block l would be skipped for the samples of layer l.

    "Hooks" means TL hook points carrying a hook and global module hooks: TL 4 bridges keep PyTorch hooks of
    their own on the wrapped HF modules (output capturing). A plain PyTorch hook a user put on some other
    module is not seen here; if it changes what block l computes from ``hook_post``, the probes of
    :class:`~.grouped.GroupedEngine` turn the shortcut off."""
    from torch.nn.modules import module as nn_module
    from transformer_lens.hook_points import HookPoint

    if any(getattr(nn_module, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return "global PyTorch module hooks are registered (the MLP-out shortcut would skip them)"
    points = [(n, m) for n, m in model.named_modules() if isinstance(m, HookPoint) and has_hooks(m)]
    if points:
        aliases: dict[int, list[str]] = {}  # the hook names a user knows (TL 4: a point has several)
        for name, hp in getattr(model, "hook_dict", {}).items():
            aliases.setdefault(id(hp), []).append(name)
        hooked = [" / ".join(aliases.get(id(m), [n])) for n, m in points]
        shown = ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")
        return f"hooks on {shown} (the MLP-out shortcut would skip them for the samples of their layer)"
    return None
