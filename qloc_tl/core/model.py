"""Backend-neutral access to a TransformerLens model.

qloc_tl never subclasses TL classes and never patches a TL class. It reads and edits activations through
the TL model protocol that both majors share: ``cfg``, ``hook_dict``, ``hooks()``, ``run_with_hooks``,
``run_with_cache`` and ``to_tokens``, with every hook scoped (``model.hooks(...)``, or a PyTorch hook handle
removed in ``finally``) and gone when the call returns or raises.

The one exception is the fast attribution engines, which, for the duration of a call only, swap parts of
*the model instance* for faster equivalents, all through one context manager,
:func:`qloc_tl.methods.attribution.engines.patching.swapped`, which puts every original object back in a
``finally`` block (in reverse order, also on error):

* child ``NewGELUActivation`` modules, and the ``act_fn`` attribute of TL 3 components holding TL's
  ``gelu_new``, by a fused tanh-GELU (``attribute_neurons(..., implementation="fast")``);
* child TL 3 ``LayerNorm`` / ``LayerNormPre`` modules by a module calling ``F.layer_norm`` with their weights,
  and, on TL 4 LayerNorm ``NormalizationBridge`` instances, an instance-level ``forward`` doing the same
  (deleted on exit) (``attribute_neurons(..., implementation="fast")``);
* the weight parameters of TL 3 ``Attention`` / ``GroupedQueryAttention`` / ``GatedMLP`` components on the CPU
  by parameters with the same values in matmul-ready storage (the fast attribution and knowledge-synapse
  engines).

Modules and components carrying hooks are never swapped. To recognise what may be swapped those engines
import the TL classes named above; :func:`hooked_kv_cache` imports TL's KV-cache class. The reference
implementations run the model's own modules untouched.

This module holds the small amount of knowledge needed to use the protocol uniformly:

* :func:`check_model` refuses objects that are not TL models, with a message that says what is missing;
* :func:`neuron_hook_name` maps a *site* (``"post"``, ``"pre"``, ``"pre_linear"``) and a layer to a hook name;
* :func:`capabilities` probes, once per model, what the backend really honours (attention-pattern and
  attention-score edits, ``start_at_layer`` skipping lower layers, a KV cache for last-token recomputation);
* tokenisation helpers that handle BOS, right padding and answer continuations.

Sites:

=============== ===================================== ==========================================
site            hook                                  meaning
=============== ===================================== ==========================================
``"post"``      ``blocks.{l}.mlp.hook_post``          input of ``W_out`` (default; act(pre), or
                                                      act(gate)·up in gated MLPs)
``"pre"``       ``blocks.{l}.mlp.hook_pre``           pre-activation (the Dai / EleutherAI lineage
                                                      reads this on GPT-2; the *gate* in gated MLPs)
``"pre_linear"`` ``blocks.{l}.mlp.hook_pre_linear``   up-projection of a gated MLP
=============== ===================================== ==========================================
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = [
    "SITES",
    "TLModel",
    "Site",
    "Capabilities",
    "tl_major",
    "check_model",
    "require_eval",
    "neuron_hook_name",
    "pattern_hook_name",
    "scores_hook_name",
    "n_layers",
    "d_mlp",
    "n_heads",
    "capabilities",
    "model_dtype",
    "model_device",
    "logit_tolerance",
    "logits_mismatch",
    "hooked_kv_cache",
    "hooked_kv_mask",
    "bridge_mask_convention",
    "frozen_parameters",
    "mode_key",
]

Site = Literal["post", "pre", "pre_linear"]
SITES: dict[str, str] = {
    "post": "mlp.hook_post",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
}

_PROTOCOL = ("cfg", "hook_dict", "hooks", "run_with_hooks", "run_with_cache")


@runtime_checkable
class TLModel(Protocol):
    """The type of every ``model`` parameter: what TL 3's ``HookedTransformer`` and TL 4's ``TransformerBridge``
    share and qloc_tl uses (checked at run time by :func:`check_model`).

    Backend-specific attributes (``tokenizer``, ``blocks``, ``W_U`` ...) are typed ``Any`` through
    ``__getattr__``; code reads them only after :func:`capabilities` or a ``hasattr`` says they exist.
    """

    cfg: Any

    @property
    def hook_dict(self) -> Mapping[str, Any]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...


def tl_major() -> int:
    """The installed TransformerLens major version (3 or 4).

    Examples:
        >>> tl_major() in (3, 4)
        True
    """
    return int(importlib.metadata.version("transformer-lens").split(".")[0])


def check_model(model: TLModel) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` looks like a TransformerLens model.

    A TL model here is anything with ``cfg``, ``hook_dict``, ``hooks()``, ``run_with_hooks`` and
    ``run_with_cache`` — a TL 3 ``HookedTransformer`` or a TL 4 ``TransformerBridge``.
    """
    missing = [name for name in _PROTOCOL if not _has(model, name)]
    if missing:
        raise UnsupportedModelError(
            f"expected a TransformerLens model (HookedTransformer or TransformerBridge), got "
            f"{type(model).__name__} which lacks {missing}; wrap a Hugging Face model with "
            f"TransformerBridge.boot_transformers(...) (TL 4) or HookedTransformer.from_pretrained(...) (TL 3)"
        )
    cfg = model.cfg
    for field in ("n_layers", "d_model", "n_heads", "d_vocab"):
        if getattr(cfg, field, None) is None:
            raise UnsupportedModelError(f"model.cfg has no {field!r}; is this a TransformerLens model?")


