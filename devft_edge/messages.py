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
from dataclasses import dataclass
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
