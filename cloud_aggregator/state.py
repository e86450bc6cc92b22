"""The aggregator's durable run state: everything needed to resume after ``kill -9``.

Tensors (global LoRA states, packs, accepted updates) live in the content-addressed blob store
and are immutable once written; ``state.json`` only references them by sha256. A checkpoint
writes ``state.json.tmp``, fsyncs it and renames it over ``state.json`` (then fsyncs the
directory), so a crash leaves either the previous or the new state, never a torn one. An update
is *accepted* only once the checkpoint that lists it is on disk; aggregation at round close
streams over the listed update blobs, so a restart neither loses an accepted update nor counts
one twice (the list is keyed by device).

Two parts of the state change with every message and grow with the fleet, so they are kept out
of ``state.json`` (whose cost is paid, with an fsync, at every checkpoint):

* the recent message ids (:class:`SeenIds`): an append-only ``seen.log``, one id per line,
  compacted to the last ``keep`` ids when it reaches twice that;
* the device records (:class:`Device`): one small file per device, ``devices/<id>.json``,
  written by :func:`save_device` when a hello or a presence changes it.

A checkpoint thus costs the same with 10 or 10,000 remembered ids and with 1 or 1,000 devices
(issue 14: ``state.json`` had reached 219 MB, a checkpoint 3.8 s, 1,000 hellos 280 s).

Layout of a state directory::

    state.json          the run (compact JSON, no devices, no message ids)
    seen.log            recent message ids, oldest first
    devices/<id>.json   one record per device that said hello
    blobs/              the blob store (:mod:`devft_edge.blobs`)
    lock                held by the running aggregator (:func:`lock_state_dir`)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from devft_edge.errors import ConfigError, DataError
from devft_edge.protocol import DEVICE_ID, MAX_MESSAGE_ID_CHARS, MESSAGE_ID, ProtocolError, Reason

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 2
"""2: devices and message ids moved out of ``state.json``; version 1 files still load."""
READABLE_VERSIONS = (1, 2)
SEEN_FILE = "seen.log"
DEVICES_DIR = "devices"
DEFAULT_SEEN_KEEP = 4096
"""Message ids remembered. Every chunk of an upload carries an id, so on a busy fleet this may be
well under a minute of traffic; it is meant for QoS 1 redeliveries, which the broker makes on
reconnect, seconds later (replays of older messages meet the round checks, see :class:`SeenIds`)."""
MAX_CACHED = 256
"""Entries of :attr:`Device.cached` kept: a hostile hello may list many (each a blob id)."""


class SeenIds:
    """The last ``keep`` message ids, in memory and in an append-only log.

    Membership is a dict look-up; :meth:`remember` appends one line to the log (no rewrite of
    anything), and when the log has grown to ``2 * keep`` lines it is rewritten to the last
    ``keep`` (tmp file, fsync, rename), so memory holds at most ``keep`` ids and the disk at most
    ``2 * keep`` lines of at most :data:`MAX_MESSAGE_ID_CHARS` characters (about 0.5 MB at the
    default). Ids that are not ``[A-Za-z0-9_.:-]{1,64}`` are refused (``ValueError``): the store
    does not trust its callers to have checked, and a newline in an id would forge log lines.

    Durability. Each id is written to the log (one ``write`` to the kernel) before the message's
    handler runs, so a crash of the aggregator process, ``kill -9`` included, loses none. It is
    not fsync'd per id, which would put back an fsync per message; :func:`save_state` fsyncs the
    log before it writes ``state.json``, so every id handled before a checkpoint is on disk with
    that checkpoint (what ``state.json``'s former ``seen_messages`` list guaranteed, no less). An
    OS crash or power loss can lose the ids that arrived after the last checkpoint; such a
    message, redelivered or replayed, is then handled a second time, and the rest of the service
    must make that harmless. What guards it (``cloud_aggregator/service.py``):

    * every payload is sealed with the sending device's enrolled key and bound to its topic, so
      only a message the device really sent can be replayed, and only on its own topics;
    * an UPDATE must name the open run, stage and round (``_check_current``: else STALE) and come
      from a selected device; a device already accepted in the round gets a duplicate verdict,
      and accepted updates are keyed by device in the checkpoint: no update counts twice;
    * a CHUNK counts only for an awaited download of that blob (sha256-checked), a REFUSAL only in
      its own round, where applying it twice is applying it once.

    Not guarded beyond the id: a replayed HELLO rewrites the device record from the old hello
    (and re-sends the device's open task), a PRESENCE sets the online flag it carried, a
    CHUNK_REQUEST is served again (bandwidth; ``bytes_down`` counts it twice). Each is corrected by
    the device's next hello or presence, and agents say hello after every aggregator start (a new
    boot id). The same holds, crash or not, for any message older than the last ``keep`` ids: this
    store recognises redeliveries, the round checks above are what stop replays.
    """

    def __init__(self, keep: int = DEFAULT_SEEN_KEEP, ids: Iterable[str] = ()) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, not {keep}")
        self.keep = keep
        self.path: Path | None = None
        """The log; None until :meth:`attach` (ids are then in memory only)."""
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lines = 0
        """Lines in the log."""
        self._unsynced = False
        for message_id in ids:
            if MESSAGE_ID.fullmatch(message_id):
                self._add(message_id)

    @classmethod
    def open(cls, path: Path, keep: int = DEFAULT_SEEN_KEEP, earlier: Iterable[str] = ()) -> SeenIds:
        """The ids in the log at ``path`` (none if it is absent), after ``earlier`` ones (a version 1
        ``state.json``'s list). Lines that are not valid ids, such as a line torn by a crash
        mid-write, are dropped; the log is rewritten if anything was dropped or added."""
        earlier = list(earlier)
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        lines = text.split("\n")
        torn = lines.pop()  # "" when the log ends with a newline, as every complete write does
        valid = [line for line in lines if MESSAGE_ID.fullmatch(line)]
        seen = cls(keep, [*earlier, *valid])
        if torn or earlier or len(valid) != len(lines) or not path.exists():
            seen.attach(path)
        else:
            seen.path, seen._lines = path, len(lines)
            if seen._lines >= 2 * keep:
                seen._compact()
        return seen

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        """The remembered ids, oldest first."""
        return list(self._ids)

    def remember(self, message_id: str) -> bool:
        """Record ``message_id``; False if it is already remembered (a duplicate).

        Raises:
            ValueError: the id is longer than :data:`MAX_MESSAGE_ID_CHARS` or has characters
                other than ``[A-Za-z0-9_.:-]`` (or is not a string).
        """
        if not isinstance(message_id, str) or not MESSAGE_ID.fullmatch(message_id):
            shown = repr(message_id)[:80]
            raise ValueError(f"message id {shown} is not 1-{MAX_MESSAGE_ID_CHARS} characters of [A-Za-z0-9_.:-]")
        if message_id in self._ids:
            return False
        self._add(message_id)
        if self.path is not None:
            if self._lines + 1 >= 2 * self.keep:
                self._compact()
            else:
                self._append(message_id)
        return True

    def attach(self, path: Path) -> None:
        """Keep the log at ``path`` from now on, starting with the ids remembered so far."""
        self.path = path
        self._compact()

    def sync(self) -> None:
        """Flush the log to disk (an fsync; nothing to do when nothing was appended since the last)."""
        if self.path is None or not self._unsynced:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._unsynced = False

    def _add(self, message_id: str) -> None:
        self._ids[message_id] = None
        while len(self._ids) > self.keep:
            self._ids.popitem(last=False)

    def _append(self, message_id: str) -> None:
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{message_id}\n".encode())
        finally:
            os.close(fd)
        self._lines += 1
        self._unsynced = True

    def _compact(self) -> None:
        """Rewrite the log to the remembered ids (at most ``keep``): once per ``keep`` ids appended."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, "".join(f"{i}\n" for i in self._ids), fsync=True)
        self._lines = len(self._ids)
        self._unsynced = False


@dataclass
class Device:
    """A device the aggregator has heard from (persisted by :func:`save_device`)."""

    profile: dict[str, Any]
    last_seen: float
    online: bool = True
    backends: list[str] = field(default_factory=lambda: ["torch"])
    cached: list[str] = field(default_factory=list)
    """Blob ids the device holds, as its hello listed them: the first :data:`MAX_CACHED` only.
    (The whole record is bounded too: it comes from one hello, whose header is at most
    ``protocol.MAX_HEADER_BYTES``.)"""

    def __post_init__(self) -> None:
        self.cached = list(self.cached[:MAX_CACHED])


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
    refused: dict[str, dict[str, str]] = field(default_factory=dict)
    """device -> ``{"reason": code, "detail": text}`` of a task it refused (e.g. ``memory``)."""


@dataclass
class RunState:
    """The whole run, as checkpointed (fields with ``state_file: False`` metadata are kept elsewhere)."""

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
    stage_delta: str = ""
    """Blob id of FLoRA's merged global update in the stage's space (empty for the other rules)."""
    full_delta: str = ""
    """Blob id of FLoRA's merged update in full-model space (after the last closed stage)."""
    private: dict[str, dict[str, Any]] = field(default_factory=dict)
    """device -> ``{"blob", "num_samples"}``: its private factors (FedSA-LoRA's B, full-model space)
    as last uploaded, which the server only evaluates and exports with, never sends."""
    stage_budget: int = 0
    """Rounds the current stage runs (its share plus what earlier stages left; cut short when the
    adaptive advance ends it)."""
    carry: int = 0
    """Rounds a stage left unused (adaptive advance), added to the next stage's budget."""
    plateau: dict[str, Any] = field(default_factory=dict)
    """The adaptive advance's record of the current stage (:class:`devft_edge.schedule.Plateau`)."""
    devices: dict[str, Device] = field(default_factory=dict, metadata={"state_file": False})
    """Not in ``state.json``: one file per device, written by :func:`save_device`."""
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
    """Per closed stage, the round loop's record of it (as the simulator's summary has it)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    rejected: dict[str, int] = field(default_factory=dict)
    """Reason code -> messages and updates rejected with it (``duplicate`` counts replays)."""
    refusals: dict[str, int] = field(default_factory=dict)
    """Reason code -> tasks devices refused with it (``memory``: the stage did not fit the device)."""
    seen: SeenIds = field(default_factory=SeenIds, repr=False, compare=False, metadata={"state_file": False})
    """Recent message ids, so a redelivered message is recognised after a restart; not in
    ``state.json`` but in ``seen.log`` (:class:`SeenIds`), which :func:`save_state` starts."""

    def remember(self, message_id: str) -> bool:
        """Record a message id; False if it was already seen (a duplicate).

        Raises:
            ProtocolError: MALFORMED, for an id :class:`SeenIds` refuses (too long, odd characters).
        """
        try:
            return self.seen.remember(message_id)
        except ValueError as error:
            raise ProtocolError(Reason.MALFORMED, str(error)) from None

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("state_file", True)}
        data["open_round"] = None if self.open_round is None else asdict(self.open_round)
        return {"version": STATE_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        """The state in ``data``; a version 1 file's ``devices`` and ``seen_messages`` land in
        :attr:`devices` and :attr:`seen` (in memory: :func:`load_state` moves them to their files)."""
        if data.get("version") not in READABLE_VERSIONS:
            raise DataError(f"run state version {data.get('version')!r}, expected one of {READABLE_VERSIONS}")
        data = {k: v for k, v in data.items() if k != "version"}
        devices = {k: Device(**v) for k, v in data.pop("devices", {}).items()}
        seen = SeenIds(ids=data.pop("seen_messages", []))
        open_round = data.pop("open_round")
        if open_round is not None:
            accepted = {k: Accepted(**v) for k, v in open_round.pop("accepted").items()}
            open_round = OpenRound(**open_round, accepted=accepted)
        return cls(**data, devices=devices, open_round=open_round, seen=seen)

    def count_rejection(self, reason: str) -> None:
        """Tally one rejected message or update under its reason code."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def save_state(directory: str | Path, state: RunState) -> None:
    """Atomically replace the checkpoint in ``directory``.

    Its cost does not grow with the fleet or the traffic: ``state.json`` holds neither the
    devices nor the message ids. The seen-id log is fsync'd first (it is started here, with the
    ids remembered so far, the first time ``state`` is saved into ``directory``), so every id
    handled before this checkpoint is on disk with it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state.seen.path != directory / SEEN_FILE:
        state.seen.attach(directory / SEEN_FILE)
    state.seen.sync()
    text = json.dumps(state.to_json(), separators=(",", ":"), sort_keys=True)
    _write_atomically(directory / STATE_FILE, text, fsync=True)


def save_device(directory: str | Path, device_id: str, device: Device) -> None:
    """Write one device's record to ``directory/devices/<id>.json`` (tmp file + rename): what a
    hello or a presence costs, whatever the size of the fleet.

    Not fsync'd: the record is soft state. A crash of the process leaves the old or the new file
    (the rename is atomic); a power loss can also leave an old or empty one, which
    :func:`load_state` skips with a warning. Either way the device's next hello rewrites it, and
    agents say hello after every aggregator start (the status carries a new boot id).

    The number of files is the number of devices that said hello; only enrolled devices can
    (every uplink message is sealed with an enrolled key), so enrolment bounds it.

    Raises:
        DataError: ``device_id`` is not a device id (it names a file: no path tricks).
    """
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise DataError(f"device id {device_id!r} must match {DEVICE_ID.pattern}")
    folder = Path(directory) / DEVICES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    device.cached = device.cached[:MAX_CACHED]
    _write_atomically(folder / f"{device_id}.json", json.dumps(asdict(device), separators=(",", ":")), fsync=False)


def _write_atomically(path: Path, text: str, fsync: bool) -> None:
    """Replace ``path`` by ``text`` through ``<path>.tmp`` and a rename; with ``fsync``, the data
    and then the directory entry are on disk when this returns."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_devices(folder: Path) -> dict[str, Device]:
    """The records under ``folder``; an unreadable one is skipped with a warning (see :func:`save_device`)."""
    devices = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not DEVICE_ID.fullmatch(path.stem):
            continue
        try:
            devices[path.stem] = Device(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as error:
            logger.warning(
                "%s: unreadable device record skipped (%s); the device's next hello rewrites it", path, error
            )
    return devices


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


def load_state(directory: str | Path, seen_keep: int = DEFAULT_SEEN_KEEP) -> RunState | None:
    """The checkpointed state, or None when there is none (a fresh run).

    Devices come from ``devices/`` (and, for a version 1 ``state.json``, from its ``devices``,
    which the files override) and message ids from ``seen.log`` (after a version 1 file's
    ``seen_messages``); what a version 1 file held is written to the new files here, so the next
    checkpoint, which drops it from ``state.json``, loses nothing.
    """
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        state = RunState.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise DataError(f"{path}: unreadable run state ({error}); move it away to start a fresh run") from None
    saved = _load_devices(directory / DEVICES_DIR)
    for device_id, device in state.devices.items():  # version 1: move them to their files
        if device_id not in saved and DEVICE_ID.fullmatch(device_id):
            save_device(directory, device_id, device)
    state.devices.update(saved)
    state.seen = SeenIds.open(directory / SEEN_FILE, seen_keep, earlier=state.seen.ids())
    return state


def open_state(directory: str | Path, run_id: str, seen_keep: int = DEFAULT_SEEN_KEEP) -> RunState:
    """The run ``run_id`` checkpointed in ``directory``, or a fresh one whose seen-id log is
    started at once (so ids remembered before the first checkpoint are already in the log).

    Raises:
        ConfigError: ``directory`` holds another run.
        DataError: its ``state.json`` is unreadable.
    """
    directory = Path(directory)
    state = load_state(directory, seen_keep)
    if state is None:
        return RunState(run_id=run_id, seen=SeenIds.open(directory / SEEN_FILE, seen_keep))
    if state.run_id != run_id:
        raise ConfigError(f"{directory} holds run {state.run_id!r}, not {run_id!r}")
    return state


def now() -> float:
    """Wall clock for deadlines and last-seen times (one place to fake in tests)."""
    return time.time()
