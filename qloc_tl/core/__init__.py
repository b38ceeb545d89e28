"""Core: the vocabulary and the machinery every other layer builds on.

Identities (:class:`Neuron`, :class:`Head`, :class:`Synapse`), errors, the TransformerLens model protocol and its
capabilities, hook factories, weight edits, argument validation, statistics and seeding, and the resumable run
store. Nothing here imports from a higher layer (data, zoo, methods, experiments, reporting, cli).
"""