def _has(obj: Any, name: str) -> bool:
    try:
        getattr(obj, name)
    except Exception:
        return False
    return True


def require_eval(model: TLModel) -> None:
    """Refuse a model in training mode (dropout would make every number stochastic)."""
    if getattr(model, "training", False):
        raise InvalidInputError(
            "model is in training mode (dropout makes attributions random); call model.eval() first"
        )


def n_layers(model: TLModel) -> int:
    """Number of transformer blocks (``model.cfg.n_layers``)."""
    return int(model.cfg.n_layers)


def n_heads(model: TLModel) -> int:
    """Number of query heads per layer (``model.cfg.n_heads``; under GQA the key/value heads are fewer)."""
    return int(model.cfg.n_heads)


def d_mlp(model: TLModel) -> int:
    """Width of the MLP hidden layer: the number of neurons per layer."""
    value = getattr(model.cfg, "d_mlp", None)
    if value is None:
        raise UnsupportedModelError("model.cfg.d_mlp is None: this model has no MLP neurons to attribute")
    return int(value)


def model_dtype(model: TLModel) -> torch.dtype:
    """dtype of the model's first parameter (float32 when it has none)."""
    for p in model.parameters():
        return p.dtype
    return torch.float32


def model_device(model: TLModel) -> torch.device:
    """Device of the model's first parameter (CPU when it has none)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_site(site: str) -> str:
    if site not in SITES:
        raise InvalidInputError(f"unknown neuron site {site!r}; choose one of {sorted(SITES)}")
    return SITES[site]


def check_layer(model: TLModel, layer: int, what: str = "layer") -> int:
    L = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
        raise InvalidInputError(f"{what} {layer!r} is out of range: the model has layers 0..{L - 1}")
    return layer


def neuron_hook_name(model: TLModel, layer: int, site: str = "post") -> str:
    """The TL hook name for the neurons of ``layer`` at ``site``, checked to exist on ``model``.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> neuron_hook_name(tiny_model(), 1)
        'blocks.1.mlp.hook_post'
    """
    suffix = check_site(site)
    check_layer(model, layer)
    name = f"blocks.{layer}.{suffix}"
    if name not in model.hook_dict:
        hint = " (hook_pre_linear exists only on gated MLPs)" if site == "pre_linear" else ""
        raise UnsupportedModelError(f"model has no hook {name!r} for site {site!r}{hint}")
    return name


def pattern_hook_name(model: TLModel, layer: int) -> str:
    """``blocks.{layer}.attn.hook_pattern``, checked to exist on ``model`` (``[batch, head, q, k]``)."""
    check_layer(model, layer)
    name = f"blocks.{layer}.attn.hook_pattern"
    if name not in model.hook_dict:
        raise UnsupportedModelError(f"model has no hook {name!r}")
    return name


def scores_hook_name(model: TLModel, layer: int) -> str:
    """``blocks.{layer}.attn.hook_attn_scores`` (pre-softmax, masked), checked to exist on ``model``."""
    check_layer(model, layer)
    name = f"blocks.{layer}.attn.hook_attn_scores"
    if name not in model.hook_dict:
        raise UnsupportedModelError(f"model has no hook {name!r}")
    return name


# --------------------------------------------------------------------------------------------------
# Capability probes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a model's backend really does, measured by :func:`capabilities`.

    Attributes:
        backend: ``"hooked"`` (TL 3 HookedTransformer) or ``"bridge"`` (a TransformerBridge).
        pattern_editable: edits returned from ``attn.hook_pattern`` hooks change the output.
        scores_editable: edits returned from ``attn.hook_attn_scores`` hooks change the output.
        start_at_layer: ``"fast"`` (lower layers are skipped: HookedTransformer), ``"no_saving"``
            (accepted but lower layers still run: TL 4 bridges) or ``"unsupported"``.
        kv_cache: ``"hooked"`` (HookedTransformer ``past_kv_cache``), ``"hf"`` (bridge forwarding
            ``past_key_values`` to a Hugging Face model) or ``None``; only reported when the probe
            reproduced the full forward's last-position logits (within :func:`logit_tolerance`, relative to
            the logits' scale: :func:`logits_mismatch`).
        notes: why a probe reported a capability missing (``"kv_cache: ..."``, ``"start_at_layer: ..."``),
            for messages; not part of equality.
    """

    backend: Literal["hooked", "bridge"]
    pattern_editable: bool
    scores_editable: bool
    start_at_layer: Literal["fast", "no_saving", "unsupported"]
    kv_cache: Literal["hooked", "hf"] | None
    notes: tuple[str, ...] = _field(default=(), compare=False)


