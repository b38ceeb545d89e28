"""Causal tracing (Meng et al., NeurIPS 2022 "ROME") as TransformerLens hooks.

Three runs per prompt, all read at the answer position (the last prompt token):

* **clean**: P[o];
* **corrupted**: Gaussian noise ε ~ N(0, ν²I) is added to the token embeddings (``hook_embed``) of the
  **subject** tokens in ``samples`` copies (ROME: 10); P*[o] is the mean over the copies;
* **corrupted with restoration**: additionally one state is set back to its clean value, giving
  P*_{clean h}[o].

Effects: total effect ``TE = P[o] − P*[o]``; indirect effect ``IE(h) = P*_{clean h}[o] − P*[o]``.

States (``kinds``), per (layer l, position i):

=========== ============================== =========================================================
kind        hook restored                  window (default)
=========== ============================== =========================================================
``resid``   ``blocks.{l}.hook_resid_pre``  1 (the residual stream entering layer l)
``mlp``     ``blocks.{l}.hook_mlp_out``    10: layers ``max(0, l − w//2) .. min(L, l + ⌈w/2⌉) − 1``
``attn``    ``blocks.{l}.hook_attn_out``   10 (same window rule; as in ROME's ``trace_with_patch``)
=========== ============================== =========================================================

Noise: ν = ``noise`` × std of the token-embedding matrix ``W_E`` (default ``noise=3.0``, ROME's "s3" rule
applied to the embedding matrix rather than to a dataset of subject embeddings), or an absolute
``noise_std``. The noise is drawn once per call from ``torch.Generator().manual_seed(seed)`` and reused for
every restoration, so all IEs of a prompt share one corruption (as in ROME, where every call re-seeds).

Subject positions are found by tokenizing the text up to the end of the subject (and up to its start) with
the model's own ``to_tokens``; pass ``subject_positions`` to override.

Cost per kind: ``n_layers × n_positions × samples`` sequences, forward only, in passes of ``batch_size`` rows.

Examples:
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> model = tiny_model()
    >>> res = causal_trace(model, "alice was born in", " paris", subject="alice", kinds=("resid",), samples=2)
    >>> tuple(res.ie["resid"].shape), res.subject_positions
    ((3, 5), (1,))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.hooks import CountingHook, HookList, intervene
from qloc_tl.core.model import TLModel, check_model, n_layers, require_eval
from qloc_tl.core.tokens import answer_probability, answer_token_id, tokenize_prompts
from qloc_tl.core.validation import check_int, check_nonempty, check_tensor, require_finite_logits

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "TraceResult", "causal_trace", "restore_states", "subject_token_positions", "trace_window"]

Kind = Literal["resid", "mlp", "attn"]
KINDS: dict[str, str] = {"resid": "hook_resid_pre", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
_DEFAULT_WINDOW = {"resid": 1, "mlp": 10, "attn": 10}


def trace_window(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a trace at ``layer`` with ``window`` (ROME's rule, clipped to the model).

    Examples:
        >>> list(trace_window(0, 10, 12)), list(trace_window(6, 10, 12)), list(trace_window(3, 1, 12))
        ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [3])
    """
    check_int("n_layers", n_layers, 1)
    check_int("layer", layer, 0, n_layers - 1)
    check_int("window", window, 1)
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _hook_name(kind: str, layer: int) -> str:
    return f"blocks.{layer}.{KINDS[kind]}"


class NoiseHook(CountingHook):
    """Adds ``noise[row % samples]`` ([samples, n_subject, d_model]) at the subject positions of every row."""

    kind = "noise"

    def __init__(self, noise: Tensor, positions: Sequence[int]) -> None:
        super().__init__()
        self.noise = noise
        self.positions = list(positions)

    def apply(self, act: Tensor) -> Tensor:
        if not self.positions:
            return act
        B = act.shape[0]
        s = self.noise.shape[0]
        reps = torch.arange(B, device=act.device) % s
        pos = torch.tensor(self.positions, device=act.device)
        add = torch.zeros_like(act)
        add[:, pos] = self.noise.to(device=act.device, dtype=act.dtype)[reps]
        return act + add


