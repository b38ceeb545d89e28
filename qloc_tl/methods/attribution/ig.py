"""Integrated-gradients attribution of MLP neurons: IG (Dai et al.), SIG (Enguehard) and AMIG (Chen et al.).

What is computed. For a prompt with answer token y and answer position t (the last real prompt token), layer
l and the clean neuron vector ``w̄ = act_l[t]`` (at ``site``: ``hook_post`` by default), let ``F(x)`` be the
objective — ``P(y | prompt)`` (``objective="prob"``, default; Dai) or ``log P`` — computed with layer l's
neurons *at position t only* replaced by ``x``; everything upstream, and every other position, keeps its
clean value. With quadrature nodes/weights ``(α_k, w_k)`` (:mod:`~qloc_tl.methods.attribution.quadrature`)
and the path ``x(α) = b + α (w̄ − b)``:

* **IG** (``method="ig"``): ``G = Σ_k w_k ∇F(x(α_k)) ≈ ∫_0^1 ∇F(x(α)) dα`` and
  ``attr_l = (w̄ − b) ⊙ G`` (``multiply_by="difference"``, default) or ``w̄ ⊙ G`` (``"activation"``).
  b is zero by default (Dai) or a user tensor ``[d_mlp]`` / ``[n_layers, d_mlp]``.
* **SIG** (``method="sig"``, a neuron adaptation of Enguehard's sequential IG): for each masked position j
  (:mod:`~qloc_tl.methods.attribution.baselines`) the baseline ``b_j`` is layer l's activation at t when
  token j is replaced by EOS; IG is run from every ``b_j`` to w̄ and the attributions are **averaged**:
  ``attr_l = mean_j (w̄ − b_j) ⊙ G_j``. Cost: n_masked × steps samples per layer.
* **AMIG** (``method="amig"``, as in Chen et al.'s code): the same per-token baselines, but the **paths** are
  averaged, i.e. one straight path from the mean baseline ``b̄ = mean_j b_j``, and the result is multiplied by
  the activation: ``attr_l = w̄ ⊙ G(b̄)`` (``multiply_by="activation"``, the default for AMIG, as in the
  authors' code) or ``(w̄ − b̄) ⊙ G(b̄)`` (``"difference"``, textbook IG from b̄).

Each layer is attributed separately ("layer-wise IG"): only one layer is scaled at a time.
Completeness: for IG/SIG (and AMIG with ``"difference"``), ``Σ_i attr_l[i] → F(w̄) − F(b)`` (SIG: the mean of
``F(b_j)``) as the quadrature error vanishes; :attr:`NeuronAttribution.completeness_delta` reports the gap.

The method, in the shape of Captum's ``IntegratedGradients``: nodes ``α_k`` (plus ``α = 0`` for ``F(b)``),
scaled inputs ``x(α_k)``, gradients ``∇F`` from an engine, their weighted sum ``G``, then ``(w̄ − b) ⊙ G``
(:func:`_integrate`, :func:`_attribute`). Engines (``implementation=``):

* ``"reference"`` (:class:`ReferenceEngine`) — per prompt, per layer, per path, a plain full forward of the
  repeated prompt in chunks of ``batch_size`` steps with a hook that replaces position t at layer l, then
  ``torch.autograd.grad`` of the summed objective w.r.t. the injected activations. Obviously correct, slow;
  the oracle of the tests. It runs the model's own modules untouched.
* ``"fast"`` (default) — the engines of :mod:`qloc_tl.methods.attribution.engines`, which recompute only
  the answer position per sample, validate themselves on the first pass of every call and fall back to a
  slower path where they cannot reproduce the clean logits (``NeuronAttribution.path`` says which ran).

Parameters are frozen (``requires_grad_(False)``) for the duration of the call and restored afterwards; all
hooks are scoped with TL's ``model.hooks(...)`` and removed even on error, and what the fast engines swap
(:mod:`~qloc_tl.methods.attribution.engines.patching`) is put back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qloc_tl.core.memory import halve_after_oom, run_chunked
from qloc_tl.core.model import (
    TLModel,
    check_model,
    d_mlp,
    frozen_parameters,
    logit_tolerance,
    logits_mismatch,
    model_dtype,
    require_eval,
)
from qloc_tl.core.tokens import tokenize_prompts
from qloc_tl.core.validation import require_finite
from qloc_tl.methods.attribution.baselines import fixed_baseline, masked_token_baselines_many
from qloc_tl.methods.attribution.config import MEMORY_FRACTION, AttributionConfig, normalise_inputs
from qloc_tl.methods.attribution.engines import (
    CleanPass,
    Engine,
    Evaluation,
    PathMismatch,
    PathPlan,
    PromptEngine,
    ShortcutMismatch,
    clean_pass,
)
from qloc_tl.methods.attribution.engines.base import acc_dtype, check_finite
from qloc_tl.methods.attribution.engines.fused import fused_activations, fused_layer_norms
from qloc_tl.methods.attribution.engines.shortcut import call_signature
from qloc_tl.methods.attribution.quadrature import quadrature
from qloc_tl.methods.attribution.results import NeuronAttribution

__all__ = ["attribute_neurons", "ReferenceEngine"]


def _longest(model: TLModel, plist: list[Any], config: AttributionConfig) -> int:
    # tokenize_prompts validates (tokenizer present, non-empty, fits n_ctx) before anything else runs
    _, last = tokenize_prompts(model, plist, prepend_bos=config.prepend_bos)
    return int(last.max()) + 1


class ReferenceEngine(PromptEngine):
    """The oracle: a plain full forward of the prompt repeated once per sample, a hook replacing the answer
    position of layer l by the samples' ``x``; one layer per chunk, ``steps`` samples per chunk by default."""

    path = "reference"
    single_layer_chunks = True
    full_rows = True

    def default_chunk(self, n_tok: int, samples: int) -> int:
        return self.config.steps

    def evaluate_prompt(self, layer_of: Tensor, x: Tensor, check: bool) -> Evaluation:
        S, t = x.shape[0], self.t
        layer = int(layer_of[0])
        xs = x.unsqueeze(1)

        def replace(act: Tensor, hook: Any) -> Tensor:
            return torch.cat([act[:, :t], xs.to(act.dtype), act[:, t + 1 :]], dim=1)

        toks = self.row.unsqueeze(0).expand(S, -1)
        with self.model.hooks(fwd_hooks=[(self.prep.names[layer], replace)]):
            logits = self.model(toks)
        return self.finish(logits[:, t], x, check)