_CAPS: weakref.WeakKeyDictionary[Any, tuple[Any, Capabilities]] = weakref.WeakKeyDictionary()


def mode_key(model: TLModel) -> Any:
    """``(compatibility mode, dtype, device)``: what a per-model cache of a probe's verdict must match, since
    any of the three can change which computations a model does."""
    return (getattr(model, "compatibility_mode", None), model_dtype(model), str(model_device(model)))


def capabilities(model: TLModel, *, refresh: bool = False) -> Capabilities:
    """Probe (once per model and mode; cached weakly) which interventions the backend honours.

    The probe runs a handful of forward passes on a 4-token input. Results are cached per model object
    and invalidated when its compatibility mode, dtype or device changes. Outputs are compared with
    :func:`logits_mismatch` against :func:`logit_tolerance` (relative to the logits' scale), so the float
    reordering noise of a deep model is not taken for a missing capability.
    """
    check_model(model)
    key = mode_key(model)
    if not refresh:
        hit = _CAPS.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
    caps = _probe(model)
    _CAPS[model] = (key, caps)
    logger.debug("capabilities of %s: %s", type(model).__name__, caps)
    return caps


@contextlib.contextmanager
def frozen_parameters(model: TLModel) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter, so that a backward pass builds no weight gradients;
    restore each flag on exit, also on error."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def logit_tolerance(dtype: torch.dtype) -> float:
    """The largest :func:`logits_mismatch` between two computations of the same logits that is taken as
    rounding noise for a model of parameter ``dtype``; what a capability probe, a fast path's validation and
    the MLP-out shortcut's probes accept.

    Examples:
        >>> logit_tolerance(torch.float32)
        0.0002
    """
    if dtype == torch.float64:
        return 1e-6  # HF LLaMA RMSNorm computes in float32 even in a float64 model
    if dtype == torch.float32:
        return 2e-4
    return 3e-2


def logits_mismatch(got: Tensor, want: Tensor) -> float:
    """``max over rows of max|got − want| / (1 + max|want|)`` (rows: all but the last dimension), in float64;
    ``inf`` when the shapes differ or either side is not finite.

    Why this measure: two correct computations of the same logits (a KV cache against the full sequence,
    a block driven alone, a fused kernel) sum the same terms in a different order, and in float the error of
    such a sum grows with the magnitude of what is summed, layer after layer; an absolute tolerance (such as
    ``torch.allclose(..., atol=1e-5)``) therefore refuses a correct deep model: SmolLM2-135M (30 layers,
    float32) reproduces its logits of magnitude ~31 through TL 3's KV cache to 1.2e-3 absolute, 3.7e-5
    relative. Scaling by ``1 + max|want|`` of the row keeps that at ~1e-5..1e-4 for a correct path in
    float32, while a wrong cache, position or shortcut moves logits by a sizeable fraction of their range
    (1e-2 and far more), which stays refused; the ``1 +`` keeps near-zero logits of tiny random models from
    making the test arbitrarily strict. Logits rather than probabilities: a small probability can be wrong by
    orders of magnitude while its absolute difference stays below any fixed tolerance.

    Examples:
        >>> want = torch.tensor([[30.0, -2.0, 0.5]])
        >>> logits_mismatch(want + 1.2e-3, want) <= logit_tolerance(torch.float32)
        True
        >>> logits_mismatch(want + torch.tensor([0.0, 1.0, 0.0]), want) > logit_tolerance(torch.float32)
        True
    """
    if got.shape != want.shape:
        return float("inf")
    g, w = got.detach().double(), want.detach().double()
    if g.numel() == 0:
        return 0.0
    w2 = w.reshape(-1, w.shape[-1]) if w.dim() else w.reshape(1, 1)
    g2 = g.reshape(w2.shape)
    err = float(((g2 - w2).abs().amax(-1) / (1.0 + w2.abs().amax(-1))).max())
    return err if err == err and err != float("inf") else float("inf")  # NaN / inf: no match


