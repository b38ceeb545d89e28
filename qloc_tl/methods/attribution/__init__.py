"""Attribution of MLP neurons: IG (Dai et al. 2022), SIG (Enguehard 2023, neuron adaptation), AMIG (Chen et
al. 2024), and knowledge-neuron selection (thresholds, refining, adaptive p).

Examples:
    >>> from qloc_tl.zoo.tiny import tiny_model
    >>> from qloc_tl.methods.attribution import attribute_neurons, select_neurons
    >>> model = tiny_model()
    >>> res = attribute_neurons(model, ["alice was born in", "bob speaks"], ["paris", "french"], steps=4)
    >>> len(res), res.scores.shape[1:] == (model.cfg.n_layers, model.cfg.d_mlp)
    (2, True)
    >>> sets = select_neurons(res.scores)   # one NeuronSet per prompt
    >>> len(sets)
    2
"""

from __future__ import annotations

from qloc_tl.methods.attribution.config import AttributionConfig
from qloc_tl.methods.attribution.ig import attribute_neurons
from qloc_tl.methods.attribution.quadrature import RULES, exactness_degree, quadrature
from qloc_tl.methods.attribution.results import NeuronAttribution
from qloc_tl.methods.attribution.selection import (
    SELECTION_METHODS,
    AdaptiveRefinement,
    NeuronSet,
    otsu_threshold,
    refine_adaptive,
    refine_neurons,
    select_neurons,
)

__all__ = [
    "attribute_neurons",
    "NeuronAttribution",
    "AttributionConfig",
    "select_neurons",
    "refine_neurons",
    "refine_adaptive",
    "AdaptiveRefinement",
    "NeuronSet",
    "otsu_threshold",
    "quadrature",
    "exactness_degree",
    "RULES",
    "SELECTION_METHODS",
]
