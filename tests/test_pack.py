"""Packs: round trip, determinism, signature and tamper checks, loading and training on a pack, CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import resource
import signal
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from devft_edge.backends import get_trainer
from devft_edge.cli import main
from devft_edge.data import encode_batch
from devft_edge.fusion import FUSIONS
from devft_edge.lora import LoraSettings, attach_lora, init_lora_state, lora_shapes, set_lora_state
from devft_edge.models import load_model, model_dir
from devft_edge.pack import (
    MAX_MANIFEST_BYTES,
    PackError,
    Refusal,
    VerifiedPack,
    load_pack,
    member_listing,
    read_manifest,
    read_pack,
    write_archive,
    write_pack,
)
from devft_edge.pack_manifest import FORMAT_VERSION, MAX_MEMBER_BYTES, PackManifest, QuantError
from devft_edge.quantization import QuantSpec
from devft_edge.signing import generate_keypair, load_private_key, load_public_key, sign
from devft_edge.submodel import build_submodel, stage_lora
from devft_edge.tasks import generate_synthetic
from devft_edge.training import TrainSettings

GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7]]
LORA = LoraSettings(rank=4, alpha=8.0)
CREATED = "2026-11-22T00:00:00Z"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(directory)
    other_private, other_public = generate_keypair(directory / "other")
    return load_private_key(private), load_public_key(public), load_public_key(other_public)


def make_pack(path: Path, key=None, scheme: str = "int4", seed: int = 0, group_size: int = 32) -> PackManifest:
    base = load_model("tiny", seed=seed)
    fusion = FUSIONS.get("dblf")
    sub = build_submodel(base, GROUPS, fusion)
    full_lora = init_lora_state(lora_shapes(base, LORA), LORA.rank, seed)
    return write_pack(
        path,
        sub.model,
        stage_lora(full_lora, GROUPS, fusion),
        model_name="tiny",
        stage=2,
        stages=4,
        groups=GROUPS,
        lora=LORA,
        quant=QuantSpec(scheme, group_size=group_size),
        training=TrainSettings(steps=3, batch_size=2, seq_len=48),
        tokenizer_dir=model_dir("tiny"),
        created=CREATED,
        sign_key=key,
    )


@pytest.fixture(scope="module")
def signed_pack(tmp_path_factory, keys):
    path = tmp_path_factory.mktemp("pack") / "stage2.devpack"
    manifest = make_pack(path, keys[0])
    return path, manifest


def test_round_trip_and_manifest(signed_pack, keys, tmp_path):
    path, manifest = signed_pack
    pack = read_pack(path, tmp_path / "p", keys[1])
    assert pack.signed and pack.manifest == manifest
    assert manifest.format_version == FORMAT_VERSION and manifest.stage == 2 and manifest.layers == 3
    assert manifest.groups == tuple(map(tuple, GROUPS)) and manifest.quant == QuantSpec("int4", group_size=32)
    assert set(manifest.members) >= {"config.json", "model.safetensors", "lora.safetensors", "tokenizer.json"}
    assert 0 < manifest.quant_error.mean_relative_rms <= manifest.quant_error.max_relative_rms < 0.2
    assert manifest.members["model.safetensors"][0] < 0.2 * manifest.fp32_bytes  # tokenizer aside
    assert manifest.lora == LoraSettings(rank=4, alpha=8.0, targets=LORA.target_names(load_model("tiny")))
    assert manifest.training == TrainSettings(steps=3, batch_size=2, seq_len=48)
    model, lora = load_pack(pack)
    assert len(model.model.layers) == 3
    assert set(lora) == set(
        stage_lora(init_lora_state(lora_shapes(load_model("tiny"), LORA), 4, 0), GROUPS, FUSIONS.get("dblf"))
    )


def test_the_typed_manifest_writes_back_the_signed_bytes(signed_pack):
    """``to_json`` of a written pack is its manifest, byte for byte: the signature covers what the type holds."""
    path, manifest = signed_pack
    with tarfile.open(path) as tar:
        raw = tar.extractfile(tar.next()).read()
    assert json.loads(raw) == manifest.to_json()
    assert json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":")).encode() == raw
    assert PackManifest.from_json(json.loads(raw)) == manifest


def test_packing_is_deterministic(tmp_path, keys):
    a, b = tmp_path / "a.devpack", tmp_path / "b.devpack"
    make_pack(a, keys[0])
    make_pack(b, keys[0])
    assert a.read_bytes() == b.read_bytes()
    make_pack(b, keys[0], seed=1)
    assert a.read_bytes() != b.read_bytes()


def _members(path: Path) -> list[tuple[tarfile.TarInfo, int]]:
    """Each member with the file offset of its data."""
    with tarfile.open(path) as tar:
        return [(m, m.offset_data) for m in tar.getmembers()]


def test_any_tampered_byte_of_any_member_is_refused(signed_pack, keys, tmp_path):
    path, _ = signed_pack
    original = path.read_bytes()
    for info, offset in _members(path):
        for position in sorted({0, info.size // 2, info.size - 1}):
            data = bytearray(original)
            data[offset + position] ^= 0x01
            bad = tmp_path / f"bad-{info.name}-{position}.devpack"
            bad.write_bytes(bytes(data))
            with pytest.raises(PackError) as error:
                read_pack(bad, tmp_path / f"out-{info.name}-{position}", keys[1])
            assert error.value.reason in (Refusal.HASH, Refusal.SIGNATURE, Refusal.MANIFEST), (info.name, position)
            assert not (tmp_path / f"out-{info.name}-{position}").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pack-")]  # staging cleaned up


def test_wrong_key_unsigned_truncated_and_extra_member(signed_pack, keys, tmp_path):
    path, _ = signed_pack
    with pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "a", keys[2])
    assert error.value.reason is Refusal.SIGNATURE
    unsigned = tmp_path / "unsigned.devpack"
    make_pack(unsigned, None)
    with pytest.raises(PackError) as error:
        read_pack(unsigned, tmp_path / "b", keys[1])
    assert error.value.reason is Refusal.UNSIGNED
    assert read_pack(unsigned, tmp_path / "b2", None).signed is False  # inspection only
    truncated = tmp_path / "truncated.devpack"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PackError) as error:
        read_pack(truncated, tmp_path / "c", keys[1])
    assert error.value.reason is Refusal.ARCHIVE
    extra = tmp_path / "extra.devpack"
    extra.write_bytes(path.read_bytes())
    with tarfile.open(extra, "a") as tar:
        info = tarfile.TarInfo("evil.sh")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"rm "))
    with pytest.raises(PackError) as error:
        read_pack(extra, tmp_path / "d", keys[1])
    assert error.value.reason is Refusal.MEMBER
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_future_format_version_is_refused_even_when_signed(signed_pack, keys, tmp_path):
    path, _ = signed_pack
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    manifest = json.loads(members[0][1])
    manifest["format_version"] = FORMAT_VERSION + 1
    new_manifest = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    members[0] = ("manifest.json", new_manifest)
    members[1] = ("manifest.sig", sign(keys[0], new_manifest))
    future = tmp_path / "future.devpack"
    with tarfile.open(future, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(PackError) as error:
        read_pack(future, tmp_path / "f", keys[1])
    assert error.value.reason is Refusal.VERSION


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_training_on_a_quantized_pack_reduces_loss(tmp_path, keys, tokenizer, scheme):
    path = tmp_path / f"{scheme}.devpack"
    make_pack(path, keys[0], scheme=scheme)
    pack = read_pack(path, tmp_path / "unpacked", keys[1])
    examples = generate_synthetic(24, seed=3)
    settings = TrainSettings(steps=12, batch_size=4, seq_len=48, lr=3e-3)
    result = get_trainer("torch").train(pack, examples, settings, seed=0)
    assert result.num_samples == 24 and torch.isfinite(torch.tensor(result.train_loss))

    def loss_with(lora) -> float:
        model, _ = load_pack(pack)
        peft_model = attach_lora(model, LORA)
        set_lora_state(peft_model, lora)
        batch = encode_batch(tokenizer, examples, 48)
        with torch.no_grad():
            return float(peft_model(**batch).loss)

    _, start = load_pack(pack)
    assert set(result.lora) == set(start)
    assert all(result.lora[k].shape == start[k].shape for k in start)
    assert loss_with(result.lora) < loss_with(start) - 0.1


def test_cli_keygen_pack_inspect_verify(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert main(["keygen", "--out", str(keys)]) == 0
    assert (keys / "private.pem").stat().st_mode & 0o777 == 0o600
    assert main(["keygen", "--out", str(keys)]) == 2  # never overwrites a key
    out = tmp_path / "s1.devpack"
    assert (
        main(
            [
                "pack",
                "--model",
                "tiny",
                "--stage",
                "1",
                "--stages",
                "3",
                "--quant",
                "int8",
                "--sign-key",
                str(keys / "private.pem"),
                "--created",
                CREATED,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["pack", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"format_version", "stage", "layers", "quant", "bytes", "fp32_bytes"} <= set(info)
    assert info["quant"] == "int8" and info["stage"] == 1 and info["signed"] is True
    assert info["bytes"] == out.stat().st_size
    assert info["members"]["model.safetensors"]["bytes"] < 0.3 * info["fp32_bytes"]
    assert main(["pack", "inspect", str(out)]) == 0
    assert "relative RMS error" in capsys.readouterr().out
    assert main(["pack", "verify", str(out), "--public-key", str(keys / "public.pem")]) == 0
    other = tmp_path / "other"
    main(["keygen", "--out", str(other)])
    assert main(["pack", "verify", str(out), "--public-key", str(other / "public.pem")]) == 1
    assert "REFUSED (signature)" in capsys.readouterr().err
    assert main(["pack", "--model", "tiny", "--out", str(out)]) == 2  # no --stage
    ends = tmp_path / "ends.devpack"  # the aggregator's stage pipeline (StageBuilder), so its options too
    assert (
        main(["pack", "--model", "tiny", "--stage", "1", "--stages", "2", "--keep-ends", "1", "--out", str(ends)]) == 0
    )
    groups = read_manifest(ends)[0].groups
    assert groups[0] == (0,) and groups[-1] == (7,) and len(groups) == 4


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
def test_planner_pack_bytes_match_a_real_pack(tmp_path, scheme):
    """The planner's pack size is the payload; the tar adds headers and the manifest (a few KB)."""
    from devft_edge.memory import model_shape
    from devft_edge.models import load_config, tokenizer_bytes
    from devft_edge.planner import PlanSettings, plan
    from devft_edge.profiles import load_profile

    path = tmp_path / f"{scheme}.devpack"
    make_pack(path, None, scheme=scheme, group_size=64)
    shape = model_shape(load_config("tiny"))
    settings = PlanSettings(stages=4, rank=LORA.rank, quant=scheme, tokenizer_bytes=tokenizer_bytes("tiny"))
    planned = plan(shape, "tiny", [load_profile("x86-cpu")], settings)
    # tiny has 8 layers: S=4 stages of 1, 2, 4, 8; the test pack has 3 blocks, so interpolate per block
    per_block = planned.stages[1].pack_bytes - planned.stages[0].pack_bytes
    predicted = planned.stages[0].pack_bytes + 2 * per_block
    overhead = path.stat().st_size - predicted
    assert 0 <= overhead < 24_576, overhead


