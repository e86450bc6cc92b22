"""Device profiles: what a class of edge device offers for on-device LoRA training.

A profile is data with one schema (``profiles/*.yaml``, named by file stem such as ``rpi4-4gb``).
The planner reads the usable memory budget (total minus what the OS and other software keep),
the base-weight quantizations the device can compute with, a sustained compute figure for step
time estimates, and link bandwidths for transfer times. Every figure comes with its source in the
file's ``sources`` section, because a planner is only as honest as its inputs.

Validation uses pydantic models (frozen, unknown keys refused): a missing, misspelt or nonsensical
field raises one :class:`ConfigError` that names the file and the dotted field path. Importing this
module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from devft_edge.errors import ConfigError

GB = 1024**3
"""Profiles state memory in GiB (as ``free -g`` and vendors' "4 GB" parts mean)."""

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
"""The profiles shipped with devft-edge (``profiles/`` at the repository root)."""

Quantization = Literal["none", "fp16", "bf16", "int8", "int4", "nf4"]
"""Base-weight storage of a pack: fp32 (``none``), 16-bit floats, int8 per channel, int4 group-wise,
bitsandbytes nf4."""
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)

SOURCE_KEYS = ("memory", "reserved", "cpu", "compute", "storage", "network")
"""Figures whose provenance every profile must state under ``sources``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Memory(_Strict):
    """Main memory and what of it training may use."""

    total_gb: float = Field(gt=0, le=4096, description="installed RAM in GiB")
    reserved_gb: float = Field(ge=0, le=4096, description="kept by OS, agent services, page cache headroom (GiB)")
    shared_with_gpu: bool = Field(description="GPU allocations come out of the same RAM (Jetson, Pi)")
    runtime_mb: int | None = Field(
        None,
        gt=0,
        le=1 << 20,
        description="resident MiB of a Python process with torch, transformers and peft imported, measured "
        "on the device (devft-edge profile); absent: the planner assumes its calibration machine's",
    )

    @model_validator(mode="after")
    def _reserved_below_total(self) -> Memory:
        if self.reserved_gb >= self.total_gb:
            raise ValueError(f"reserved_gb={self.reserved_gb} must be below total_gb={self.total_gb}")
        return self


class Cpu(_Strict):
    """Host processor."""

    arch: Literal["aarch64", "x86_64"]
    cores: int = Field(ge=1, le=1024)
    model: str = Field(min_length=1)


class Accelerator(_Strict):
    """Training accelerator, if any."""

    kind: Literal["none", "cuda"]
    compute_capability: str | None = Field(default=None, pattern=r"^\d+\.\d+$")

    @model_validator(mode="after")
    def _capability_iff_cuda(self) -> Accelerator:
        if (self.kind == "cuda") != (self.compute_capability is not None):
            raise ValueError("compute_capability is required for kind 'cuda' and must be absent otherwise")
        return self


class Compute(_Strict):
    """Sustained throughput the training backend gets, for step-time estimates."""

    sustained_gflops: float = Field(gt=0, le=1e6, description="fp32 GEMM throughput the trainer sustains")
    backend: Literal["cpu", "cuda"] = Field(description="where training runs on this device")


class Network(_Strict):
    """Typical link speeds to the broker, in megabits per second."""

    uplink_mbps: float = Field(gt=0, le=1e6)
    downlink_mbps: float = Field(gt=0, le=1e6)


class MeasuredStep(_Strict):
    """A real local training step measured on the device (``devft-edge profile --measure-step``)."""

    model: str = Field(min_length=1, description="model spec the step trained, e.g. smollm2")
    layers: int = Field(ge=1, le=4096)
    batch: int = Field(ge=1, le=65536)
    seq: int = Field(ge=1, le=1 << 20)
    quant: Quantization
    peak_bytes: int = Field(gt=0, le=1 << 50, description="peak resident memory of the training process")
    step_seconds: float = Field(gt=0, le=86400, description="wall time of one steady-state step")


class DeviceProfile(_Strict):
    """One device class: the schema of ``profiles/*.yaml``."""

    name: str = Field(min_length=1, description="file stem, e.g. rpi4-4gb (set by the loader)")
    description: str = Field(min_length=1)
    memory: Memory
    cpu: Cpu
    accelerator: Accelerator
    quantizations: tuple[Quantization, ...] = Field(min_length=1)
    compute: Compute
    storage_gb: float = Field(gt=0, le=1e6)
    network: Network
    sources: dict[str, str]
    measured_step: MeasuredStep | None = None
    """Optional: the planner scales its step-time estimate for this device by this measurement."""

    def problems(self) -> list[str]:
        """Cross-field problems as ``field: message`` (checked by the loader after the schema)."""
        problems = []
        for key in SOURCE_KEYS:
            if not self.sources.get(key, "").strip():
                problems.append(f"sources.{key}: missing; say where the {key} figure comes from")
        if "nf4" in self.quantizations and self.compute.backend != "cuda":
            problems.append("quantizations: nf4 needs bitsandbytes on CUDA; this device trains on its CPU")
        if self.compute.backend == "cuda" and self.accelerator.kind != "cuda":
            problems.append("compute.backend: cuda, but accelerator.kind is none")
        return problems

    @property
    def budget_bytes(self) -> int:
        """Memory a training process may use: total minus reserved."""
        return int((self.memory.total_gb - self.memory.reserved_gb) * GB)


def _describe(error: ValidationError, source: str) -> list[str]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{source}: {where}: {message}")
    return problems


def parse_profile(data: object, name: str, source: str = "<profile>") -> DeviceProfile:
    """Validate a profile mapping; ``source`` names the file in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile must be a mapping of fields, got {type(data).__name__}")
    if "name" in data:
        raise ConfigError(f"{source}: name: not a field; a profile is named by its file stem ({name!r})")
    try:
        profile = DeviceProfile.model_validate({**data, "name": name})
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None
    problems = profile.problems()
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return profile


def load_profile_file(path: str | Path) -> DeviceProfile:
    """Read and validate one profile YAML; its name is the file stem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read profile: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_profile(data, path.stem, str(path))


def profile_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Directories searched for profiles: user directories first, then the shipped ones."""
    return [Path(d) for d in extra] + [PROFILES_DIR]


def available_profiles(extra_dirs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Profile name -> file; a user directory's file shadows a shipped one of the same name."""
    found: dict[str, Path] = {}
    for directory in reversed(profile_dirs(extra_dirs)):
        if directory.is_dir():
            found.update({p.stem: p for p in sorted(directory.glob("*.yaml"))})
    return dict(sorted(found.items()))


def load_profile(name_or_path: str | Path, extra_dirs: Sequence[str | Path] = ()) -> DeviceProfile:
    """A profile by name (searching ``extra_dirs`` then the shipped ones) or by path to a YAML file."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        return load_profile_file(text)
    for directory in extra_dirs:
        if not Path(directory).is_dir():
            raise ConfigError(f"--profiles-dir {directory}: no such directory")
    known = available_profiles(extra_dirs)
    if text not in known:
        raise ConfigError(f"unknown device profile {text!r}; known: {', '.join(known) or '(none)'}")
    return load_profile_file(known[text])


def load_profiles(names: Iterable[str | Path], extra_dirs: Sequence[str | Path] = ()) -> list[DeviceProfile]:
    """Several profiles; every problem in every file is reported together."""
    profiles, problems = [], []
    for name in names:
        try:
            profiles.append(load_profile(name, extra_dirs))
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)
    return profiles


def dump_profile(profile: DeviceProfile) -> str:
    """YAML text of a profile (without its name, which is the file stem)."""
    data = profile.model_dump(mode="json", exclude={"name"})
    return yaml.safe_dump(data, sort_keys=False)