def _chunk_end(s0: int, nl: int, block: int, bs: int, single_layer: bool) -> int:
    """The end of the chunk of layer-major samples that starts at ``s0``: whole layer blocks of ``block`` samples
    grouped up to ``bs`` samples, a block larger than ``bs`` split on its own (so is the rest of a block a chunk
    starts inside of, after a smaller ``bs``); ``single_layer`` never mixes layers."""
    block_end = (s0 // block + 1) * block
    if single_layer or block > bs or s0 % block:
        return min(s0 + bs, block_end)
    return min(s0 + (bs // block) * block, nl * block)


def _integrate(
    engine: Engine,
    idxs: list[int],
    prep: CleanPass,
    bases: Tensor,
    wbar: Tensor,
    alphas: Tensor,
    weights: Tensor,
    zero_k: int,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The quadrature for the prompts ``idxs`` (bases ``[G, J, L, D]``, clean activations ``[G, L, D]``; G > 1
    only where the engine groups prompts): returns ``(Σ_k w_k ∇F [G, nl·J, D], F(b) [G, nl·J], P(b) [G,
    nl·J])``, sample ``(layer, path j, node k)`` at ``x = b_j + α_k (w̄ − b_j)``.

    The samples (layer-major) are cut into chunks (:func:`_chunk_end`) of the engine's
    :meth:`~qloc_tl.methods.attribution.engines.Engine.chunk_size`; a chunk that runs out of memory is halved
    and run again (:func:`~qloc_tl.core.memory.run_chunked`; the engine keeps the smaller size for its later
    prompts), and one sample per pass that does not fit raises :class:`~qloc_tl.core.errors.ResourceError`.
    Each chunk's scaled inputs come from the engine's
    :meth:`~qloc_tl.methods.attribution.engines.Engine.line` (neurons, or with the MLP-out shortcut the block
    outputs they produce, :class:`~qloc_tl.methods.attribution.engines.grouped.ResidualLine`), the engine
    returns ``F`` and ``∇F``, and the gradients are summed with the weights ``w_k``.

    With ``check``, the first chunk gets one or two extra unedited samples per prompt (x = w̄ at the chunk's
    lowest and highest layer) whose logits must reproduce the clean logits; otherwise
    :class:`~qloc_tl.methods.attribution.engines.PathMismatch` is raised.
    """
    model = engine.model
    acc, dev = alphas.dtype, alphas.device
    G, J, K = bases.shape[0], bases.shape[1], alphas.shape[0]
    layers_t = torch.tensor(prep.layers, dtype=torch.long, device=dev)
    nl = len(prep.layers)
    n_tok = int(prep.last[idxs].max()) + 1
    bs = engine.chunk_size(n_tok, nl * J * K, G)
    line = engine.line(idxs, bases, wbar)
    integral = torch.zeros(G, nl * J, line.width, dtype=acc, device=dev)
    f0 = torch.zeros(G, nl * J, dtype=acc, device=dev)
    p0 = torch.zeros(G, nl * J, dtype=acc, device=dev)

    def step(s0: int, s1: int) -> None:
        """Samples ``s0:s1``: evaluated, then added to the sums (nothing is stored before the last lines, so a
        chunk that ran out of memory can run again)."""
        nonlocal check
        s_idx = torch.arange(s0, s1, device=dev)
        li, rest = s_idx // (J * K), s_idx % (J * K)
        j, k = rest // K, rest % K
        lay = layers_t[li]
        x = line.at(li, j, alphas[k])  # the scaled inputs
        n_check = 0
        if check:  # unedited samples at the chunk's lowest layer (through every block the chunk runs) and
            # at its highest (blockwise: the last copy of the sequence, the farthest from the prefix)
            extra = torch.unique(torch.stack([lay.min(), lay.max()]))
            n_check = extra.numel()
            lay = torch.cat([lay, extra])
            x = torch.cat([x, line.clean(extra)], dim=1)
        x = x.to(line.dtype).detach().requires_grad_(True)
        o, p, g, tail = engine.evaluate(lay, x, check)  # F, P and ∇F
        if check:
            assert tail is not None
            got = tail[:, -n_check:].to(acc)
            ref = prep.clean_last_logits[idxs].to(acc).unsqueeze(1)  # [G, 1, V]
            err = logits_mismatch(got, ref.expand_as(got))
            if not err <= logit_tolerance(model_dtype(model)):  # NaN / inf fail too
                raise PathMismatch(err)
            o, p, g = o[:, :-n_check], p[:, :-n_check], g[:, :-n_check]
            lay = lay[:-n_check]
        check_finite(g, f"gradients (layers {sorted(set(lay.tolist()))})", model)
        pj = li * J + j
        z = k == zero_k
        contribution, pz, oz, pp = weights[k].view(1, -1, 1) * g.to(acc), pj[z], o[:, z].to(acc), p[:, z].to(acc)
        integral.index_add_(1, pj, contribution)  # Σ_k w_k ∇F
        f0[:, pz] = oz
        p0[:, pz] = pp
        check = False

    with engine.prompts(idxs):
        size = run_chunked(
            nl * J * K,
            bs,
            step,
            what="samples",
            advice=(
                f"a pass of one sample of {G} prompt{'s' if G > 1 else ''} of up to {n_tok} tokens does not fit "
                f"on {dev}: shorten the prompt, attribute fewer layers at once (layers=...), free memory, or load "
                f"the model in a smaller dtype (torch.bfloat16)"
            ),
            next_stop=lambda s0, b: _chunk_end(s0, nl, J * K, b, engine.single_layer_chunks),
            device=dev,
        )
    if size < bs:  # the later prompts start at the size that fitted
        engine.chunk_cap = size
    return line.to_neurons(integral), f0, p0


def attribute_neurons(
    model: TLModel | Any,  # anything else: check_model raises UnsupportedModelError
    prompts: str | Tensor | Sequence[str] | Sequence[Tensor],
    answers: str | int | Tensor | Sequence[str] | Sequence[int],
    *,
    method: str = "ig",
    steps: int = 20,
    rule: str = "left",
    site: str = "post",
    baseline: str | Tensor | None = None,
    objective: str = "prob",
    multiply_by: str | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    prepend_bos: bool | None = None,
    multi_token: str = "error",
    implementation: str = "fast",
    show_progress: bool = False,
    replacement_id: int | None = None,
    mask_bos: bool = False,
    fast_path: str = "auto",
    memory_fraction: float = MEMORY_FRACTION,
) -> NeuronAttribution:
    """Attribute the answer probability to every MLP neuron at the answer position (IG / SIG / AMIG).

    See the module docstring for exactly what each method computes.

    Args:
        model: a TL model (HookedTransformer or TransformerBridge) in eval mode.
        prompts: a string or 1-D token tensor (single prompt), or a list of them / a 2-D token tensor.
        answers: the answer for each prompt: a string (tokenised as the continuation of the prompt) or a
            token id; a list of the same length as ``prompts``.
        method: ``"ig"`` (Dai et al.), ``"sig"`` (per-token masked baselines, averaged attributions) or
            ``"amig"`` (per-token masked baselines, averaged path).
        steps: number of quadrature nodes m (default 20).
        rule: ``"left"`` (default, Dai's code), ``"right"``, ``"midpoint"``, ``"trapezoid"``,
            ``"gauss_legendre"`` or ``"eleuther"`` (see :mod:`~qloc_tl.methods.attribution.quadrature`).
        site: ``"post"`` (``mlp.hook_post``, default), ``"pre"`` or ``"pre_linear"``.
        baseline: IG only: ``"zero"`` (default) or a tensor ``[d_mlp]`` / ``[n_layers, d_mlp]``. SIG/AMIG build
            masked-token baselines (leave ``None``).
        objective: ``"prob"`` (default, softmax probability of the answer) or ``"logprob"``.
        multiply_by: ``"difference"`` (w̄ − b; default for IG/SIG) or ``"activation"`` (w̄; default for AMIG).
        layers: layers to attribute (default all); the others are NaN in the result.
        batch_size: samples of a prompt per pass (default: ``steps`` for the reference; up to 512 for the
            blockwise paths; 128 samples of whole layers for ``"packed"``; ``2048 // n_tokens`` rows for
            ``"full"``).
        prepend_bos: passed to TL tokenisation of string prompts (``None`` = the model's default).
        multi_token: ``"error"`` (default) or ``"first"`` for answers that are several tokens.
        implementation: ``"fast"`` (default) or ``"reference"``.
        show_progress: a tqdm bar over prompts.
        replacement_id: SIG/AMIG replacement token (default: the tokenizer's EOS).
        mask_bos: SIG/AMIG: also mask a leading BOS token (default False).
        fast_path: ``"auto"`` (default: ``"blockwise"`` on HF-backed bridges and on HookedTransformers with
            learned absolute positions where ``n_ctx`` leaves room for passes as large as kv-hooked's,
            else ``"kv-hooked"`` on HookedTransformers; after a failed validation the next one —
            HookedTransformer ``"blockwise"`` → ``"kv-hooked"``, bridge ``"blockwise"`` → ``"packed"`` when
            ≥ 3 copies fit after the prompt, else ``"full"``), ``"kv"`` (require a prefix-reusing path —
            HookedTransformer: the KV cache; bridges: blockwise/packed — and raise
            :class:`~qloc_tl.core.errors.CapabilityError` if it fails validation), ``"blockwise"`` /
            ``"packed"`` (that path exactly, same error; ``"packed"`` on bridges only) or ``"full"``
            (batched full sequences).
        memory_fraction: the share of the device's free memory one pass may plan to take (in (0, 1], default
            0.5): the engines' passes (prompts of the clean pass, prompts and samples per attribution pass, all
            also capped by fixed budgets) are made smaller where the free memory is short. A pass that still
            runs out of memory is halved and run again (one WARNING each time); one that does not fit with a
            single prompt and sample raises :class:`~qloc_tl.core.errors.ResourceError`. Scores do not depend
            on it.

    Returns:
        A :class:`~qloc_tl.methods.attribution.NeuronAttribution`.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model()
        >>> res = attribute_neurons(model, "alice was born in", "paris", steps=4)
        >>> res.scores.shape == (model.cfg.n_layers, model.cfg.d_mlp)
        True
    """
    check_model(model)
    require_eval(model)
    config = AttributionConfig(
        method=method,
        steps=steps,
        rule=rule,
        site=site,
        baseline=baseline,
        objective=objective,
        multiply_by=multiply_by,
        layers=tuple(layers) if layers is not None and not isinstance(layers, (int, str)) else layers,  # type: ignore[arg-type]
        batch_size=batch_size,
        prepend_bos=prepend_bos,
        multi_token=multi_token,
        implementation=implementation,
        show_progress=show_progress,
        replacement_id=replacement_id,
        mask_bos=mask_bos,
        fast_path=fast_path,
        memory_fraction=memory_fraction,
    )
    d_mlp(model)
    plist, ids, single = normalise_inputs(model, prompts, answers, config)
    fast = config.implementation == "fast"
    signature = call_signature(model, config)  # the blocks as the user has them, before the swaps below
    fused = fused_activations(model) if fast else contextlib.nullcontext()
    normed = fused_layer_norms(model) if fast else contextlib.nullcontext()
    with frozen_parameters(model), fused, normed:
        return _attribute(model, plist, ids, single, config, signature)


def _attribute(
    model: TLModel, plist: list[Any], ids: list[int], single: bool, config: AttributionConfig, signature: Any = None
) -> NeuronAttribution:
    """The method on normalised inputs; ``signature``: :func:`~qloc_tl.methods.attribution.engines.shortcut.call_signature`."""
    plan: PathPlan | None = None
    if config.implementation == "reference":
        prep = clean_pass(model, plist, ids, config)
        engine: Engine = ReferenceEngine(model, prep, config)
    else:
        plan = PathPlan(model, config, _longest(model, plist, config), signature)
        prep = plan.clean_pass(plist, ids)
        engine = plan.engine(prep)
    n, L, D = prep.acts.shape
    acc = acc_dtype(model)
    dev = prep.acts.device
    alphas, weights = quadrature(config.rule, config.steps)
    if not bool((alphas == 0).any()):  # one extra node at α=0 (weight 0) gives F(baseline) for the delta
        alphas = torch.cat([torch.zeros(1, dtype=alphas.dtype), alphas])
        weights = torch.cat([torch.zeros(1, dtype=weights.dtype), weights])
    zero_k = int((alphas == 0).nonzero()[0])
    alphas, weights = alphas.to(dev, acc), weights.to(dev, acc)

    scores = torch.full((n, L, D), float("nan"), dtype=acc, device=dev)
    base_prob = torch.full((n, L), float("nan"), dtype=acc, device=dev)
    base_obj = torch.full((n, L), float("nan"), dtype=acc, device=dev)
    delta = torch.full((n, L), float("nan"), dtype=acc, device=dev)
    fixed = fixed_baseline(config.baseline, L, D, prep.acts) if config.method == "ig" else None
    layer_names = {l: prep.names[l] for l in prep.layers}
    layers_t = torch.tensor(prep.layers, dtype=torch.long, device=dev)
    nl = len(prep.layers)
    validated = False

    from tqdm.auto import tqdm

    def bases_of(idxs: list[int]) -> Tensor:
        """``[G, J, L, D]`` baselines of the prompts ``idxs`` (J = 1 except for SIG, whose G is 1)."""
        if config.method == "ig":
            assert fixed is not None
            return fixed.to(acc).expand(len(idxs), 1, L, D)
        rows = [prep.tokens[i, : int(prep.last[i]) + 1] for i in idxs]
        chunk = 1 if plan is None else 64
        masked = masked_token_baselines_many(model, rows, layer_names, config, chunk=chunk)  # [J_g, L, D] each
        if config.method == "sig":
            return torch.stack([m.to(acc) for m in masked])
        return torch.stack([m.to(acc).mean(0, keepdim=True) for m in masked])

    with tqdm(total=n, disable=not config.show_progress, desc=f"{config.method} attribution") as bar:
        done = 0
        most = n  # prompts per pass after an out-of-memory back-off
        while done < n:
            G = min(engine.group_size(nl * alphas.shape[0], n - done), most)
            idxs = list(range(done, done + G))
            check = engine.validated and not validated  # once per call, on the first pass
            try:
                bases = bases_of(idxs)  # [G, J, L, D]
                wbar = prep.acts[idxs].to(acc)  # [G, L, D]
                integral, f0, p0 = _integrate(engine, idxs, prep, bases, wbar, alphas, weights, zero_k, check)
            except ShortcutMismatch as exc:
                assert plan is not None
                engine = plan.without_shortcut(prep, exc.err)
                continue  # the same prompts again, without it
            except PathMismatch as exc:
                assert plan is not None
                engine = plan.fall_back(prep, exc)
                continue  # the same prompts again, on the next path
            except Exception as exc:
                # out of memory even at one sample per pass: fewer prompts per pass (anything else is raised)
                advice = (
                    f"one prompt of up to {int(prep.last[idxs].max()) + 1} tokens does not fit on {dev}: shorten "
                    f"the prompt, free memory, or load the model in a smaller dtype (torch.bfloat16)"
                )
                most = halve_after_oom(exc, G, "prompts", advice)  # at one prompt: ResourceError
                continue
            if plan is not None and not validated:  # the path of the call is settled
                plan.settle(engine)  # one warning per model when it is slower than normal
            validated = True
            J = bases.shape[1]
            for r, i in enumerate(idxs):
                integ = integral[r].view(nl, J, D)
                w = wbar[r, layers_t].unsqueeze(1)  # [nl, 1, D]
                mult = (w - bases[r][:, layers_t].transpose(0, 1)) if config.multiply_by == "difference" else w
                sc = (mult * integ).mean(1)  # [nl, D]: the attribution, averaged over SIG's paths
                scores[i, layers_t] = sc
                base_obj[i, layers_t] = f0[r].view(nl, J).mean(1)
                base_prob[i, layers_t] = p0[r].view(nl, J).mean(1)
                delta[i, layers_t] = sc.sum(-1) - (prep.clean_obj[i].to(acc) - base_obj[i, layers_t])
            done += G
            bar.update(G)
    require_finite("attribution scores", scores[:, layers_t], layer_dim=1, layers=prep.layers)  # names the layers
    return NeuronAttribution(
        scores_batched=scores,
        clean_prob=prep.clean_prob.to(acc),
        baseline_prob=base_prob,
        baseline_objective=base_obj,
        completeness_delta=delta,
        activations=prep.acts.to(acc),
        prompts=tuple(plist),
        answer_ids=prep.answers,
        positions=prep.last,
        n_tokens=prep.last + 1,
        config=config,
        path=engine.path,
        single=single,
    )
