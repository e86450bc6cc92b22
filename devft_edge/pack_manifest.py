"""The manifest of a signed archive (a pack or a stage plan) as a frozen, self-checking type.

Read as string keys in the pack reader, the stage plan, the trainers, the agent and the CLI, a
mistyped key or a field of the wrong type was found by whichever reader touched it first, as a
``KeyError`` deep in training on a device. Here a manifest is read once: :meth:`PackManifest.from_json`
checks every field (JSON type, range, and what fields must agree on: ``layers`` is the number of
``groups``, the groups partition the original layers, the stage lies within the stages) and names
every bad one in a single ``manifest`` :class:`PackError`; readers then use attributes.
:meth:`~ArchiveManifest.to_json` writes exactly the keys of format version 1 (``docs/packs.md``),
so an archive written through the type is byte for byte the one written before it, and existing
packs and their signatures still verify. A manifest is versioned, so a key this reader does not
know is refused rather than ignored: what was read is what :meth:`~ArchiveManifest.to_json` writes back.

The archive itself (member order, signature, hashes) is :mod:`devft_edge.pack`'s; the stage plan's
manifest is :class:`devft_edge.stage_plan.StagePlanManifest`, on :class:`ArchiveManifest` too.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

from devft_edge import bounded_json
from devft_edge.errors import DevFTError
from devft_edge.lora import LoraSettings
from devft_edge.models import TOKENIZER_FILES
from devft_edge.quantization import QUANTIZERS, QuantSpec
from devft_edge.training import TrainSettings

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
MAX_MANIFEST_DEPTH = 8
"""Manifests nest 4 deep (``members.<name>.bytes``, ``quant.error.<field>``); deeper is refused."""
_SHA256 = re.compile(r"[0-9a-f]{64}")

Member = tuple[int, str]
"""A listed member: its size in bytes and its sha256 (64 lowercase hex digits)."""
M = TypeVar("M", bound="ArchiveManifest")
T = TypeVar("T")


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


def parse_manifest(manifest_bytes: bytes) -> dict[str, Any]:
    """The manifest as JSON, parsed with the protocol header's bounds (no huge integers, no
    infinities), at most :data:`MAX_MANIFEST_DEPTH` deep, of the supported format version; its
    fields are :meth:`ArchiveManifest.from_json`'s to check."""
    try:
        manifest = bounded_json.loads(manifest_bytes, MAX_MANIFEST_DEPTH)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PackError(Refusal.MANIFEST, f"manifest.json is not bounded JSON: {str(error)[:200]}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise PackError(Refusal.MANIFEST, "manifest.json is not a pack manifest")
    version = manifest["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:  # true and 1.0 equal 1
        raise PackError(Refusal.VERSION, f"format version {version!r}; this reader supports {FORMAT_VERSION}")
    return manifest


def listed_members(members: Any) -> tuple[dict[str, Member], list[str]]:
    """A manifest's ``members`` as name -> (bytes, sha256), and a problem for each malformed entry.

    The archive reader needs the list before any member (:func:`devft_edge.pack.read_pack`), the
    typed manifest after them; both read it here.
    """
    if not isinstance(members, dict):
        return {}, ["'members' must map names to {bytes, sha256}"]
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
    return listed, problems


_ABSENT = object()


class Fields:
    """Reads one JSON object of a manifest, collecting a problem per bad field instead of stopping
    at the first, so that one refusal names all of them (by path: ``lora.rank``).

    A bad field reads as a placeholder of the right type; :meth:`fine` says whether fields read
    well, so a check between fields is made only on real values. Nested objects share the list of
    problems. Numbers are returned as the JSON had them (an int stays an int), so a manifest
    written back is the bytes it was read from.
    """

    def __init__(self, data: Any, path: str = "", problems: list[str] | None = None) -> None:
        self.data: Mapping[str, Any] = data if isinstance(data, dict) else {}
        self.path = path
        self.problems: list[str] = [] if problems is None else problems
        self._bad: set[str] = set()
        self._read: set[str] = set()
        self._quiet = not isinstance(data, dict)  # the object itself is bad: reported once, by its parent

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self.data.get(key, _ABSENT)

    def bad(self, key: str, want: str) -> None:
        """Record that field ``key`` is not ``want``."""
        self._bad.add(key)
        if self._quiet:
            return
        value = self.data.get(key, _ABSENT)
        shown = "nothing" if value is _ABSENT else json.dumps(value)[:40]
        self.problems.append(f"{self._name(key)} must be {want}, got {shown}")

    def fine(self, *keys: str) -> bool:
        """Whether every one of ``keys`` read well (and this object is one)."""
        return not self._quiet and not self._bad.intersection(keys)

    def integer(self, key: str, low: int, high: int | None = None) -> int:
        """An int (not a bool, not a float) from ``low`` (to ``high``)."""
        value = self._get(key)
        if type(value) is not int or value < low or (high is not None and value > high):
            span = "" if high is None else f" to {high}"
            self.bad(key, f"the integer {low}" if high == low else f"an integer from {low}{span}")
            return low
        return value

    def number(self, key: str, low: float | None = None) -> float:
        """A finite int or float (NaN, which the bounded parser lets through, is refused), at least ``low``."""
        value = self._get(key)
        if type(value) not in (int, float) or value != value or (low is not None and value < low):
            self.bad(key, "a finite number" + ("" if low is None else f" >= {low}"))
            return 0.0 if low is None else low
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if type(value) is not bool:
            self.bad(key, "true or false")
            return False
        return value

    def text(self, key: str, choices: tuple[str, ...] = ()) -> str:
        """A non-empty string (one of ``choices``, when given)."""
        value = self._get(key)
        if not (isinstance(value, str) and value and (not choices or value in choices)):
            self.bad(key, f"one of {', '.join(choices)}" if choices else "a non-empty string")
            return choices[0] if choices else "?"
        return value

    def optional_text(self, key: str) -> str | None:
        """A non-empty string or null (the key itself must be there)."""
        value = self._get(key)
        if value is None:
            return None
        if not (isinstance(value, str) and value):
            self.bad(key, "a non-empty string or null")
            return None
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        """A non-empty list of distinct non-empty strings."""
        value = self._get(key)
        if not (
            isinstance(value, list)
            and value
            and all(isinstance(item, str) and item for item in value)
            and len(set(value)) == len(value)
        ):
            self.bad(key, "a non-empty list of distinct names")
            return ()
        return tuple(value)

    def labels(self, key: str, choices: list[str]) -> dict[str, str]:
        """Names -> one of ``choices`` (a quantized module's scheme)."""
        value = self._get(key)
        if not (isinstance(value, dict) and all(isinstance(v, str) and v in choices for v in value.values())):
            self.bad(key, f"an object of names -> {'|'.join(choices)}")
            return {}
        return dict(value)

    def groups(self, key: str) -> tuple[tuple[int, ...], ...]:
        """Non-empty groups of original layer indices that together hold each of 0..N-1 once."""
        value = self._get(key)
        if not (
            isinstance(value, list)
            and value
            and all(isinstance(g, list) and g and all(type(j) is int for j in g) for g in value)
        ):
            self.bad(key, "a non-empty list of non-empty lists of layer indices")
            return ((0,),)
        if sorted(j for g in value for j in g) != list(range(sum(len(g) for g in value))):
            self.bad(key, "a partition of the layers 0..N-1 (each in one group)")
            return ((0,),)
        return tuple(tuple(g) for g in value)

    def rows(self, key: str) -> tuple[tuple[float, ...], ...]:
        """A list of non-empty lists of finite numbers."""
        value = self._get(key)
        if not (
            isinstance(value, list)
            and all(
                isinstance(row, list) and row and all(type(c) in (int, float) and c == c for c in row) for row in value
            )
        ):
            self.bad(key, "a list of non-empty lists of finite numbers")
            return ()
        return tuple(tuple(row) for row in value)

    def members(self, key: str) -> dict[str, Member]:
        """The listed members (:func:`listed_members`, whose entries hold nothing else), each
        malformed entry a problem of its own."""
        value = self._get(key)
        listed, problems = listed_members(value)
        problems += [
            f"{name}: an entry holds bytes and sha256 only"
            for name in listed
            if set(value[name]) != {"bytes", "sha256"}
        ]
        if problems:
            self._bad.add(key)
            self.problems += [f"{self._name(key)}: {problem}" for problem in problems[:5]]
        return listed

    def object(self, key: str) -> Fields:
        """The object at ``key``, read by a child that reports into the same problems."""
        value = self._get(key)
        if not isinstance(value, dict):
            self.bad(key, "an object")
        return Fields(value, self._name(key), self.problems)

    def built(self, key: str, ok: bool, build: Callable[[], T], placeholder: T) -> T:
        """``build()``: a settings object made of fields that read ``ok``, whose own checks'
        complaints are reported under ``key``; ``placeholder`` when a field was bad or it complains."""
        if not ok:
            self._bad.add(key)
            return placeholder
        try:
            return build()
        except ValueError as error:  # ConfigError is one; its message says which setting
            self._bad.add(key)
            self.problems.append(f"{self._name(key)}: {error}")
            return placeholder

    def done(self) -> None:
        """Refuse keys that were not read: a versioned manifest has no fields a reader may skip."""
        unknown = sorted(set(self.data) - self._read)
        if unknown and not self._quiet:
            where = self.path or "manifest"
            self.problems.append(f"{where} has unknown keys: {', '.join(unknown)[:120]}")

    def check(self) -> None:
        """Raise one ``manifest`` refusal naming every problem, if there is any."""
        if self.problems:
            raise PackError(Refusal.MANIFEST, "manifest.json: " + "; ".join(self.problems[:20]))


def read_quant_spec(f: Fields, parent: Fields) -> QuantSpec:
    """The ``QuantSpec`` part of a manifest's ``quant`` object ``f``."""
    scheme, group_size, embeddings = (
        f.text("scheme", tuple(QUANTIZERS.names())),
        f.integer("group_size", 1),
        f.flag("embeddings"),
    )
    ok = f.fine("scheme", "group_size", "embeddings")
    return parent.built("quant", ok, lambda: QuantSpec(scheme, group_size, embeddings), QuantSpec())


def _read_lora(f: Fields, parent: Fields) -> LoraSettings:
    """A manifest's ``lora`` object ``f``: rank, alpha, dropout and the resolved targets."""
    rank, alpha, dropout, targets = f.integer("rank", 1), f.number("alpha"), f.number("dropout"), f.strings("targets")
    f.done()
    ok = f.fine("rank", "alpha", "dropout", "targets")
    return parent.built("lora", ok, lambda: LoraSettings(rank, alpha, dropout, targets), LoraSettings())


def _lora_json(lora: LoraSettings) -> dict[str, Any]:
    """A manifest's ``lora`` object (``targets`` resolved for the model when the manifest was built)."""
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets or ())}


