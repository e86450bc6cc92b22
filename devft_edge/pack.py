"""Submodel packs: what the aggregator ships to a device for one stage, signed and verifiable.

A pack is one uncompressed POSIX tar file (``.devpack``) whose members are, in this order:

- ``manifest.json``: format version, model family and name, stage and group map, quantization
  (scheme, per-module map, error summary), LoRA config, training defaults, creation time, and
  the size and sha256 of every other member (canonical JSON: sorted keys, no spaces);
- ``manifest.sig``: the aggregator's ed25519 signature of the manifest bytes (absent when unsigned);
- ``config.json``: the submodel's HF config; ``model.safetensors``: its frozen base weights at the
  pack's quantization; ``lora.safetensors``: the starting LoRA in canonical naming;
- the tokenizer files.

Trust flows from the signature to the manifest to every member's hash, and :func:`read_pack`
checks in that order, so that a hostile archive can make it write no more than a correctly signed
manifest declares. It streams the archive once:

1. the first member must be ``manifest.json``, at most :data:`MAX_MANIFEST_BYTES`; it is read into
   memory, and ``manifest.sig`` (exactly 64 bytes), when present, must come next;
2. with a public key, the signature is verified over the manifest bytes before they are parsed, and
   a pack that is unsigned or whose signature fails is refused before any further member is read;
3. the manifest is parsed as bounded JSON (the protocol header's limits on integers and floats, at
   most :data:`MAX_MANIFEST_DEPTH` deep), its format version checked, and its member list must map
   known member names to a size (at most :data:`MAX_MEMBER_BYTES`) and a sha256;
4. every further member must be a plain regular file (no link, device, fifo, directory or sparse
   file, whose expansion a tar header does not bound) listed in the manifest, not seen before, with
   a header size equal to the listed size before a byte of it is written; it is written into a
   private staging directory while hashed, and its sha256 compared with the listed one;
5. every listed member must have come.

Only then is the staging directory handed over; on any failure it is deleted and a
:class:`PackError` says why (:class:`Refusal`). Nothing of a refused pack is ever used.

Packing is deterministic: the same inputs (including ``created``) give byte-identical packs (tar
headers carry fixed owner, mode and time; safetensors and JSON are written canonically).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
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

from devft_edge.archive import PLAIN_FILE, member_kind
from devft_edge.errors import DevFTError
from devft_edge.lora import LoraSettings, LoraState
from devft_edge.models import TOKENIZER_FILES
from devft_edge.protocol import _bounded_int, _constant, _depth, _finite_float
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
MAX_MANIFEST_BYTES = 2**20
"""The manifest is read into memory before anything in it is trusted, so it is bounded. Real ones
are a few KB (the tiny test model's 2.2 KB; the quantized-module map adds about 0.3 KB per layer),
so 1 MiB leaves a hundredfold room."""
MAX_MANIFEST_DEPTH = 8
"""Manifests nest 4 deep (``members.<name>.bytes``, ``quant.error.<field>``); deeper is refused."""
SIGNATURE_BYTES = 64
"""An ed25519 signature."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _require_plain_file(info: tarfile.TarInfo) -> None:
    """Refuse anything but a plain file (:func:`devft_edge.archive.member_kind`)."""
    kind = member_kind(info)
    if kind != PLAIN_FILE:
        raise PackError(Refusal.ARCHIVE, f"member {info.name!r} is a {kind}, not a plain file")


def _read_small(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int, reason: Refusal) -> bytes:
    """The content of a member that is read into memory (the manifest, its signature), at most ``limit`` bytes."""
    _require_plain_file(info)
    if info.size > limit:
        raise PackError(reason, f"{info.name} is {info.size} bytes (at most {limit})")
    source = tar.extractfile(info)
    assert source is not None  # a regular file always has a stream
    return source.read()


def _verified_head(
    tar: tarfile.TarFile, public_key: Ed25519PublicKey | None
) -> tuple[bytes, bytes | None, tarfile.TarInfo | None]:
    """The manifest bytes, the signature (checked when ``public_key`` is given) and the header of the
    member after them; no payload member's content has been read."""
    first = tar.next()
    if first is None:
        raise PackError(Refusal.ARCHIVE, "the archive has no members")
    if first.name != MANIFEST:
        raise PackError(Refusal.MISSING, f"the first member is {first.name!r}; a pack starts with {MANIFEST}")
    manifest_bytes = _read_small(tar, first, MAX_MANIFEST_BYTES, Refusal.MANIFEST)
    after = tar.next()
    signature = None
    if after is not None and after.name == SIGNATURE:
        if after.size != SIGNATURE_BYTES:
            raise PackError(Refusal.SIGNATURE, f"{SIGNATURE} is {after.size} bytes, not {SIGNATURE_BYTES}")
        signature = _read_small(tar, after, SIGNATURE_BYTES, Refusal.SIGNATURE)
    if public_key is not None:
        if signature is None:
            raise PackError(Refusal.UNSIGNED, f"the pack is not signed ({SIGNATURE} must follow {MANIFEST})")
        if not verifies(public_key, manifest_bytes, signature):
            raise PackError(Refusal.SIGNATURE, "the manifest signature does not verify with the provisioned key")
    return manifest_bytes, signature, after if signature is None else tar.next()


def _parse_manifest(manifest_bytes: bytes) -> dict[str, Any]:
    """The manifest, parsed with the protocol header's bounds (no huge integers, no infinities) and
    refused when it nests deeper than :data:`MAX_MANIFEST_DEPTH`."""
    try:
        manifest = json.loads(
            manifest_bytes, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_constant
        )
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PackError(Refusal.MANIFEST, f"manifest.json is not bounded JSON: {str(error)[:200]}") from None
    if _depth(manifest) > MAX_MANIFEST_DEPTH:
        raise PackError(Refusal.MANIFEST, f"manifest.json nests deeper than {MAX_MANIFEST_DEPTH}")
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise PackError(Refusal.MANIFEST, "manifest.json is not a pack manifest")
    version = manifest["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:  # true and 1.0 equal 1
        raise PackError(Refusal.VERSION, f"format version {version!r}; this reader supports {FORMAT_VERSION}")
    return manifest


def _listed_members(manifest: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """The manifest's member list as name -> (bytes, sha256); every malformed entry is reported at once."""
    members = manifest.get("members")
    if not isinstance(members, dict):
        raise PackError(Refusal.MANIFEST, "manifest.json: 'members' must map names to {bytes, sha256}")
    listed, problems = {}, []
    for name, entry in sorted(members.items()):
        size, sha = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if name not in PAYLOAD_NAMES:
            problems.append(f"unknown member {name!r}")
        elif type(size) is not int or not 0 <= size <= MAX_MEMBER_BYTES:
            problems.append(f"{name}: bytes must be an integer from 0 to {MAX_MEMBER_BYTES}")
        elif not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            problems.append(f"{name}: sha256 must be 64 lowercase hex digits")
        else:
            listed[name] = (size, sha)
    if problems:
        raise PackError(Refusal.MANIFEST, f"manifest.json lists: {'; '.join(problems[:5])}")
    return listed


def _extract(
    tar: tarfile.TarFile, info: tarfile.TarInfo, listed: Mapping[str, tuple[int, str]], staging: Path, written: set[str]
) -> None:
    """Write the listed member ``info`` into ``staging`` and add it to ``written``, refusing it
    before a byte is written when its header does not match the manifest, and after when its
    content does not."""
    _require_plain_file(info)
    name = info.name
    if name not in listed:
        raise PackError(Refusal.MEMBER, f"member {name!r} is not in the manifest")
    if name in written:
        raise PackError(Refusal.MEMBER, f"duplicate member {name!r}")
    size, sha = listed[name]
    if info.size != size:
        raise PackError(Refusal.HASH, f"member {name!r} is {info.size} bytes, the manifest says {size}")
    source = tar.extractfile(info)
    assert source is not None  # a regular file always has a stream
    digest = hashlib.sha256()
    with (staging / name).open("wb") as out:
        while chunk := source.read(1 << 20):  # tarfile stops at info.size and raises if the data ends early
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha:
        raise PackError(
            Refusal.HASH, f"member {name!r}: sha256 {digest.hexdigest()[:16]}..., manifest says {sha[:16]}..."
        )
    written.add(name)


def _unpack(path: Path, staging: Path, public_key: Ed25519PublicKey | None) -> tuple[dict[str, Any], bool]:
    """Verify ``path`` member by member (module docstring) into ``staging``; the manifest and whether it is signed."""
    try:
        with tarfile.open(path, mode="r|") as tar:
            manifest_bytes, signature, info = _verified_head(tar, public_key)
            manifest = _parse_manifest(manifest_bytes)
            listed = _listed_members(manifest)
            (staging / MANIFEST).write_bytes(manifest_bytes)
            if signature is not None:
                (staging / SIGNATURE).write_bytes(signature)
            written: set[str] = set()
            while info is not None:
                _extract(tar, info, listed, staging, written)
                info = tar.next()
    except PackError:
        raise
    except (tarfile.TarError, EOFError, ValueError) as error:  # tarfile lets a bad pax or sparse map's ValueError out
        raise PackError(Refusal.ARCHIVE, f"{path}: not a readable pack archive: {str(error)[:200]}") from None
    except OSError as error:
        raise PackError(Refusal.ARCHIVE, f"{path}: cannot read: {error.strerror or error}") from None
    missing = sorted(set(listed) - written)
    if missing:
        raise PackError(Refusal.MISSING, f"members listed in the manifest are absent: {', '.join(missing)}")
    return manifest, signature is not None


def read_pack(path: str | Path, dest: str | Path, public_key: Ed25519PublicKey | None) -> VerifiedPack:
    """Verify ``path`` and unpack it into the new directory ``dest``.

    With ``public_key`` the manifest must carry a valid signature by it, checked before anything
    else is read; ``None`` checks hashes and format only (for inspection, never for training on a
    device). The order of the checks is in the module docstring.

    Raises:
        PackError: with the :class:`Refusal` reason; ``dest`` is not created.
    """
    path, dest = Path(path), Path(dest)
    if dest.exists():
        raise DevFTError(f"{dest} already exists; a pack unpacks into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pack-", dir=dest.parent))
    try:
        manifest, signed = _unpack(path, staging, public_key)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return VerifiedPack(directory=dest, manifest=manifest, signed=signed)


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