def _matches(got: Tensor, want: Tensor, model: TLModel) -> tuple[bool, float]:
    err = logits_mismatch(got, want)
    return err <= logit_tolerance(model_dtype(model)), err


def _probe(model: TLModel) -> Capabilities:
    backend: Literal["hooked", "bridge"] = "bridge" if "Bridge" in type(model).__name__ else "hooked"
    device = model_device(model)
    vocab = int(model.cfg.d_vocab)
    toks = (torch.arange(4, device=device) % max(vocab, 1)).unsqueeze(0) + (1 if vocab > 5 else 0)
    was_training = model.training
    model.eval()
    notes: list[str] = []
    try:
        with torch.no_grad():
            clean = _forward(model, toks)
            pname = "blocks.0.attn.hook_pattern"
            sname = "blocks.0.attn.hook_attn_scores"

            def zero_pattern(act: Tensor, hook: Any) -> Tensor:
                return torch.zeros_like(act)

            def perturb_scores(act: Tensor, hook: Any) -> Tensor:
                q = act.shape[-2]
                allowed = torch.ones(q, act.shape[-1], dtype=torch.bool, device=act.device).tril()
                allowed = allowed & torch.isfinite(act) & (act > torch.finfo(act.dtype).min / 2)
                bump = torch.linspace(-3.0, 3.0, act.shape[-1], device=act.device, dtype=act.dtype)
                return torch.where(allowed, act + bump, act)

            pattern_ok = _edit_changes(model, toks, clean, pname, zero_pattern)
            scores_ok = _edit_changes(model, toks, clean, sname, perturb_scores)
            start_mode = _probe_start(model, toks, clean, backend, notes)
            kv = _probe_kv(model, toks, clean, backend, notes)
    finally:
        model.train(was_training)
    return Capabilities(backend, pattern_ok, scores_ok, start_mode, kv, tuple(notes))


def _forward(model: TLModel, toks: Tensor, **kw: Any) -> Tensor:
    return model(toks, **kw)


def _edit_changes(model: TLModel, toks: Tensor, clean: Tensor, name: str, fn: Any) -> bool:
    if name not in model.hook_dict:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = model.run_with_hooks(toks, fwd_hooks=[(name, fn)])
        except Exception as exc:  # a backend that cannot take the edit at all
            logger.debug("edit probe on %s raised %r", name, exc)
            return False
    # honoured: the edit moves the logits by more than rounding noise (a hooked run may take another kernel)
    return not _matches(out, clean, model)[0]


def _probe_start(
    model: TLModel, toks: Tensor, clean: Tensor, backend: str, notes: list[str] | None = None
) -> Literal["fast", "no_saving", "unsupported"]:
    if n_layers(model) < 2:
        return "unsupported"
    try:
        _, cache = model.run_with_cache(toks, names_filter=["blocks.1.hook_resid_pre"])
        resid = cache["blocks.1.hook_resid_pre"]
        out = model(resid, start_at_layer=1)
    except Exception as exc:
        if notes is not None:
            notes.append(f"start_at_layer: model(resid, start_at_layer=1) raised {exc!r}")
        return "unsupported"
    ok, err = _matches(out, clean, model)
    if not ok:
        if notes is not None:
            notes.append(
                f"start_at_layer: the forward from block 1 differs from the full forward by {err:.2e} relative to "
                f"the logits' scale (tolerance {logit_tolerance(model_dtype(model)):.0e})"
            )
        return "unsupported"
    return "fast" if backend == "hooked" else "no_saving"


