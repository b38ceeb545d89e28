"""What the fast engines remember about a model between calls, in one object: :data:`ENGINE_CACHE`.

A fast engine checks itself on the first pass of every call (its logits against the clean forward pass, the
MLP-out shortcut against a plain run of the block). Some verdicts are worth keeping, so that later calls on
the same model skip a path that cannot work there or a check that already passed:

* **failed paths**: a path that did not reproduce the clean logits on a model (attribution ``"blockwise"`` /
  ``"packed"``, the knowledge-synapse fast engine), remembered with the model's
  :func:`~qloc_tl.core.model.mode_key` (compatibility mode, dtype, device): a model moved to another dtype or
  device, or switched to another compatibility mode, is tried again;
* **MLP-out shortcut**: the probes' verdict, with the signature of the blocks it was reached for
  (:func:`~qloc_tl.methods.attribution.engines.shortcut.blocks_signature`); a changed block is probed again;
* **affine unembedding**: whether a TL 3 ``model.unembed`` module computes ``ln_final(r) @ W_U + b_U``, per
  module (a replaced module is checked again);
* **warnings given**: the slower-path and fallback warnings are logged once per model.

Everything is held through weak references to the model (or module): nothing here keeps a model alive, and
a new model at a recycled address starts with nothing remembered. :meth:`EngineCache.clear` forgets all of
it, or what is known about one model.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

from qloc_tl.core.model import TLModel, mode_key

__all__ = ["EngineCache", "ENGINE_CACHE"]


@dataclass
class _ModelMemo:
    failed: dict[str, tuple[Any, str]] = field(default_factory=dict)  # path -> (mode_key, why)
    shortcut: tuple[Any, bool] | None = None  # (blocks signature, verdict)
    warned: set[Any] = field(default_factory=set)


class EngineCache:
    """Per-model verdicts of the fast engines (see the module docstring); one instance, :data:`ENGINE_CACHE`.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> cache = EngineCache()
        >>> cache.mark_failed(model, "packed", "logits differ")
        >>> cache.failure(model, "packed")
        'logits differ'
        >>> cache.clear(model)
        >>> cache.failure(model, "packed") is None
        True
    """

    def __init__(self) -> None:
        self._models: weakref.WeakKeyDictionary[Any, _ModelMemo] = weakref.WeakKeyDictionary()
        self._unembeds: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

    def _memo(self, model: TLModel) -> _ModelMemo:
        memo = self._models.get(model)
        if memo is None:
            memo = self._models[model] = _ModelMemo()
        return memo

    # ---------------------------------------------------------------------------------- failed paths

    def mark_failed(self, model: TLModel, path: str, why: str = "") -> None:
        """Remember that ``path`` failed its validation on ``model`` in its current mode, and why."""
        self._memo(model).failed[path] = (mode_key(model), why)

    def failure(self, model: TLModel, path: str) -> str | None:
        """Why ``path`` failed on ``model`` in its current mode (``""`` when no reason was given), else
        ``None``."""
        memo = self._models.get(model)
        hit = memo.failed.get(path) if memo is not None else None
        return hit[1] if hit is not None and hit[0] == mode_key(model) else None

    def failed(self, model: TLModel, path: str) -> bool:
        """Whether ``path`` failed its validation on ``model`` in its current mode."""
        return self.failure(model, path) is not None

    # ---------------------------------------------------------------------------- MLP-out shortcut

    def shortcut_verdict(self, model: TLModel, signature: Any) -> bool | None:
        """The probes' verdict on the MLP-out shortcut for blocks of this ``signature``, else ``None`` (also
        for ``signature=None``: never remembered)."""
        if signature is None:
            return None
        memo = self._models.get(model)
        known = memo.shortcut if memo is not None else None
        return known[1] if known is not None and known[0] == signature else None

    def remember_shortcut(self, model: TLModel, signature: Any, ok: bool) -> None:
        """Keep the probes' verdict for blocks of this ``signature`` (nothing for ``signature=None``)."""
        if signature is not None:
            self._memo(model).shortcut = (signature, ok)

    # -------------------------------------------------------------------------- affine unembedding

    def affine_unembed(self, module: Any) -> bool | None:
        """Whether the unembedding ``module`` was found to be ``ln_final(r) @ W_U + b_U``; ``None``: not
        checked yet."""
        return self._unembeds.get(module)

    def remember_affine_unembed(self, module: Any, ok: bool) -> None:
        """Keep the verdict of the check for ``module``."""
        self._unembeds[module] = ok

    # ------------------------------------------------------------------------------------ warnings

    def first_time(self, model: TLModel, key: Any) -> bool:
        """True the first time ``key`` is seen for ``model`` (a warning to log once), False afterwards."""
        seen = self._memo(model).warned
        if key in seen:
            return False
        seen.add(key)
        return True

    def clear(self, model: TLModel | None = None) -> None:
        """Forget everything (``model=None``), or everything known about ``model`` and its unembedding."""
        if model is None:
            self._models.clear()
            self._unembeds.clear()
            return
        self._models.pop(model, None)
        unembed = getattr(model, "unembed", None)
        if unembed is not None:
            with contextlib.suppress(TypeError):  # not weak-referenceable: never remembered
                self._unembeds.pop(unembed, None)


ENGINE_CACHE = EngineCache()
"""The verdicts every fast engine reads and writes (attribution and knowledge synapses)."""