def _read_training(f: Fields, parent: Fields) -> TrainSettings:
    """A manifest's ``training`` object; a field it lacks takes its default, as ``TrainSettings(**training)``
    gave before the typed manifest (a pack written before the field existed still reads)."""
    hints = get_type_hints(TrainSettings)
    read: dict[type, Callable[[str], Any]] = {bool: f.flag, int: lambda key: f.integer(key, 0), float: f.number}
    names = [field.name for field in fields(TrainSettings) if field.name in f.data]
    values = {name: read[hints[name]](name) for name in names}
    f.done()
    return parent.built("training", f.fine(*values), lambda: TrainSettings(**values), TrainSettings())


@dataclass(frozen=True, kw_only=True)
class ArchiveManifest(ABC):
    """What the manifests of a pack and of a stage plan share: the model, the stage and its groups,
    quantization, the LoRA and training settings, and the listed members.

    Its mappings are plain dicts typed read-only: the dataclass is frozen and nothing writes to them.
    """

    format_version: ClassVar[int] = FORMAT_VERSION
    created: str
    """ISO-8601 creation time, an input of the writer (packing is reproducible)."""
    model_name: str
    model_type: str
    stage: int
    """1-based stage; 0 is the full model (``full_pack`` delivery)."""
    stages: int
    groups: tuple[tuple[int, ...], ...]
    """The original layers fused into each block, a partition of the full model's layers."""
    quant: QuantSpec
    lora: LoraSettings
    """The LoRA settings, ``targets`` resolved for the model."""
    training: TrainSettings
    members: Mapping[str, Member]
    """Every payload member: name -> (bytes, sha256)."""

    @property
    def layers(self) -> int:
        """Blocks of the stage model: one per group."""
        return len(self.groups)

    @classmethod
    @abstractmethod
    def from_json(cls: type[M], data: Mapping[str, Any]) -> M:
        """The manifest ``data`` describes; a ``manifest`` :class:`PackError` names every bad field."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The manifest as written (its canonical bytes are what the signature covers)."""

    @classmethod
    def read(cls: type[M], directory: Path) -> M:
        """The manifest of a directory that :func:`devft_edge.pack.read_archive` unpacked (its
        members verified then) or :func:`devft_edge.stage_plan.derive_stage_pack` built."""
        return cls.from_json(parse_manifest((directory / MANIFEST).read_bytes()))

    def check(self) -> None:
        """Refuse a manifest built in code that every reader would refuse: the writers call it, so
        a bad argument fails where it is passed, not on each device that reads the archive."""
        type(self).from_json(self.to_json())

    @staticmethod
    def _common(f: Fields) -> dict[str, Any]:
        """The shared fields' constructor arguments, read from ``f`` (quantization is each kind's)."""
        f.integer("format_version", FORMAT_VERSION, FORMAT_VERSION)
        model = f.object("model")
        name, model_type = model.text("name"), model.text("model_type")
        model.done()
        stage, stages, layers = f.integer("stage", 0), f.integer("stages", 1), f.integer("layers", 1)
        groups = f.groups("groups")
        if f.fine("stage", "stages") and stage > stages:
            f.bad("stage", f"at most stages ({stages})")
        if f.fine("layers", "groups") and layers != len(groups):
            f.bad("layers", f"the number of groups ({len(groups)})")
        return {
            "created": f.text("created"),
            "model_name": name,
            "model_type": model_type,
            "stage": stage,
            "stages": stages,
            "groups": groups,
            "lora": _read_lora(f.object("lora"), f),
            "training": _read_training(f.object("training"), f),
            "members": f.members("members"),
        }

    def _common_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created": self.created,
            "model": {"name": self.model_name, "model_type": self.model_type},
            "stage": self.stage,
            "stages": self.stages,
            "layers": self.layers,
            "groups": [list(g) for g in self.groups],
            "lora": _lora_json(self.lora),
            "training": asdict(self.training),
            "members": {name: {"bytes": size, "sha256": sha} for name, (size, sha) in self.members.items()},
        }


