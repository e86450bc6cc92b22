"""The aggregator's configuration (``devft-edge serve --config aggregator.yaml``), validated on load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_aggregator.state import DEFAULT_SEEN_KEEP
from devft_edge.blobs import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from devft_edge.configfile import load_yaml_model
from devft_edge.methods import check_method, uses_devft
from devft_edge.mqtt import BrokerLogin
from devft_edge.robust import DEFAULT_NORM_RATIO, DEFAULT_WEIGHT_RATIO
from devft_edge.schedule import DEFAULT_MIN_DELTA
from devft_edge.update_check import DEFAULT_MAX_UPDATE_NORM


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Train(_Strict):
    """Local training each selected device runs per round."""

    steps: int = Field(8, ge=1)
    batch: int = Field(4, ge=1)
    seq: int = Field(64, ge=8)
    lr: float = Field(3e-4, gt=0)
    checkpointing: bool = Field(False, description="gradient checkpointing on the devices (less memory, more compute)")


class Heal(_Strict):
    """Server-side healing of fused stage submodels (``devft_edge.healing.HealSettings``)."""

    steps: int = Field(300, ge=1)
    lr: float = Field(3e-4, gt=0)
    batch: int = Field(4, ge=1)
    prompts: int = Field(256, ge=1)
    new_tokens: int = Field(40, ge=1)
    hidden_weight: float = Field(0.0, ge=0)
    mode: Literal["bake", "adapter"] = "bake"
    rank: int = Field(64, ge=1)
    seed: int = 0


class AggregatorConfig(_Strict, BrokerLogin):
    """Everything one federated run of the aggregator depends on."""

    run_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    broker: str | None = Field(None, description="mqtt[s]://host:port; none: start the embedded broker")
    model: str = "smollm2"
    method: str = Field("devft", description="fedit, fedsa, flora, devft (= devft+fedit), devft+fedsa or devft+flora")
    stages: int = Field(4, ge=1)
    rounds: int = Field(12, ge=1)
    round_split: Literal["depth", "equal"] = "depth"
    capacities: list[int] | None = Field(None, description="stage depths instead of the doubling rule (sets stages)")
    stage_steps: Literal["fixed", "compute"] = Field(
        "fixed", description="local steps in every stage, or steps / step cost: a round of each stage costs the same"
    )
    adaptive_patience: int = Field(
        0, ge=0, description="end a stage after this many evaluations without progress (0: off); rounds carry over"
    )
    adaptive_min_delta: float = Field(DEFAULT_MIN_DELTA, ge=0, description="eval-loss decrease that counts as progress")
    per_round: int = Field(2, ge=1, description="devices selected per round (K)")
    quorum: int = Field(1, ge=1, description="updates needed to close a round at its deadline")
    round_timeout_s: float = Field(600.0, gt=0)
    selection_wait_s: float = Field(30.0, ge=0, description="wait this long for per_round devices, then use fewer")
    train: Train = Train()
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    quant: Literal["none", "fp16", "bf16", "int8", "int4", "nf4"] = "int4"
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES)
    upload_quota_bytes: int = Field(2 * 2**30, ge=2**20, description="partial update uploads held at once, in all")
    disk_reserve_bytes: int = Field(512 * 2**20, ge=0, description="free disk an upload must leave")
    partial_max_age_s: float = Field(3600.0, gt=0, description="a partial upload untouched this long is removed")
    seen_ids: int = Field(
        DEFAULT_SEEN_KEEP, ge=64, description="recent message ids remembered (a redelivery within them is a duplicate)"
    )
    serve_rate_bytes_per_s: float = Field(
        64 * 2**20, gt=0, description="chunk bytes served to one device per second (bursts of two windows)"
    )
    max_update_norm: float | None = Field(DEFAULT_MAX_UPDATE_NORM, gt=0)
    max_weight_ratio: float = Field(
        DEFAULT_WEIGHT_RATIO, ge=1, description="a device weighs at most this x the others' median sample count"
    )
    max_norm_ratio: float = Field(
        DEFAULT_NORM_RATIO, ge=1, description="a device's change is clipped to this x the others' median norm"
    )
    similarity: str = "cka"
    grouping: str = "contiguous"
    fusion: str = "dblf"
    beta: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(0.1, description="DBLF beta, or auto")
    transfer: Literal["copy", "inv_n"] = Field("copy", description="knowledge transfer rule between stages")
    keep_ends: int = Field(0, ge=0, description="keep the first and last k layers unfused")
    heal: Heal | None = Field(None, description="distil each fused submodel toward the full model (server)")
    full_eval: bool = Field(True, description="evaluate the full model with the transferred LoRA after each stage")
    delivery: Literal["stage_packs", "full_pack"] = Field(
        "stage_packs",
        description="stage_packs: a pack per stage; full_pack: the full pack once, then a signed stage plan per stage "
        "from which devices fuse the stage themselves",
    )
    seed: int = 0
    sign_key: Path
    device_keys: Path = Field(
        description="directory of enrolled device public keys, <device-id>.pem (written by `flash` and `enroll`); "
        "messages from any other device id, or not sealed by its key, are refused before they are parsed"
    )
    state_dir: Path = Path("runs/aggregator/state")
    out_dir: Path = Path("runs/aggregator/out")
    profiles_dir: list[Path] = []
    eval_examples: int = Field(48, ge=0, description="held-out synthetic examples evaluated after each round (0: off)")
    export_merged: bool = Field(False, description="also save the base model with the final LoRA merged in")

    @model_validator(mode="after")
    def _consistent(self) -> AggregatorConfig:
        if self.quorum > self.per_round:
            raise ValueError(f"quorum {self.quorum} exceeds per_round {self.per_round}")
        check_method(self.method)
        if uses_devft(self.method) and self.rounds < self.stage_count:
            raise ValueError(f"rounds {self.rounds} < stages {self.stage_count}: every stage needs a round")
        return self

    @property
    def stage_count(self) -> int:
        """Stages of the run: one without DevFT, else one per capacity (or ``stages``)."""
        if not uses_devft(self.method):
            return 1
        return len(self.capacities) if self.capacities else self.stages

    @property
    def prefix(self) -> str:
        """Topic prefix of the fleet."""
        return f"devft/{self.fleet}"

    @classmethod
    def from_file(cls, path: str | Path) -> AggregatorConfig:
        """Load and validate a YAML config; errors name the file and field."""
        return load_yaml_model(cls, path)