def _probe_kv(
    model: TLModel, toks: Tensor, clean: Tensor, backend: str, notes: list[str] | None = None
) -> Literal["hooked", "hf"] | None:
    try:
        if backend == "hooked":
            cache = hooked_kv_cache(model, 1)
            head, tail = toks[:, :-1], toks[:, -1:]
            model(head, past_kv_cache=cache, attention_mask=hooked_kv_mask(model, head))
            out = model(tail, past_kv_cache=cache, attention_mask=hooked_kv_mask(model, tail))
            kind: Literal["hooked", "hf"] = "hooked"
        else:
            return None  # bridges: no uniform KV-cache API across TL versions
    except Exception as exc:
        logger.debug("kv-cache probe failed: %r", exc)
        if notes is not None:
            notes.append(f"kv_cache: the KV-cache forward raised {exc!r}")
        return None
    ok, err = _matches(out[:, -1], clean[:, -1], model)
    if ok:
        return kind
    if notes is not None:
        notes.append(
            f"kv_cache: the last token's logits through the KV cache differ from the full forward's by {err:.2e} "
            f"relative to the logits' scale (tolerance {logit_tolerance(model_dtype(model)):.0e})"
        )
    return None


def hooked_kv_cache(model: TLModel, batch: int) -> Any:
    """A fresh TL 3 ``HookedTransformer`` KV cache (the class moved between 2.x and 3.x)."""
    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as _Cache
    except ImportError:  # TL 2.x / early 3.x
        from transformer_lens.past_key_value_caching import (  # type: ignore[no-redef]
            HookedTransformerKeyValueCache as _Cache,
        )
    return _Cache.init_cache(model.cfg, model.cfg.device, batch)


def hooked_kv_mask(model: TLModel, tokens: Tensor) -> Tensor | None:
    """The ``attention_mask`` to pass with ``tokens`` (``[batch, pos]``, no padding) to a TL 3
    ``HookedTransformer`` forward that fills or reads a ``past_kv_cache``: ``None`` where the model has a
    tokenizer (TL computes the mask from its pad token, as before), else all ones.

    Why: with a cache, TL 3's ``input_to_embed`` needs a mask and, given none, derives it from the tokenizer;
    a model built from a config without one (tests, toy models, notebooks) raises "Cannot compute attention
    mask without a tokenizer". All ones is what TL's own ``get_attention_mask`` returns without a tokenizer
    (no token is taken for padding), so the cache holds what the full forward computes.
    """
    if getattr(model, "tokenizer", None) is not None:
        return None
    return torch.ones(tokens.shape, dtype=torch.long, device=tokens.device)


_MASKS: weakref.WeakKeyDictionary[Any, tuple[Any, Literal["keep", "mask"] | None]] = weakref.WeakKeyDictionary()


def bridge_mask_convention(model: TLModel) -> Literal["keep", "mask"] | None:
    """How a TL 4 bridge reads a 4-D boolean ``attention_mask`` ``[batch, 1, q, k]`` (probed once per model and
    mode, on a 4-token input; cached weakly): ``"keep"`` (True = may attend: Hugging Face's convention, what
    HF-backed bridges take), ``"mask"`` (True = masked out, combined with the causal mask: TL 4's
    ``TransformerBridge.boot_native`` models, whose ``NativeAttention`` ORs the mask into its causal one) or
    ``None`` (neither reproduces the plain forward's logits, or the forward raised: no packed layout).

    The causal mask in the keep convention is tried first, so a backend that honours it (every HF-backed
    bridge) keeps the layout it always had. Its complement (True above the diagonal) reproduces the plain
    forward only where True means masked: the keep convention would leave each query its future only.
    The engines validate their first pass against the clean logits regardless.
    """
    key = mode_key(model)
    hit = _MASKS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    device = model_device(model)
    vocab = int(model.cfg.d_vocab)
    toks = (torch.arange(4, device=device) % max(vocab, 1)).unsqueeze(0) + (1 if vocab > 5 else 0)
    keep = torch.ones(4, 4, dtype=torch.bool, device=device).tril()[None, None]
    verdict: Literal["keep", "mask"] | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clean = _forward(model, toks)
            for name, mask in (("keep", keep), ("mask", ~keep)):
                try:
                    out = _forward(model, toks, attention_mask=mask)
                except Exception as exc:  # a backend that rejects 4-D masks
                    logger.debug("4-D mask probe (%s) raised %r", name, exc)
                    continue
                if _matches(out, clean, model)[0]:
                    verdict = "keep" if name == "keep" else "mask"
                    break
    finally:
        model.train(was_training)
    _MASKS[model] = (key, verdict)
    return verdict