@dataclass(frozen=True)
class QuantError:
    """Relative RMS error ``||W_q - W|| / ||W||`` of a pack's quantized weights (all 0 unquantized)."""

    mean_relative_rms: float
    max_relative_rms: float
    worst_module: str | None
    """The module with the largest error; None when nothing is quantized."""


@dataclass(frozen=True, kw_only=True)
class PackManifest(ArchiveManifest):
    """A pack's manifest: what a device trains on, and what ``pack inspect`` reports."""

    quant_modules: Mapping[str, str]
    """Every quantized module -> its scheme."""
    quant_error: QuantError
    fp32_bytes: int
    """The stage model's weights at fp32: what the pack's size is compared with."""
    derived_from: tuple[str, str] | None = None
    """For a stage a device fused itself (:func:`devft_edge.stage_plan.derive_stage_pack`): the
    directories of the full pack and the plan; such a stage lists no members (it is no archive)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PackManifest:
        f = Fields(data)
        common = cls._common(f)
        quant = f.object("quant")
        spec = read_quant_spec(quant, f)
        modules = quant.labels("modules", QUANTIZERS.names())
        error = quant.object("error")
        mean, largest = error.number("mean_relative_rms", 0), error.number("max_relative_rms", 0)
        quant_error = QuantError(mean, largest, error.optional_text("worst_module"))
        error.done()
        quant.done()
        fp32_bytes = f.integer("fp32_bytes", 0)
        derived_from = None
        if "derived_from" in f.data:
            origin = f.object("derived_from")
            derived_from = (origin.text("pack"), origin.text("plan"))
            origin.done()
        f.done()
        f.check()
        return cls(
            **common,
            quant=spec,
            quant_modules=modules,
            quant_error=quant_error,
            fp32_bytes=fp32_bytes,
            derived_from=derived_from,
        )

    def to_json(self) -> dict[str, Any]:
        data = {
            **self._common_json(),
            "quant": {**asdict(self.quant), "modules": dict(self.quant_modules), "error": asdict(self.quant_error)},
            "fp32_bytes": self.fp32_bytes,
        }
        if self.derived_from is not None:
            data["derived_from"] = {"pack": self.derived_from[0], "plan": self.derived_from[1]}
        return data
