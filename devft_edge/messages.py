"""The typed payloads of the protocol: one frozen dataclass per message kind's ``data``.

Handlers on both sides read the same fields; read as string keys scattered over the aggregator and
the agent, a mistyped key or a field of the wrong type is found only on the wire, one at a time.
Each payload here parses a received ``data`` in ``from_data``, which names every bad field in one
``malformed`` :class:`~devft_edge.protocol.ProtocolError` (a device's log then says all that is
wrong with a message at once), and writes what its sender puts on the wire in ``to_data``, with
the keys of ``docs/protocol.md`` unchanged, so the wire format is the same as before the types.

Keys a payload does not know are ignored: ``re``, which :meth:`Envelope.reply` adds to any
answer, and fields a newer peer may send. A reason code is never part of a payload: it travels in
the envelope (a message carries content or a reason, never both), so a sender passes it beside
the payload. Bounds that depend on the receiver's state (a chunk index within the blob, an offer's
size against the LoRA) are the receiver's checks, not the parser's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from devft_edge.blobs import MAX_CHUNKS, BlobInfo
from devft_edge.protocol import Kind, ProtocolError, Reason

MAX_SAMPLES = 2**53
"""Largest ``num_samples`` an update may declare: every integer up to it is exact as a float, so
the aggregation weights computed from it are too."""
_BOUND = 2**63
"""Largest magnitude of a reported metric: anything a device measures is far below it."""


class _Fields:
    """Reads one payload's fields, collecting a problem per bad field instead of stopping at the first.

    Each reader returns a placeholder for a bad field; :meth:`check` raises before a payload could
    be built from one.
    """

    def __init__(self, kind: Kind, data: dict[str, Any]) -> None:
        self.kind, self.data = kind, data
        self.problems: list[str] = []

    def _bad(self, key: str, want: str) -> None:
        self.problems.append(f"{key} must be {want}, got {str(self.data.get(key))[:40]}")

    def blob(self) -> BlobInfo:
        """The blob description at the top level (``blob``, ``size``, ``chunk_bytes``)."""
        try:
            return BlobInfo.from_json(self.data)
        except ProtocolError as error:
            self.problems.append(str(error).removeprefix(f"{Reason.MALFORMED.value}: "))
            return BlobInfo("0" * 64, 0, 1)

    def integer(self, key: str, low: int, high: int, default: int | None = None) -> int:
        """An int (not a bool, not a float) in ``low..high``; ``default`` when absent, if given."""
        value = self.data.get(key, default)
        if type(value) is not int or not low <= value <= high:
            self._bad(key, f"an integer in {low}..{high}")
            return low
        return value

    def number(self, key: str, default: float, nan: bool = False) -> float:
        """A bounded int or float (NaN too if ``nan``); ``default`` when absent."""
        value = self.data.get(key, default)
        if type(value) in (int, float) and (abs(value) < _BOUND or (nan and math.isnan(value))):
            return float(value)
        self._bad(key, "a number" + (" or NaN" if nan else ""))
        return 0.0

    def flag(self, key: str) -> bool:
        """A bool (required)."""
        value = self.data.get(key)
        if type(value) is not bool:
            self._bad(key, "true or false")
            return False
        return value

    def text(self, key: str, default: str = "") -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            self._bad(key, "a string")
            return default
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.data.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self._bad(key, "a list of strings")
            return default
        return tuple(value)

    def integers(self, key: str) -> tuple[int, ...]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or any(type(item) is not int for item in value):
            self._bad(key, "a list of integers")
            return ()
        return tuple(value)

    def blob_at(self, key: str) -> BlobInfo | None:
        """The blob described by the object at ``key`` (None when absent)."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self._bad(key, "a blob object")
            return None
        try:
            return BlobInfo.from_json(value)
        except ProtocolError as error:
            self.problems.append(f"{key}: " + str(error).removeprefix(f"{Reason.MALFORMED.value}: "))
            return None

    def counts(self, key: str) -> dict[str, int]:
        """Names -> non-negative integers (absent: none)."""
        value = self.data.get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()
        ):
            self._bad(key, "an object of counts")
            return {}
        return dict(value)

    def optional_number(self, key: str) -> float | None:
        """A bounded number or NaN, or None when absent or null."""
        return None if self.data.get(key) is None else self.number(key, 0.0, nan=True)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if not isinstance(value, dict):
            self._bad(key, "an object")
            return {}
        return value

    def check(self) -> None:
        """Raise ``malformed`` naming every bad field, if there is any."""
        if self.problems:
            raise ProtocolError(Reason.MALFORMED, f"{self.kind.value}: " + "; ".join(self.problems))


