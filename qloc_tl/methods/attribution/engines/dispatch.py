"""Which engine a fast attribution call runs on (:func:`fast_kind`, :class:`PathPlan`), what it falls back to
when a validation fails, and the one warning per model when a call runs slower than the model's normal path.
"""

from __future__ import annotations

import logging
from typing import Any

from qloc_tl.core.errors import CapabilityError, InvalidInputError
from qloc_tl.core.model import TLModel, capabilities, mode_key, model_device
from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.engines.base import Engine, PathMismatch
from qloc_tl.methods.attribution.engines.blockwise import BlockwiseEngine
from qloc_tl.methods.attribution.engines.cache import ENGINE_CACHE
from qloc_tl.methods.attribution.engines.clean import CleanPass, clean_pass
from qloc_tl.methods.attribution.engines.full import FullEngine
from qloc_tl.methods.attribution.engines.hooked_blockwise import (
    HookedBlockwiseEngine,
    rows_chunk_wanted,
    rows_layout_ok,
    rows_room,
)
from qloc_tl.methods.attribution.engines.kv_hooked import HookedKVEngine
from qloc_tl.methods.attribution.engines.packed import PackedEngine
from qloc_tl.methods.attribution.engines.prefix_attention import prefix_attention_applies
from qloc_tl.methods.attribution.engines.shortcut import shortcut_applies, shortcut_blocker
from qloc_tl.methods.attribution.engines.unembed import linear_unembedding

logger = logging.getLogger(__name__)

__all__ = ["PathPlan", "fast_kind", "make_engine", "MIN_PACKED_ROOM"]

MIN_PACKED_ROOM = 2
"""``fast_path="auto"`` packs only when the context has room for this many copies after the prompt (with one
or two copies per row a packed row is as long as the full path's and gains nothing)."""

_PATH_WORDS = {
    "full": "'full' (batched full-sequence)",
    "packed": "'packed'",
    "kv-hooked": "'kv-hooked' (KV cache)",
    "blockwise": "'blockwise'",
}


def _is_hooked_transformer(model: TLModel) -> bool:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # pragma: no cover - a TL without it
        return False
    return isinstance(model, HookedTransformer)


def fast_kind(model: TLModel, config: AttributionConfig, longest: int) -> str:
    """The fast implementation's path: ``"kv-hooked"``, ``"blockwise"``, ``"packed"`` or ``"full"``.

    ``longest``: tokens of the longest prompt. On a HookedTransformer "auto" takes ``"blockwise"``
    (:class:`~.hooked_blockwise.HookedBlockwiseEngine`) where :func:`~.hooked_blockwise.rows_layout_ok` and
    ``n_ctx`` leaves room for chunks as large as kv-hooked's (:func:`~.hooked_blockwise.rows_chunk_wanted`),
    else (also after it failed validation on this model) ``"kv-hooked"``. On HF-backed bridges "auto" takes
    ``"blockwise"``, else (after it failed validation on this model) ``"packed"`` when the context has room
    for a few copies, else ``"full"``.
    """
    fp = config.fast_path
    if fp == "full":
        return "full"
    caps = capabilities(model)
    if caps.kv_cache == "hooked" and caps.start_at_layer == "fast":
        if fp == "packed":
            raise CapabilityError(
                f"fast_path='packed' is a path of HF-backed TL 4 bridges; this {type(model).__name__} uses "
                f"'blockwise' or 'kv-hooked' (fast_path='auto', 'blockwise' or 'kv')"
            )
        rows = rows_layout_ok(model)
        room = rows_room(model, longest)
        if fp == "blockwise":
            if not rows:
                raise CapabilityError(
                    f"fast_path='blockwise' on a {type(model).__name__} needs learned absolute positions, "
                    f"causal global attention and editable hook_attn_scores; use fast_path='auto' or 'kv'"
                )
            if room < 1:
                raise CapabilityError(
                    f"fast_path='blockwise' needs room for a copy after the longest prompt within n_ctx "
                    f"({longest} tokens + 3 > {model.cfg.n_ctx}); use fast_path='auto' or 'kv'"
                )
            return "blockwise"
        # "auto": only where its chunks are as large as kv-hooked's (a chunk is a pass, each with a fixed cost)
        wanted = rows_chunk_wanted(model, config, longest)
        if fp == "auto" and rows and room >= wanted and not ENGINE_CACHE.failed(model, "blockwise"):
            return "blockwise"
        return "kv-hooked"
    if caps.backend == "bridge":
        if fp in ("blockwise", "packed"):
            return fp
        if not ENGINE_CACHE.failed(model, "blockwise"):
            return "blockwise"
        n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
        room = n_ctx - longest if n_ctx else 1 << 30  # copies that fit one row after the prompt, minus one
        if not ENGINE_CACHE.failed(model, "packed") and (fp == "kv" or room >= MIN_PACKED_ROOM):
            return "packed"
    if fp in ("kv", "blockwise") and caps.backend == "hooked" and _is_hooked_transformer(model):
        why = "; ".join(caps.notes) or "the capability probes found no usable KV cache / start_at_layer"
        raise CapabilityError(
            f"fast_path={fp!r} needs TL's KV cache and start_at_layer on this {type(model).__name__}, and its "
            f"capability probes refused them: {why}; use fast_path='auto' or 'full'"
        )
    if fp == "kv":
        raise InvalidInputError(
            f"fast_path='kv' needs a HookedTransformer KV cache or an HF-backed bridge; this "
            f"{type(model).__name__} has neither — use fast_path='auto' or 'full'"
        )
    if fp in ("blockwise", "packed"):
        raise CapabilityError(
            f"fast_path={fp!r} needs an HF-backed TL 4 bridge; this {type(model).__name__} is not one"
        )
    return "full"


