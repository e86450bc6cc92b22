"""LoRA settings and the canonical LoRA state that moves between server and clients.

A *LoRA state* is a flat ``dict[str, Tensor]`` keyed ``layers.{i}.{module}.lora_A`` /
``.lora_B`` (e.g. ``layers.3.self_attn.q_proj.lora_A``), with A of shape [rank, in_features] and
B of shape [out_features, rank]. The layer index is the position in whatever model the state
belongs to: the full model, or a stage submodel whose layer ``i`` is the fusion of group ``i``.
Keeping one flat, framework-neutral naming (not peft's ``base_model.model...default.weight``)
means the same state can be fused, transferred, aggregated, serialised with safetensors and sent
over the wire without knowing about peft.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from devft_edge.errors import ConfigError, raise_if
from devft_edge.layers import architecture_of, decoder_layers

LoraState = dict[str, Tensor]
ADAPTER = "default"
_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters, shared by every stage so states stay shape-compatible."""

    rank: int = 8
    """LoRA rank r (the paper uses 32 on 7B-13B models; 8 suits a 135M model)."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps simulations exactly reproducible."""
    targets: tuple[str, ...] | None = None
    """Projection names to adapt; None means every linear projection of the block."""

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        raise_if(problems)

    @property
    def scaling(self) -> float:
        """The factor alpha / rank applied to B @ A."""
        return self.alpha / self.rank

    def target_names(self, model: nn.Module) -> tuple[str, ...]:
        """The targets to use on ``model``, validated against its family's projections."""
        arch = architecture_of(model)
        if self.targets is None:
            return arch.lora_targets
        unknown = sorted(set(self.targets) - set(arch.lora_targets))
        if unknown:
            raise ConfigError(
                f"LoRA targets {unknown} are not projections of {arch.model_type}; "
                f"known: {', '.join(arch.lora_targets)}"
            )
        return self.targets

    def peft_config(self, model: nn.Module) -> LoraConfig:
        """The peft ``LoraConfig`` for ``model`` (only decoder blocks, never the LM head)."""
        arch = architecture_of(model)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_names(model)),
            fan_in_fan_out=arch.fan_in_fan_out,
            bias="none",
            task_type="CAUSAL_LM",
        )


def attach_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with trainable LoRA (in place, as peft does); base weights stay frozen."""
    return get_peft_model(model, settings.peft_config(model))


def lora_modules(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped projection, keyed ``layers.{i}.{module}`` in depth order."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    found: dict[str, LoraLayer] = {}
    for i, layer in enumerate(decoder_layers(inner)):
        for name, module in layer.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                found[f"layers.{i}.{name}"] = module
    return found


def get_lora_state(model: nn.Module) -> LoraState:
    """A detached copy of the model's LoRA weights in canonical naming."""
    state: LoraState = {}
    for key, module in lora_modules(model).items():
        state[f"{key}.lora_A"] = module.lora_A[ADAPTER].weight.detach().clone()
        state[f"{key}.lora_B"] = module.lora_B[ADAPTER].weight.detach().clone()
    return state


def set_lora_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load ``state`` into the model's LoRA weights; keys and shapes must match exactly.

    Raises:
        ConfigError: listing every missing, unexpected or mis-shaped entry.
    """
    modules = lora_modules(model)
    targets = {}
    for key, module in modules.items():
        targets[f"{key}.lora_A"] = module.lora_A[ADAPTER].weight
        targets[f"{key}.lora_B"] = module.lora_B[ADAPTER].weight
    problems = [f"missing LoRA entry {k}" for k in targets if k not in state]
    problems += [f"unexpected LoRA entry {k}" for k in state if k not in targets]
    problems += [
        f"{k}: shape {tuple(state[k].shape)} != expected {tuple(p.shape)}"
        for k, p in targets.items()
        if k in state and state[k].shape != p.shape
    ]
    if len(problems) > 12:  # one readable error, not hundreds of lines
        problems = [*problems[:12], f"... and {len(problems) - 12} more"]
    raise_if(problems)
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(state[key])


def lora_shapes(model: nn.Module, settings: LoraSettings) -> dict[str, tuple[int, int]]:
    """``layers.{i}.{module}`` -> (in_features, out_features) for every target projection."""
    names = settings.target_names(model)
    shapes: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] not in names:
                continue
            base = getattr(module, "base_layer", module)
            if isinstance(base, nn.Linear):
                shapes[f"layers.{i}.{name}"] = (base.in_features, base.out_features)
            elif hasattr(base, "nf"):  # GPT-2 Conv1D: weight is [in, out]
                shapes[f"layers.{i}.{name}"] = (base.weight.shape[0], base.nf)
    return shapes


def init_lora_state(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> LoraState:
    """Fresh LoRA as peft initialises it: A ~ U(+-1/sqrt(in)) (kaiming, a=sqrt(5)), B = 0.

    Drawn from a private generator, module by module in sorted name order, so the result depends
    only on ``seed`` and the shapes: not on what else consumed the global RNG, nor on the order of
    ``shapes`` (a state read back from safetensors comes sorted; a model lists its modules in
    layer order). The state is returned in the order of ``shapes``.
    """
    gen = torch.Generator().manual_seed(seed)
    drawn = {}
    for key in sorted(shapes):
        fan_in = shapes[key][0]
        drawn[key] = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) / math.sqrt(fan_in)
    state: LoraState = {}
    for key, (_, fan_out) in shapes.items():
        state[f"{key}.lora_A"] = drawn[key]
        state[f"{key}.lora_B"] = torch.zeros(fan_out, rank)
    return state


def split_layers(state: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Group a state by layer index: ``{i: {"self_attn.q_proj.lora_A": A, ...}}``."""
    layers: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ConfigError(f"not a canonical LoRA key: {key!r}")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    return layers


def join_layers(layers: Mapping[int, Mapping[str, Tensor]]) -> LoraState:
    """Inverse of :func:`split_layers`."""
    return {f"layers.{i}.{name}": t for i, entries in sorted(layers.items()) for name, t in entries.items()}


def select(state: Mapping[str, Tensor], part: str) -> LoraState:
    """The entries of one factor (``"lora_A"`` or ``"lora_B"``)."""
    return {k: v for k, v in state.items() if k.endswith(part)}


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Size in bytes of the state serialised as safetensors: what one transfer of it costs."""
    return len(safetensors_save({k: v.contiguous() for k, v in state.items()}))


@contextmanager
def lora_applied(model: nn.Module, settings: LoraSettings, state: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily wrap ``model`` with LoRA loaded from ``state``; the wrapping is undone on exit."""
    peft_model = attach_lora(model, settings)
    try:
        set_lora_state(peft_model, state)
        yield peft_model
    finally:
        peft_model.unload()
