"""The aggregator's durable run state: everything needed to resume after ``kill -9``.

Tensors (global LoRA states, packs, accepted updates) live in the content-addressed blob store
and are immutable once written; ``state.json`` only references them by sha256. A checkpoint
writes ``state.json.tmp``, fsyncs it and renames it over ``state.json`` (then fsyncs the
directory), so a crash leaves either the previous or the new state, never a torn one. An update
is *accepted* only once the checkpoint that lists it is on disk; aggregation at round close
streams over the listed update blobs, so a restart neither loses an accepted update nor counts
one twice (the list is keyed by device).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from devft_edge.errors import ConfigError, DataError

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class Device:
    """A device the aggregator has heard from."""

    profile: dict[str, Any]
    last_seen: float
    online: bool = True
    backends: list[str] = field(default_factory=lambda: ["torch"])
    cached: list[str] = field(default_factory=list)


@dataclass
class Accepted:
    """An update that passed validation and counts in the open round."""

    blob: str
    num_samples: int
    message_id: str
    train_loss: float
    seconds: float = 0.0
    """The device's training time for the task, as it reported."""
    peak_rss_bytes: int = 0
    """The device's peak resident memory during the task (unpacking, loading, training), as it reported."""
    norm: float = 0.0
    """L2 norm of the update's change from the round's start (robust aggregation clips by it)."""


@dataclass
class OpenRound:
    """The round in progress."""

    index: int
    """0-based round over the whole run."""
    selected: list[str]
    tasks: dict[str, str]
    """device -> task message id."""
    deadline: float
    accepted: dict[str, Accepted] = field(default_factory=dict)


@dataclass
class RunState:
    """The whole run, as checkpointed."""

    run_id: str
    stage: int = 0
    """1-based stage in progress (0: not started)."""
    stage_rounds_done: int = 0
    rounds_done: int = 0
    groups: list[list[int]] = field(default_factory=list)
    full_lora: str = ""
    """Blob id of the full model's LoRA (after the last closed stage)."""
    stage_lora: str = ""
    """Blob id of the stage submodel's global LoRA."""
    pack: str = ""
    """Blob id of the pack devices train from: the stage's own, or the full pack (``full_pack`` delivery)."""
    plan: str = ""
    """Blob id of the stage's signed plan (``full_pack`` delivery; empty with stage packs)."""
    full_pack: str = ""
    """Blob id of the full model's pack (``full_pack`` delivery: written once per run)."""
    devices: dict[str, Device] = field(default_factory=dict)
    open_round: OpenRound | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_down_pack: int = 0
    """Part of ``bytes_down`` that is stage packs (model weights); the rest is LoRA state."""
    started: float = 0.0
    """Wall-clock start of the run (metrics count seconds from here, across restarts)."""
    initial_eval: dict[str, Any] = field(default_factory=dict)
    """The untuned base model on the held-out set."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Per opened stage: number, layers, groups, pack blob and size."""
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    seen_messages: list[str] = field(default_factory=list)
    """Recent message ids (bounded), so a redelivered message is recognised after a restart."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Reason code -> messages and updates rejected with it (``duplicate`` counts replays)."""

    def remember(self, message_id: str, keep: int = 4096) -> bool:
        """Record a message id; False if it was already seen (a duplicate)."""
        if message_id in self.seen_messages:
            return False
        self.seen_messages.append(message_id)
        del self.seen_messages[:-keep]
        return True

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        if data.get("version") != STATE_VERSION:
            raise DataError(f"run state version {data.get('version')!r}, expected {STATE_VERSION}")
        data = {k: v for k, v in data.items() if k != "version"}
        devices = {k: Device(**v) for k, v in data.pop("devices").items()}
        open_round = data.pop("open_round")
        if open_round is not None:
            accepted = {k: Accepted(**v) for k, v in open_round.pop("accepted").items()}
            open_round = OpenRound(**open_round, accepted=accepted)
        return cls(**data, devices=devices, open_round=open_round)

    def count_rejection(self, reason: str) -> None:
        """Tally one rejected message or update under its reason code."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def save_state(directory: str | Path, state: RunState) -> None:
    """Atomically replace the checkpoint in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    with tmp.open("w") as f:
        json.dump(state.to_json(), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_FILE = "lock"


def lock_state_dir(directory: str | Path) -> IO[str]:
    """Hold ``directory`` for this process: two aggregators on one state directory would overwrite
    each other's checkpoints. The lock is the kernel's (``flock``), so it ends with the process,
    ``kill -9`` included; keep the returned file open for as long as the service runs.

    Raises:
        ConfigError: another process holds the directory (its pid is in the message).
    """
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"{directory} is in use by another aggregator (pid {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def load_state(directory: str | Path) -> RunState | None:
    """The checkpointed state, or None when there is none (a fresh run)."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    try:
        return RunState.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(f"{path}: unreadable run state ({error}); move it away to start a fresh run") from None


def now() -> float:
    """Wall clock for deadlines and last-seen times (one place to fake in tests)."""
    return time.time()
