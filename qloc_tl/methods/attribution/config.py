"""The frozen, validated configuration of one :func:`~qloc_tl.methods.attribution.attribute_neurons` call, and
its prompts and answers in normal form (:func:`normalise_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError
from qloc_tl.core.model import SITES, TLModel
from qloc_tl.core.tokens import answer_token_id
from qloc_tl.core.validation import check_choice, check_float
from qloc_tl.methods.attribution.quadrature import RULES

__all__ = [
    "AttributionConfig",
    "MEMORY_FRACTION",
    "METHODS",
    "OBJECTIVES",
    "MULTIPLY_BY",
    "IMPLEMENTATIONS",
    "normalise_inputs",
]

METHODS = ("ig", "sig", "amig")
OBJECTIVES = ("prob", "logprob")
MULTIPLY_BY = ("activation", "difference")
IMPLEMENTATIONS = ("fast", "reference")
FAST_PATHS = ("auto", "kv", "blockwise", "packed", "full")
MEMORY_FRACTION = 0.5
"""The default ``memory_fraction``: the share of the device's free memory one pass may plan to take."""


def _pos_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(
            f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}"
        )


@dataclass(frozen=True, eq=False)
class AttributionConfig:
    """Settings of an attribution run (see :func:`~qloc_tl.methods.attribution.attribute_neurons` for meanings).

    ``baseline`` is resolved from ``None``: ``"zero"`` for IG, ``"masked"`` (per-token masked baselines)
    for SIG and AMIG; ``multiply_by`` from ``None``: ``"difference"`` for IG and SIG, ``"activation"`` for
    AMIG. ``memory_fraction`` (in (0, 1], default :data:`MEMORY_FRACTION`) is the share of the device's free
    memory (:func:`~qloc_tl.core.memory.free_memory`, read before each pass is sized) that one pass may plan to
    take: the engines' fixed element budgets and chunk sizes are lowered to fit it; it never changes a score.
    Validation happens in ``__post_init__`` and raises :class:`~qloc_tl.core.errors.InvalidInputError`.

    Examples:
        >>> AttributionConfig(method="amig").multiply_by
        'activation'
        >>> AttributionConfig(steps=0)
        Traceback (most recent call last):
        ...
        qloc_tl.core.errors.InvalidInputError: steps must be a positive int, got 0
    """

    method: Literal["ig", "sig", "amig"] | str = "ig"
    steps: int = 20
    rule: str = "left"
    site: Literal["post", "pre", "pre_linear"] | str = "post"
    baseline: Any = None
    objective: Literal["prob", "logprob"] | str = "prob"
    multiply_by: Literal["activation", "difference"] | str | None = None
    layers: tuple[int, ...] | None = None
    batch_size: int | None = None
    prepend_bos: bool | None = None
    multi_token: Literal["error", "first"] | str = "error"
    implementation: Literal["fast", "reference"] | str = "fast"
    show_progress: bool = False
    replacement_id: int | None = None
    mask_bos: bool = False
    fast_path: Literal["auto", "kv", "blockwise", "packed", "full"] | str = "auto"
    memory_fraction: float = MEMORY_FRACTION

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        _pos_int("steps", self.steps)
        check_choice("rule", self.rule, RULES)
        if self.rule == "trapezoid" and self.steps < 2:
            raise InvalidInputError("rule='trapezoid' needs steps >= 2 (it uses both end points)")
        check_choice("site", self.site, tuple(SITES))
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("multi_token", self.multi_token, ("error", "first"))
        check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        check_choice("fast_path", self.fast_path, FAST_PATHS)
        _pos_int("batch_size", self.batch_size, allow_none=True)
        object.__setattr__(
            self, "memory_fraction", check_float("memory_fraction", self.memory_fraction, 0.0, 1.0, open_lo=True)
        )
        for name in ("show_progress", "mask_bos"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.prepend_bos is not None and not isinstance(self.prepend_bos, bool):
            raise InvalidInputError(f"prepend_bos must be True, False or None, got {self.prepend_bos!r}")
        if self.replacement_id is not None and (
            isinstance(self.replacement_id, bool)
            or not isinstance(self.replacement_id, int)
            or self.replacement_id < 0
        ):
            raise InvalidInputError(
                f"replacement_id must be a token id (int >= 0) or None, got {self.replacement_id!r}"
            )
        # multiply_by
        mb = self.multiply_by
        if mb is None:
            mb = "activation" if self.method == "amig" else "difference"
        check_choice("multiply_by", mb, MULTIPLY_BY)
        object.__setattr__(self, "multiply_by", mb)
        # baseline
        b = self.baseline
        if b is None:
            b = "zero" if self.method == "ig" else "masked"
        if isinstance(b, str):
            if self.method == "ig" and b != "zero":
                raise InvalidInputError(
                    f"baseline for method='ig' must be 'zero' or a tensor, got {b!r}; per-token masked baselines "
                    f"are method='sig' (averaged attributions) or method='amig' (averaged paths)"
                )
            if self.method != "ig" and b != "masked":
                raise InvalidInputError(
                    f"method={self.method!r} builds its own per-token masked baselines; leave baseline=None "
                    f"(got {b!r}), or use method='ig' with a tensor baseline"
                )
        elif isinstance(b, Tensor):
            if self.method != "ig":
                raise InvalidInputError(
                    f"a tensor baseline is only used by method='ig' (method={self.method!r} builds masked-token "
                    f"baselines); pass method='ig'"
                )
            if b.ndim not in (1, 2) or not b.dtype.is_floating_point:
                raise InvalidInputError(
                    f"baseline tensor must be float [d_mlp] or [n_layers, d_mlp], got {b.dtype} {tuple(b.shape)}"
                )
            if not bool(torch.isfinite(b).all()):
                raise InvalidInputError("baseline tensor contains inf/NaN")
        else:
            raise InvalidInputError(f"baseline must be 'zero', a tensor or None, got {type(b).__name__}")
        object.__setattr__(self, "baseline", b)
        if self.layers is not None:
            if isinstance(self.layers, (int, str)) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in self.layers
            ):
                raise InvalidInputError(f"layers must be a sequence of ints or None, got {self.layers!r}")
            layers = tuple(sorted(set(int(x) for x in self.layers)))
            if not layers:
                raise InvalidInputError("layers is empty: pass None for all layers or a non-empty sequence")
            object.__setattr__(self, "layers", layers)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (a tensor baseline is reported by its shape)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if isinstance(self.baseline, Tensor):
            out["baseline"] = f"tensor{tuple(self.baseline.shape)}"
        if self.layers is not None:
            out["layers"] = list(self.layers)
        return out


