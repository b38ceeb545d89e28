"""Methods: attribution of neurons (IG, SIG, AMIG) and of attention (knowledge synapses), the Consistency
Score, causal tracing, screening for known facts, the completeness diagnostic and CAS neuron selection.

Each method is a function of ``(model, inputs, config)`` returning a typed result; none runs an experiment.
"""
