"""Submodel packs: what the aggregator ships to a device for one stage, signed and verifiable.

A pack is one uncompressed POSIX tar file (``.devpack``) whose members are, in this order:

- ``manifest.json``: format version, model family and name, stage and group map, quantization
  (scheme, per-module map, error summary), LoRA config, training defaults, creation time, and
  the size and sha256 of every other member (canonical JSON: sorted keys, no spaces);
- ``manifest.sig``: the aggregator's ed25519 signature of the manifest bytes (absent when unsigned);
- ``config.json``: the submodel's HF config; ``model.safetensors``: its frozen base weights at the
  pack's quantization; ``lora.safetensors``: the starting LoRA in canonical naming;
- the tokenizer files.

Trust flows from the signature to the manifest to every member's hash, so :func:`read_pack`
streams the archive into a private staging directory, hashes each member on the way, and only
after the signature, the format version, the member list and every hash have verified does it
hand the directory over; on any failure the staging directory is deleted and a
:class:`PackError` says why (:class:`Refusal`). Nothing of a refused pack is ever used.

Packing is deterministic: the same inputs (including ``created``) give byte-identical packs (tar
headers carry fixed owner, mode and time; safetensors and JSON are written canonically).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import Tensor, nn
from transformers import PreTrainedModel

from devft_edge.errors import DevFTError
from devft_edge.lora import LoraSettings, LoraState
from devft_edge.models import TOKENIZER_FILES
from devft_edge.quantization import QuantizedEmbedding, QuantizedLinear, QuantSpec, quantize_model
from devft_edge.signing import Ed25519PrivateKey, Ed25519PublicKey, sign, verifies
from devft_edge.training import TrainSettings
from devft_edge.weights import unique_state

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LORA = "lora.safetensors"
HEAL = "heal.safetensors"
"""Stage plans only: a heal adapter a device applies to the blocks it fuses (devft_edge.stage_plan)."""
BLOCKS = "blocks.safetensors"
"""Stage plans only: ready fused (baked, healed) blocks that replace device-side fusion."""
PAYLOAD_NAMES = frozenset({CONFIG, WEIGHTS, LORA, HEAL, BLOCKS, *TOKENIZER_FILES})
"""Every member name a pack may list besides the manifest and its signature."""
MAX_MEMBER_BYTES = 8 * 2**30
"""No member of a pack can legitimately be larger; a bigger one is refused before it fills a disk."""


class Refusal(str, Enum):
    """Why a pack was refused (sent back to the aggregator as the reason code)."""

    ARCHIVE = "archive"  # not a readable tar, truncated, or a member that is not a plain file
    MEMBER = "member"  # unexpected, duplicate or oversize member
    MISSING = "missing"  # a member the manifest lists is absent, or the manifest itself is
    MANIFEST = "manifest"  # the manifest is not valid JSON of the expected shape
    VERSION = "version"  # unsupported format version
    UNSIGNED = "unsigned"  # a signature is required and there is none
    SIGNATURE = "signature"  # the signature does not verify with the provisioned key
    HASH = "hash"  # a member's size or sha256 differs from the manifest


class PackError(DevFTError):
    """A pack failed verification; ``reason`` says which check."""

    def __init__(self, reason: Refusal, message: str) -> None:
        self.reason = reason
        super().__init__(f"pack refused ({reason.value}): {message}")


@dataclass(frozen=True)
class VerifiedPack:
    """A pack whose members all verified, unpacked into ``directory``."""

    directory: Path
    manifest: dict[str, Any]
    signed: bool


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _quant_errors(model: nn.Module, originals: Mapping[str, Tensor]) -> dict[str, float]:
    """Relative RMS error ``||W_q - W|| / ||W||`` of every quantized weight, by module name."""
    errors = {}
    for name, original in originals.items():
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):
            restored = module.dequantized()
        elif isinstance(module, QuantizedEmbedding):
            restored = module.quantizer.dequantize(module.parts(), module.embedding_dim)
        else:
            continue
        errors[name] = float((restored - original).norm() / original.norm().clamp(min=1e-12))
    return errors


def _weights_to_quantize(model: nn.Module) -> dict[str, Tensor]:
    """``[out, in]`` fp32 weights of the modules :func:`quantize_model` may replace, by module name."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(weight, Tensor)
            and weight.dim() == 2
            and type(module).__name__ in ("Linear", "Embedding", "Conv1D")
        ):
            found[name] = weight.detach().T if type(module).__name__ == "Conv1D" else weight.detach()
    return found


