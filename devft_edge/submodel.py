"""Stage submodels: group the full model's layers and fuse each group into one layer.

Stage s of DevFT trains a real, smaller HF model with L_s blocks. Block g of the submodel is the
DBLF fusion of the full model's blocks in group g (every tensor of the block: attention, MLP,
norms). Embeddings, final norm and LM head are *shared* with the base model (the same tensors, not
copies): they are frozen and not fused. LoRA is attached afterwards with peft; its initial state is
the fusion of the members' LoRA A and B (separately), so the submodel starts from what the
previous stage transferred.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from devft_edge.errors import ConfigError
from devft_edge.fusion import Fusion, fuse_layers
from devft_edge.grouping import Grouping
from devft_edge.layers import architecture_of, decoder_layers, layer_prefix, num_layers
from devft_edge.lora import LoraSettings, LoraState, lora_applied
from devft_edge.similarity import LayerEvidence, Similarity, collect_layer_outputs
from devft_edge.transfer import TRANSFERS


@dataclass
class Submodel:
    """A stage's fused model and which original layers each of its blocks came from."""

    model: PreTrainedModel
    """Plain HF causal LM with ``len(groups)`` blocks (no LoRA attached)."""
    groups: list[list[int]]
    """``groups[g]`` = original layer indices fused into block g, ascending (anchor first)."""


def _check_groups(groups: Sequence[Sequence[int]], total: int) -> None:
    flat = sorted(j for g in groups for j in g)
    problems = []
    if flat != list(range(total)):
        problems.append(f"groups must partition layers 0..{total - 1} exactly once, got {list(map(list, groups))}")
    if any(len(g) == 0 for g in groups):
        problems.append("every group needs at least one layer")
    if any(list(g) != sorted(g) for g in groups):
        problems.append("members of a group must be ascending (the anchor is the shallowest)")
    if problems:
        raise ConfigError(problems)


def submodel_config(config: PretrainedConfig, groups: Sequence[Sequence[int]]) -> PretrainedConfig:
    """The base config with ``len(groups)`` layers.

    Per-layer list fields (e.g. Qwen2's ``layer_types``) take the value of each group's anchor, so a
    fused block keeps the attention kind of its shallowest member.
    """
    total = num_layers(config)
    new = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == total and hasattr(new, key):
            setattr(new, key, [value[g[0]] for g in groups])
    setattr(new, architecture_of(config).num_layers_attr, len(groups))
    return new


def build_submodel(base: PreTrainedModel, groups: Sequence[Sequence[int]], fusion: Fusion) -> Submodel:
    """Build the fused submodel for ``groups``.

    Memory: the fused blocks are new tensors (about ``len(groups)/L`` of the block weights); the
    embeddings, final norm and head are the base model's own tensors.
    """
    group_lists = [list(g) for g in groups]
    _check_groups(group_lists, num_layers(base.config))
    prefix = layer_prefix(base, 0)[: -len("0.")]
    base_state = base.state_dict(keep_vars=True)
    per_layer: list[dict[str, Tensor]] = [{} for _ in range(num_layers(base.config))]
    state: dict[str, Tensor] = {}
    for key, tensor in base_state.items():
        if key.startswith(prefix):
            index, _, name = key[len(prefix) :].partition(".")
            per_layer[int(index)][name] = tensor.detach()
        else:
            state[key] = tensor.detach()
    for g, fused in enumerate(fuse_layers(per_layer, group_lists, fusion)):
        for name, tensor in fused.items():
            state[f"{prefix}{g}.{name}"] = tensor
    config = submodel_config(base.config, group_lists)
    # Parameters on the meta device (no random init of weights we overwrite at once); buffers such
    # as rotary frequencies are built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return Submodel(model=model, groups=group_lists)


def stage_lora(
    full_state: Mapping[str, Tensor], groups: Sequence[Sequence[int]], fusion: Fusion, transfer: str = "copy"
) -> LoraState:
    """The representatives' initial LoRA: the transfer rule's contraction (the paper's ``copy``:
    DBLF on the members' A and B, separately; see :mod:`devft_edge.transfer`)."""
    return TRANSFERS.get(transfer).contract(full_state, groups, fusion)