ROUND = TrainSettings(steps=3, batch_size=4, seq_len=48, lr=3e-3)
"""A short local round for the trainer tests."""


@pytest.fixture
def int8_pack(tmp_path, keys) -> VerifiedPack:
    """A verified int8 pack of the tiny model, unpacked."""
    path = tmp_path / "p.devpack"
    make_pack(path, keys[0], scheme="int8")
    return read_pack(path, tmp_path / "unpacked", keys[1])


def test_the_torch_trainer_keeps_a_pack_loaded_and_trains_the_same_as_a_fresh_one(int8_pack):
    """Rounds of a stage reuse the loaded pack: the second round's result must equal what a
    freshly loaded trainer computes from the same start (no state leaks between rounds)."""
    pack, examples, settings = int8_pack, generate_synthetic(16, seed=5), ROUND
    warm = get_trainer("torch")
    first = warm.train(pack, examples, settings, seed=0)
    second = warm.train(pack, examples, settings, seed=1, start=first.lora)
    fresh = get_trainer("torch").train(pack, examples, settings, seed=1, start=first.lora)
    assert all(torch.equal(second.lora[k], fresh.lora[k]) for k in fresh.lora)
    assert second.train_loss == fresh.train_loss
    again = warm.train(pack, examples, settings, seed=0)  # start=None: the pack's own LoRA again
    assert all(torch.equal(again.lora[k], first.lora[k]) for k in first.lora)


