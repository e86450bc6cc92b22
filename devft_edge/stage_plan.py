"""Stage plans: a device builds each stage's fused submodel itself from the full pack it holds.

With stage packs every stage ships its own weights, so DevFT's four stages download the embeddings
four times and more block weights than the full model has (SmolLM2 int4: 27 + 36 + 52 + 85 MB of
packs against FedIT's one 85 MB pack). With ``full_pack`` delivery a device downloads the signed
full pack once; each stage then needs only a small signed *stage plan*: the groups, each member's
fusion coefficient, and what the device cannot derive itself: a heal adapter (low-rank factors and
norm deltas, ``heal.safetensors``) or, for a heal baked into the weights, the healed blocks
themselves (``blocks.safetensors``). A plan is a signed archive with the pack format
(:func:`devft_edge.pack.write_archive`, verified by :func:`devft_edge.pack.read_pack`), bound to
its full pack by that pack's sha256.

:func:`derive_stage_pack` does the fusion on the device, block by block: each member layer's
tensors are read from the pack one at a time (``safetensors.safe_open``, memory-mapped) and
dequantized, summed with their coefficients in fp32, healed, and quantized again with the pack's
scheme, so the device never holds more than one fp32 layer beside the small stage it builds. The
result is written as an ordinary stage-pack directory, so the trainers load it as they load a
shipped stage pack. Fusing dequantized members differs from the server's fusion of fp32 members
by the quantization error (a singleton group copies its quantized tensors unchanged).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import Tensor

from devft_edge.errors import DevFTError
from devft_edge.fusion import Fusion
from devft_edge.layers import architecture_of, num_layers
from devft_edge.lora import LoraSettings, LoraState
from devft_edge.memory import model_shape
from devft_edge.models import TOKENIZER_FILES
from devft_edge.pack import BLOCKS, FORMAT_VERSION, HEAL, LORA, WEIGHTS, VerifiedPack, write_archive
from devft_edge.quantization import QuantSpec
from devft_edge.signing import Ed25519PrivateKey
from devft_edge.stage import Stage
from devft_edge.submodel import submodel_config
from devft_edge.training import TrainSettings

__all__ = ["KIND", "derive_stage_pack", "plan_matches", "write_plan", "write_stage_plan"]

KIND = "stage_plan"


def write_plan(
    path: str | Path,
    *,
    base_pack: str,
    model_name: str,
    model_type: str,
    stage: int,
    stages: int,
    groups: Sequence[Sequence[int]],
    coefficients: Sequence[Sequence[float]],
    quant: QuantSpec,
    lora: LoraSettings,
    targets: Sequence[str],
    training: TrainSettings,
    created: str,
    heal: Mapping[str, Tensor] | None = None,
    blocks: Mapping[str, Tensor] | None = None,
    sign_key: Ed25519PrivateKey | None = None,
) -> dict[str, Any]:
    """Write the signed plan of one stage; returns its manifest.

    Args:
        base_pack: sha256 of the full pack the plan applies to.
        coefficients: ``coefficients[g][k]`` weighs member ``groups[g][k]`` in block ``g``.
        heal: a heal adapter (``layers.{g}.{module}.heal_A/heal_B``, ``layers.{g}.{norm}.weight_delta``).
        blocks: the stage's finished blocks (state-dict keys of the stage submodel, at ``quant``).
    """
    if heal and blocks:
        raise DevFTError("a plan carries a heal adapter or finished blocks, not both")
    if [len(g) for g in groups] != [len(c) for c in coefficients]:
        raise DevFTError("one fusion coefficient per group member is needed")
    payload: dict[str, bytes] = {}
    if heal:
        payload[HEAL] = save({k: v.detach().float().contiguous() for k, v in heal.items()})
    if blocks:
        payload[BLOCKS] = save({k: v.detach().contiguous() for k, v in blocks.items()})
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "created": created,
        "model": {"name": model_name, "model_type": model_type},
        "stage": stage,
        "stages": stages,
        "layers": len(groups),
        "groups": [list(g) for g in groups],
        "coefficients": [[float(c) for c in row] for row in coefficients],
        "base_pack": base_pack,
        "heal": "adapter" if heal else "blocks" if blocks else "none",
        "quant": asdict(quant),
        "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(targets)},
        "training": asdict(training),
    }
    return write_archive(Path(path), manifest, payload, sign_key)


def write_stage_plan(
    path: str | Path,
    stage: Stage,
    fusion: Fusion,
    *,
    base_pack: str,
    quant: QuantSpec,
    lora: LoraSettings,
    **fields: Any,
) -> dict[str, Any]:
    """Write the plan of an opened :class:`~devft_edge.stage.Stage`: its groups, ``fusion``'s
    coefficients, and its heal (the adapter, or for a baked heal the finished blocks at ``quant``).

    ``fields`` are :func:`write_plan`'s remaining keywords (model name, stages, training, ...).
    """
    import copy

    from devft_edge.layers import layer_prefix
    from devft_edge.quantization import quantize_model
    from devft_edge.weights import unique_state

    blocks = None
    if stage.heal is not None and not stage.heal.adapter:  # a baked heal: the device cannot derive it
        prefix = layer_prefix(stage.model, 0)[: -len("0.")]
        quantized = quantize_model(copy.deepcopy(stage.model), quant)
        blocks = {k: v for k, v in unique_state(quantized).items() if k.startswith(prefix)}
    return write_plan(
        path,
        base_pack=base_pack,
        model_type=stage.model.config.model_type,
        stage=stage.number,
        groups=stage.groups,
        coefficients=[fusion.coefficients(len(g)) for g in stage.groups],
        quant=quant,
        lora=lora,
        targets=lora.target_names(stage.model),
        heal=stage.heal.adapter if stage.heal is not None else None,
        blocks=blocks,
        **fields,
    )


def plan_matches(plan: VerifiedPack, base_pack: str) -> list[str]:
    """Every reason ``plan`` cannot be applied to the full pack with sha256 ``base_pack``."""
    m = plan.manifest
    problems = []
    if m.get("kind") != KIND:
        problems.append("not a stage plan")
    if m.get("base_pack") != base_pack:
        problems.append(f"made for pack {str(m.get('base_pack'))[:12]}..., not {base_pack[:12]}...")
    groups, coefficients = m.get("groups"), m.get("coefficients")
    if not (isinstance(groups, list) and isinstance(coefficients, list) and len(groups) == len(coefficients)):
        problems.append("groups and coefficients must be lists of the same length")
    return problems


def derive_stage_pack(full: VerifiedPack, plan: VerifiedPack, start: LoraState, dest: Path) -> VerifiedPack:
    """Build the stage pack that ``plan`` describes from the verified ``full`` pack, into ``dest``.

    Both inputs must be verified (signed) already; ``start`` is the stage's starting LoRA.
    """
    from transformers import AutoConfig

    groups = [list(g) for g in plan.manifest["groups"]]
    coefficients = plan.manifest["coefficients"]
    config = AutoConfig.from_pretrained(full.directory)
    total = num_layers(config)
    if sorted(j for g in groups for j in g) != list(range(total)):
        raise DevFTError(f"the plan's groups do not partition the pack's {total} layers")
    spec = QuantSpec(**{k: full.manifest["quant"][k] for k in ("scheme", "group_size", "embeddings")})
    prefix = f"{architecture_of(config).layers_path}."
    shapes = {lin.name: (lin.out_features, lin.in_features) for lin in model_shape(config).block_linears}
    staging = dest.with_name(dest.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state: dict[str, Tensor] = {}
    with safe_open(str(full.directory / WEIGHTS), framework="pt") as weights:
        keys = list(weights.keys())
        for key in keys:
            if not key.startswith(prefix):
                state[key] = weights.get_tensor(key)
        if plan.manifest["heal"] == "blocks":
            with safe_open(str(plan.directory / BLOCKS), framework="pt") as blocks:
                state.update({k: blocks.get_tensor(k) for k in blocks.keys()})
        else:
            heal = _read(plan.directory / HEAL) if plan.manifest["heal"] == "adapter" else {}
            for g, (members, coeffs) in enumerate(zip(groups, coefficients, strict=True)):
                state.update(_fuse_block(weights, keys, prefix, g, members, coeffs, spec, shapes, heal))
    submodel_config(config, groups).save_pretrained(staging)
    save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
    save_file({k: v.detach().float().contiguous() for k, v in start.items()}, str(staging / LORA))
    for name in TOKENIZER_FILES:
        if (full.directory / name).is_file():
            shutil.copyfile(full.directory / name, staging / name)
    manifest = {
        **{k: full.manifest[k] for k in ("format_version", "model", "quant", "lora", "training")},
        "stage": plan.manifest["stage"],
        "stages": plan.manifest["stages"],
        "layers": len(groups),
        "groups": groups,
        "derived_from": {"pack": full.directory.name, "plan": plan.directory.name},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)
    return VerifiedPack(directory=dest, manifest=manifest, signed=full.signed and plan.signed)


def _read(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _fuse_block(
    weights: Any,
    keys: list[str],
    prefix: str,
    g: int,
    members: list[int],
    coeffs: list[float],
    spec: QuantSpec,
    shapes: Mapping[str, tuple[int, int]],
    heal: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Block ``g`` of the stage: sum of the members' tensors weighted by ``coeffs``, healed, quantized."""
    quantizer = spec.quantizer()
    anchor = f"{prefix}{members[0]}."
    names = [k[len(anchor) :] for k in keys if k.startswith(anchor)]
    modules = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[0].rsplit(".", 1)[-1] in shapes}
    out: dict[str, Tensor] = {}
    exact = len(members) == 1 and coeffs == [1.0] and not any(k.startswith(f"layers.{g}.") for k in heal)
    if exact:  # a singleton: its tensors as they are
        return {f"{prefix}{g}.{n}": weights.get_tensor(anchor + n) for n in names}
    for module in sorted(modules):
        part_names = [n for n in names if n.rsplit(".", 1)[0] == module and n.rsplit(".", 1)[1] != "bias"]
        out_f, in_f = shapes[module.rsplit(".", 1)[-1]]
        fused = torch.zeros(out_f, in_f)
        for j, c in zip(members, coeffs, strict=True):
            parts = {n.rsplit(".", 1)[1]: weights.get_tensor(f"{prefix}{j}.{n}") for n in part_names}
            member = parts["weight"] if "weight" in parts else quantizer.dequantize(parts, in_f)
            fused += c * member.float()
        if f"layers.{g}.{module}.heal_A" in heal:
            fused += heal[f"layers.{g}.{module}.heal_B"] @ heal[f"layers.{g}.{module}.heal_A"]
        if spec.scheme == "none":
            out[f"{prefix}{g}.{module}.weight"] = fused
        else:
            out.update({f"{prefix}{g}.{module}.{k}": v for k, v in quantizer.quantize(fused).items()})
    for name in names:  # norms and biases: plain tensors, fused in fp32
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf != "bias":
            continue
        fused = sum(c * weights.get_tensor(f"{prefix}{j}.{name}").float() for j, c in zip(members, coeffs, strict=True))
        delta = heal.get(f"layers.{g}.{module}.weight_delta") if leaf == "weight" else None
        out[f"{prefix}{g}.{name}"] = fused + delta if delta is not None else fused
    return out
