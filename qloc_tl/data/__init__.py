"""Data: facts, neighbor queries and texts, and the bundled ParaRel / T-REx files (CC BY-NC 4.0, research use
only; see ``pararel/NOTICE.md``)."""

from qloc_tl.data.datasets import (
    builtin_facts,
    builtin_ppl_texts,
    builtin_relations,
    generic_ppl_texts,
    pararel_facts,
)
from qloc_tl.data.facts import Fact, Query, Template, load_pararel

__all__ = [
    "Fact",
    "Query",
    "Template",
    "load_pararel",
    "builtin_facts",
    "builtin_ppl_texts",
    "builtin_relations",
    "generic_ppl_texts",
    "pararel_facts",
]
