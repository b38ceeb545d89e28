"""qloc_tl: knowledge neurons, knowledge synapses and query localization for TransformerLens models.

The vocabulary is fixed once: a **neuron** is ``blocks.{l}.mlp.hook_post[..., i]`` (``Neuron(l, i)``),
a **head** is ``blocks.{l}.attn.hook_pattern[:, h]`` (``Head(l, h)``).
"""

from __future__ import annotations

import importlib.metadata

from .errors import (
    CapabilityError,
    DataError,
    HookNotFiredError,
    InvalidInputError,
    NumericalError,
    QlocError,
    ResumeMismatchError,
    UnsupportedModelError,
)
from .facts import Fact, Query, Template, load_pararel
from .hooks import (
    HookList,
    intervene,
    record_neurons,
    run_with_interventions,
    scale_attention,
    scale_neurons,
    set_neurons,
)
from .identities import Head, Neuron, Synapse
from .model import Capabilities, capabilities, neuron_hook_name, tl_major

# Submodules and the most used names of the experiment modules are loaded lazily on first access
# (``qloc_tl.datasets``, ``qloc_tl.attribute_neurons`` ...), so ``import qloc_tl`` stays light.
_SUBMODULES = (
    "attribution", "cli", "consistency", "datasets", "dynamic", "editing", "facts", "hooks", "identities",
    "loading", "mapping", "model", "query_localization", "report", "store", "synapses", "testing", "tracing",
    "views", "zoo",
)  # fmt: skip
_LAZY = {
    "attribute_neurons": "attribution",
    "NeuronAttribution": "attribution",
    "AttributionConfig": "attribution",
    "select_neurons": "attribution",
    "refine_neurons": "attribution",
    "refine_adaptive": "attribution",
    "NeuronSet": "attribution",
    "consistency_score": "consistency",
    "run_consistency": "consistency",
    "ConsistencyConfig": "consistency",
    "find_synapses": "synapses",
    "SynapseResult": "synapses",
    "dynamic_kn_selection": "dynamic",
    "causal_trace": "tracing",
    "run_query_localization": "query_localization",
    "QLConfig": "query_localization",
    "erase": "editing",
    "update": "editing",
    "apply_erase": "editing",
    "apply_update": "editing",
    "plot_editing": "editing",
    "cas_scores": "editing",
    "select_cas": "editing",
    "run_editing_experiment": "editing",
    "EditingConfig": "editing",
    "load_builtin_model": "zoo",
    "builtin_model_dir": "zoo",
    "load_hf_directory": "loading",
    "load_model": "zoo",
    "filter_known": "known",
    "KnownFacts": "known",
    "next_token_probs": "known",
}


def __getattr__(name: str) -> object:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qloc_tl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_LAZY))


try:
    __version__ = importlib.metadata.version("qloc-tl")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "Neuron",
    "Head",
    "Synapse",
    "Fact",
    "Query",
    "Template",
    "load_pararel",
    "HookList",
    "scale_neurons",
    "set_neurons",
    "scale_attention",
    "record_neurons",
    "intervene",
    "run_with_interventions",
    "Capabilities",
    "capabilities",
    "neuron_hook_name",
    "tl_major",
    "QlocError",
    "InvalidInputError",
    "UnsupportedModelError",
    "CapabilityError",
    "HookNotFiredError",
    "NumericalError",
    "DataError",
    "ResumeMismatchError",
    *_LAZY,
]
