"""Knowledge synapses (KS): attention-pattern entries at the answer row that carry a fact.

Vocabulary: a **knowledge synapse** ``Synapse(layer, head, key_position)`` is column ``key_position`` of head
``(layer, head)``'s attention pattern ``blocks.{layer}.attn.hook_pattern[:, head]`` *in the row of the answer
query position* (the last prompt token, which predicts the object). One score per (layer, head, key).

Scoring (``method``):

* ``"attattr"`` (default; Self-Attention Attribution, Hao et al. 2021, restricted to the answer row): for
  each layer l, every head's answer row A_l[h, q, :] is scaled from 0 to A together, and
  ``score[l, h, j] = A_l[h, q, j] · Σ_k w_k ∂P(answer)/∂A_l[h, q, j] |_{α_k A}`` — integrated gradients of the
  answer **probability** with the zero baseline, nodes/weights from
  :func:`qloc_tl.methods.attribution.quadrature.quadrature` (``rule="left"``: Dai et al.'s Riemann sum). Other layers
  run freely (their patterns respond to the edit). Completeness: ``Σ_{h,j} score[l] ≈ P(A) − P(α = 0)``
  (exact as ``steps → ∞``); :attr:`SynapseResult.completeness_delta` reports the gap per layer.
* ``"raw"``: the clean attention weight ``A_l[h, q, j]``.

Selection (``threshold_method`` / ``threshold``) reuses
:func:`qloc_tl.methods.attribution.select_neurons`' rules (``score >= τ``): ``"fraction_of_max"`` (default,
τ = 0.2·max), ``"absolute"``, ``"percentile"``, ``"topk"``, ``"otsu"``. Two scopes:

* **global** (``per_head=False``, the default): one τ over every (layer, head, key) entry of the answer row,
  e.g. τ = 0.2 · (the largest score of any head). Only entries that are large compared with the whole
  model's strongest entry are kept, so the number of synapses does not grow with the number of heads.
* **per head** (``per_head=True``): τ from each head's own key columns. With fraction-of-max every head whose
  best score is positive keeps at least one column, however weak that head is overall; on a 30-layer,
  9-head model (SmolLM2-135M) this kept hundreds of synapses spread over almost all 270 heads, where global
  selection kept about a dozen. ``head_threshold`` (a fraction of the global max) restricts per-head
  selection to heads whose best score reaches it.

Raw attention usually picks the first token in most heads (attention sinks); ``exclude_keys=(0,)`` leaves it
out.

Engines (``implementation``):

* ``"fast"`` (default). Scaling the answer row (the last position q) of one layer's pattern changes the
  computation at q only; every earlier position's keys and values, in every layer, stay the clean ones. So
  each sample (layer l, node α_k, or the α = 0 baseline) recomputes the answer token alone on top of the
  clean prefix, and the samples of a call share that prefix. Two paths, by backend:

  - ``"kv-hooked"`` (TL 3 ``HookedTransformer`` with a working KV cache and ``start_at_layer``, from
    :func:`~qloc_tl.core.model.capabilities`): the prefix (tokens 0..q−1) goes once into TL's KV cache; a pass
    runs the answer token one block at a time, the prefix's keys/values of that block expanded over the
    batch, and the samples of layer l join at block l with the clean residual entering it, so no sample
    computes a block below its own. The answer-row pattern there is ``[batch, head, 1, n_keys]``.
  - ``"packed"`` (TL 4 bridges, which ignore ``past_key_values``): a row is the prefix followed by one
    copy of the answer token per sample, with a 4-D attention mask that lets each copy see the prefix and
    itself only and position id q for every copy (what the Hugging Face model under an HF-backed bridge
    honours). A copy's pattern row holds the prefix keys 0..q−1 and its own column, which stands for key q;
    the gradients are mapped back to keys 0..q.

  Each sample's edit multiplies its layer's answer row (all heads) by α and adds a zero leaf whose gradient
  is ∂P/∂(pattern entry). The first pass of every call is validated: an extra unedited row must reproduce
  the clean forward's answer logits, and the pass's first sample (the first layer's α = 0 baseline) a full
  forward with that row zeroed, both within :func:`~qloc_tl.core.model.logit_tolerance` relative to the logits'
  scale (:func:`~qloc_tl.core.model.logits_mismatch`). Where the backend has no such path (a TL 3 model whose
  KV-cache probe failed), or the validation fails or the layout's forward raises (TL 4 ``boot_native``
  bridges ignore 4-D masks), the call runs ``"batched"`` instead and one WARNING per model names the
  reason; a failed validation is remembered per model (and mode), so later calls go straight to
  ``"batched"``. :attr:`SynapseResult.implementation` / ``fast_path`` record what ran. The engine lives in
  :mod:`qloc_tl.methods.attribution.engines.synapses`; its failures are remembered in
  :data:`~qloc_tl.methods.attribution.engines.cache.ENGINE_CACHE`.
* ``"batched"``: runs the m steps of several layers as rows of one full-sequence forward (``batch_size``
  rows per pass) using :func:`~qloc_tl.core.hooks.scale_attention` with per-row query positions and a read-only
  gradient tap. Memory: one pass holds activations and gradients of ``batch_size`` rows.
* ``"reference"``: a plain loop, one full forward/backward per (layer, step), with its own hook.

Every engine freezes the parameters (``requires_grad_(False)``) for the call and scopes its hooks; both are
restored / removed on exit, also on error.

Backends: pattern edits must be honoured (HookedTransformer, HF-backed bridges, TL 4 ``boot_native``);
:func:`~qloc_tl.core.hooks.intervene` refuses others with :class:`~qloc_tl.core.errors.CapabilityError`.

Examples:
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> res = find_synapses(model, "alice was born in", " paris", steps=4)
    >>> tuple(res.scores.shape) == (3, 4, 5)
    True
    >>> all(s.key_position <= res.query_position for s in res.synapses)
    True
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.hooks import CountingHook, HookList, intervene, scale_attention
from qloc_tl.core.identities import Head, Synapse
from qloc_tl.core.memory import halve_after_oom
from qloc_tl.core.model import (
    TLModel,
    check_layer,
    check_model,
    frozen_parameters,
    n_heads,
    n_layers,
    pattern_hook_name,
    require_eval,
)
from qloc_tl.core.tokens import answer_probability, answer_token_id, tokenize_prompts
from qloc_tl.core.validation import check_int, check_tensor, require_finite, require_finite_logits
from qloc_tl.methods.attribution.engines.cache import ENGINE_CACHE
from qloc_tl.methods.attribution.engines.synapses import (
    FastMismatch,
    FastPath,
    attattr_fast,
    synapse_fast_path,
)
from qloc_tl.methods.attribution.quadrature import quadrature
from qloc_tl.methods.attribution.selection import check_selection, select_neurons

logger = logging.getLogger(__name__)

__all__ = ["SynapseResult", "find_synapses", "select_synapses", "synapse_columns", "synapse_patterns"]

Method = Literal["attattr", "raw"]
Implementation = Literal["fast", "batched", "reference"]


@dataclass(frozen=True, eq=False)
class SynapseResult:
    """Scores and selected knowledge synapses of one query.

    Attributes:
        scores: ``[n_layers, n_heads, n_keys]`` (keys = prompt positions 0..q); NaN for layers not scored.
        synapses: the selected :class:`~qloc_tl.Synapse` objects, sorted.
        method: ``"attattr"`` or ``"raw"``.
        steps, rule: quadrature of ``"attattr"`` (None for ``"raw"``).
        threshold_method, threshold, per_head, head_threshold, exclude_keys: the selection rule.
        query_position: the answer row q (= n_keys − 1).
        answer_id: the answer token id.
        prob: clean P(answer).
        prob_zero: ``[n_layers]`` P(answer) with every head's answer row of layer l zeroed (``"attattr"``
            baseline; NaN for ``"raw"`` or layers not scored).
        tokens: ``[n_keys]`` prompt token ids; ``str_tokens`` their strings.
        layers: the scored layers.
        implementation: the engine that computed the ``"attattr"`` scores: ``"fast"``, ``"batched"`` (also
            when ``"fast"`` was asked for and fell back) or ``"reference"``.
        fast_path: the fast engine's path, ``"kv-hooked"`` or ``"packed"`` (None for the other engines).
    """

    scores: Float[Tensor, "n_layers n_heads n_keys"]
    synapses: tuple[Synapse, ...]
    method: str
    steps: int | None
    rule: str | None
    threshold_method: str
    threshold: float
    per_head: bool
    head_threshold: float | None
    exclude_keys: tuple[int, ...]
    query_position: int
    answer_id: int
    prob: float
    prob_zero: Float[Tensor, " n_layers"]
    tokens: Int[Tensor, " n_keys"]
    str_tokens: tuple[str, ...]
    layers: tuple[int, ...]
    implementation: str = "batched"
    fast_path: str | None = None

    @property
    def heads(self) -> tuple[Head, ...]:
        """Heads with at least one synapse, sorted."""
        return tuple(sorted({s.as_head() for s in self.synapses}))

    def columns(self) -> dict[Head, tuple[int, ...]]:
        """Head → its synapse key positions."""
        return synapse_columns(self.synapses)

    @property
    def completeness_delta(self) -> Float[Tensor, " n_layers"]:
        """``Σ_{h,j} scores[l] − (prob − prob_zero[l])`` per layer (NaN for ``"raw"``); → 0 as steps grow."""
        total = self.scores.double().nansum(dim=(1, 2))
        return (total - (self.prob - self.prob_zero.double())).to(self.scores.dtype)

    def reselect(self, **kwargs: Any) -> SynapseResult:
        """The same scores with another selection rule (keywords of :func:`select_synapses`)."""
        from dataclasses import replace

        params: dict[str, Any] = dict(
            threshold_method=self.threshold_method, threshold=self.threshold, per_head=self.per_head,
            head_threshold=self.head_threshold, exclude_keys=self.exclude_keys,
        )  # fmt: skip
        params.update(kwargs)
        syn = select_synapses(self.scores, **params)
        params["exclude_keys"] = tuple(params["exclude_keys"])
        return replace(self, synapses=syn, **params)

    def top_k(self, k: int = 10) -> list[tuple[Synapse, float]]:
        """The ``k`` highest-scoring (layer, head, key) entries."""
        s = torch.nan_to_num(self.scores.double(), nan=-math.inf).reshape(-1)
        H, K = self.scores.shape[1], self.scores.shape[2]
        idx = torch.argsort(s, descending=True, stable=True)[:k].tolist()
        return [(Synapse(i // (H * K), (i // K) % H, i % K), float(s[i])) for i in idx if math.isfinite(float(s[i]))]

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: one row per (layer, head, key) with ``token``, ``score`` and ``selected``."""
        L, H, K = self.scores.shape
        sel = set(self.synapses)
        rows = []
        s = self.scores.detach().cpu()
        for layer in range(L):
            for h in range(H):
                for j in range(K):
                    rows.append(
                        (layer, h, j, self.str_tokens[j], float(s[layer, h, j]), Synapse(layer, h, j) in sel)
                    )
        return pd.DataFrame(rows, columns=["layer", "head", "key_position", "token", "score", "selected"])

    def __repr__(self) -> str:
        return (
            f"SynapseResult(method={self.method!r}, n_synapses={len(self.synapses)}, n_heads={len(self.heads)}, "
            f"prob={self.prob:.4g}, tokens={list(self.str_tokens)})"
        )


