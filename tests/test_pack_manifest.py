"""The typed manifests: a round trip keeps every byte, and every malformed field is refused by name.

No model is built here: the manifests are made in code, and the archives around them are a few
hundred bytes (tests/test_pack.py and tests/test_stage_plan.py check the manifests of real packs).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from devft_edge.lora import LoraSettings
from devft_edge.pack import member_listing, read_pack, write_archive
from devft_edge.pack_manifest import HEAL, PackError, PackManifest, QuantError, Refusal
from devft_edge.quantization import QuantSpec
from devft_edge.signing import Ed25519PrivateKey
from devft_edge.stage_plan import StagePlanManifest, read_plan
from devft_edge.training import TrainSettings

PAYLOAD = {"config.json": b"{}"}
COMMON = dict(
    created="2026-11-22T00:00:00Z",
    model_name="tiny",
    model_type="llama",
    stage=1,
    stages=2,
    groups=((0, 1), (2,), (3, 4), (5, 6, 7)),
    quant=QuantSpec("int4", group_size=32),
    lora=LoraSettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
    training=TrainSettings(steps=3, batch_size=2, seq_len=48),
    members=member_listing(PAYLOAD),
)
PACK = PackManifest(
    **COMMON,
    quant_modules={"model.layers.0.self_attn.q_proj": "int4", "lm_head": "int4"},
    quant_error=QuantError(0.05, 0.09, "lm_head"),
    fp32_bytes=13_175_040,
)
PLAN = StagePlanManifest(
    **COMMON,
    coefficients=((0.9, 0.1), (1.0,), (0.9, 0.1), (0.8, 0.1, 0.1)),
    base_pack="0" * 64,
    heal="none",
)


def _canonical(data: dict) -> bytes:
    """The manifest bytes a writer signs: sorted keys, no spaces."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _changed(manifest: PackManifest | StagePlanManifest, path: str, value: object) -> dict:
    """``manifest``'s JSON with the field at the dotted ``path`` set to ``value`` (removed when it is ``...``)."""
    data = copy.deepcopy(manifest.to_json())
    *parents, key = path.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    if value is ...:
        del target[key]
    else:
        target[key] = value
    return data


@pytest.mark.parametrize("manifest", [PACK, PLAN, replace(PACK, derived_from=("full", "plan"), members={})])
def test_a_manifest_round_trips_through_its_json(manifest):
    data = manifest.to_json()
    assert type(manifest).from_json(data) == manifest
    again = type(manifest).from_json(json.loads(_canonical(data)))
    assert again == manifest and _canonical(again.to_json()) == _canonical(data)
    assert manifest.layers == len(manifest.groups) == data["layers"]


def test_numbers_keep_their_json_type_so_the_bytes_round_trip():
    """An alpha or lr written as an integer is read and written back as one (not as 16.0)."""
    data = _changed(PACK, "lora.alpha", 16)
    data["training"]["lr"] = 1
    assert _canonical(PackManifest.from_json(data).to_json()) == _canonical(data)


def test_a_missing_training_field_takes_its_default():
    """``TrainSettings(**training)`` did so before the type: a pack written before a field existed still reads."""
    read = PackManifest.from_json(_changed(PACK, "training.checkpointing", ...))
    assert read.training == PACK.training


PACK_CASES = {
    "format_version": ("format_version", 2),
    "created type": ("created", 5),
    "created missing": ("created", ...),
    "model name": ("model.name", ""),
    "model unknown key": ("model.family", "llama"),
    "stage type": ("stage", "1"),
    "stage negative": ("stage", -1),
    "stage beyond stages": ("stage", 3),
    "stages zero": ("stages", 0),
    "layers not the groups": ("layers", 3),
    "groups overlap": ("groups", [[0, 1], [1, 2], [3, 4], [5, 6, 7]]),
    "groups leave a gap": ("groups", [[0, 1], [3], [4, 5], [6, 7, 8]]),
    "groups empty group": ("groups", [[0, 1], [], [2], [3]]),
    "groups bool index": ("groups", [[0, True], [2], [3, 4], [5, 6, 7]]),
    "groups not lists": ("groups", "0-7"),
    "quant scheme": ("quant.scheme", "int3"),
    "quant group size type": ("quant.group_size", "64"),
    "quant group size odd": ("quant.group_size", 33),
    "quant embeddings": ("quant.embeddings", 1),
    "quant modules": ("quant.modules", {"lm_head": "int5"}),
    "quant error negative": ("quant.error.max_relative_rms", -0.1),
    "quant error nan": ("quant.error.mean_relative_rms", math.nan),
    "quant worst module missing": ("quant.error.worst_module", ...),
    "quant not an object": ("quant", "int4"),
    "lora rank zero": ("lora.rank", 0),
    "lora rank float": ("lora.rank", 4.0),
    "lora alpha nan": ("lora.alpha", math.nan),
    "lora alpha negative": ("lora.alpha", -1.0),
    "lora dropout": ("lora.dropout", 1.0),
    "lora no targets": ("lora.targets", []),
    "lora repeated target": ("lora.targets", ["q_proj", "q_proj"]),
    "training steps": ("training.steps", 0),
    "training lr type": ("training.lr", "fast"),
    "training unknown key": ("training.epochs", 3),
    "fp32 bytes": ("fp32_bytes", -1),
    "members unknown name": ("members", {"evil.sh": {"bytes": 1, "sha256": "0" * 64}}),
    "members bad size": ("members", {"config.json": {"bytes": -1, "sha256": "0" * 64}}),
    "members extra key": ("members", {"config.json": {"bytes": 1, "sha256": "0" * 64, "mode": 493}}),
    "derived_from": ("derived_from", {"pack": "full"}),
    "a plan's key": ("kind", "stage_plan"),
}
"""Each malformed pack manifest: the dotted path of the field changed and its value."""
NAMED = {
    "lora alpha negative": "lora: alpha",
    "lora dropout": "lora: dropout",
    "training steps": "training: local steps",
    "quant group size odd": "quant: int4 group_size",
}
"""Cases the refusal names by another path than the field changed (a check between fields, a setting's own)."""