def write_pack(
    path: str | Path,
    model: PreTrainedModel,
    lora_state: Mapping[str, Tensor],
    *,
    model_name: str,
    stage: int,
    stages: int,
    groups: list[list[int]],
    lora: LoraSettings,
    quant: QuantSpec,
    training: TrainSettings,
    tokenizer_dir: str | Path,
    created: str,
    sign_key: Ed25519PrivateKey | None = None,
) -> dict[str, Any]:
    """Quantize ``model`` (in place) and write the stage pack to ``path`` atomically; returns the manifest.

    Args:
        model: the stage submodel (fp32, frozen, no LoRA attached).
        lora_state: its starting LoRA, canonical keys.
        created: ISO-8601 creation time; an input (not the clock) so packing is reproducible.
    """
    fp32_bytes = sum(t.numel() * 4 for t in unique_state(model).values() if t.is_floating_point())
    originals = _weights_to_quantize(model)
    quantize_model(model, quant)
    errors = _quant_errors(model, originals) if quant.scheme != "none" else {}
    del originals
    payload: dict[str, bytes] = {
        CONFIG: model.config.to_json_string(use_diff=False).encode(),
        WEIGHTS: save(unique_state(model), metadata={"format": "pt"}),
        LORA: save({k: v.detach().float().contiguous() for k, v in lora_state.items()}, metadata={"format": "pt"}),
    }
    tokenizer_dir = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            payload[name] = (tokenizer_dir / name).read_bytes()
    modules = {
        name: quant.scheme for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": created,
        "model": {"name": model_name, "model_type": model.config.model_type},
        "stage": stage,
        "stages": stages,
        "layers": len(groups),
        "groups": groups,
        "quant": {
            **asdict(quant),
            "modules": modules,
            "error": {
                "mean_relative_rms": sum(errors.values()) / len(errors) if errors else 0.0,
                "max_relative_rms": max(errors.values(), default=0.0),
                "worst_module": max(errors, key=errors.__getitem__) if errors else None,
            },
        },
        "lora": {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "targets": list(lora.target_names(model)),
        },
        "training": asdict(training),
        "fp32_bytes": fp32_bytes,
    }
    return write_archive(Path(path), manifest, payload, sign_key)


def write_archive(
    path: Path, manifest: dict[str, Any], payload: Mapping[str, bytes], sign_key: Ed25519PrivateKey | None
) -> dict[str, Any]:
    """Write a signed archive (a pack or a stage plan): ``manifest`` plus the size and sha256 of
    every payload member, its signature, then the members; returns the manifest as written."""
    manifest = {
        **manifest,
        "members": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(payload.items())
        },
    }
    manifest_bytes = _canonical(manifest)
    members = [(MANIFEST, manifest_bytes)]
    if sign_key is not None:
        members.append((SIGNATURE, sign(sign_key, manifest_bytes)))
    members += sorted(payload.items())
    _write_tar(path, members)
    return manifest


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unpack_members(path: Path, staging: Path) -> dict[str, tuple[int, str]]:
    """Stream the tar's members into ``staging``; returns name -> (bytes, sha256)."""
    seen: dict[str, tuple[int, str]] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                name = info.name
                if not info.isfile():
                    raise PackError(Refusal.ARCHIVE, f"member {name!r} is not a plain file")
                if name not in PAYLOAD_NAMES | {MANIFEST, SIGNATURE}:
                    raise PackError(Refusal.MEMBER, f"unexpected member {name!r}")
                if name in seen:
                    raise PackError(Refusal.MEMBER, f"duplicate member {name!r}")
                if info.size > MAX_MEMBER_BYTES:
                    raise PackError(Refusal.MEMBER, f"member {name!r} is {info.size} bytes (limit {MAX_MEMBER_BYTES})")
                source = tar.extractfile(info)
                assert source is not None  # a regular file always has a stream
                digest, size = hashlib.sha256(), 0
                with (staging / name).open("wb") as out:
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if size != info.size:
                    raise PackError(Refusal.ARCHIVE, f"member {name!r} is truncated ({size} of {info.size} bytes)")
                seen[name] = (size, digest.hexdigest())
    except tarfile.TarError as error:
        raise PackError(Refusal.ARCHIVE, f"{path}: not a readable pack archive: {error}") from None
    except OSError as error:
        raise PackError(Refusal.ARCHIVE, f"{path}: cannot read: {error.strerror or error}") from None
    return seen