def layer_evidence(
    base: PreTrainedModel,
    similarity: Similarity,
    settings: LoraSettings,
    lora_state: Mapping[str, Tensor],
    calibration_ids: Tensor,
) -> LayerEvidence:
    """What ``similarity`` needs about the full model with its current LoRA applied.

    The paper's weight cosine includes LoRA parameters; CKA uses the block outputs of the
    LoRA-adapted model on the calibration tokens. Only the evidence the variant needs is computed.
    """
    with lora_applied(base, settings, lora_state) as adapted:
        if similarity.needs == "outputs":
            # Skip the first token: on SmolLM2 it carries a ~22,500 "attention sink" activation in
            # layers 11-28 (others stay < 140) that makes those layers look identical under CKA.
            outputs = collect_layer_outputs(adapted, calibration_ids, skip_tokens=1)
            return LayerEvidence(params=None, outputs=outputs)
        params = [
            {name: p.detach() for name, p in layer.named_parameters()}
            for layer in decoder_layers(adapted.get_base_model())
        ]
        # Copies: unloading LoRA afterwards must not invalidate what we return.
        return LayerEvidence(params=[{k: v.clone() for k, v in p.items()} for p in params], outputs=None)


def stage_groups(
    base: PreTrainedModel,
    capacity: int,
    similarity: Similarity,
    grouping: Grouping,
    settings: LoraSettings,
    lora_state: Mapping[str, Tensor],
    calibration_ids: Tensor,
    seed: int,
    keep_ends: int = 0,
) -> list[list[int]]:
    """The groups of a stage with ``capacity`` blocks, from the full model with its current LoRA.

    The full-depth stage is all singletons (no similarity needed); shallower stages group by the
    similarity of the LoRA-adapted layers, as the simulator and the aggregator both do.

    ``keep_ends = k`` keeps the first and last ``k`` layers as singleton groups (unfused) and
    groups only the middle ``L - 2k`` layers into ``capacity - 2k`` groups, as offsite-tuning's
    emulator keeps the bottom and top layers exact and compresses the middle: the embedding-side
    and head-side layers, whose LoRA then transfers exactly, are the least alike of all layers
    (CKA on SmolLM2), so fusing them costs the most.
    """
    total = num_layers(base.config)
    if capacity == total:
        return [[j] for j in range(total)]
    problems = [f"keep_ends must be >= 0, got {keep_ends}"] if keep_ends < 0 else []
    if keep_ends > 0 and capacity < 2 * keep_ends + 1:
        problems.append(f"a {capacity}-layer stage cannot keep {keep_ends} layers at each end and fuse the middle")
    if problems:
        raise ConfigError(problems)
    evidence = layer_evidence(base, similarity, settings, lora_state, calibration_ids)
    matrix = similarity.compute(evidence)
    if keep_ends == 0:
        return grouping.group(matrix, capacity, seed)
    middle = grouping.group(matrix[keep_ends:-keep_ends, keep_ends:-keep_ends], capacity - 2 * keep_ends, seed)
    head = [[j] for j in range(keep_ends)]
    tail = [[j] for j in range(total - keep_ends, total)]
    return head + [[j + keep_ends for j in g] for g in middle] + tail


def add_weight_delta(model: nn.Module, delta: Mapping[str, Tensor], scaling: float) -> None:
    """Merge dense updates ``scaling * delta`` (keys ``layers.{i}.{module}.delta``) into the weights.

    Works on a plain or peft-wrapped model (peft's LoRA layers keep the original as ``base_layer``)
    and on a quantized pack's layers (:class:`devft_edge.quantization.QuantizedLinear` keeps the
    update beside its quantized weight).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(inner)
    fan_in_fan_out = architecture_of(inner).fan_in_fan_out
    with torch.no_grad():
        for key, value in delta.items():
            index, _, rest = key[len("layers.") :].partition(".")
            module = layers[int(index)].get_submodule(rest[: -len(".delta")])
            module = getattr(module, "base_layer", module)
            update = value.T if fan_in_fan_out else value
            shape = (module.out_features, module.in_features) if module.weight is None else module.weight.shape
            if update.shape != shape:
                raise ConfigError(f"{key}: delta shape {tuple(update.shape)} != weight {tuple(shape)}")
            if module.weight is None:  # a quantized pack's layer: the update rides beside its weight
                module.add_delta(update, scaling)
            else:
                module.weight.add_(update.to(module.weight.dtype), alpha=scaling)


@contextmanager
def state_applied(
    base: nn.Module, settings: LoraSettings, lora: Mapping[str, Tensor], delta: Mapping[str, Tensor]
) -> Iterator[nn.Module]:
    """``base`` with FLoRA's merged update ``delta`` and ``lora`` on top, for the block; both are
    taken out on exit (the base is shared: the server evaluates and exports from it)."""
    add_weight_delta(base, delta, settings.scaling)
    try:
        with lora_applied(base, settings, lora) as model:
            yield model
    finally:
        add_weight_delta(base, delta, -settings.scaling)