def synapse_columns(synapses: Iterable[Synapse]) -> dict[Head, tuple[int, ...]]:
    """Group synapses by head: ``Head → sorted key positions``.

    Examples:
        >>> synapse_columns([Synapse(1, 0, 3), Synapse(1, 0, 1), Synapse(0, 2, 0)])
        {Head(layer=0, head=2): (0,), Head(layer=1, head=0): (1, 3)}
    """
    cols: dict[Head, set[int]] = defaultdict(set)
    for s in synapses:
        if not isinstance(s, Synapse):
            raise InvalidInputError(f"expected Synapse objects, got {s!r}")
        cols[s.as_head()].add(s.key_position)
    return {h: tuple(sorted(cols[h])) for h in sorted(cols)}


def select_synapses(
    scores: Float[Tensor, "..."] | Any,  # [n_layers, n_heads, n_keys]; checked below (InvalidInputError)
    *,
    threshold_method: str = "fraction_of_max",
    threshold: float | int | None = 0.2,
    per_head: bool = False,
    head_threshold: float | int | None = None,
    exclude_keys: Sequence[int] = (),
) -> tuple[Synapse, ...]:
    """Select synapses from a score tensor with :func:`qloc_tl.methods.attribution.select_neurons`' rules.

    Args:
        scores: ``[n_layers, n_heads, n_keys]``; NaN entries are never selected.
        threshold_method, threshold: the rule and its value (``score >= τ``).
        per_head: False (default): one τ over all (layer, head, key) entries (global selection); True: τ
            from each head's own keys (every head with a positive best score keeps at least one column).
        head_threshold: when given, only heads whose max score is ≥ ``head_threshold ·`` (global max) are
            eligible (a fraction in [0, 1]).
        exclude_keys: key positions never selected (e.g. ``(0,)`` for the BOS attention sink).

    Examples:
        >>> s = torch.zeros(1, 2, 3); s[0, 0, 2] = 1.0; s[0, 1, 1] = 0.05; s[0, 1, 0] = 0.01
        >>> [str(x) for x in select_synapses(s)]
        ['L0H0K2']
        >>> [str(x) for x in select_synapses(s, per_head=True)]
        ['L0H0K2', 'L0H1K1']
    """
    if not isinstance(scores, Tensor) or scores.ndim != 3:
        raise InvalidInputError(
            f"scores must be a [n_layers, n_heads, n_keys] tensor, got {getattr(scores, 'shape', type(scores))}"
        )
    check_tensor("scores", scores, kind="real", finite=False)  # NaN marks a layer that was not scored
    threshold = check_selection(threshold_method, threshold)
    if not isinstance(per_head, bool):
        raise InvalidInputError(f"per_head must be True or False, got {per_head!r}")
    s = scores.detach().to("cpu", torch.float64).clone()
    L, H, K = s.shape
    for j in exclude_keys:
        if isinstance(j, bool) or not isinstance(j, int) or not -K <= j < K:
            raise InvalidInputError(f"exclude_keys entry {j!r} is not a key position in 0..{K - 1}")
        s[..., j] = math.nan
    eligible = torch.ones(L, H, dtype=torch.bool)
    if head_threshold is not None:
        if isinstance(head_threshold, bool) or not isinstance(head_threshold, (int, float)) or not 0 <= head_threshold <= 1:
            raise InvalidInputError(f"head_threshold must be a fraction in [0, 1] or None, got {head_threshold!r}")
        finite = torch.nan_to_num(s, nan=-math.inf)
        gmax = float(finite.max()) if finite.numel() else -math.inf
        hmax = finite.amax(dim=-1)
        eligible = hmax >= head_threshold * gmax if gmax > 0 else torch.zeros(L, H, dtype=torch.bool)
    out: list[Synapse] = []
    if per_head:
        for layer in range(L):
            for h in range(H):
                if not bool(eligible[layer, h]) or not bool(torch.isfinite(s[layer, h]).any()):
                    continue
                chosen = select_neurons(s[layer, h].unsqueeze(0), method=threshold_method, value=threshold)
                out.extend(Synapse(layer, h, n.index) for n in chosen)
    else:
        s = torch.where(eligible.unsqueeze(-1), s, torch.full_like(s, math.nan))
        if bool(torch.isfinite(s).any()):
            chosen = select_neurons(s.reshape(1, -1), method=threshold_method, value=threshold)
            out.extend(Synapse(n.index // (H * K), (n.index // K) % H, n.index % K) for n in chosen)
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------------
# Scoring engines
# --------------------------------------------------------------------------------------------------


class _GradTap(CountingHook):
    """Read-only hook: returns ``act + z`` with a zero leaf ``z`` so that ∂output/∂act can be read as z.grad."""

    kind = "tap"

    def __init__(self) -> None:
        super().__init__()
        self.z: Tensor | None = None

    def apply(self, act: Tensor) -> Tensor:
        self.z = torch.zeros_like(act, requires_grad=True)
        return act + self.z


def _attattr_batched(
    model: TLModel,
    tokens: Tensor,
    answer: int,
    layers: Sequence[int],
    A: dict[int, Tensor],
    alphas: Tensor,
    weights: Tensor,
    batch_size: int,
    show_progress: bool,
) -> tuple[dict[int, Tensor], dict[int, float]]:
    """∑_k w_k ∂P/∂(answer row) per layer, and P with the answer row zeroed, m steps × layers per pass."""
    P = tokens.shape[1]
    q = P - 1
    H = n_heads(model)
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    toks = torch.cat([tokens, torch.full((1, 1), int(pad_id or 0), dtype=tokens.dtype, device=tokens.device)], 1)
    pad = P
    m = len(alphas)
    # jobs: (layer, step) with step == -1 the α = 0 baseline row (no gradient needed)
    jobs = [(layer, k) for layer in layers for k in range(m)] + [(layer, -1) for layer in layers]
    acc = {layer: torch.zeros(H, P, dtype=torch.float64) for layer in layers}
    pzero: dict[int, float] = {}
    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    it: Iterable[list[tuple[int, int]]] = chunks
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc="attattr", unit="pass", leave=False)
    for chunk in it:
        B = len(chunk)
        groups: dict[int, dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
        for r, (layer, k) in enumerate(chunk):
            groups[layer][0.0 if k < 0 else float(alphas[k])].append(r)
        hooks = HookList()
        taps: dict[int, _GradTap] = {}
        for layer in sorted(groups):
            heads = [Head(layer, h) for h in range(H)]
            for a, rows in groups[layer].items():
                rp = torch.full((B,), pad, dtype=torch.long, device=toks.device)
                rp[torch.tensor(rows, device=toks.device)] = q
                hooks += scale_attention(heads, a, row_positions=rp, model=model)
            if any(k >= 0 for (lay, k) in chunk if lay == layer):
                taps[layer] = _GradTap()
                hooks.append((pattern_hook_name(model, layer), taps[layer]))
        batch = toks.expand(B, -1)
        with frozen_parameters(model), torch.enable_grad(), intervene(model, hooks) as mdl:
            logits = mdl(batch)
            p_graph = answer_probability(logits, q, answer)
            tap_layers = sorted(taps)
            zs: list[Tensor] = []
            for t in tap_layers:
                z = taps[t].z
                assert z is not None  # set when the hook ran, in the forward pass above
                zs.append(z)
            grads = torch.autograd.grad(p_graph.sum(), zs) if tap_layers else ()
        p = p_graph.detach()
        g_by_layer = dict(zip(tap_layers, grads))
        for r, (layer, k) in enumerate(chunk):
            if k < 0:
                pzero[layer] = float(p[r])
            else:
                acc[layer] += float(weights[k]) * g_by_layer[layer][r, :, q, :P].detach().to("cpu", torch.float64)
    return acc, pzero


def _attattr_reference(
    model: TLModel,
    tokens: Tensor,
    answer: int,
    layers: Sequence[int],
    A: dict[int, Tensor],
    alphas: Tensor,
    weights: Tensor,
) -> tuple[dict[int, Tensor], dict[int, float]]:
    """The plain definition: one full forward and backward per (layer, step), splicing x = α·A_row in."""
    P = tokens.shape[1]
    q = P - 1
    acc: dict[int, Tensor] = {}
    pzero: dict[int, float] = {}
    for layer in layers:
        name = f"blocks.{layer}.attn.hook_pattern"
        acc[layer] = torch.zeros_like(A[layer], dtype=torch.float64)
        for k in [*range(len(alphas)), -1]:
            a = 0.0 if k < 0 else float(alphas[k])
            x = (a * A[layer]).clone().requires_grad_(k >= 0)

            def splice(act: Tensor, hook: Any = None, x: Tensor = x) -> Tensor:
                row = x.to(act.dtype).unsqueeze(0).unsqueeze(2).expand(act.shape[0], -1, 1, -1)
                return torch.cat([act[:, :, :q], row, act[:, :, q + 1 :]], dim=2)

            with torch.enable_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=[(name, splice)])
                p = answer_probability(logits, q, answer)[0]
                if k < 0:
                    pzero[layer] = float(p.detach())
                    continue
                (g,) = torch.autograd.grad(p, x)
            acc[layer] += float(weights[k]) * g.detach().to("cpu", torch.float64)
    return acc, pzero


def _warn_fallback(model: TLModel, why: str) -> None:
    """One WARNING per model that the fast engine cannot run; later fallbacks log at INFO."""
    if not ENGINE_CACHE.first_time(model, "synapses fallback"):
        logger.info("find_synapses: full-sequence batched engine (%s)", why)
        return
    logger.warning(
        "find_synapses: the fast engine cannot run on this %s (%s); using the full-sequence batched engine, "
        "which computes every prompt position per sample (about n_tokens times slower)",
        type(model).__name__, why,
    )  # fmt: skip


def find_synapses(
    model: TLModel,
    query: str | Tensor,
    answer: str | int,
    *,
    method: Method | str = "attattr",
    steps: int = 20,
    rule: str = "left",
    threshold: float | int | None = 0.2,
    threshold_method: str = "fraction_of_max",
    per_head: bool = False,
    head_threshold: float | None = None,
    exclude_keys: Sequence[int] = (),
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    implementation: Implementation | str = "fast",
    multi_token: Literal["error", "first"] = "first",
    show_progress: bool = False,
) -> SynapseResult:
    """Score every attention-pattern entry of the answer row and select the knowledge synapses of a query.

    Args:
        model: a TL model in eval mode whose backend honours ``attn.hook_pattern`` edits.
        query: the prompt (a string, or a 1-D token tensor); its last token is the answer position.
        answer: the answer as a continuation string (``" Paris"``) or a token id.
        method: ``"attattr"`` (IG over the pattern, default) or ``"raw"`` (attention weights).
        steps, rule: quadrature of the IG path (``"attattr"`` only).
        threshold, threshold_method, per_head, head_threshold, exclude_keys: selection, see
            :func:`select_synapses` (default: global fraction-of-max, τ = 0.2 · the largest score over all
            heads' key columns).
        layers: layers to score (default all); others hold NaN.
        batch_size: rows (layer × step) per forward pass of the batched engine. The fast engine's samples are
            one token each: it takes ``batch_size × n_tokens`` samples per pass (the same number of token
            positions) on the KV path, ``2 × batch_size`` on the packed path (whole layers per pass, as far
            as they fit). A query that runs out of memory runs again with half the ``batch_size`` (one
            WARNING each time); at 1 it raises :class:`~qloc_tl.core.errors.ResourceError`.
        implementation: ``"fast"`` (default: only the answer token per sample, on top of the clean prefix;
            falls back to ``"batched"`` with one WARNING per model where the backend cannot run it or it
            fails its validation), ``"batched"`` (full-sequence rows, several layers and steps per pass) or
            ``"reference"`` (one full forward per (layer, step); for testing). See the module docstring.
        multi_token: ``"first"`` (default) uses the answer's first token; ``"error"`` refuses multi-token
            answers.
        show_progress: a tqdm bar over passes.

    Returns:
        A :class:`SynapseResult`.

    Raises:
        CapabilityError: the backend ignores attention-pattern edits.
        NumericalError: the scores contain inf/NaN.
    """
    check_model(model)
    require_eval(model)
    if method not in ("attattr", "raw"):
        raise InvalidInputError(f"method must be 'attattr' or 'raw', got {method!r}")
    if implementation not in ("fast", "batched", "reference"):
        raise InvalidInputError(
            f"implementation must be 'fast', 'batched' or 'reference', got {implementation!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
    L, H = n_layers(model), n_heads(model)
    layer_list = (
        tuple(range(L)) if layers is None else tuple(sorted({check_layer(model, check_int("layer", x)) for x in layers}))
    )
    if not layer_list:
        raise InvalidInputError("layers is empty: pass None for all layers")
    if isinstance(query, Tensor) and query.ndim == 2:
        if query.shape[0] != 1:
            raise InvalidInputError(f"query must be one prompt; got a token batch of shape {tuple(query.shape)}")
        query = query[0]
    tokens, _ = tokenize_prompts(model, [query])
    P = tokens.shape[1]
    q = P - 1
    answer_id = answer_token_id(model, query if isinstance(query, str) else None, answer, multi_token=multi_token)
    names = [pattern_hook_name(model, layer) for layer in layer_list]
    fast: FastPath | None = None
    why = ""
    if method == "attattr" and implementation == "fast":
        fast, why = synapse_fast_path(model)
    # the KV path starts the samples of layer l at block l from the clean residual entering it
    resid_names = {l: f"blocks.{l}.hook_resid_pre" for l in layer_list} if fast == "kv-hooked" else {}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[*names, *resid_names.values()])
    require_finite_logits(model, logits, tokens, "clean logits")
    prob = float(answer_probability(logits, q, answer_id)[0])
    A = {layer: cache[name][0, :, q, :].detach().clone() for layer, name in zip(layer_list, names)}
    resid_q = {layer: cache[name][0, q].detach().clone() for layer, name in resid_names.items()}
    clean_logits = logits[0, q].detach()
    del cache, logits
    dtype = torch.float64 if clean_logits.dtype == torch.float64 else torch.float32
    used_path: str | None = None
    scores = torch.full((L, H, P), math.nan, dtype=dtype)
    prob_zero = torch.full((L,), math.nan, dtype=dtype)
    if method == "raw":
        for layer in layer_list:
            scores[layer] = A[layer].to("cpu", dtype)
        used_steps, used_rule = None, None
    else:
        alphas, weights = quadrature(rule, steps)
        got: tuple[dict[int, Tensor], dict[int, float]] | None = None
        while got is None:  # an out-of-memory error: the same query again with half the samples per pass
            try:
                if fast is not None and used_path is None and implementation == "fast":
                    per_pass = batch_size * P if fast == "kv-hooked" else 2 * batch_size
                    try:
                        got = attattr_fast(
                            model, fast, tokens, answer_id, layer_list, alphas, weights, per_pass, clean_logits,
                            resid_q, show_progress,
                        )  # fmt: skip
                        used_path = fast
                    except FastMismatch as exc:
                        why = str(exc)
                        ENGINE_CACHE.mark_failed(model, "synapses", why)
                if got is None and implementation in ("fast", "batched"):
                    if implementation == "fast":
                        _warn_fallback(model, why)
                        implementation = "batched"
                    got = _attattr_batched(
                        model, tokens, answer_id, layer_list, A, alphas, weights, batch_size, show_progress
                    )
                elif got is None:
                    got = _attattr_reference(model, tokens, answer_id, layer_list, A, alphas, weights)
            except Exception as exc:
                advice = f"a pass of one sample of a {P}-token prompt does not fit: shorten the prompt or free memory"
                batch_size = halve_after_oom(exc, batch_size, "samples", advice)  # not out of memory: raised
        acc, pzero = got
        for layer in layer_list:
            scores[layer] = (A[layer].to("cpu", torch.float64) * acc[layer]).to(dtype)
            prob_zero[layer] = pzero[layer]
        used_steps, used_rule = steps, rule
    require_finite("synapse scores", scores[list(layer_list)], layer_dim=0, layers=layer_list)
    syn = select_synapses(
        scores, threshold_method=threshold_method, threshold=threshold, per_head=per_head,
        head_threshold=head_threshold, exclude_keys=exclude_keys,
    )  # fmt: skip
    str_tokens = tuple(_str_tokens(model, tokens[0]))
    return SynapseResult(
        scores=scores, synapses=syn, method=method, steps=used_steps, rule=used_rule,
        threshold_method=threshold_method, threshold=float(threshold) if threshold is not None else math.nan,
        per_head=per_head, head_threshold=head_threshold, exclude_keys=tuple(exclude_keys), query_position=q,
        answer_id=answer_id, prob=prob, prob_zero=prob_zero, tokens=tokens[0].detach().cpu(),
        str_tokens=str_tokens, layers=layer_list, implementation=implementation, fast_path=used_path,
    )  # fmt: skip


def _str_tokens(model: TLModel, tokens: Tensor) -> list[str]:
    try:
        return [str(t) for t in model.to_str_tokens(tokens)]
    except Exception:  # no tokenizer
        return [str(int(t)) for t in tokens]


def synapse_patterns(
    model: TLModel, result: SynapseResult, heads: Sequence[Head] | None = None, *, max_heads: int = 12
) -> dict[Head, Tensor]:
    """Attention patterns ``[query_pos, key_pos]`` of the heads holding a query's knowledge synapses, on the
    query's tokens: the data a head view (:func:`qloc_tl.reporting.views.synapse_heads_view`) draws.

    Args:
        model: the TL model ``result`` was computed on.
        result: a :class:`SynapseResult`.
        heads: heads to read (default: the synapse heads, strongest synapse first, at most ``max_heads``).
        max_heads: cap on the number of default heads.

    Returns:
        ``{Head: pattern}`` in display order (CPU tensors).
    """
    check_int("max_heads", max_heads, 1)
    if heads is None:
        best = {h: float(result.scores[h.layer, h.head].nan_to_num(nan=-math.inf).max()) for h in result.heads}
        heads = sorted(best, key=lambda h: (-best[h], h))[:max_heads]
    heads = list(heads)
    if not heads:
        raise InvalidInputError("the query has no knowledge synapses to show; pass heads= explicitly")
    names = [pattern_hook_name(model, layer) for layer in sorted({h.layer for h in heads})]
    device = next((q.device for q in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        _, cache = model.run_with_cache(result.tokens.unsqueeze(0).to(device), names_filter=names)
    return {h: cache[pattern_hook_name(model, h.layer)][0, h.head].detach().cpu() for h in heads}