def make_engine(
    model: TLModel,
    kind: str,
    prep: CleanPass,
    config: AttributionConfig,
    shortcut: bool = False,
    signature: Any = None,
    verified: bool = False,
) -> Engine:
    """The engine of path ``kind`` (``"blockwise"`` on a HookedTransformer is
    :class:`~.hooked_blockwise.HookedBlockwiseEngine`); the MLP-out shortcut arguments go to the blockwise
    engines (:class:`~.grouped.GroupedEngine`)."""
    if kind == "full":
        return FullEngine(model, prep, config)
    if kind == "packed":
        return PackedEngine(model, prep, config)
    if kind == "kv-hooked":
        return HookedKVEngine(model, prep, config, shortcut, signature, verified)
    if kind == "blockwise":
        cls = HookedBlockwiseEngine if capabilities(model).backend == "hooked" else BlockwiseEngine
        return cls(model, prep, config, shortcut, signature, verified)
    raise ValueError(f"unknown fast path {kind!r}")


def _start_reasons(model: TLModel, config: AttributionConfig, kind: str) -> tuple[str | None, list[str]]:
    """``(normal path, reasons)`` when the fast implementation starts on a slower path than the one it takes
    on this kind of model (``(None, [])`` otherwise): a HookedTransformer whose capability probes found no
    usable KV cache or ``start_at_layer`` (:attr:`~qloc_tl.core.model.Capabilities.notes` say why), or a path
    that failed validation on an earlier call (:class:`~.cache.EngineCache`). ``fast_path="full"`` is what the
    user asked for: never slower than normal."""
    if config.fast_path == "full":
        return None, []
    caps = capabilities(model)
    earlier = "the %s path did not reproduce the clean logits on an earlier call"
    if caps.backend == "hooked":
        if kind == "full" and _is_hooked_transformer(model):
            notes = list(caps.notes) or ["the capability probes found no usable KV cache / start_at_layer"]
            return "'kv-hooked' / 'blockwise'", notes
        if kind == "kv-hooked" and config.fast_path == "auto" and ENGINE_CACHE.failed(model, "blockwise"):
            return "blockwise", [earlier % "blockwise"]
        return None, []
    reasons = []
    if kind != "blockwise" and ENGINE_CACHE.failed(model, "blockwise"):
        reasons.append(earlier % "blockwise")
    if kind == "full" and ENGINE_CACHE.failed(model, "packed"):
        reasons.append(earlier % "packed")
    return ("blockwise" if reasons else None), reasons