def test_gradient_checkpointing_trains_the_same_lora_and_is_switched_per_task(int8_pack):
    """A task may ask for gradient checkpointing (less memory): the same LoRA comes out, and the
    next task without it does not inherit it from the resident model."""
    pack, examples, plain = int8_pack, generate_synthetic(16, seed=5), ROUND
    trainer = get_trainer("torch")
    recomputed = trainer.train(pack, examples, replace(plain, checkpointing=True), seed=0)
    assert trainer._loaded[1].get_base_model().is_gradient_checkpointing
    reference = trainer.train(pack, examples, plain, seed=0)
    assert not trainer._loaded[1].get_base_model().is_gradient_checkpointing
    for key, value in reference.lora.items():
        assert torch.allclose(recomputed.lora[key], value, rtol=1e-4, atol=1e-6), key
    assert recomputed.train_loss == pytest.approx(reference.train_loss, rel=1e-5)


# ---- verify before you parse: hostile archives -------------------------------------------------

LIMIT = 2**20
"""No test below may make the reader write a file larger than this (the crafted packs are a few KB)."""
NOT_FILES = {
    "symbolic link": tarfile.SYMTYPE,
    "hard link": tarfile.LNKTYPE,
    "character device": tarfile.CHRTYPE,
    "block device": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "directory": tarfile.DIRTYPE,
    "contiguous file": tarfile.CONTTYPE,
}
"""Member types a pack refuses, by the words its message uses (tarfile counts contiguous files as regular)."""


