"""Stage plans: a device builds each stage's fused submodel itself from the full pack it holds.

With stage packs every stage ships its own weights, so DevFT's four stages download the embeddings
four times and more block weights than the full model has (SmolLM2 int4: 27 + 36 + 52 + 85 MB of
packs against FedIT's one 85 MB pack). With ``full_pack`` delivery a device downloads the signed
full pack once; each stage then needs only a small signed *stage plan*: the groups, each member's
fusion coefficient, and what the device cannot derive itself: a heal adapter (low-rank factors and
norm deltas, ``heal.safetensors``) or, for a heal baked into the weights, the healed blocks
themselves (``blocks.safetensors``). A plan is a signed archive with the pack format
(:func:`devft_edge.pack.write_archive`, verified by :func:`read_plan`), bound to its full pack by
that pack's sha256; its manifest is a :class:`StagePlanManifest`, which checks, when it is read,
that there is one coefficient per group member and that the member ``heal`` names is the one shipped.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

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
from devft_edge.pack import Verified, VerifiedPack, member_listing, read_archive, write_archive
from devft_edge.pack_manifest import (
    BLOCKS,
    HEAL,
    LORA,
    MANIFEST,
    WEIGHTS,
    ArchiveManifest,
    Fields,
    read_quant_spec,
)
from devft_edge.quantization import QuantSpec
from devft_edge.signing import Ed25519PrivateKey, Ed25519PublicKey
from devft_edge.stage import Stage
from devft_edge.submodel import submodel_config
from devft_edge.training import TrainSettings

__all__ = [
    "KIND",
    "StagePlanManifest",
    "VerifiedPlan",
    "derive_stage_pack",
    "plan_matches",
    "read_plan",
    "write_plan",
    "write_stage_plan",
]

KIND = "stage_plan"
Heal = Literal["none", "adapter", "blocks"]
"""What a plan ships for the healing of its fused blocks: nothing, an adapter, or the blocks."""
_HEAL_MEMBERS: dict[str, str | None] = {"none": None, "adapter": HEAL, "blocks": BLOCKS}


@dataclass(frozen=True, kw_only=True)
class StagePlanManifest(ArchiveManifest):
    """A stage plan's manifest: how a device fuses the stage from the full pack ``base_pack``."""

    kind: ClassVar[str] = KIND
    coefficients: tuple[tuple[float, ...], ...]
    """``coefficients[g][k]`` weighs member ``groups[g][k]`` in block ``g``."""
    base_pack: str
    """sha256 of the full pack the plan applies to."""
    heal: Heal
    """``adapter``: member ``heal.safetensors``; ``blocks``: member ``blocks.safetensors``."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StagePlanManifest:
        f = Fields(data)
        f.text("kind", (KIND,))
        common = cls._common(f)
        quant = f.object("quant")
        spec = read_quant_spec(quant, f)
        quant.done()
        coefficients, base_pack = f.rows("coefficients"), f.text("base_pack")
        heal = cast(Heal, f.text("heal", tuple(_HEAL_MEMBERS)))  # one of the choices, or a placeholder one
        if f.fine("groups", "coefficients") and [len(g) for g in common["groups"]] != [len(c) for c in coefficients]:
            f.bad("coefficients", "one number per member of each group")
        shipped = {HEAL, BLOCKS} & set(common["members"])
        if f.fine("heal", "members") and shipped != {_HEAL_MEMBERS[heal]} - {None}:
            f.bad("heal", f"what the members ship ({', '.join(sorted(shipped)) or 'no heal member'})")
        f.done()
        f.check()
        return cls(**common, quant=spec, coefficients=coefficients, base_pack=base_pack, heal=heal)

    def to_json(self) -> dict[str, Any]:
        return {
            **self._common_json(),
            "kind": self.kind,
            "coefficients": [list(row) for row in self.coefficients],
            "base_pack": self.base_pack,
            "heal": self.heal,
            "quant": asdict(self.quant),
        }


VerifiedPlan = Verified[StagePlanManifest]
"""A verified stage plan."""


def read_plan(path: str | Path, dest: str | Path, public_key: Ed25519PublicKey | None) -> VerifiedPlan:
    """Verify the stage plan ``path`` and unpack it into the new directory ``dest``
    (:func:`devft_edge.pack.read_archive`); a pack is refused (its manifest is no plan's)."""
    return read_archive(path, dest, public_key, StagePlanManifest)


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
) -> StagePlanManifest:
    """Write the signed plan of one stage; returns its manifest.

    Args:
        base_pack: sha256 of the full pack the plan applies to.
        coefficients: ``coefficients[g][k]`` weighs member ``groups[g][k]`` in block ``g``.
        heal: a heal adapter (``layers.{g}.{module}.heal_A/heal_B``, ``layers.{g}.{norm}.weight_delta``).
        blocks: the stage's finished blocks (state-dict keys of the stage submodel, at ``quant``).
    """
    if heal and blocks:
        raise DevFTError("a plan carries a heal adapter or finished blocks, not both")
    payload: dict[str, bytes] = {}
    if heal:
        payload[HEAL] = save({k: v.detach().float().contiguous() for k, v in heal.items()})
    if blocks:
        payload[BLOCKS] = save({k: v.detach().contiguous() for k, v in blocks.items()})
    manifest = StagePlanManifest(
        created=created,
        model_name=model_name,
        model_type=model_type,
        stage=stage,
        stages=stages,
        groups=tuple(tuple(g) for g in groups),
        coefficients=tuple(tuple(float(c) for c in row) for row in coefficients),
        base_pack=base_pack,
        heal="adapter" if heal else "blocks" if blocks else "none",
        quant=quant,
        lora=LoraSettings(lora.rank, lora.alpha, lora.dropout, tuple(targets)),
        training=training,
        members=member_listing(payload),
    )
    write_archive(Path(path), manifest, payload, sign_key)
    return manifest


