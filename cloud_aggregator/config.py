"""The aggregator's configuration (``devft-edge serve --config aggregator.yaml``), validated on load."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from cloud_aggregator.state import DEFAULT_SEEN_KEEP
from devft_edge.blobs import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from devft_edge.configfile import load_yaml_model
from devft_edge.mqtt import BrokerLogin
from devft_edge.robust import DEFAULT_NORM_RATIO, DEFAULT_WEIGHT_RATIO
from devft_edge.run_config import RunConfig
from devft_edge.update_check import DEFAULT_MAX_UPDATE_NORM


class AggregatorConfig(RunConfig, BrokerLogin):
    """Everything one federated run of the aggregator depends on: the run configuration (model,
    method, schedule, ``train``, ``lora``, ``recipe``, ... as in ``simulate``) and the service's own."""

    run_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    broker: str | None = Field(None, description="mqtt[s]://host:port; none: start the embedded broker")
    quorum: int = Field(1, ge=1, description="updates needed to close a round at its deadline")
    round_timeout_s: float = Field(600.0, gt=0)
    selection_wait_s: float = Field(30.0, ge=0, description="wait this long for per_round devices, then use fewer")
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
    sign_key: Path
    device_keys: Path = Field(
        description="directory of enrolled device public keys, <device-id>.pem (written by `flash` and `enroll`); "
        "messages from any other device id, or not sealed by its key, are refused before they are parsed"
    )
    state_dir: Path = Path("runs/aggregator/state")
    out_dir: Path = Path("runs/aggregator/out")
    profiles_dir: list[Path] = []

    @model_validator(mode="after")
    def _quorum(self) -> AggregatorConfig:
        if self.quorum > self.per_round:
            raise ValueError(f"quorum {self.quorum} exceeds per_round {self.per_round}")
        return self

    @property
    def prefix(self) -> str:
        """Topic prefix of the fleet."""
        return f"devft/{self.fleet}"

    @classmethod
    def from_file(cls, path: str | Path) -> AggregatorConfig:
        """Load and validate a YAML config; errors name the file and field."""
        return load_yaml_model(cls, path)
