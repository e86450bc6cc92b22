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
   most :data:`~devft_edge.pack_manifest.MAX_MANIFEST_DEPTH` deep), its format version checked, and
   its member list must map known member names to a size (at most
   :data:`~devft_edge.pack_manifest.MAX_MEMBER_BYTES`) and a sha256;
4. every further member must be a plain regular file (no link, device, fifo, directory or sparse
   file, whose expansion a tar header does not bound) listed in the manifest, not seen before, with
   a header size equal to the listed size before a byte of it is written; it is written into a
   private staging directory while hashed, and its sha256 compared with the listed one;
5. every listed member must have come;
6. the manifest is read into its type (:class:`~devft_edge.pack_manifest.PackManifest`, or a stage
   plan's), which checks every other field. It comes last, so a hostile archive is refused for the
   same reason as before the type; a signed manifest of the wrong shape is refused here.

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
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic

from safetensors.torch import save
from torch import Tensor, nn
from transformers import PreTrainedModel

from devft_edge.archive import PLAIN_FILE, member_kind
from devft_edge.errors import DevFTError
from devft_edge.lora import LoraSettings, LoraState
from devft_edge.models import TOKENIZER_FILES
from devft_edge.pack_manifest import (
    CONFIG,
    LORA,
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    ArchiveManifest,
    M,
    Member,
    PackError,
    PackManifest,
    QuantError,
    Refusal,
    listed_members,
    parse_manifest,
)
from devft_edge.quantization import QuantizedEmbedding, QuantizedLinear, QuantSpec, quantize_model
from devft_edge.signing import Ed25519PrivateKey, Ed25519PublicKey, sign, verifies
from devft_edge.training import TrainSettings
from devft_edge.weights import unique_state

MAX_MANIFEST_BYTES = 2**20
"""The manifest is read into memory before anything in it is trusted, so it is bounded. Real ones
are a few KB (the tiny test model's 2.2 KB; the quantized-module map adds about 0.3 KB per layer),
so 1 MiB leaves a hundredfold room."""
SIGNATURE_BYTES = 64
"""An ed25519 signature."""


@dataclass(frozen=True)
class Verified(Generic[M]):
    """An archive whose members all verified, unpacked into ``directory``, with its typed manifest."""

    directory: Path
    manifest: M
    signed: bool


VerifiedPack = Verified[PackManifest]
"""A verified pack: what the trainers load."""


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
    groups: Sequence[Sequence[int]],
    lora: LoraSettings,
    quant: QuantSpec,
    training: TrainSettings,
    tokenizer_dir: str | Path,
    created: str,
    sign_key: Ed25519PrivateKey | None = None,
) -> PackManifest:
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
    manifest = PackManifest(
        created=created,
        model_name=model_name,
        model_type=model.config.model_type,
        stage=stage,
        stages=stages,
        groups=tuple(tuple(g) for g in groups),
        quant=quant,
        quant_modules=modules,
        quant_error=QuantError(
            mean_relative_rms=sum(errors.values()) / len(errors) if errors else 0.0,
            max_relative_rms=max(errors.values(), default=0.0),
            worst_module=max(errors, key=errors.__getitem__) if errors else None,
        ),
        lora=LoraSettings(lora.rank, lora.alpha, lora.dropout, lora.target_names(model)),
        training=training,
        fp32_bytes=fp32_bytes,
        members=member_listing(payload),
    )
    write_archive(Path(path), manifest, payload, sign_key)
    return manifest


def member_listing(payload: Mapping[str, bytes]) -> dict[str, Member]:
    """The size and sha256 of every payload member, by name: what a manifest lists."""
    return {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in sorted(payload.items())}


def write_archive(
    path: Path, manifest: ArchiveManifest, payload: Mapping[str, bytes], sign_key: Ed25519PrivateKey | None
) -> None:
    """Write a signed archive (a pack or a stage plan): ``manifest``, which lists ``payload``
    (:func:`member_listing`), its signature, then the members.

    Raises:
        PackError: ``manifest`` is one a reader would refuse (checked before anything is written).
    """
    manifest.check()
    manifest_bytes = _canonical(manifest.to_json())
    members = [(MANIFEST, manifest_bytes)]
    if sign_key is not None:
        members.append((SIGNATURE, sign(sign_key, manifest_bytes)))
    members += sorted(payload.items())
    _write_tar(path, members)


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


def _listed_members(manifest: Mapping[str, Any]) -> dict[str, Member]:
    """The manifest's member list as name -> (bytes, sha256), needed before any member is read;
    every malformed entry is reported at once."""
    listed, problems = listed_members(manifest.get("members"))
    if problems:
        raise PackError(Refusal.MANIFEST, f"manifest.json lists: {'; '.join(problems[:5])}")
    return listed


def _extract(
    tar: tarfile.TarFile, info: tarfile.TarInfo, listed: Mapping[str, Member], staging: Path, written: set[str]
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


def _unpack(path: Path, staging: Path, public_key: Ed25519PublicKey | None, kind: type[M]) -> tuple[M, bool]:
    """Verify ``path`` member by member (module docstring) into ``staging``; the manifest, read as
    ``kind``, and whether it is signed."""
    try:
        with tarfile.open(path, mode="r|") as tar:
            manifest_bytes, signature, info = _verified_head(tar, public_key)
            data = parse_manifest(manifest_bytes)
            listed = _listed_members(data)
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
    return kind.from_json(data), signature is not None  # last: a hostile archive's refusal is the one above


def read_archive(path: str | Path, dest: str | Path, public_key: Ed25519PublicKey | None, kind: type[M]) -> Verified[M]:
    """Verify the archive ``path`` (a pack, or a stage plan: ``kind`` is its manifest's type) and
    unpack it into the new directory ``dest``.

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
        manifest, signed = _unpack(path, staging, public_key, kind)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Verified(directory=dest, manifest=manifest, signed=signed)


def read_pack(path: str | Path, dest: str | Path, public_key: Ed25519PublicKey | None) -> VerifiedPack:
    """Verify the pack ``path`` and unpack it into the new directory ``dest`` (:func:`read_archive`)."""
    return read_archive(path, dest, public_key, PackManifest)


def read_manifest(path: str | Path) -> tuple[PackManifest, bool]:
    """The manifest of the pack ``path`` (not verified) and whether it carries a signature."""
    with tempfile.TemporaryDirectory(prefix="devft-inspect-") as tmp:
        verified = read_pack(path, Path(tmp) / "pack", public_key=None)
        return verified.manifest, verified.signed


def load_pack(pack: VerifiedPack) -> tuple[PreTrainedModel, LoraState]:
    """The pack's frozen (quantized) submodel and its starting LoRA, ready for ``attach_lora``."""
    from devft_edge.weights import load_base, read_safetensors

    model = load_base(pack.directory, pack.manifest.quant)
    lora = {k: v.clone() for k, v in read_safetensors(pack.directory / LORA).items()}
    return model, lora