@contextlib.contextmanager
def _no_file_larger_than(limit: int) -> Iterator[list[int]]:
    """Make every write past ``limit`` bytes of one file fail (``RLIMIT_FSIZE``) and record each try.

    The kernel enforces the bound, so it holds whatever the reader writes and wherever; the
    yielded list gains an entry for each write the limit stopped.
    """
    stopped: list[int] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, lambda signum, frame: stopped.append(signum))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield stopped
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _entry(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """One member as it stands in a tar: header block(s), then its data padded to whole blocks."""
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _file(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return _entry(info, data)


def _tar(path: Path, *entries: bytes) -> Path:
    path.write_bytes(b"".join(entries) + bytes(2 * tarfile.BLOCKSIZE))
    return path


def _listing(name: str, size: int, data: bytes) -> dict:
    """A manifest's ``members`` listing one member: its declared size and the sha256 of ``data``."""
    return {name: {"bytes": size, "sha256": hashlib.sha256(data).hexdigest()}}


def _manifest(members: dict) -> PackManifest:
    """A well-formed pack manifest listing ``members`` (name -> (bytes, sha256)), no model needed."""
    return PackManifest(
        created=CREATED,
        model_name="tiny",
        model_type="llama",
        stage=1,
        stages=1,
        groups=((0,),),
        quant=QuantSpec(),
        quant_modules={},
        quant_error=QuantError(0.0, 0.0, None),
        lora=LoraSettings(targets=("q_proj",)),
        training=TrainSettings(),
        fp32_bytes=1,
        members=members,
    )


def _head(manifest: dict | bytes, key=None) -> bytes:
    """The manifest member and, with ``key``, its signature member: what a pack starts with."""
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest, sort_keys=True).encode()
    return _file("manifest.json", raw) + (_file("manifest.sig", sign(key, raw)) if key is not None else b"")


def _gnu_sparse(name: str, realsize: int, data: bytes) -> bytes:
    """An old-GNU sparse member (type ``S``): ``data`` stored, placed after ``realsize - len(data)``
    bytes of holes, so a reader that expands it writes ``realsize`` bytes."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(data)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(realsize - len(data), 12, tarfile.GNU_FORMAT) + tarfile.itn(
        len(data), 12, tarfile.GNU_FORMAT
    )
    header[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _pax_sparse(name: str, realsize: int, data: bytes, sparse_map: bytes | None = None) -> bytes:
    """A pax GNU sparse 1.0 member: ``GNU.sparse.*`` keys, then the map and ``data`` as its content."""
    if sparse_map is None:
        sparse_map = b"1\n%d\n%d\n" % (realsize - len(data), len(data))
    sparse_map += bytes(-len(sparse_map) % tarfile.BLOCKSIZE)
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(sparse_map) + len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return _entry(info, sparse_map + data)


@pytest.mark.parametrize("sparse", [_gnu_sparse, _pax_sparse])
def test_a_signed_pack_with_a_sparse_member_is_refused_before_it_is_expanded(tmp_path, keys, sparse):
    """A few-KB pack whose correctly signed manifest lists a 64 MiB member stored sparse: the
    reader must refuse the member type, not write 64 MiB of holes and hash them."""
    realsize, data = 64 * 2**20, b"x" * 512
    expanded = hashlib.sha256(bytes(realsize - len(data)) + data).hexdigest()
    manifest = {"format_version": FORMAT_VERSION, "members": {"config.json": {"bytes": realsize, "sha256": expanded}}}
    path = _tar(tmp_path / "sparse.devpack", _head(manifest, keys[0]), sparse("config.json", realsize, data))
    assert path.stat().st_size < 8192
    with _no_file_larger_than(LIMIT) as stopped, pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1])
    assert not stopped
    assert error.value.reason is Refusal.ARCHIVE and "sparse" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse.devpack"]


def test_a_malformed_sparse_map_is_a_pack_error(tmp_path, keys):
    """tarfile raises a bare ValueError for a sparse map that is not numbers; it must not escape."""
    manifest = {"format_version": FORMAT_VERSION, "members": _listing("config.json", 1, b"x")}
    path = _tar(tmp_path / "bad.devpack", _head(manifest, keys[0]), _pax_sparse("config.json", 1, b"x", b"no\n"))
    with pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1])
    assert error.value.reason is Refusal.ARCHIVE


@pytest.mark.parametrize("signature", ["none", "wrong key", "tampered"])
def test_an_unverified_manifest_stops_the_reader_before_any_member(tmp_path, keys, signature):
    """Unsigned, signed by another key or with a damaged signature: refused with nothing but the
    manifest read, so an 8 MiB member is never written."""
    path = tmp_path / "big.devpack"
    other = generate_keypair(tmp_path / "other")[0]
    key = {"none": None, "wrong key": load_private_key(other), "tampered": keys[0]}[signature]
    payload = {"config.json": bytes(8 * 2**20)}
    write_archive(path, _manifest(member_listing(payload)), payload, key)
    if signature == "tampered":
        data = bytearray(path.read_bytes())
        data[_members(path)[1][1]] ^= 1  # the first byte of the signature's data
        path.write_bytes(bytes(data))
    with _no_file_larger_than(LIMIT) as stopped, pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1])
    assert not stopped
    assert error.value.reason is (Refusal.UNSIGNED if signature == "none" else Refusal.SIGNATURE)


@pytest.mark.parametrize("depth", [20, 100_000])
@pytest.mark.parametrize("signed", [True, False])
def test_a_deeply_nested_manifest_is_refused(tmp_path, keys, depth, signed):
    nested = b'{"format_version":1,"members":{},"x":' + b"[" * depth + b"]" * depth + b"}"
    path = _tar(tmp_path / "deep.devpack", _head(nested, keys[0] if signed else None))
    with pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1] if signed else None)
    assert error.value.reason is Refusal.MANIFEST


def test_an_oversized_manifest_is_refused_even_when_signed(tmp_path, keys):
    """Real manifests are a few KB (the tiny model's 2.2 KB); one over MAX_MANIFEST_BYTES is not read."""
    manifest = {"format_version": FORMAT_VERSION, "members": {}, "pad": "x" * MAX_MANIFEST_BYTES}
    path = _tar(tmp_path / "fat.devpack", _head(manifest, keys[0]))
    with pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1])
    assert error.value.reason is Refusal.MANIFEST