class RestoreHook(CountingHook):
    """Replaces ``act[b, p]`` by ``clean[p]`` where ``mask[b, p]`` (a per-row clean-state restoration)."""

    kind = "restore"

    def __init__(self, clean: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.clean = clean  # [pos, d]
        self.mask = mask  # [batch, pos] bool

    def apply(self, act: Tensor) -> Tensor:
        P = self.clean.shape[0]
        if act.shape[1] < P or act.shape[0] != self.mask.shape[0]:
            raise InvalidInputError(
                f"restore hook expects [{self.mask.shape[0]}, >={P}, d] activations, got {tuple(act.shape)}"
            )
        mask = self.mask.to(act.device)
        if act.shape[1] > P:
            pad = torch.zeros(mask.shape[0], act.shape[1] - P, dtype=torch.bool, device=act.device)
            mask = torch.cat([mask, pad], 1)
            clean = torch.cat([self.clean, self.clean.new_zeros(act.shape[1] - P, self.clean.shape[1])], 0)
        else:
            clean = self.clean
        return torch.where(mask.unsqueeze(-1), clean.to(device=act.device, dtype=act.dtype).unsqueeze(0), act)


@dataclass(frozen=True, eq=False)
class TraceResult:
    """Causal-tracing results of one prompt.

    Attributes:
        ie: kind → ``[n_layers, n_positions]`` indirect effects ``P*_{clean h} − P*``.
        p_restored: kind → ``[n_layers, n_positions]`` the restored probabilities (mean over samples).
        p_clean: P[o]; ``p_corrupt``: P*[o] (mean over samples); ``te`` = ``p_clean − p_corrupt``.
        str_tokens, tokens: the prompt; ``subject_positions``: the corrupted positions.
        answer_id, noise_std, samples, window (kind → window), seed: the settings.
    """

    ie: dict[str, Float[Tensor, "n_layers n_positions"]]
    p_restored: dict[str, Float[Tensor, "n_layers n_positions"]]
    p_clean: float
    p_corrupt: float
    tokens: Int[Tensor, " n_positions"]
    str_tokens: tuple[str, ...]
    subject_positions: tuple[int, ...]
    answer_id: int
    noise_std: float
    samples: int
    window: dict[str, int] = field(default_factory=dict)
    seed: int = 1

    @property
    def te(self) -> float:
        """Total effect ``P[o] − P*[o]``."""
        return self.p_clean - self.p_corrupt

    def to_dataframe(self) -> Any:
        """Long form: one row per (kind, layer, position) with ``token``, ``subject``, ``ie`` and ``p``."""
        import pandas as pd

        rows = []
        for kind, ie in self.ie.items():
            for layer in range(ie.shape[0]):
                for i in range(ie.shape[1]):
                    rows.append(
                        (kind, layer, i, self.str_tokens[i], i in self.subject_positions, float(ie[layer, i]),
                         float(self.p_restored[kind][layer, i]))
                    )  # fmt: skip
        return pd.DataFrame(rows, columns=["kind", "layer", "position", "token", "subject", "ie", "p"])


def subject_token_positions(model: TLModel, prompt: str, subject: str, *, prepend_bos: bool | None = None) -> tuple[int, ...]:
    """Token positions of ``subject`` (its first occurrence) in ``model.to_tokens(prompt)``.

    The text before the subject (right-stripped) and the text through the subject's end are tokenized; the
    subject occupies the positions between the two lengths. Raises when ``subject`` is not in ``prompt`` or
    the tokenization of the prefix is not a prefix of the prompt's tokens.

    Examples:
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> subject_token_positions(tiny_model(), "the capital of france is", "capital of france")
        (2, 3, 4)
    """
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidInputError(f"subject must be a non-empty string, got {subject!r}")
    start = prompt.find(subject)
    if start < 0:
        raise InvalidInputError(f"subject {subject!r} does not occur in the prompt {prompt!r}; pass subject_positions=")
    end = start + len(subject)

    def tok(text: str, bos: bool | None = prepend_bos) -> list[int]:
        kw = {} if bos is None else {"prepend_bos": bos}
        return [int(t) for t in model.to_tokens(text, **kw)[0].tolist()]

    full = tok(prompt)
    through = tok(prompt[:end])
    before_text = prompt[:start].rstrip()
    if before_text:
        before = tok(before_text)
    else:
        bos = tok(prompt, True)
        nob = tok(prompt, False)
        with_bos = prepend_bos if prepend_bos is not None else bool(getattr(model.cfg, "default_prepend_bos", True))
        before = bos[: len(bos) - len(nob)] if with_bos else []
    if full[: len(through)] != through or through[: len(before)] != before or len(through) <= len(before):
        raise InvalidInputError(
            f"could not locate subject {subject!r} in the tokens of {prompt!r} (tokenization is not prefix-stable "
            f"there); pass subject_positions= explicitly"
        )
    return tuple(range(len(before), len(through)))


def _embed_std(model: TLModel) -> float:
    W_E = getattr(model, "W_E", None)
    if W_E is None:
        raise InvalidInputError("model has no W_E to derive the noise level from; pass noise_std=")
    return float(W_E.detach().double().std())


def causal_trace(
    model: TLModel,
    prompt: str | Tensor,
    answer: str | int,
    *,
    subject: str | None = None,
    subject_positions: Sequence[int] | None = None,
    kinds: Sequence[Kind] = ("resid", "mlp", "attn"),
    noise: float = 3.0,
    noise_std: float | None = None,
    samples: int = 10,
    window: int | dict[str, int] | None = None,
    seed: int = 1,
    corrupt_hook: str = "hook_embed",
    batch_size: int = 256,
    multi_token: Literal["error", "first"] = "first",
    show_progress: bool = False,
) -> TraceResult:
    """Causal tracing of one prompt: indirect effects of restoring each (layer, position) state.

    Args:
        model: a TL model in eval mode (any backend; only residual/MLP/attention outputs are patched).
        prompt: the prompt (string, or 1-D token tensor with ``subject_positions``).
        answer: the object as a continuation string or a token id.
        subject / subject_positions: what to corrupt (one of the two).
        kinds: which states to trace (``"resid"``, ``"mlp"``, ``"attn"``).
        noise: ν as a multiple of the std of ``W_E`` (ignored when ``noise_std`` is given).
        noise_std: absolute ν.
        samples: corrupted copies (ROME: 10).
        window: an int for every kind, or kind → window (defaults: resid 1, mlp 10, attn 10).
        seed: seeds the noise.
        corrupt_hook: where the noise is added: ``"hook_embed"`` (token embeddings; default) or
            ``"blocks.0.hook_resid_pre"``.
        batch_size: rows (restorations × samples) per forward pass.
        multi_token: ``"first"`` (default) or ``"error"`` for multi-token answers.
        show_progress: a tqdm bar over passes.

    Returns:
        A :class:`TraceResult`.
    """
    check_model(model)
    require_eval(model)
    kinds = tuple(check_nonempty("kinds", kinds))
    for k in kinds:
        if k not in KINDS:
            raise InvalidInputError(f"unknown kind {k!r}; choose from {list(KINDS)}")
    check_int("seed", seed, 0)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidInputError(f"samples must be a positive int, got {samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
    if corrupt_hook not in model.hook_dict:
        raise InvalidInputError(f"model has no hook {corrupt_hook!r} to add the noise at; use 'hook_embed' or 'blocks.0.hook_resid_pre'")
    L = n_layers(model)
    windows: dict[str, int] = dict(_DEFAULT_WINDOW)
    if isinstance(window, int) and not isinstance(window, bool):
        windows = {k: window for k in KINDS}
    elif isinstance(window, dict):
        windows.update(window)
    elif window is not None:
        raise InvalidInputError(f"window must be an int, a dict kind -> int, or None, got {window!r}")
    for name, w in windows.items():
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise InvalidInputError(f"window for {name!r} must be a positive int, got {w!r}")
    tokens, _ = tokenize_prompts(model, [prompt])
    P = tokens.shape[1]
    if subject_positions is None:
        if subject is None or not isinstance(prompt, str):
            raise InvalidInputError("give subject= (a substring of the prompt) or subject_positions=")
        positions = subject_token_positions(model, prompt, subject)
    else:
        positions = tuple(sorted({int(p) for p in subject_positions}))
        if not positions or positions[0] < 0 or positions[-1] >= P:
            raise InvalidInputError(f"subject_positions {subject_positions!r} must be non-empty positions in 0..{P - 1}")
    answer_id = answer_token_id(model, prompt if isinstance(prompt, str) else None, answer, multi_token=multi_token)
    nu = float(noise_std) if noise_std is not None else float(noise) * _embed_std(model)
    if not math.isfinite(nu) or nu < 0:
        raise InvalidInputError(f"noise level must be a finite number >= 0, got {nu!r}")
    gen = torch.Generator().manual_seed(int(seed))
    d_model = int(model.cfg.d_model)
    eps = torch.randn(samples, len(positions), d_model, generator=gen, dtype=torch.float64) * nu
    names = sorted({_hook_name(k, layer) for k in kinds for layer in range(L)})
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    require_finite_logits(model, logits, tokens, "clean logits")
    q = P - 1
    p_clean = float(answer_probability(logits, q, answer_id)[0])
    clean = {name: cache[name][0].detach() for name in names}
    del cache
    p_corrupt = float(
        restore_states(model, tokens, answer_id, [[]], noise=eps, subject_positions=positions, clean=clean,
                       corrupt_hook=corrupt_hook)[0]
    )  # fmt: skip
    ie: dict[str, Tensor] = {}
    p_rest: dict[str, Tensor] = {}
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for kind in kinds:
        configs = [
            [(kind, lay, i) for lay in trace_window(layer, windows[kind], L)] for layer in range(L) for i in range(P)
        ]
        per_pass = max(1, batch_size // samples)
        chunks = [configs[j : j + per_pass] for j in range(0, len(configs), per_pass)]
        it: Iterable[list[Any]] = chunks
        if show_progress:
            from tqdm.auto import tqdm

            it = tqdm(chunks, desc=f"trace {kind}", unit="pass", leave=False)
        vals = []
        for ch in it:
            vals.append(
                restore_states(model, tokens, answer_id, ch, noise=eps, subject_positions=positions, clean=clean,
                               corrupt_hook=corrupt_hook)
            )  # fmt: skip
        pr = torch.cat(vals).reshape(L, P).to(dtype)
        p_rest[kind] = pr
        ie[kind] = pr - torch.tensor(p_corrupt, dtype=dtype)
    str_tokens = tuple(str(t) for t in model.to_str_tokens(tokens[0])) if getattr(model, "tokenizer", None) else tuple(
        str(int(t)) for t in tokens[0]
    )
    return TraceResult(
        ie=ie, p_restored=p_rest, p_clean=p_clean, p_corrupt=p_corrupt, tokens=tokens[0].cpu(), str_tokens=str_tokens,
        subject_positions=positions, answer_id=answer_id, noise_std=nu, samples=samples,
        window={k: windows[k] for k in kinds}, seed=seed,
    )  # fmt: skip


def restore_states(
    model: TLModel,
    tokens: Int[Tensor, "1 pos"],
    answer_id: int,
    configs: Sequence[Sequence[tuple[str, int, int]]],
    *,
    noise: Float[Tensor, "samples n_subject d_model"],
    subject_positions: Sequence[int],
    clean: dict[str, Tensor] | None = None,
    corrupt_hook: str = "hook_embed",
) -> Float[Tensor, " n_configs"]:
    """Mean P(answer) over the noise samples for each restoration config (one forward pass).

    Each config is a list of ``(kind, layer, position)`` states restored to their clean values together
    (an empty list: the plain corrupted run). ``clean`` maps hook names to clean ``[pos, d]`` values (computed
    when None).

    Examples:
        >>> import torch
        >>> from qloc_tl.zoo.tiny import tiny_model
        >>> model = tiny_model(); toks = model.to_tokens("alice was born in")
        >>> eps = torch.zeros(2, 1, model.cfg.d_model)
        >>> p = restore_states(model, toks, 5, [[], [("resid", 0, 1)]], noise=eps, subject_positions=[1])
        >>> bool(torch.allclose(p[0], p[1]))
        True
    """
    check_tensor("tokens", tokens, kind="int", ndim=(1, 2))
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.shape[0] != 1:
        raise InvalidInputError(f"tokens must be one prompt [1, pos], got shape {tuple(tokens.shape)}")
    P = tokens.shape[1]
    q = P - 1
    L = n_layers(model)
    check_nonempty("configs", configs)
    subject_positions = [check_int("subject position", p, 0, P - 1) for p in check_nonempty("subject_positions", subject_positions)]
    check_tensor("noise", noise, kind="float", ndim=3)
    s = int(noise.shape[0])
    if noise.shape[1] != len(subject_positions) or noise.shape[2] != int(model.cfg.d_model):
        raise InvalidInputError(
            f"noise must be [samples, n_subject={len(subject_positions)}, d_model={model.cfg.d_model}], got "
            f"{tuple(noise.shape)}"
        )
    for cfg in configs:
        for kind, layer, pos in cfg:
            if kind not in KINDS or not 0 <= layer < L or not 0 <= pos < P:
                raise InvalidInputError(f"bad state {(kind, layer, pos)!r}: kinds {list(KINDS)}, layers 0..{L - 1}, positions 0..{P - 1}")
    needed = sorted({_hook_name(k, lay) for cfg in configs for k, lay, _ in cfg})
    if clean is None or any(n not in clean for n in needed):
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=needed)
        clean = {n: cache[n][0].detach() for n in needed}
    n = len(configs)
    B = n * s
    masks: dict[str, Tensor] = {}
    for c, cfg in enumerate(configs):
        for kind, layer, pos in cfg:
            name = _hook_name(kind, layer)
            if name not in masks:
                masks[name] = torch.zeros(B, P, dtype=torch.bool)
            masks[name][c * s : (c + 1) * s, pos] = True
    hooks = HookList([(corrupt_hook, NoiseHook(noise, subject_positions))])
    for name in sorted(masks):
        hooks.append((name, RestoreHook(clean[name], masks[name])))
    with torch.no_grad(), intervene(model, hooks) as m:
        logits = m(tokens.expand(B, -1))
        # inside the intervention, so that the search for the first non-finite layer sees the corrupted run
        require_finite_logits(model, logits, tokens.expand(B, -1), "corrupted-run logits")
        p = answer_probability(logits, q, answer_id)
    return p.reshape(n, s).double().mean(1).cpu()