def _check(staging: Path, seen: Mapping[str, tuple[int, str]], public_key: Ed25519PublicKey | None) -> dict[str, Any]:
    if MANIFEST not in seen:
        raise PackError(Refusal.MISSING, "no manifest.json")
    manifest_bytes = (staging / MANIFEST).read_bytes()
    try:
        manifest = json.loads(manifest_bytes)
        version, listed = manifest["format_version"], manifest["members"]
    except (ValueError, KeyError, TypeError):
        raise PackError(Refusal.MANIFEST, "manifest.json is not a pack manifest") from None
    if not (isinstance(listed, dict) and all(isinstance(v, dict) for v in listed.values())):
        raise PackError(Refusal.MANIFEST, "manifest.json: 'members' must map names to {bytes, sha256}")
    if version != FORMAT_VERSION:
        raise PackError(Refusal.VERSION, f"format version {version!r}; this reader supports {FORMAT_VERSION}")
    if public_key is not None:
        if SIGNATURE not in seen:
            raise PackError(Refusal.UNSIGNED, "the pack is not signed and a signature is required")
        if not verifies(public_key, manifest_bytes, (staging / SIGNATURE).read_bytes()):
            raise PackError(Refusal.SIGNATURE, "the manifest signature does not verify with the provisioned key")
    unlisted = sorted(set(seen) - set(listed) - {MANIFEST, SIGNATURE})
    if unlisted:
        raise PackError(Refusal.MEMBER, f"members not in the manifest: {', '.join(unlisted)}")
    for name, entry in sorted(listed.items()):
        if name not in PAYLOAD_NAMES:
            raise PackError(Refusal.MANIFEST, f"manifest lists an unknown member {name!r}")
        if name not in seen:
            raise PackError(Refusal.MISSING, f"member {name!r} listed in the manifest is absent")
        size, sha = seen[name]
        if size != entry.get("bytes") or sha != entry.get("sha256"):
            raise PackError(
                Refusal.HASH,
                f"member {name!r}: {size} bytes sha256 {sha[:16]}..., manifest says "
                f"{entry.get('bytes')} bytes sha256 {str(entry.get('sha256'))[:16]}...",
            )
    return manifest


def read_pack(path: str | Path, dest: str | Path, public_key: Ed25519PublicKey | None) -> VerifiedPack:
    """Verify ``path`` and unpack it into the new directory ``dest``.

    With ``public_key`` the manifest must carry a valid signature by it; ``None`` checks hashes
    and format only (for inspection, never for training on a device).

    Raises:
        PackError: with the :class:`Refusal` reason; ``dest`` is not created.
    """
    path, dest = Path(path), Path(dest)
    if dest.exists():
        raise DevFTError(f"{dest} already exists; a pack unpacks into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pack-", dir=dest.parent))
    try:
        seen = _unpack_members(path, staging)
        manifest = _check(staging, seen, public_key)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return VerifiedPack(directory=dest, manifest=manifest, signed=SIGNATURE in seen)


def read_manifest(path: str | Path) -> tuple[dict[str, Any], bool]:
    """The manifest of ``path`` (not verified) and whether the pack carries a signature."""
    with tempfile.TemporaryDirectory(prefix="devft-inspect-") as tmp:
        verified = read_pack(path, Path(tmp) / "pack", public_key=None)
        return verified.manifest, verified.signed


def load_pack(pack: VerifiedPack) -> tuple[PreTrainedModel, LoraState]:
    """The pack's frozen (quantized) submodel and its starting LoRA, ready for ``attach_lora``."""
    from devft_edge.weights import load_base, read_safetensors

    spec = QuantSpec(**{k: pack.manifest["quant"][k] for k in ("scheme", "group_size", "embeddings")})
    model = load_base(pack.directory, spec)
    lora = {k: v.clone() for k, v in read_safetensors(pack.directory / LORA).items()}
    return model, lora


def lora_settings(manifest: Mapping[str, Any]) -> LoraSettings:
    """The LoRA configuration a pack was built for."""
    entry = manifest["lora"]
    return LoraSettings(
        rank=entry["rank"], alpha=entry["alpha"], dropout=entry["dropout"], targets=tuple(entry["targets"])
    )


def train_settings(manifest: Mapping[str, Any]) -> TrainSettings:
    """The training defaults a pack carries."""
    return TrainSettings(**manifest["training"])