@pytest.mark.parametrize("case", PACK_CASES)
def test_a_malformed_pack_manifest_is_refused_naming_the_field(case):
    path, value = PACK_CASES[case]
    with pytest.raises(PackError) as error:
        PackManifest.from_json(_changed(PACK, path, value))
    assert error.value.reason is Refusal.MANIFEST
    named = NAMED.get(case, path.rsplit(".", 1)[0] if case.endswith("unknown key") else path)
    assert named in str(error.value), str(error.value)


def test_every_bad_field_is_named_at_once():
    data = _changed(PACK, "stage", "one")
    data["lora"]["rank"] = 0
    data["layers"] = 9
    data["quant"]["error"]["worst_module"] = 3
    with pytest.raises(PackError) as error:
        PackManifest.from_json(data)
    message = str(error.value)
    for named in ("stage must", "lora.rank", "layers must", "quant.error.worst_module"):
        assert named in message, message


PLAN_CASES = {
    "kind": ("kind", "pack"),
    "no kind (a pack)": ("kind", ...),
    "coefficients per member": ("coefficients", [[1.0], [1.0], [0.9, 0.1], [0.8, 0.1, 0.1]]),
    "coefficients nan": ("coefficients", [[math.nan, 0.1], [1.0], [0.9, 0.1], [0.8, 0.1, 0.1]]),
    "base_pack": ("base_pack", ""),
    "heal word": ("heal", "some"),
    "heal without its member": ("heal", "adapter"),
    "quant has no error in a plan": ("quant.error", {}),
}
"""Each malformed stage plan manifest: the dotted path of the field changed and its value."""


@pytest.mark.parametrize("case", PLAN_CASES)
def test_a_malformed_plan_manifest_is_refused_naming_the_field(case):
    path, value = PLAN_CASES[case]
    with pytest.raises(PackError) as error:
        StagePlanManifest.from_json(_changed(PLAN, path, value))
    assert error.value.reason is Refusal.MANIFEST
    assert (path if case != "quant has no error in a plan" else "quant has unknown keys: error") in str(error.value)


def test_a_plan_with_its_heal_member_reads():
    heal = replace(PLAN, heal="adapter", members={**PLAN.members, **member_listing({HEAL: b"x"})})
    assert StagePlanManifest.from_json(heal.to_json()) == heal


def _archive(path: Path, manifest: dict, key: Ed25519PrivateKey) -> Path:
    """A signed archive of ``manifest`` (raw JSON, as a hostile or buggy writer makes it) and :data:`PAYLOAD`."""
    raw = _canonical(manifest)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("manifest.json", raw), ("manifest.sig", key.sign(raw)), *PAYLOAD.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_signed_archive_whose_manifest_is_malformed_is_refused_and_nothing_is_kept(tmp_path):
    """Signature and members verify; the typed manifest, read last, refuses it and ``dest`` never appears."""
    key = Ed25519PrivateKey.generate()
    path = _archive(tmp_path / "bad.devpack", _changed(PACK, "layers", 3), key)
    with pytest.raises(PackError) as error:
        read_pack(path, tmp_path / "out", key.public_key())
    assert error.value.reason is Refusal.MANIFEST and "layers" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.devpack"]
    good = read_pack(_archive(tmp_path / "good.devpack", PACK.to_json(), key), tmp_path / "good", key.public_key())
    assert good.signed and good.manifest == PACK and PackManifest.read(good.directory) == PACK


def test_a_pack_is_not_a_plan_and_a_plan_is_not_a_pack(tmp_path):
    key = Ed25519PrivateKey.generate()
    write_archive(tmp_path / "p.devpack", PACK, PAYLOAD, key)
    write_archive(tmp_path / "s.plan", PLAN, PAYLOAD, key)
    with pytest.raises(PackError, match="kind") as error:
        read_plan(tmp_path / "p.devpack", tmp_path / "a", key.public_key())
    assert error.value.reason is Refusal.MANIFEST
    with pytest.raises(PackError, match="unknown keys: base_pack, coefficients, heal, kind") as error:
        read_pack(tmp_path / "s.plan", tmp_path / "b", key.public_key())
    assert error.value.reason is Refusal.MANIFEST
    assert read_plan(tmp_path / "s.plan", tmp_path / "c", key.public_key()).manifest == PLAN


def test_a_writer_refuses_a_manifest_every_reader_would_refuse(tmp_path):
    """Built in code with the stage beyond the stages: refused before a byte is written."""
    with pytest.raises(PackError, match="stage must be at most stages"):
        write_archive(tmp_path / "x.devpack", replace(PACK, stage=3), PAYLOAD, None)
    assert not any(tmp_path.iterdir())


def test_the_members_a_writer_lists_are_the_payload():
    assert PACK.members == {"config.json": (2, hashlib.sha256(b"{}").hexdigest())}
