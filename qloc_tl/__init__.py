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
]
