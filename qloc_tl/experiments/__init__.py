"""Experiments: the paper's experiments as resumable runs over many facts (consistency, Query-KN mapping,
dynamic KN selection, query localization, editing) and the studies beside them (KN specificity, update
strength). Each returns DataFrames; plotting and verdicts live in :mod:`qloc_tl.reporting`.
"""