class PathPlan:
    """The path of one fast call: which engine runs (``kind``), whether it uses the MLP-out shortcut, why the
    call is slower than the model's normal schedule (``normal``, ``reasons``), and what happens when a
    validation fails (:meth:`without_shortcut`, :meth:`fall_back`).

    ``longest``: tokens of the longest prompt; ``signature``: :func:`~.shortcut.call_signature` of the model
    before the call's swaps (``None``: the shortcut's verdict is neither remembered nor looked up)."""

    def __init__(
        self, model: TLModel, config: AttributionConfig, longest: int, signature: Any = None
    ) -> None:
        self.model, self.config, self.longest = model, config, longest
        self.kind = kind = fast_kind(model, config, longest)
        normal, reasons = _start_reasons(model, config, kind)
        shortcut = shortcut_applies(model, config, kind)
        blocker = shortcut_blocker(model) if shortcut else None
        if blocker is not None:
            shortcut = False
            normal, reasons = normal or kind, [*reasons, blocker]
        self.signature = signature if shortcut else None
        self.verdict = ENGINE_CACHE.shortcut_verdict(model, self.signature)
        if self.verdict is False:  # the probes refused it on an earlier call, for the same blocks
            shortcut = False
            reasons.append("the MLP-out shortcut's probes refused it on an earlier call for these blocks")
            normal = normal or kind
        self.shortcut, self.normal, self.reasons = shortcut, normal, reasons

    def clean_pass(self, plist: list[Any], ids: list[int]) -> CleanPass:
        """The clean pass, keeping what the planned engine starts from. TL 3's prefix-reusing paths (and the
        one they fall back to) compute the clean logits by the unembedding map."""
        model, kind = self.model, self.kind
        hooked_path = kind in ("kv-hooked", "blockwise") and capabilities(model).backend == "hooked"
        return clean_pass(
            model,
            plist,
            ids,
            self.config,
            want_resid=kind in ("kv-hooked", "blockwise"),
            want_rows=kind == "blockwise" and not hooked_path,
            unembed=linear_unembedding(model) if hooked_path and model_device(model).type == "cpu" else None,
            want_post=self.shortcut,
            want_kv=hooked_path and rows_layout_ok(model),
        )

    def engine(self, prep: CleanPass) -> Engine:
        """The planned engine. With the shortcut it is checked by the probes of the first pass, unless they
        passed on an earlier call for the same blocks."""
        return make_engine(
            self.model, self.kind, prep, self.config, self.shortcut, self.signature, self.verdict is True
        )

    def without_shortcut(self, prep: CleanPass, err: float) -> Engine:
        """After the probes refused the MLP-out shortcut: the same path without it."""
        logger.info(
            "the MLP-out shortcut does not reproduce block outputs on this %s (relative error %.2e); "
            "running every block of its samples",
            type(self.model).__name__,
            err,
        )
        self.reasons.append(
            f"the MLP-out shortcut does not reproduce block outputs (relative error {err:.2e})"
        )
        self.normal = self.normal or self.kind
        self.shortcut = False
        return make_engine(self.model, self.kind, prep, self.config)

    def fall_back(self, prep: CleanPass, exc: PathMismatch) -> Engine:
        """After ``kind`` failed validation: the engine of the next path (HookedTransformer: "blockwise" →
        "kv-hooked" → "full", kv-hooked with the shared-prefix attention first retried with TL's own; bridges: "blockwise" → "packed" when the context has room → "full"), or
        :class:`~qloc_tl.core.errors.CapabilityError` when the user asked for a prefix-reusing path."""
        model, config, kind, err = self.model, self.config, self.kind, exc.err
        self.normal = self.normal or kind
        if (
            kind == "kv-hooked"
            and prefix_attention_applies(model)
            and not ENGINE_CACHE.failed(model, "prefix-attention")
        ):
            # the shared-prefix attention can fail alone: kv-hooked with TL's own attention next
            ENGINE_CACHE.mark_failed(model, "prefix-attention", f"relative error {err:.2e}")
            self.reasons.append(
                f"the shared-prefix attention does not reproduce the clean logits (relative error {err:.2e})"
            )
            logger.info("the shared-prefix attention does not reproduce the clean logits on this %s (relative "
                        "error %.2e); kv-hooked with TL's attention", type(model).__name__, err)  # fmt: skip
            return HookedKVEngine(model, prep, config, self.shortcut, self.signature, prefix_attention=False)
        self.reasons.append(f"the {kind} path does not reproduce the clean logits (relative error {err:.2e})")
        if config.fast_path != "auto":
            raise CapabilityError(
                f"fast_path={config.fast_path!r}: the {kind} path does not reproduce the clean logits on this "
                f"model (relative error {err:.2e}); use fast_path='auto' or 'full'"
            ) from None
        if kind == "blockwise":
            ENGINE_CACHE.mark_failed(model, "blockwise", f"relative error {err:.2e}")
            nxt = fast_kind(model, config, self.longest)  # blockwise is marked failed: "packed" or "full"
        else:
            if kind == "packed":
                ENGINE_CACHE.mark_failed(model, "packed", f"relative error {err:.2e}")
            nxt = "full"
        # the detail of each event; the one warning per model is settle's, once the call runs on a path
        logger.info(
            "the %s fast path does not reproduce the clean logits on this %s (relative error %.2e; e.g. a backend "
            "that ignores 4-D attention masks or explicit position ids); using the %s path",
            kind,
            type(model).__name__,
            err,
            "batched full-sequence" if nxt == "full" else nxt,
        )
        self.kind, self.shortcut = nxt, False
        return make_engine(model, nxt, prep, config)

    def settle(self, engine: Engine) -> None:
        """The path of the call is settled (its first pass succeeded on ``engine``): when it is slower than
        normal, one WARNING per model (and mode, path and shortcut use) naming the path taken, the one it
        would take and why not."""
        if not self.reasons:
            return
        model, kind = self.model, self.kind
        used = engine.shortcut
        lost = not used and shortcut_applies(model, self.config, kind)
        normal = self.normal or kind
        if not ENGINE_CACHE.first_time(model, ("slower", mode_key(model), kind, used)):
            return
        taken = (
            _PATH_WORDS.get(kind, repr(kind)) + " path" + (" without the MLP-out shortcut" if lost else "")
        )
        instead = _PATH_WORDS.get(normal, normal) + (" with it" if lost and normal == kind else "")
        logger.warning(
            "attribute_neurons on this %s runs the slower %s instead of %s, because %s (warned once per model)",
            type(model).__name__,
            taken,
            instead,
            "; ".join(self.reasons),
        )