def test_a_real_manifest_is_far_below_the_bound(signed_pack):
    path, manifest = signed_pack
    with tarfile.open(path) as tar:
        first = tar.next()
    assert first.name == "manifest.json" and first.size < MAX_MANIFEST_BYTES / 100


@pytest.mark.parametrize(
    "entry",
    [
        {"bytes": -1},
        {"bytes": True},
        {"bytes": 1.0},
        {"bytes": MAX_MEMBER_BYTES + 1},
        {"sha256": hashlib.sha256(b"x").hexdigest().upper()},
        {"sha256": hashlib.sha256(b"x").hexdigest()[:63]},
    ],
)
def test_a_manifest_member_entry_of_the_wrong_shape_is_refused(tmp_path, keys, entry):
    members = _listing("config.json", 1, b"x")
    members["config.json"].update(entry)
    manifest = {"format_version": FORMAT_VERSION, "members": members}
    path = _tar(tmp_path / "shape.devpack", _head(manifest, keys[0]), _file("config.json", b"x"))
    with pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1])
    assert error.value.reason is Refusal.MANIFEST


def test_a_member_larger_than_the_manifest_says_is_refused_before_it_is_written(tmp_path, keys):
    manifest = {"format_version": FORMAT_VERSION, "members": _listing("config.json", 10, bytes(10))}
    path = _tar(tmp_path / "long.devpack", _head(manifest, keys[0]), _file("config.json", bytes(8 * 2**20)))
    with _no_file_larger_than(LIMIT) as stopped, pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1])
    assert not stopped
    assert error.value.reason is Refusal.HASH


