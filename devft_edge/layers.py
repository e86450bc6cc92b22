"""Layer access for the supported decoder-only architectures.

DevFT needs three things from a causal LM: its list of decoder blocks, the config field that
counts them, and the names of the linear projections inside a block that LoRA targets. Those differ
per family (``model.layers`` vs ``transformer.h``, ``q_proj`` vs ``c_attn``), so they live in one
table here and nowhere else. An architecture missing from the table fails with an error that names
the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from devft_edge.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Architecture:
    """How to reach the decoder blocks of one model family."""

    model_type: str
    """``config.model_type`` of the family."""
    layers_path: str
    """Dotted attribute path from the ``*ForCausalLM`` module to the ``nn.ModuleList`` of blocks."""
    num_layers_attr: str
    """Config field holding the number of blocks."""
    lora_targets: tuple[str, ...]
    """Names (last path component) of every linear projection of a block: the default LoRA targets."""
    fan_in_fan_out: bool = False
    """True when the projections are GPT-2 ``Conv1D`` (weight stored as [in, out])."""


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "model.layers", "num_hidden_layers", _LLAMA_TARGETS),
        Architecture("mistral", "model.layers", "num_hidden_layers", _LLAMA_TARGETS),
        Architecture("qwen2", "model.layers", "num_hidden_layers", _LLAMA_TARGETS),
        Architecture("qwen3", "model.layers", "num_hidden_layers", _LLAMA_TARGETS),
        Architecture(
            "phi3",
            "model.layers",
            "num_hidden_layers",
            ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        ),
        Architecture(
            "gpt_neox",
            "gpt_neox.layers",
            "num_hidden_layers",
            ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        ),
        Architecture("gpt2", "transformer.h", "n_layer", ("c_attn", "c_proj", "c_fc"), fan_in_fan_out=True),
    )
}


def architecture_of(model_or_config: nn.Module | object) -> Architecture:
    """The :class:`Architecture` entry for a model (or its config).

    Raises:
        UnsupportedArchitectureError: naming the model type and the supported ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]  # type: ignore[index]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in depth order."""
    module: nn.Module = model
    for part in architecture_of(model).layers_path.split("."):
        module = getattr(module, part)
    assert isinstance(module, nn.ModuleList), type(module)
    return module


def num_layers(config: object) -> int:
    """Number of decoder blocks the config declares."""
    return int(getattr(config, architecture_of(config).num_layers_attr))


def layer_prefix(model_or_config: nn.Module | object, index: int) -> str:
    """State-dict prefix of block ``index`` (e.g. ``model.layers.3.``)."""
    return f"{architecture_of(model_or_config).layers_path}.{index}."
