"""Benchmark of knowledge-synapse attribution (``find_synapses``, method ``"attattr"``) on SmolLM2-135M.

For each quadrature size m (default 20 and 6) and each prompt it times, per query,

* ``batched`` — ``find_synapses(..., implementation="batched")``: the full-sequence engine, every
  (layer, step) sample a row of the whole prompt (layers × (m + 1) rows per query);
* ``fast``    — ``find_synapses(...)`` (default): only the answer token per sample, on top of the clean
  prefix (TL 3: TL's KV cache; TL 4: packed rows); the path that ran is printed;
* ``reference`` (with ``--plain`` only) — the plain loop, one full forward/backward per (layer, step);

and the max relative difference of the fast scores from the batched ones (``max|Δ| / max|batched|`` over
all (layer, head, key) scores) and of P with each layer's answer row zeroed.

Prompts: ~10-token facts SmolLM2-135M answers top-1 (the script prints P(answer) and whether it is the top
token). Timing: wall time (``time.perf_counter``) and process CPU time (``time.process_time``, all threads)
of each call, min over ``--repeats`` rounds; within a round each prompt runs fast then batched, so a slow
spell of a shared machine hits both. ``torch.set_num_threads(--threads)`` (default 2). The TL major is the
one installed in the interpreter that runs the script (run it under each venv).

Usage::

    python benchmarks/bench_synapses.py                  # m = 20 and 6, two prompts, 2 threads
    python benchmarks/bench_synapses.py --steps 6 --prompts 1 --plain
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qloc_tl.core.model import tl_major  # noqa: E402
from qloc_tl.methods.synapses import find_synapses  # noqa: E402

PROMPTS = [
    ("The Eiffel Tower is located in the city of", " Paris"),  # 10 tokens
    ("The Statue of Liberty is located in the city of", " New"),  # 10 tokens
    ("The Great Wall of China is located in the country of", " China"),  # 11 tokens
]


def _timed(model: Any, prompt: str, answer: str, **kw: Any) -> tuple[Any, float, float]:
    """``find_synapses(model, prompt, answer, **kw)`` with its wall and process CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = find_synapses(model, prompt, answer, **kw)
    return out, time.perf_counter() - w, time.process_time() - c


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 6], help="quadrature sizes m")
    ap.add_argument("--prompts", type=int, default=2, help=f"prompts per m (at most {len(PROMPTS)})")
    ap.add_argument("--repeats", type=int, default=1, help="min over this many rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="also time the plain reference loop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    import qloc_tl

    w0 = time.perf_counter()
    model = qloc_tl.load_model("smollm2-135m")
    print(f"TL {tl_major()} ({type(model).__name__}), SmolLM2-135M loaded in {time.perf_counter() - w0:.1f} s; "
          f"{args.threads} threads")  # fmt: skip
    prompts = PROMPTS[: args.prompts]
    for p, a in prompts:
        toks = model.to_tokens(p)
        with torch.no_grad():
            probs = model(toks)[0, -1].softmax(-1)
        aid = int(model.to_tokens(a, prepend_bos=False)[0, 0])
        print(f"  {toks.shape[1]:2d} tokens  {p!r} -> {a!r}: P = {float(probs[aid]):.3f}, "
              f"top-1 = {int(probs.argmax()) == aid}")  # fmt: skip
    # warm-up: capability probes, first-call allocations
    find_synapses(model, prompts[0][0], prompts[0][1], steps=1, layers=[0])
    find_synapses(model, prompts[0][0], prompts[0][1], steps=1, layers=[0], implementation="batched")

    rows = []
    for m in args.steps:
        best: dict[str, list[tuple[float, float]]] = {}
        rel_s, rel_p, path = 0.0, 0.0, None
        for _ in range(args.repeats):
            for i, (p, a) in enumerate(prompts):
                fast, fw, fc = _timed(model, p, a, steps=m)
                ref, bw, bc = _timed(model, p, a, steps=m, implementation="batched")
                path = fast.fast_path or fast.implementation
                rel_s = max(rel_s, _rel(fast.scores, ref.scores))
                rel_p = max(rel_p, _rel(fast.prob_zero, ref.prob_zero))
                for name, t in (("fast", (fw, fc)), ("batched", (bw, bc))):
                    cur = best.setdefault(name, [(float("inf"), float("inf"))] * len(prompts))
                    cur[i] = (min(cur[i][0], t[0]), min(cur[i][1], t[1]))
                if args.plain:
                    plain, pw, pc = _timed(model, p, a, steps=m, implementation="reference")
                    rel_s = max(rel_s, _rel(fast.scores, plain.scores))
                    cur = best.setdefault("reference", [(float("inf"), float("inf"))] * len(prompts))
                    cur[i] = (min(cur[i][0], pw), min(cur[i][1], pc))
                print(f"  m={m:2d} prompt {i}: fast ({path}) {fw:6.2f} s wall / {fc:6.2f} s cpu; "
                      f"batched {bw:6.2f} s wall / {bc:6.2f} s cpu", flush=True)  # fmt: skip
        mean = {k: (sum(t[0] for t in v) / len(v), sum(t[1] for t in v) / len(v)) for k, v in best.items()}
        rows.append((m, path, mean, rel_s, rel_p))

    print()
    print("| TL | m | batched s/query (wall / cpu) | fast s/query (wall / cpu) | speed-up (wall) | fast path "
          "| max rel. diff scores | max rel. diff P(row zeroed) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, path, mean, rel_s, rel_p in rows:
        b, f = mean["batched"], mean["fast"]
        print(f"| {tl_major()} | {m} | {b[0]:.1f} / {b[1]:.1f} | {f[0]:.2f} / {f[1]:.2f} | {b[0] / f[0]:.1f}x "
              f"| {path} | {rel_s:.1e} | {rel_p:.1e} |")  # fmt: skip
        if "reference" in mean:
            r = mean["reference"]
            print(f"|   | {m} | plain reference loop: {r[0]:.1f} / {r[1]:.1f} s/query |  |  |  |  |  |")


if __name__ == "__main__":
    main()