@pytest.mark.parametrize("words", NOT_FILES)
def test_a_member_that_is_not_a_plain_file_is_refused(tmp_path, keys, words):
    kind = NOT_FILES[words]
    info = tarfile.TarInfo("config.json")
    info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "manifest.json"
    data = b"{}" if kind == tarfile.CONTTYPE else b""
    info.size = len(data)
    manifest = {"format_version": FORMAT_VERSION, "members": _listing("config.json", len(data), data)}
    path = _tar(tmp_path / "link.devpack", _head(manifest, keys[0]), _entry(info, data))
    with pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", keys[1])
    assert error.value.reason is Refusal.ARCHIVE and words in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_manifest_and_its_signature_must_come_first(tmp_path, keys):
    """The reader trusts nothing it has not checked against a verified manifest, so the manifest
    (and the signature right after it) must precede every member."""
    manifest = _manifest(member_listing({"config.json": b"{}"})).to_json()
    raw = json.dumps(manifest, sort_keys=True).encode()
    config, head, sig = (
        _file("config.json", b"{}"),
        _file("manifest.json", raw),
        _file("manifest.sig", sign(keys[0], raw)),
    )
    for name, entries, key, reason in [
        ("config-first", (config, head, sig), keys[1], Refusal.MISSING),
        ("config-first-unsigned", (config, head), None, Refusal.MISSING),
        ("late-signature", (head, config, sig), keys[1], Refusal.UNSIGNED),
        ("empty", (), None, Refusal.ARCHIVE),
    ]:
        with pytest.raises(PackError) as error:
            read_pack(_tar(tmp_path / f"{name}.devpack", *entries), tmp_path / name, key)
        assert error.value.reason is reason, name
    assert read_pack(_tar(tmp_path / "ok.devpack", head, sig, config), tmp_path / "ok", keys[1]).signed
