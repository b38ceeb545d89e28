"""Load a local Hugging Face checkpoint directory as a TransformerLens model, offline, under either TL major.

* TL 4.x: ``TransformerBridge.boot_transformers(path)`` (optionally ``enable_compatibility_mode()``).
* TL 3.x: ``HookedTransformer.from_pretrained`` refuses local directories, so the config is built by hand
  from the HF config and the weights go through TL's own ``convert_gpt2_weights`` /
  ``convert_llama_weights`` and ``load_and_process_state_dict``.

Weight processing convention (pick one and keep it — see ``docs/tl_api`` §2):
``processing="none"`` (default) gives the raw model (TL 3 HT without folding ≡ raw TL 4 bridge, equal to the
HF model); ``processing="compat"`` gives TL 3 ``from_pretrained`` defaults ≡ TL 4
``enable_compatibility_mode()``. Probabilities and log-probs agree between the two; raw logits do not.

Only GPT-2 and LLaMA architectures are converted on TL 3 (the two the project tests); TL 4 accepts every
architecture its bridge supports.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from qloc_tl.core.errors import InvalidInputError, UnsupportedModelError
from qloc_tl.core.model import tl_major
from qloc_tl.core.validation import check_model_dtype

logger = logging.getLogger(__name__)

__all__ = ["load_hf_directory"]


def load_hf_directory(
    path: str | os.PathLike[str],
    *,
    processing: Literal["none", "compat"] = "none",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Load a local HF causal-LM directory (config.json, weights, tokenizer files) as a TL model in eval mode.

    Returns a ``TransformerBridge`` under TL 4 and a ``HookedTransformer`` under TL 3. No network access is
    attempted (``local_files_only``).

    Examples:
        >>> from qloc_tl.zoo import builtin_model_dir
        >>> model = load_hf_directory(builtin_model_dir())
        >>> model.cfg.n_layers > 0
        True
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    if processing not in ("none", "compat"):
        raise InvalidInputError(f"processing must be 'none' or 'compat', got {processing!r}")
    check_model_dtype(dtype)
    if tl_major() >= 4:
        model = _load_tl4(path, processing, device, dtype)
    else:
        model = _load_tl3(path, processing, device, dtype)
    model.eval()
    return model


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _load_tl4(path: Path, processing: str, device: Any, dtype: torch.dtype) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(str(path), device=str(device), dtype=dtype)
    if processing == "compat":
        model.enable_compatibility_mode(disable_warnings=True)
    return model


def _load_tl3(path: Path, processing: str, device: Any, dtype: torch.dtype) -> Any:
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    hf_cfg = json.loads((path / "config.json").read_text())
    arch = (hf_cfg.get("architectures") or [""])[0]
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    hf_model.eval()
    tokenizer = _tokenizer(path)
    if arch == "GPT2LMHeadModel":
        d_model = hf_cfg["n_embd"]
        n_heads = hf_cfg["n_head"]
        act = hf_cfg.get("activation_function", "gelu_new")
        cfg = HookedTransformerConfig(
            n_layers=hf_cfg["n_layer"],
            d_model=d_model,
            n_heads=n_heads,
            d_head=d_model // n_heads,
            d_mlp=hf_cfg.get("n_inner") or 4 * d_model,
            d_vocab=hf_cfg["vocab_size"],
            n_ctx=hf_cfg["n_positions"],
            act_fn=act,
            eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
            normalization_type="LN",
            positional_embedding_type="standard",
            original_architecture=arch,
            tokenizer_prepends_bos=False,
            default_prepend_bos=True,
            device=str(device),
            dtype=dtype,
        )
        state = convert_gpt2_weights(hf_model, cfg)
    elif arch == "LlamaForCausalLM":
        d_model = hf_cfg["hidden_size"]
        n_heads = hf_cfg["num_attention_heads"]
        n_kv = hf_cfg.get("num_key_value_heads") or n_heads
        rope = hf_cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0))
        d_head = hf_cfg.get("head_dim") or d_model // n_heads
        cfg = HookedTransformerConfig(
            n_layers=hf_cfg["num_hidden_layers"],
            d_model=d_model,
            n_heads=n_heads,
            d_head=d_head,
            d_mlp=hf_cfg["intermediate_size"],
            d_vocab=hf_cfg["vocab_size"],
            n_ctx=hf_cfg["max_position_embeddings"],
            act_fn=hf_cfg.get("hidden_act", "silu"),
            eps=hf_cfg.get("rms_norm_eps", 1e-6),
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=d_head,
            rotary_base=theta,
            rotary_adjacent_pairs=False,
            final_rms=True,
            gated_mlp=True,
            n_key_value_heads=None if n_kv == n_heads else n_kv,
            original_architecture=arch,
            device=str(device),
            dtype=dtype,
        )
        state = convert_llama_weights(hf_model, cfg)
    else:
        raise UnsupportedModelError(
            f"TL 3 loading of local {arch or 'unknown'} checkpoints is not supported (GPT2LMHeadModel and "
            f"LlamaForCausalLM are); under TL 4 any architecture the bridge knows is loaded"
        )
    import contextlib
    import io

    # HookedTransformer prints "Moving model to device" on stdout; a library must not, so it is captured
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        model = HookedTransformer(cfg, tokenizer=tokenizer)
        fold = processing == "compat"
        model.load_and_process_state_dict(
            state,
            fold_ln=fold,
            center_writing_weights=fold,
            center_unembed=fold,
            fold_value_biases=fold,
        )
        model.to(device)
    if captured.getvalue().strip():
        logger.debug("TransformerLens said: %s", captured.getvalue().strip())
    return model