def write_stage_plan(
    path: str | Path,
    stage: Stage,
    fusion: Fusion,
    *,
    base_pack: str,
    quant: QuantSpec,
    lora: LoraSettings,
    **fields: Any,
) -> StagePlanManifest:
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


def plan_matches(plan: VerifiedPlan, base_pack: str) -> list[str]:
    """Every reason ``plan`` cannot be applied to the full pack with sha256 ``base_pack`` (its own
    fields were checked when it was read)."""
    made_for = plan.manifest.base_pack
    return [] if made_for == base_pack else [f"made for pack {made_for[:12]}..., not {base_pack[:12]}..."]


def derive_stage_pack(full: VerifiedPack, plan: VerifiedPlan, start: LoraState, dest: Path) -> VerifiedPack:
    """Build the stage pack that ``plan`` describes from the verified ``full`` pack, into ``dest``.

    Both inputs must be verified (signed) already; ``start`` is the stage's starting LoRA. The
    stage's manifest is the full pack's with the plan's stage and groups, and lists no members (the
    directory is built here, not unpacked from an archive).
    """
    from transformers import AutoConfig

    groups = [list(g) for g in plan.manifest.groups]
    coefficients = [list(row) for row in plan.manifest.coefficients]
    config = AutoConfig.from_pretrained(full.directory)
    total = num_layers(config)
    if sorted(j for g in groups for j in g) != list(range(total)):
        raise DevFTError(f"the plan's groups do not partition the pack's {total} layers")
    spec = full.manifest.quant
    prefix = f"{architecture_of(config).layers_path}."
    shape = model_shape(config)
    shapes = {lin.name: (lin.out_features, lin.in_features) for lin in shape.block_linears}
    staging = dest.with_name(dest.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state: dict[str, Tensor] = {}
    with safe_open(str(full.directory / WEIGHTS), framework="pt") as weights:
        keys = list(weights.keys())
        for key in keys:
            if not key.startswith(prefix):
                state[key] = weights.get_tensor(key)
        if plan.manifest.heal == "blocks":
            with safe_open(str(plan.directory / BLOCKS), framework="pt") as blocks:
                state.update({k: blocks.get_tensor(k) for k in blocks.keys()})
        else:
            heal = _read(plan.directory / HEAL) if plan.manifest.heal == "adapter" else {}
            for g, (members, coeffs) in enumerate(zip(groups, coefficients, strict=True)):
                state.update(_fuse_block(weights, keys, prefix, g, members, coeffs, spec, shapes, heal))
    submodel_config(config, groups).save_pretrained(staging)
    save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
    save_file({k: v.detach().float().contiguous() for k, v in start.items()}, str(staging / LORA))
    for name in TOKENIZER_FILES:
        if (full.directory / name).is_file():
            shutil.copyfile(full.directory / name, staging / name)
    manifest = replace(
        full.manifest,
        created=plan.manifest.created,
        stage=plan.manifest.stage,
        stages=plan.manifest.stages,
        groups=plan.manifest.groups,
        fp32_bytes=4 * shape.params_total(len(groups)),
        members={},
        derived_from=(full.directory.name, plan.directory.name),
    )
    (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), sort_keys=True))
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
