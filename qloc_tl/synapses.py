"""Knowledge synapses (KS): attention-pattern entries at the answer row that carry a fact (method spec §4.6).

Vocabulary: a **knowledge synapse** ``Synapse(layer, head, key_position)`` is column ``key_position`` of head
``(layer, head)``'s attention pattern ``blocks.{layer}.attn.hook_pattern[:, head]`` *in the row of the answer
query position* (the last prompt token, which predicts the object). One score per (layer, head, key).

Scoring (``method``):

* ``"attattr"`` (default; Self-Attention Attribution, Hao et al. 2021, restricted to the answer row): for
  each layer l, every head's answer row A_l[h, q, :] is scaled from 0 to A together, and
  ``score[l, h, j] = A_l[h, q, j] · Σ_k w_k ∂P(answer)/∂A_l[h, q, j] |_{α_k A}`` — integrated gradients of the
  answer **probability** with the zero baseline, nodes/weights from
  :func:`qloc_tl.attribution.quadrature.quadrature` (``rule="left"``: Dai et al.'s Riemann sum). Other layers
  run freely (their patterns respond to the edit). Completeness: ``Σ_{h,j} score[l] ≈ P(A) − P(α = 0)``
  (exact as ``steps → ∞``); :attr:`SynapseResult.completeness_delta` reports the gap per layer.
* ``"raw"``: the clean attention weight ``A_l[h, q, j]``.

Selection (``threshold_method`` / ``threshold``) reuses
:func:`qloc_tl.attribution.select_neurons`' rules (``score >= τ``): ``"fraction_of_max"`` (default,
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

Engines: the default ``implementation="batched"`` runs the m steps of several layers as rows of one forward
(``batch_size`` rows per pass) using :func:`~qloc_tl.hooks.scale_attention` with per-row query positions and
a read-only gradient tap; ``"reference"`` is a plain loop, one full forward/backward per (layer, step), with
its own hook. Memory: one pass holds activations and gradients of ``batch_size`` rows.

Backends: pattern edits must be honoured (HookedTransformer, HF-backed bridges, TL 4 ``boot_native``);
:func:`~qloc_tl.hooks.intervene` refuses others with :class:`~qloc_tl.errors.CapabilityError`.

Examples:
    >>> from qloc_tl.testing import tiny_model
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

from .attribution.ig import _frozen_params
from .attribution.quadrature import quadrature
from .attribution.selection import select_neurons
from .errors import InvalidInputError, NumericalError
from .hooks import CountingHook, HookList, intervene, scale_attention
from .identities import Head, Synapse
from .model import (
    answer_probability,
    answer_token_id,
    check_layer,
    check_model,
    n_heads,
    n_layers,
    pattern_hook_name,
    require_eval,
    tokenize_prompts,
)

logger = logging.getLogger(__name__)

__all__ = ["SynapseResult", "find_synapses", "select_synapses", "synapse_columns"]

Method = Literal["attattr", "raw"]


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
        implementation: ``"batched"`` or ``"reference"``.
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

        params = dict(
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
    scores: Float[Tensor, "n_layers n_heads n_keys"],
    *,
    threshold_method: str = "fraction_of_max",
    threshold: float | None = 0.2,
    per_head: bool = False,
    head_threshold: float | None = None,
    exclude_keys: Sequence[int] = (),
) -> tuple[Synapse, ...]:
    """Select synapses from a score tensor with :func:`qloc_tl.attribution.select_neurons`' rules.

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
    model: Any,
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
        with _frozen_params(model), torch.enable_grad(), intervene(model, hooks) as mdl:
            logits = mdl(batch)
            p_graph = answer_probability(logits, q, answer)
            tap_layers = sorted(taps)
            grads = (
                torch.autograd.grad(p_graph.sum(), [taps[t].z for t in tap_layers]) if tap_layers else ()  # type: ignore[misc]
            )
        p = p_graph.detach()
        g_by_layer = dict(zip(tap_layers, grads))
        for r, (layer, k) in enumerate(chunk):
            if k < 0:
                pzero[layer] = float(p[r])
            else:
                acc[layer] += float(weights[k]) * g_by_layer[layer][r, :, q, :P].detach().to("cpu", torch.float64)
    return acc, pzero


def _attattr_reference(
    model: Any,
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


def find_synapses(
    model: Any,
    query: str | Tensor,
    answer: str | int,
    *,
    method: Method = "attattr",
    steps: int = 20,
    rule: str = "left",
    threshold: float | None = 0.2,
    threshold_method: str = "fraction_of_max",
    per_head: bool = False,
    head_threshold: float | None = None,
    exclude_keys: Sequence[int] = (),
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    implementation: Literal["batched", "reference"] = "batched",
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
        batch_size: rows (layer × step) per forward pass of the batched engine.
        implementation: ``"batched"`` (default) or ``"reference"`` (one forward per step; for testing).
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
    if implementation not in ("batched", "reference"):
        raise InvalidInputError(f"implementation must be 'batched' or 'reference', got {implementation!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
    L, H = n_layers(model), n_heads(model)
    layer_list = tuple(range(L)) if layers is None else tuple(sorted({check_layer(model, int(x)) for x in layers}))
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
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    prob = float(answer_probability(logits, q, answer_id)[0])
    A = {layer: cache[name][0, :, q, :].detach().clone() for layer, name in zip(layer_list, names)}
    del cache
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores = torch.full((L, H, P), math.nan, dtype=dtype)
    prob_zero = torch.full((L,), math.nan, dtype=dtype)
    if method == "raw":
        for layer in layer_list:
            scores[layer] = A[layer].to("cpu", dtype)
        used_steps, used_rule = None, None
    else:
        alphas, weights = quadrature(rule, steps)
        if implementation == "batched":
            acc, pzero = _attattr_batched(model, tokens, answer_id, layer_list, A, alphas, weights, batch_size, show_progress)
        else:
            acc, pzero = _attattr_reference(model, tokens, answer_id, layer_list, A, alphas, weights)
        for layer in layer_list:
            scores[layer] = (A[layer].to("cpu", torch.float64) * acc[layer]).to(dtype)
            prob_zero[layer] = pzero[layer]
        used_steps, used_rule = steps, rule
    if not bool(torch.isfinite(scores[list(layer_list)]).all()):
        raise NumericalError("synapse scores contain inf/NaN; run the model in float32 or float64")
    syn = select_synapses(
        scores, threshold_method=threshold_method, threshold=threshold, per_head=per_head,
        head_threshold=head_threshold, exclude_keys=exclude_keys,
    )  # fmt: skip
    str_tokens = tuple(_str_tokens(model, tokens[0]))
    return SynapseResult(
        scores=scores, synapses=syn, method=method, steps=used_steps, rule=used_rule,
        threshold_method=threshold_method, threshold=threshold if threshold is not None else math.nan,
        per_head=per_head, head_threshold=head_threshold, exclude_keys=tuple(exclude_keys), query_position=q,
        answer_id=answer_id, prob=prob, prob_zero=prob_zero, tokens=tokens[0].detach().cpu(),
        str_tokens=str_tokens, layers=layer_list, implementation=implementation,
    )  # fmt: skip


def _str_tokens(model: Any, tokens: Tensor) -> list[str]:
    try:
        return [str(t) for t in model.to_str_tokens(tokens)]
    except Exception:  # no tokenizer
        return [str(int(t)) for t in tokens]
