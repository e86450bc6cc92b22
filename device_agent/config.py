"""The device agent's configuration (``devft-edge agent --config agent.yaml``), validated on load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from devft_edge.configfile import load_yaml_model
from devft_edge.mqtt import BrokerLogin


class AgentConfig(BrokerLogin):
    """Identity, broker (and its login, :class:`BrokerLogin`), trust anchor, data and resources of one device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    broker: str = Field("mqtt://127.0.0.1:1883", description="mqtt[s]://host:port")
    public_key: Path = Field(description="the aggregator's public key (PEM): checks its packs and its messages")
    identity: Path = Field(
        description="this device's ed25519 private key (PEM), enrolled with the fleet; seals its messages"
    )
    profile: str = Field("measure", description="profile name or YAML path, or 'measure' to profile this machine")
    profiles_dir: list[Path] = []
    data: str = Field("synthetic:48:0", description="JSONL file/directory of local examples, or synthetic:N:SEED")
    cache_dir: Path = Path("~/.cache/devft-edge/agent")
    cache_quota_bytes: int = Field(
        4 * 2**30, ge=2**20, description="complete blobs kept in the cache (least recently used evicted first)"
    )
    disk_reserve_bytes: int = Field(256 * 2**20, ge=0, description="free disk a download must leave")
    hello_cached_max: int = Field(64, ge=0, description="most recently used cached blobs listed in the hello")
    backend: Literal["torch", "ort"] = "torch"
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")

    @property
    def prefix(self) -> str:
        """Topic prefix of the fleet."""
        return f"devft/{self.fleet}"

    @classmethod
    def from_file(cls, path: str | Path) -> AgentConfig:
        """Load and validate a YAML config; errors name the file and field."""
        return load_yaml_model(cls, path)
