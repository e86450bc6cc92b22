"""Frozen base weights on disk: write a (quantized) model, read it back into a trainable skeleton.

A device's memory budget is tight, so reading must not hold two copies: the file is read with
plain ``readinto`` into one buffer (page cache, not process memory, holds the file's pages) and
every tensor is a view into that buffer, so loading costs the weights' bytes once. ``safetensors``
orders tensors by decreasing dtype size, which keeps every view aligned.

The directory holds ``config.json`` (the HF config), ``quant.json`` (:class:`QuantSpec`) and
``model.safetensors``; packs (issue 5) add a manifest, signature, tokenizer and LoRA around it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from devft_edge.errors import DataError
from devft_edge.quantization import QuantSpec, quantize_model

WEIGHTS_FILE = "model.safetensors"
QUANT_FILE = "quant.json"

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict with each shared tensor once (a tied head is re-tied on load)."""
    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().contiguous()
    return state


def save_base(model: PreTrainedModel, spec: QuantSpec, directory: str | Path) -> Path:
    """Quantize ``model`` (in place) per ``spec`` and write it to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quantize_model(model, spec)
    model.config.save_pretrained(directory)
    (directory / QUANT_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    save_file(unique_state(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


MAX_HEADER_BYTES = 16 * 2**20
"""Largest safetensors header read (a LoRA's or a pack's is a few KB to a few hundred KB)."""


def _span(info: object) -> tuple[int, int]:
    """A tensor entry's ``(start, end)`` byte offsets, checked: plain ints, ``0 <= start <= end``, and a
    shape of non-negative ints (JSON's own parser bounds integer length: 4,300 digits)."""
    if not isinstance(info, dict):
        raise TypeError("a tensor entry is not an object")
    offsets, shape = info["data_offsets"], info["shape"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
        raise ValueError(f"data_offsets {str(offsets)[:40]} are not two integers")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"shape {str(shape)[:40]} is not a list of non-negative integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise ValueError(f"data_offsets {offsets} out of order")
    return start, end


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file as views into one buffer (one copy of the data in memory).

    The file may come from an untrusted device: every size is checked against the file before
    anything is allocated, and any inconsistency is a :class:`DataError`, never another exception.

    Raises:
        DataError: for a truncated file, a bad header or an unknown dtype, naming the file.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise DataError(f"{path}: truncated safetensors file (no header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(file_size - 8, MAX_HEADER_BYTES):
            raise DataError(f"{path}: header length {header_len} exceeds the file or {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise TypeError("header is not an object")
            header.pop("__metadata__", None)
            spans = {name: _span(info) for name, info in header.items()}
            size = max((end for _, end in spans.values()), default=0)
        except (UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError, RecursionError) as error:
            raise DataError(f"{path}: bad safetensors header: {str(error)[:200]}") from None
        if size > file_size - 8 - header_len:
            raise DataError(f"{path}: truncated safetensors file (expected {size} data bytes)")
        buffer = bytearray(size)
        f.readinto(memoryview(buffer))
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise DataError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        try:
            start, end = spans[name]
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            flat = (
                torch.frombuffer(buffer, dtype=dtype, count=count, offset=start)
                if count
                else torch.empty(0, dtype=dtype)
            )
            tensors[name] = flat.view([int(d) for d in info["shape"]])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise DataError(f"{path}: tensor {name!r}: bad offsets or shape: {error}") from None
    return tensors


def load_base(directory: str | Path, spec: QuantSpec | None = None) -> PreTrainedModel:
    """Build the model in ``directory`` with its quantized layers, frozen, in eval mode.

    ``spec`` is the weights' quantization (default: the directory's ``quant.json``). The skeleton
    is built on the meta device and takes the file's tensors by assignment, so the weights are in
    memory once.
    """
    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    if spec is None:
        spec = QuantSpec(**json.loads((directory / QUANT_FILE).read_text()))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantize_model(model, spec)
    state = read_safetensors(directory / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if _is_tied_copy(model, k)}
    if set(missing) - tied or unexpected:
        raise DataError(
            f"{directory}: weights do not match the config: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    if getattr(config, "tie_word_embeddings", False):
        _retie(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _is_tied_copy(model: PreTrainedModel, key: str) -> bool:
    head = model.get_output_embeddings()
    head_prefix = next((n for n, m in model.named_modules() if m is head), None)
    return bool(
        getattr(model.config, "tie_word_embeddings", False) and head_prefix and key.startswith(head_prefix + ".")
    )


def _retie(model: PreTrainedModel) -> None:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if hasattr(embed, "weight") and isinstance(embed.weight, Tensor):
        head.weight = embed.weight
    else:
        for name, buf in embed.named_buffers(recurse=False):
            setattr(head, name, buf)
