"""qloc_tl: knowledge neurons, knowledge synapses and query localization for TransformerLens models.

The vocabulary is fixed once: a **neuron** is ``blocks.{l}.mlp.hook_post[..., i]`` (``Neuron(l, i)``),
a **head** is ``blocks.{l}.attn.hook_pattern[:, h]`` (``Head(l, h)``).
"""

from __future__ import annotations

import importlib.metadata

from qloc_tl.core.errors import (
    CapabilityError,
    DataError,
    HookNotFiredError,
    InvalidInputError,
    NumericalError,
    OutputError,
    QlocError,
    ResourceError,
    ResumeMismatchError,
    UnsupportedModelError,
)
from qloc_tl.core.hooks import (
    HookList,
    intervene,
    record_neurons,
    run_with_interventions,
    scale_attention,
    scale_neurons,
    set_neurons,
)
from qloc_tl.core.identities import Head, Neuron, Synapse
from qloc_tl.core.model import Capabilities, capabilities, neuron_hook_name, tl_major
from qloc_tl.data.facts import Fact, Query, Template, load_pararel

# Submodules and the most used names of the experiment modules are loaded lazily on first access
# (``qloc_tl.data.datasets``, ``qloc_tl.attribute_neurons`` ...), so ``import qloc_tl`` stays light.
_SUBMODULES = ("core", "data", "zoo", "methods", "experiments", "reporting", "cli")
_LAZY = {
    "attribute_neurons": "methods.attribution",
    "NeuronAttribution": "methods.attribution",
    "AttributionConfig": "methods.attribution",
    "select_neurons": "methods.attribution",
    "refine_neurons": "methods.attribution",
    "refine_adaptive": "methods.attribution",
    "NeuronSet": "methods.attribution",
    "consistency_score": "experiments.consistency",
    "run_consistency": "experiments.consistency",
    "ConsistencyConfig": "experiments.consistency",
    "find_synapses": "methods.synapses",
    "SynapseResult": "methods.synapses",
    "dynamic_kn_selection": "experiments.dynamic",
    "causal_trace": "methods.tracing",
    "run_query_localization": "experiments.query_localization",
    "QLConfig": "experiments.query_localization",
    "erase": "core.edits",
    "update": "core.edits",
    "apply_erase": "core.edits",
    "apply_update": "core.edits",
    "plot_editing": "reporting.editing_plots",
    "cas_scores": "methods.cas",
    "select_cas": "methods.cas",
    "run_editing_experiment": "experiments.editing",
    "EditingConfig": "experiments.editing",
    "load_builtin_model": "zoo",
    "builtin_model_dir": "zoo",
    "load_hf_directory": "zoo.loading",
    "load_model": "zoo",
    "filter_known": "methods.known",
    "KnownFacts": "methods.known",
    "next_token_probs": "methods.known",
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
    "OutputError",
    "ResourceError",
    *_LAZY,
]
