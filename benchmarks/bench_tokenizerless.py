"""Benchmark: IG on a TL 3 ``HookedTransformer`` / TL 4 ``TransformerBridge.boot_native`` model built from a
config without a tokenizer.

Such a model (tests, toy experiments, many notebooks) used to run the slow ``"full"`` path: TL 3's KV-cache
forward raises "Cannot compute attention mask without a tokenizer", so the capability probe refused the KV
cache. The probe and the TL 3 engines now pass an explicit all-ones ``attention_mask`` where the model has no
tokenizer (:func:`qloc_tl.core.model.hooked_kv_mask`), and such a model gets the prefix-reusing paths.

TL 4: a ``boot_native`` bridge (TL's own ``NativeModel``, no Hugging Face model) used to run the ``"full"`` path
too: its attention reads a 4-D boolean ``attention_mask`` as True = masked (Hugging Face: True = keep), so the
``"blockwise"`` and ``"packed"`` layouts failed their validation against the clean logits. The engines now
pass the mask in the convention the backend is probed to read
(:func:`qloc_tl.core.model.bridge_mask_convention`) and keep its rows within ``n_ctx``; such a bridge gets
``"blockwise"``. The same shape as a ``TransformerBridgeConfig``, booted with ``boot_native(cfg)``.

Model: ``HookedTransformerConfig(n_layers=6, d_model=256, n_heads=4, d_head=64, d_mlp=1024, n_ctx=N,
d_vocab=1000, act_fn="gelu", normalization_type="LN")``, random weights, no tokenizer, N = 64 and 1024
(``--n-ctx``); ``--queries`` random prompts of ``--tokens`` tokens given as token tensors, answers as token
ids; IG, m = ``--steps`` (20), ``torch.set_num_threads(--threads)`` (1).

For each N it times, in turn within each of ``--repeats`` rounds (a slow spell of the shared machine then
hits all three), after one warm-up call of each (the per-model capability probes are not a query's cost):

* ``reference`` — ``implementation="reference"``: per prompt, per layer, the prompt repeated through the
  whole model (the plain per-layer full-sequence IG loop, the obviously-correct oracle);
* ``full``      — ``fast_path="full"``: batched full sequences, several layers per pass (what such a model ran
  before);
* ``fast``      — the default (``fast_path="auto"``), reporting the path it took.

It prints the median over the rounds of the CPU time of the calling thread (``time.thread_time``; with
``--threads`` > 1 wall time) per query, the wall-clock median too, the speed-ups and the max relative
difference of the scores (``max |Δ| / max |reference|``).

Usage::

    python benchmarks/bench_tokenizerless.py                       # N = 64 and 1024, 12 queries, 3 rounds
    python benchmarks/bench_tokenizerless.py --n-ctx 64 --queries 8 --repeats 5
    .ci-venvs/tl4/bin/python benchmarks/bench_tokenizerless.py    # TL 4: the boot_native bridge
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qloc_tl.core.model import bridge_mask_convention, capabilities, tl_major  # noqa: E402
from qloc_tl.methods.attribution import attribute_neurons  # noqa: E402


def tokenizerless_model(n_ctx: int, seed: int = 0) -> Any:
    """The 6-layer d_model-256 GPT-2-shaped model of the issue, random weights, no tokenizer: a TL 3
    ``HookedTransformer``, or under TL 4 a ``TransformerBridge.boot_native`` bridge."""
    shape = dict(
        n_layers=6, d_model=256, n_heads=4, d_head=64, d_mlp=1024, n_ctx=n_ctx, d_vocab=1000, act_fn="gelu",
        normalization_type="LN", seed=seed,
    )  # fmt: skip
    torch.manual_seed(seed)
    if tl_major() >= 4:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(TransformerBridgeConfig(**shape)).eval()  # type: ignore[attr-defined]
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**shape)).eval()
    assert model.tokenizer is None
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def bench(n_ctx: int, args: argparse.Namespace) -> dict[str, Any]:
    model = tokenizerless_model(n_ctx)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 1000, (args.queries, args.tokens), generator=g)
    prompts = list(toks)
    answers = [int(a) for a in torch.randint(0, 1000, (args.queries,), generator=g)]
    n, steps = args.queries, args.steps
    caps = capabilities(model)
    kind = (
        f"boot_native TransformerBridge without tokenizer (4-D mask convention {bridge_mask_convention(model)!r})"
        if caps.backend == "bridge"
        else f"HookedTransformer without tokenizer (kv_cache={caps.kv_cache!r})"
    )
    engines = {
        "reference": lambda: attribute_neurons(model, prompts, answers, steps=steps, implementation="reference"),
        "full": lambda: attribute_neurons(model, prompts, answers, steps=steps, fast_path="full"),
        "fast": lambda: attribute_neurons(model, prompts, answers, steps=steps),
    }
    for fn in engines.values():  # warm-up: probes, verdicts remembered per model
        fn()
    cpu: dict[str, list[float]] = {k: [] for k in engines}
    wall: dict[str, list[float]] = {k: [] for k in engines}
    res: dict[str, Any] = {}
    now = time.perf_counter if args.threads > 1 else time.thread_time
    for _ in range(args.repeats):
        for k, fn in engines.items():
            w0, t0 = time.perf_counter(), now()
            res[k] = fn()
            cpu[k].append((now() - t0) / n)
            wall[k].append((time.perf_counter() - w0) / n)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    medw = {k: statistics.median(v) for k, v in wall.items()}
    ref = res["reference"].scores_batched
    out = {
        "n_ctx": n_ctx,
        "kv_cache": caps.kv_cache,
        "path": res["fast"].path,
        "full_path": res["full"].path,
        "sec": med,
        "wall": medw,
        "all": cpu,
        "diff_fast": rel_diff(res["fast"].scores_batched, ref),
        "diff_full": rel_diff(res["full"].scores_batched, ref),
    }
    unit = "CPU time of the calling thread" if args.threads == 1 else "wall time"
    print(
        f"n_ctx {n_ctx}: TL {tl_major()} {kind}, "
        f"{n} queries of {args.tokens} tokens, m = {steps}, {torch.get_num_threads()} thread(s); median of "
        f"{args.repeats} rounds, {unit}, ms per query (wall median in brackets):\n"
        f"  reference       {1e3 * med['reference']:8.2f} ({1e3 * medw['reference']:.2f})  "
        f"rounds {[round(1e3 * x, 2) for x in cpu['reference']]}\n"
        f"  full            {1e3 * med['full']:8.2f} ({1e3 * medw['full']:.2f})  "
        f"rounds {[round(1e3 * x, 2) for x in cpu['full']]}  vs reference {med['reference'] / med['full']:.1f}x, "
        f"max rel diff {out['diff_full']:.1e}\n"
        f"  fast ({out['path']:<9s}) {1e3 * med['fast']:8.2f} ({1e3 * medw['fast']:.2f})  "
        f"rounds {[round(1e3 * x, 2) for x in cpu['fast']]}  vs reference {med['reference'] / med['fast']:.1f}x, "
        f"vs full {med['full'] / med['fast']:.1f}x, max rel diff vs reference {out['diff_fast']:.1e}",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-ctx", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="log qloc_tl.methods.attribution at INFO")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("qloc_tl.methods.attribution").setLevel(logging.INFO)
    for n_ctx in args.n_ctx:
        bench(n_ctx, args)


if __name__ == "__main__":
    main()
