"""Tiny random TransformerLens models for tests, doctests and demos — built offline from configs.

``tiny_model(arch="gpt2" | "llama", source="native" | "hf")`` returns an eval-mode TL model of the installed
major with a small word-level tokenizer:

* ``source="native"``: TL 4 ``TransformerBridge.boot_native`` / TL 3 ``HookedTransformer(cfg)``;
* ``source="hf"``: a seeded ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` saved to a local directory (cached in
  the temp dir) and loaded with :func:`qloc_tl.zoo.loading.load_hf_directory` — the path real users take.

d_vocab (96) differs from d_model (64) on purpose: TL's ``center_unembed`` mis-centres square unembeddings.
The LLaMA shape has grouped-query attention (4 query heads, 2 key/value heads) and a gated MLP.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from qloc_tl.core.model import tl_major

__all__ = ["tiny_model", "tiny_tokenizer", "tiny_hf_directory", "TINY_WORDS"]

TINY_WORDS = ["the", "a", "an", "of", "in", "is", "was", "born", "city", "capital", "country", "language", "speaks", "works", "plays", "paris", "london", "rome", "berlin", "madrid", "france", "england", "italy", "germany", "spain", "french", "english", "italian", "german", "spanish", "piano", "guitar", "violin", "physics", "chemistry", "biology", "math", "music", "art", "doctor", "lawyer", "teacher", "king", "queen", "river", "sea", "mountain", "red", "blue", "green", "cat", "dog", "bird", "fish", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "alice", "bob", "carol", "dave", "eve", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar", "peggy", "trent", "victor", "walter", "yes", "no", "and", "or", "to", "from", "by"]

SPECIALS = ["<|endoftext|>", "[UNK]", "[PAD]"]
D_VOCAB = 96


def tiny_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :data:`TINY_WORDS` (96 ids, BOS=EOS=0, UNK=1, PAD=2).

    It is saved to (and reloaded from) a directory in the temp dir, because TL re-loads tokenizers by
    ``name_or_path`` to add BOS handling.
    """
    from transformers import AutoTokenizer

    path = Path(tempfile.gettempdir()) / "qloc_tl_tiny" / f"tokenizer-{D_VOCAB}"
    if not (path / "tokenizer.json").is_file():
        tmp = path.with_name(f".{path.name}-{os.getpid()}")
        _build_tokenizer().save_pretrained(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(TINY_WORDS))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    filler = 0
    while len(vocab) < D_VOCAB:
        vocab[f"w{filler}"] = len(vocab)
        filler += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
        pad_token="[PAD]",
    )


def _hf_config(arch: str) -> Any:
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=D_VOCAB, n_positions=32, n_embd=64, n_layer=3, n_head=4, n_inner=128,
            activation_function="gelu_new", bos_token_id=0, eos_token_id=0, pad_token_id=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=D_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=2,
        )  # fmt: skip
    raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")


def tiny_hf_directory(arch: Literal["gpt2", "llama"] = "gpt2", seed: int = 0, root: str | None = None) -> Path:
    """Write (once; cached) a seeded tiny HF checkpoint with its tokenizer and return its directory."""
    from transformers import AutoModelForCausalLM

    cfg = _hf_config(arch)
    key = hashlib.sha1(f"{arch}-{seed}-{cfg.to_json_string()}".encode()).hexdigest()[:12]
    base = Path(root or os.path.join(tempfile.gettempdir(), "qloc_tl_tiny"))
    path = base / f"{arch}-{key}"
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    tmp = base / f".{arch}-{key}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(tmp))
    tiny_tokenizer().save_pretrained(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _native(arch: str, seed: int, dtype: torch.dtype) -> Any:
    gated = arch == "llama"
    common = dict(
        n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=96 if gated else 128, d_vocab=D_VOCAB, n_ctx=32,
        act_fn="silu" if gated else "gelu_new", normalization_type="RMS" if gated else "LN",
        positional_embedding_type="rotary" if gated else "standard", gated_mlp=gated,
    )  # fmt: skip
    if gated:
        common["n_key_value_heads"] = 2
    tok = tiny_tokenizer()
    if tl_major() >= 4:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        if gated:
            common["final_rms"] = True
        cfg = TransformerBridgeConfig(**common, seed=seed)  # type: ignore[arg-type]
        model = TransformerBridge.boot_native(cfg, tokenizer=tok, dtype=dtype)  # type: ignore[attr-defined]
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from transformer_lens import HookedTransformer, HookedTransformerConfig

        if gated:
            common.update(final_rms=True, rotary_dim=16, rotary_adjacent_pairs=False)
        cfg = HookedTransformerConfig(**common, seed=seed, dtype=dtype, device="cpu")
        model = HookedTransformer(cfg, tokenizer=tok)
    return model


def tiny_model(
    arch: Literal["gpt2", "llama"] = "gpt2",
    *,
    source: Literal["native", "hf"] = "native",
    processing: Literal["none", "compat"] = "none",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A tiny random TL model (eval mode, with a tokenizer) of the installed TL major.

    Examples:
        >>> model = tiny_model("llama")
        >>> (model.cfg.n_layers, model.cfg.d_vocab != model.cfg.d_model)
        (3, True)
    """
    if source == "native":
        model = _native(arch, seed, dtype)
        if processing == "compat":
            if tl_major() >= 4:
                model.enable_compatibility_mode(disable_warnings=True)
            else:
                raise ValueError("processing='compat' with source='native' is only meaningful on TL 4")
    elif source == "hf":
        from qloc_tl.zoo.loading import load_hf_directory

        model = load_hf_directory(tiny_hf_directory(arch, seed), processing=processing, dtype=dtype)
    else:
        raise ValueError(f"source must be 'native' or 'hf', got {source!r}")
    model.eval()
    return model
