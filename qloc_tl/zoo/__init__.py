"""Models shipped inside the package.

The **built-in fact model** is a small GPT-2 (Hugging Face ``GPT2LMHeadModel``) trained from scratch, by
:mod:`qloc_tl.zoo.train`, on ParaRel / T-REx facts whose neighbor queries are in
:func:`qloc_tl.datasets.builtin_facts`. It is the default model for examples, tests and experiments on
machines that cannot download GPT-2 or LLaMA. Its files (config, safetensors weights, word-level tokenizer,
the facts, measured metrics and the model card) are in :func:`builtin_model_dir`.

License: trained on T-REx facts (LAMA, CC BY-NC 4.0): the model and its data are for research use only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["builtin_model_dir", "load_builtin_model"]

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
    :func:`qloc_tl.loading.load_hf_directory` (see there for ``processing``). Nothing is downloaded.

    Examples:
        >>> model = load_builtin_model()
        >>> from qloc_tl.datasets import builtin_facts
        >>> fact = builtin_facts(relations="P19")[0]
        >>> probs = model(fact.queries[0].text)[0, -1].softmax(-1)
        >>> model.to_single_token(fact.answer) == int(probs.argmax())
        True
    """
    from ..loading import load_hf_directory

    path = builtin_model_dir()
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise DataError(f"the built-in model directory {str(path)!r} lacks {missing}; reinstall qloc_tl")
    logger.debug("loading the built-in fact model from %s", path)
    return load_hf_directory(path, processing=processing, device=device, dtype=dtype)