def normalise_inputs(
    model: TLModel, prompts: Any, answers: Any, config: AttributionConfig
) -> tuple[list[Any], list[int], bool]:
    """``(prompts, answer ids, single)``: the prompts as a list (a string, a 1-D token tensor, a list of them
    or a 2-D token tensor), one answer token id per prompt, and whether a single prompt was given."""
    single = isinstance(prompts, str) or (isinstance(prompts, Tensor) and prompts.ndim == 1)
    if single:
        plist: list[Any] = [prompts]
    elif isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise InvalidInputError(
                f"token tensor prompts must be 1-D or 2-D, got shape {tuple(prompts.shape)}"
            )
        plist = list(prompts)
    else:
        plist = list(prompts)
    if not plist:
        raise InvalidInputError("no prompts given")
    if isinstance(answers, (str, int)) or (isinstance(answers, Tensor) and answers.numel() == 1 and single):
        alist: list[Any] = [answers]
    elif isinstance(answers, Tensor):
        alist = [int(a) for a in answers.reshape(-1)]
    else:
        alist = list(answers)
    if len(alist) == 1 and len(plist) > 1 and isinstance(answers, (str, int)):
        raise InvalidInputError(
            f"got {len(plist)} prompts but a single answer; pass a list of {len(plist)} answers (one per prompt)"
        )
    if len(alist) != len(plist):
        raise InvalidInputError(
            f"got {len(plist)} prompts but {len(alist)} answers; give one answer per prompt"
        )
    multi_token = cast(Literal["error", "first"], config.multi_token)  # checked by AttributionConfig
    ids = [
        answer_token_id(model, p if isinstance(p, str) else None, a, multi_token=multi_token)
        for p, a in zip(plist, alist)
    ]
    return plist, ids, single
