"""The configuration of the knowledge-editing experiment (:func:`qloc_tl.experiments.editing.run_editing_experiment`)
and the names of its neuron sets, edits and classes.

Examples:
    >>> cfg = EditingConfig(methods="CAS", lambda2=2.0)
    >>> cfg.methods, cfg.rule
    (('CAS',), 'dai')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from qloc_tl.core.edits import RULE_DEFAULTS, EmbeddingKind, UpdateRule
from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.validation import check_choice, check_float, check_int

__all__ = ["METHODS", "ALL_METHODS", "EDITS", "CLASSES", "EditingConfig"]

METHODS = ("N_i", "N_u", "CAS")
ALL_METHODS = ("N_i", "N_u", "CAS", "CAS_k")
EDITS = ("erase", "update")
CLASSES = ("K_C", "K_I")


@dataclass(frozen=True)
class EditingConfig:
    """Configuration of :func:`~qloc_tl.experiments.editing.run_editing_experiment` (frozen, validated).

    Attributes:
        methods: neuron sets to edit with: ``"N_i"``, ``"N_u"``, ``"CAS"`` (default) and the optional
            size-matched control ``"CAS_k"`` (top-``|N_i|`` CAS neurons); see
            :func:`qloc_tl.methods.cas.fact_neuron_sets`.
        edits: ``"erase"`` and/or ``"update"``.
        attribution_method, steps, site: passed to ``attribute_neurons`` when attributions are computed.
        kn_threshold: fraction of max selecting each query's KNs (Dai et al.'s t = 0.2).
        cas_beta1, cas_beta2, cas_spread, cas_normalize, cas_method, cas_value: CAS (see
            :func:`qloc_tl.methods.cas.select_cas`).
        cs_mode, cs_threshold: K_C/K_I split when no ``classes`` are given: CS (``consistency_score`` over the
            per-query KN sets) ≥ ``cs_threshold`` → K_C, else K_I. 0.3 is the example static threshold of the
            paper's submission; the paper does not state the value it used.
        rule, lambda1, lambda2, embedding: the update (:func:`qloc_tl.core.edits.update`); ``None`` λ = the
            rule's default.
        erase_value: ``"zero"``.
        old_object: o = the model's top-1 on the edited query (``"top1"``) or the gold object (``"gold"``).
        require_known: skip facts none of whose queries the model answers with the gold object; the edited
            query is always one the model answers correctly when this is on.
        edit_query: which query is edited — ``"random"`` (seeded per fact, among the known ones) or
            ``"first"`` (the first known one).
        n_unrelated: unrelated queries per fact for Locality (one query each of facts of other relations).
        n_same_relation: queries per fact for the same-relation Locality ``loc_same`` (one query each of
            other facts of the fact's relation with another subject and another object; 0 turns it off).
        max_facts_per_class: stop once this many facts of each class were edited (``None``: all facts).
        chunk_size: facts per stored part (the unit of resumption).
        batch_size: prompts per forward pass.
        seed: seeds o', the edited query and the unrelated queries (per fact, from ``Fact.key``).
        verify_edits: verify every weight edit with a probe forward pass.
    """

    methods: tuple[str, ...] = METHODS
    edits: tuple[str, ...] = EDITS
    attribution_method: str = "ig"
    steps: int = 20
    site: str = "post"
    kn_threshold: float = 0.2
    cas_beta1: float = 1.0
    cas_beta2: float = 1.0
    cas_spread: Literal["std", "var"] = "var"
    cas_normalize: Literal["max", "none"] = "max"
    cas_method: Literal["fraction_of_max", "topk"] = "fraction_of_max"
    cas_value: float = 0.2
    cs_mode: Literal["relaxed", "strict"] = "relaxed"
    cs_threshold: float = 0.3
    rule: UpdateRule = "dai"
    lambda1: float | None = None
    lambda2: float | None = None
    embedding: EmbeddingKind = "unembed"
    erase_value: Literal["zero"] = "zero"
    old_object: Literal["top1", "gold"] = "top1"
    require_known: bool = True
    edit_query: Literal["random", "first"] = "random"
    n_unrelated: int = 20
    n_same_relation: int = 10
    max_facts_per_class: int | None = None
    chunk_size: int = 8
    batch_size: int = 32
    seed: int = 0
    verify_edits: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("methods", ALL_METHODS), ("edits", EDITS)):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            v = tuple(v)
            bad = [x for x in v if x not in allowed]
            if not v or bad or len(set(v)) != len(v):
                raise InvalidInputError(
                    f"{name} must be a non-empty tuple of distinct values from {allowed}, got {v!r}"
                )
            object.__setattr__(self, name, v)
        choices = {
            "attribution_method": ("ig", "sig", "amig"),
            "site": ("post", "pre", "pre_linear"),
            "cas_spread": ("std", "var"),
            "cas_normalize": ("max", "none"),
            "cas_method": ("fraction_of_max", "topk"),
            "cs_mode": ("relaxed", "strict"),
            "rule": tuple(RULE_DEFAULTS),
            "embedding": ("unembed", "embed"),
            "erase_value": ("zero",),
            "old_object": ("top1", "gold"),
            "edit_query": ("random", "first"),
        }
        for name, allowed_values in choices.items():
            check_choice(name, getattr(self, name), allowed_values)
        for name in ("kn_threshold", "cs_threshold"):
            check_float(name, getattr(self, name), 0.0, 1.0)
        for name in ("cas_beta1", "cas_beta2"):
            check_float(name, getattr(self, name), lo=0.0)
        if self.cas_method == "fraction_of_max":
            check_float("cas_value", self.cas_value, 0.0, 1.0)
        elif int(check_float("cas_value", self.cas_value)) != self.cas_value or self.cas_value < 1:
            raise InvalidInputError(f"cas_value must be a positive integer for topk, got {self.cas_value!r}")
        for name in ("steps", "chunk_size", "batch_size"):
            check_int(name, getattr(self, name), lo=1)
        for name in ("n_unrelated", "n_same_relation"):
            check_int(name, getattr(self, name), lo=0)
        check_int("max_facts_per_class", self.max_facts_per_class, lo=1, allow_none=True)
        check_int("seed", self.seed)
        for name in ("lambda1", "lambda2"):
            check_float(name, getattr(self, name), allow_none=True)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"], d["edits"] = list(self.methods), list(self.edits)
        return d
