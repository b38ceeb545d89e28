"""Write tests/data/smollm2_ig_reference.json: IG of one known SmolLM2 fact, the oracle of the cross-major
test in tests/integration/test_smollm2_known.py (run under either TL major; the test then compares the other one against it).

    QLOC_TL_CACHE=... python tests/make_smollm2_reference.py
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import torch

import qloc_tl as q

PROMPT, ANSWER, STEPS, TOP = "The capital city of France is", " Paris", 4, 64


def reference() -> dict:
    model = q.load_model("smollm2-135m")
    res = q.attribute_neurons(model, PROMPT, ANSWER, steps=STEPS)
    flat = res.scores.detach().double().flatten()
    top = flat.abs().topk(TOP).indices
    d = int(model.cfg.d_mlp)
    return {
        "prompt": PROMPT, "answer": ANSWER, "steps": STEPS,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "clean_prob": float(res.clean_prob[0]),
        "neurons": [[int(i) // d, int(i) % d] for i in top],
        "scores": [float(flat[i]) for i in top],
        "layer_sums": res.scores.detach().double().sum(-1).tolist(),
    }  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(__file__).parent / "data" / "smollm2_ig_reference.json"
    out.write_text(json.dumps(reference(), indent=1))
    print(f"wrote {out}")