class Payload:
    """What every payload offers its sender: its message kind and the ``data`` it puts on the wire."""

    KIND: ClassVar[Kind]

    def to_data(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Hello(Payload):
    """A device announces itself: its profile (validated by the aggregator against the profile
    schema), the trainer backends it has and blobs it holds (so they are not sent again)."""

    KIND: ClassVar[Kind] = Kind.HELLO
    profile: dict[str, Any]
    backends: tuple[str, ...] = ("torch",)
    cached: tuple[str, ...] = ()
    agent_version: int = 1

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Hello:
        f = _Fields(cls.KIND, data)
        hello = cls(
            profile=f.mapping("profile"),
            backends=f.strings("backends", ("torch",)),
            cached=f.strings("cached", ()),
            agent_version=f.integer("agent_version", 0, 2**31, default=1),
        )
        f.check()
        return hello

    def to_data(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "backends": list(self.backends),
            "cached": list(self.cached),
            "agent_version": self.agent_version,
        }


@dataclass(frozen=True)
class Presence(Payload):
    """A device's retained online flag; its last will says offline."""

    KIND: ClassVar[Kind] = Kind.PRESENCE
    online: bool

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Presence:
        f = _Fields(cls.KIND, data)
        presence = cls(online=f.flag("online"))
        f.check()
        return presence

    def to_data(self) -> dict[str, Any]:
        return {"online": self.online}


@dataclass(frozen=True)
class UpdateOffer(Payload):
    """A device's trained update, offered for the aggregator to pull, with what it reports.

    ``num_samples`` is the aggregation weight (an int in 1..:data:`MAX_SAMPLES`: not a bool, a
    fraction or inf); the metrics are numbers a float holds, ``train_loss`` also NaN (a device that
    has no loss to report, and the value it defaults to).
    """

    KIND: ClassVar[Kind] = Kind.UPDATE
    blob: BlobInfo
    num_samples: int
    train_loss: float = math.nan
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> UpdateOffer:
        f = _Fields(cls.KIND, data)
        offer = cls(
            blob=f.blob(),
            num_samples=f.integer("num_samples", 1, MAX_SAMPLES),
            train_loss=f.number("train_loss", math.nan, nan=True),
            seconds=f.number("seconds", 0.0),
            peak_rss_bytes=int(f.number("peak_rss_bytes", 0)),
        )
        f.check()
        return offer

    def to_data(self) -> dict[str, Any]:
        return {
            **self.blob.to_json(),
            "num_samples": self.num_samples,
            "train_loss": self.train_loss,
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


@dataclass(frozen=True)
class Chunk(Payload):
    """One chunk of a blob; its bytes are the message body. ``index`` is below :data:`MAX_CHUNKS`;
    whether it fits the blob is the receiver's check."""

    KIND: ClassVar[Kind] = Kind.CHUNK
    blob: BlobInfo
    index: int

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Chunk:
        f = _Fields(cls.KIND, data)
        chunk = cls(blob=f.blob(), index=f.integer("index", 0, MAX_CHUNKS - 1))
        f.check()
        return chunk

    def to_data(self) -> dict[str, Any]:
        return {**self.blob.to_json(), "index": self.index}


@dataclass(frozen=True)
class ChunkRequest(Payload):
    """The chunks of a blob a receiver lacks (as many as it asks for: the holder serves a window)."""

    KIND: ClassVar[Kind] = Kind.CHUNK_REQUEST
    blob: BlobInfo
    missing: tuple[int, ...] = ()

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> ChunkRequest:
        f = _Fields(cls.KIND, data)
        request = cls(blob=f.blob(), missing=f.integers("missing"))
        f.check()
        return request

    def to_data(self) -> dict[str, Any]:
        return {**self.blob.to_json(), "missing": list(self.missing)}


@dataclass(frozen=True)
class Refusal(Payload):
    """A device will not run its task; the reason code is the envelope's, ``detail`` explains it."""

    KIND: ClassVar[Kind] = Kind.REFUSAL
    detail: str = ""

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Refusal:
        f = _Fields(cls.KIND, data)
        refusal = cls(detail=f.text("detail"))
        f.check()
        return refusal

    def to_data(self) -> dict[str, Any]:
        return {"detail": self.detail}


@dataclass(frozen=True)
class Verdict(Payload):
    """The aggregator's answer to an update offer (``re``: its message id); a rejection's reason
    code is the envelope's, ``note`` explains it."""

    KIND: ClassVar[Kind] = Kind.VERDICT
    re: str
    accepted: bool
    note: str = ""

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Verdict:
        f = _Fields(cls.KIND, data)
        verdict = cls(re=f.text("re"), accepted=f.flag("accepted"), note=f.text("note"))
        f.check()
        return verdict

    def to_data(self) -> dict[str, Any]:
        return {"re": self.re, "accepted": self.accepted, "note": self.note}


TRAIN_KEYS = {
    "steps": "steps",
    "batch": "batch_size",
    "seq": "seq_len",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "checkpointing": "checkpointing",
}
"""A task's ``train`` keys -> :class:`~devft_edge.training.TrainSettings` fields (the wire's short names)."""
_TRAIN_REQUIRED = ("steps", "batch", "seq", "lr")


@dataclass(frozen=True)
class Task(Payload):
    """The aggregator asks a device to train one round.

    The blobs to fetch: the stage's pack (with ``full_pack`` delivery the full pack, plus the
    stage's signed ``plan`` to fuse it), the stage's global LoRA, and FLoRA's dense ``delta``; how
    to train (every :class:`~devft_edge.training.TrainSettings` field, so a device trains exactly
    as the simulator's clients do); the rule's client half and the stage's layer map
    (:class:`~devft_edge.methods.ClientMethod`); the simulator's training and data seeds of this
    client; the round's deadline.
    """

    KIND: ClassVar[Kind] = Kind.TASK
    pack: BlobInfo
    lora: BlobInfo
    method: Any
    """:class:`~devft_edge.methods.ClientMethod` (imported when parsed: it needs torch)."""
    train: Any
    """:class:`~devft_edge.training.TrainSettings`."""
    seed: int
    data_seed: int
    deadline: float = 0.0
    plan: BlobInfo | None = None
    delta: BlobInfo | None = None

    @property
    def blobs(self) -> list[BlobInfo]:
        """Every blob the task needs, pack first."""
        return [b for b in (self.pack, self.lora, self.plan, self.delta) if b is not None]

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Task:
        from devft_edge.errors import ConfigError
        from devft_edge.methods import ClientMethod
        from devft_edge.training import TrainSettings

        f = _Fields(cls.KIND, data)
        pack, lora, plan, delta = (f.blob_at(key) for key in ("pack", "lora", "plan", "delta"))
        f.problems += [f"{key} is missing" for key in ("pack", "lora") if key not in data]
        method = train = None
        try:
            method = ClientMethod.from_json(data.get("method"))
        except ConfigError as error:
            f.problems.append(str(error))
        given = data.get("train")
        if not isinstance(given, dict):
            f.problems.append("train must be an object")
        else:
            t = _Fields(cls.KIND, given)
            values: dict[str, Any] = {}
            for key, name in TRAIN_KEYS.items():
                if key in _TRAIN_REQUIRED and key not in given:
                    t.problems.append(f"{key} is missing")
                elif key == "checkpointing":
                    values[name] = t.flag(key) if key in given else False
                elif key in ("steps", "batch", "seq"):
                    values[name] = t.integer(key, 1, 2**31)
                elif key in given:
                    values[name] = t.number(key, 0.0)
            f.problems += [f"train.{problem}" for problem in t.problems]
            if not t.problems:
                try:
                    train = TrainSettings(**values)
                except ConfigError as error:
                    f.problems.append(f"train: {error}")
        seed, data_seed = (f.integer(key, -(2**63), 2**63 - 1) for key in ("seed", "data_seed"))
        deadline = f.number("deadline", 0.0)
        f.check()
        assert pack is not None and lora is not None  # f.check() raised otherwise
        return cls(pack, lora, method, train, seed, data_seed, deadline, plan, delta)

    def to_data(self) -> dict[str, Any]:
        settings = asdict(self.train)
        blobs = {"pack": self.pack, "lora": self.lora, "plan": self.plan, "delta": self.delta}
        return {
            **{key: blob.to_json() for key, blob in blobs.items() if blob is not None},
            "method": self.method.to_json(),
            "train": {key: settings[name] for key, name in TRAIN_KEYS.items()},
            "deadline": self.deadline,
            "seed": self.seed,
            "data_seed": self.data_seed,
        }


STATUS_DEVICES = 64
"""Device ids a status lists by name (the rest are counted): agents refuse messages over 64 KiB,
and a status that grew with the fleet (1,000 ghost hellos pushed it past that once) would cut
every device off."""


@dataclass(frozen=True)
class RoundStatus:
    """The open round as a status shows it."""

    index: int
    selected: tuple[str, ...]
    accepted: tuple[str, ...]
    deadline: float


@dataclass(frozen=True)
class Status(Payload):
    """The aggregator's retained status: what ``devft-edge status``, the demo's progress bar and
    every agent (which announces itself again on a new ``boot``) read. Bounded whatever the
    fleet's size (:data:`STATUS_DEVICES`)."""

    KIND: ClassVar[Kind] = Kind.STATUS
    run: str
    boot: str
    """Changes on every aggregator start and reconnect."""
    stage: int
    stages: int
    round: int
    rounds: int
    finished: bool = False
    devices_online: tuple[str, ...] = ()
    devices_online_count: int = 0
    devices_known: int = 0
    round_open: RoundStatus | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    """Reason code -> messages and updates the aggregator rejected with it."""
    refusals: dict[str, int] = field(default_factory=dict)
    """Reason code -> tasks devices refused with it."""

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Status:
        f = _Fields(cls.KIND, data)
        round_open = None
        if data.get("round_open") is not None:
            r = _Fields(cls.KIND, f.mapping("round_open"))
            round_open = RoundStatus(
                r.integer("index", 0, 2**31),
                r.strings("selected", ()),
                r.strings("accepted", ()),
                r.number("deadline", 0.0),
            )
            f.problems += [f"round_open.{problem}" for problem in r.problems]
        status = cls(
            run=f.text("run"),
            boot=f.text("boot"),
            stage=f.integer("stage", 0, 2**31),
            stages=f.integer("stages", 0, 2**31),
            round=f.integer("round", 0, 2**31),
            rounds=f.integer("rounds", 0, 2**31),
            finished=f.flag("finished") if "finished" in data else False,
            devices_online=f.strings("devices_online", ())[:STATUS_DEVICES],
            devices_online_count=f.integer("devices_online_count", 0, 2**31, default=0),
            devices_known=f.integer("devices_known", 0, 2**31, default=0),
            round_open=round_open,
            bytes_up=f.integer("bytes_up", 0, 2**63, default=0),
            bytes_down=f.integer("bytes_down", 0, 2**63, default=0),
            eval_loss=f.optional_number("eval_loss"),
            eval_accuracy=f.optional_number("eval_accuracy"),
            rejected=f.counts("rejected"),
            refusals=f.counts("refusals"),
        )
        f.check()
        return status

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)  # tuples stay tuples: JSON writes them as lists
        data["rejected"], data["refusals"] = dict(sorted(self.rejected.items())), dict(sorted(self.refusals.items()))
        return data
