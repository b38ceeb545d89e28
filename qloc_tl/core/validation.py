"""Argument validation shared by every public function: one helper family, one error type.

Each helper either returns the value in its canonical form or raises :class:`~qloc_tl.core.errors.InvalidInputError`
naming the argument. Choices are given as a ``Literal`` type (read with :func:`typing.get_args`, as
TransformerLens's ``EdgeAttributionConfig`` does) or as a plain tuple, so a config's annotation and its check
cannot drift apart.

Examples:
    >>> from typing import Literal
    >>> check_choice("site", "post", Literal["pre", "post"])
    'post'
    >>> check_float("fraction", 0.2, lo=0.0, hi=1.0)
    0.2
    >>> as_neurons([(0, 1), (2, 3)])
    [Neuron(layer=0, index=1), Neuron(layer=2, index=3)]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from qloc_tl.core.errors import InvalidInputError, NumericalError
from qloc_tl.core.identities import Neuron
from qloc_tl.core.model import SITES, TLModel, check_layer, d_mlp, n_layers

__all__ = [
    "check_choice",
    "check_int",
    "check_float",
    "check_nonempty",
    "check_tensor",
    "check_finite_values",
    "check_model_dtype",
    "as_neurons",
    "as_neuron_set",
    "as_neuron_sets",
    "validate_neurons",
    "require_finite",
    "require_finite_logits",
    "nonfinite_site",
]

TensorKind = Literal["float", "int", "real"]


def check_choice(name: str, value: Any, choices: Any) -> Any:
    """``value`` if it is one of ``choices`` (a ``Literal[...]`` type or an iterable of allowed values)."""
    allowed = get_args(choices) or tuple(choices)
    if value not in allowed:
        raise InvalidInputError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_int(
    name: str, value: Any, lo: int | None = 0, hi: int | None = None, *, allow_none: bool = False
) -> Any:
    """``int(value)`` if it is an integer (a Python or NumPy int, not a ``bool``) in ``[lo, hi]`` (``lo=None``:
    no lower bound), or ``None`` when ``allow_none``."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = "" if lo is None and hi is None else f" >= {lo}" if hi is None else f" <= {hi}" if lo is None else f" in [{lo}, {hi}]"
        raise InvalidInputError(f"{name} must be an int{rng}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    allow_none: bool = False,
    open_lo: bool = False,
    open_hi: bool = False,
) -> Any:
    """``float(value)`` if it is a finite real number in ``[lo, hi]`` (or ``None`` when ``allow_none``);
    ``open_lo`` / ``open_hi`` exclude the bound itself.

    NaN and ±inf are refused even when the range is unbounded: no argument of this package means anything there.
    NumPy scalars count as numbers; ``bool`` and complex numbers do not.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if v < lo or v > hi or (open_lo and v == lo) or (open_hi and v == hi):
        rng = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
        raise InvalidInputError(f"{name} must be a number in {rng}, got {value!r}")
    return v


def check_nonempty(name: str, items: Any) -> Any:
    """``items`` if it has at least one element (strings are refused: they are never a collection here)."""
    if isinstance(items, (str, bytes)):
        raise InvalidInputError(f"{name} must be a collection, got a string {items!r}")
    if len(items) == 0:
        raise InvalidInputError(f"{name} is empty: give at least one item")
    return items


_KINDS: dict[str, str] = {"float": "floating-point", "int": "integer", "real": "real (integer or floating-point)"}


def check_tensor(
    name: str,
    value: Any,
    *,
    kind: TensorKind = "float",
    ndim: int | Sequence[int] | None = None,
    nonempty: bool = True,
    finite: bool = True,
) -> Tensor:
    """``value`` if it is a tensor of the right dtype ``kind`` (``"float"``, ``"int"`` or ``"real"``: either; bool and
    complex tensors never qualify), one of the ranks ``ndim``, with elements (``nonempty``) that are all finite
    (``finite``, float tensors only).

    Examples:
        >>> check_tensor("scores", torch.zeros(2, 3), ndim=2).shape
        torch.Size([2, 3])
        >>> check_tensor("tokens", torch.zeros(3), kind="int")
        Traceback (most recent call last):
        ...
        qloc_tl.core.errors.InvalidInputError: tokens must be an integer tensor, got dtype torch.float32
    """
    if not isinstance(value, Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    dt = value.dtype
    is_float, is_int = dt.is_floating_point, not dt.is_floating_point and not dt.is_complex and dt != torch.bool
    if (kind == "float" and not is_float) or (kind == "int" and not is_int) or (kind == "real" and not (is_float or is_int)):
        raise InvalidInputError(f"{name} must be a{'n' if kind == 'int' else ''} {_KINDS[kind]} tensor, got dtype {dt}")
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim) if ndim is not None else None
    if ranks is not None and value.ndim not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise InvalidInputError(f"{name} must be a {want} tensor, got shape {tuple(value.shape)}")
    if nonempty and value.numel() == 0:
        raise InvalidInputError(f"{name} is empty (shape {tuple(value.shape)}): give at least one element")
    if finite and is_float and value.numel() and not bool(torch.isfinite(value).all()):
        raise InvalidInputError(f"{name} contains inf/NaN")
    return value


def check_finite_values(name: str, values: Any, lo: float = -math.inf, hi: float = math.inf) -> list[float]:
    """``values`` (a sequence of real numbers) as floats, each finite and in ``[lo, hi]``; a non-empty
    sequence."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidInputError(f"{name} must be a sequence of numbers, got {values!r}")
    out = [check_float(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(values)]
    if not out:
        raise InvalidInputError(f"{name} is empty: give at least one number")
    return out


MODEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_model_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` if models can run in it: float32, float64, float16 or bfloat16 (integer, bool, complex and
    float8 parameters cannot carry activations and their gradients)."""
    if dtype not in MODEL_DTYPES:
        raise InvalidInputError(
            f"dtype must be one of torch.float32, torch.float64, torch.float16, torch.bfloat16, got {dtype!r}"
        )
    return dtype


def _neuron(n: Any, what: str) -> Neuron:
    if isinstance(n, Neuron):
        return n
    if isinstance(n, (tuple, list)) and len(n) == 2:
        return Neuron(*n)
    raise InvalidInputError(f"{what} must contain Neuron(layer, index) objects or (layer, index) pairs, got {n!r}")


def as_neurons(neurons: Iterable[Neuron] | Neuron, what: str = "neurons") -> list[Neuron]:
    """A non-empty list of :class:`Neuron` from a neuron, neurons or ``(layer, index)`` pairs."""
    if isinstance(neurons, Neuron):
        return [neurons]
    if isinstance(neurons, (str, bytes)):
        raise InvalidInputError(f"{what} must be Neuron objects, got a string {neurons!r}")
    out = [_neuron(n, what) for n in neurons]
    if not out:
        raise InvalidInputError(f"empty neuron list: give at least one Neuron(layer, index) in {what}")
    return out


def as_neuron_set(neurons: Iterable[Neuron], what: str = "neurons") -> frozenset[Neuron]:
    """A (possibly empty) frozenset of :class:`Neuron`: a KN set may legitimately be empty."""
    if isinstance(neurons, (str, bytes)):
        raise InvalidInputError(f"{what} must be an iterable of Neuron, got a string {neurons!r}")
    return frozenset(_neuron(n, what) for n in neurons)


def as_neuron_sets(kn_sets: Sequence[Iterable[Neuron]], what: str = "kn_sets") -> list[frozenset[Neuron]]:
    """One frozenset per query from a sequence of neuron iterables."""
    if isinstance(kn_sets, (str, bytes)) or not isinstance(kn_sets, Sequence):
        raise InvalidInputError(f"{what} must be a sequence with one neuron set per query, got {type(kn_sets).__name__}")
    return [as_neuron_set(s, f"{what}[{i}]") for i, s in enumerate(kn_sets)]


def validate_neurons(model: TLModel, neurons: Sequence[Neuron], site: str) -> None:
    """Every neuron's layer and index exist in ``model`` and the model has the hook of ``site``."""
    width = d_mlp(model)
    for n in neurons:
        check_layer(model, n.layer, what=f"layer of {n!r}")
        if n.index >= width:
            raise InvalidInputError(f"neuron index of {n!r} is out of range: d_mlp={width}")
        name = f"blocks.{n.layer}.{SITES[site]}"
        if name not in model.hook_dict:
            raise InvalidInputError(f"model has no hook {name!r} for site {site!r}")


def require_finite(what: str, values: Tensor, *, layer_dim: int | None = None, layers: Sequence[int] | None = None) -> None:
    """Raise :class:`~qloc_tl.core.errors.NumericalError` when ``values`` (computed, not given) hold inf/NaN.

    With ``layer_dim`` the message names the layers (entries of ``layers``, default ``0..n-1``, along that
    dimension) that hold them: a non-finite number is a model or precision problem, and its layer says where.
    """
    if values.numel() == 0 or bool(torch.isfinite(values).all()):
        return
    where = ""
    if layer_dim is not None:
        bad = (~torch.isfinite(values)).movedim(layer_dim, 0).reshape(values.shape[layer_dim], -1).any(1)
        labels = list(layers) if layers is not None else list(range(values.shape[layer_dim]))
        where = f" at layer(s) {[labels[i] for i in bad.nonzero().flatten().tolist()]}"
    raise NumericalError(f"{what} became inf/NaN{where} (dtype {values.dtype}); {_advice(values.dtype)}")


def _advice(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half-precision activations overflow easily: run the model in float32 (model.to(torch.float32))"
    return "check the model's weights (inf/NaN parameters) and the scale of any intervention"


def nonfinite_site(model: TLModel, tokens: Tensor) -> str | None:
    """The first hook, in forward order (embeddings, then each block's attention output, MLP neurons and
    residual stream), whose activations on ``tokens`` hold inf/NaN; ``None`` when all are finite.

    One extra forward pass, run only to explain a non-finite result.
    """
    names = ["hook_embed", "hook_pos_embed"]
    for layer in range(n_layers(model)):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.{SITES['post']}", f"blocks.{layer}.hook_resid_post"]
    names = [n for n in names if n in model.hook_dict]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    for n in names:
        if n in cache and not bool(torch.isfinite(cache[n]).all()):
            return n
    return None


def require_finite_logits(model: TLModel, logits: Tensor, tokens: Tensor, what: str = "logits") -> None:
    """Raise :class:`~qloc_tl.core.errors.NumericalError` when the model's ``logits`` on ``tokens`` hold inf/NaN,
    naming the first layer whose activations went non-finite (:func:`nonfinite_site`)."""
    if bool(torch.isfinite(logits).all()):
        return
    site = nonfinite_site(model, tokens)
    where = f"; the first non-finite activations are at {site!r}" if site else " in the unembedding (every layer is finite)"
    dtype = next((p.dtype for p in model.parameters()), logits.dtype)
    raise NumericalError(f"the model's {what} contain inf/NaN (model dtype {dtype}){where}; {_advice(dtype)}")
