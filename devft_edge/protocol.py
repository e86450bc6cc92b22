"""The wire protocol between aggregator and devices: message envelope, kinds, reason codes, topics.

``docs/protocol.md`` is the specification; this module is its single implementation, used by both
the aggregator and the agent. It works over plain MQTT 3.1.1: every message is one publish whose
payload is ``[4-byte big-endian header length][header: UTF-8 JSON][body: bytes]``. The header
names the protocol version, the message kind, the run/stage/round it belongs to, a unique
message id (handlers are idempotent: a repeated id is a duplicate) and the sender; kind-specific
fields go in ``data``. A message carries content or an error (``reason``), never both: with a
reason, ``data`` holds only what names and explains it (:data:`ERROR_FIELDS`) and the body is empty
(checked on construction, so also on decoding).

Every payload on the wire is *sealed*: the encoded envelope followed by the sender's 64-byte
ed25519 signature over the topic and the envelope (:func:`seal`). A receiver checks the seal with
the key it trusts for that topic (:func:`unseal`: the aggregator's key on a device's downlink and
the status topic, the device's enrolled key on its uplink and presence) before it parses anything;
binding the topic means a message cannot be replayed onto another device's topics.

Pure functions and frozen dataclasses only: no MQTT client, no I/O.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from devft_edge import bounded_json
from devft_edge.errors import DevFTError
from devft_edge.signing import Ed25519PrivateKey, Ed25519PublicKey, verifies

PROTOCOL_VERSION = 1
AGGREGATOR = "aggregator"
"""Sender id of the aggregator."""
MAX_HEADER_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16
"""Deepest nesting a header may have (the protocol's own headers nest 5 deep at most)."""
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Device ids: safe as MQTT topic levels, client ids and file names."""
MAX_MESSAGE_ID_CHARS = 64
"""Longest message id accepted; the protocol's own ids are uuid4 hex, 32 characters."""
MESSAGE_ID = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_MESSAGE_ID_CHARS}}}")
"""Message ids: bounded, because receivers remember recent ones, and free of line breaks and
anything a terminal interprets (the aggregator's seen-id log is one id per line)."""
MAX_RUN_CHARS = 128
"""Longest run id a header may name."""
SIGNATURE_BYTES = 64
"""Length of the ed25519 seal at the end of every payload."""
_SEAL_DOMAIN = b"devft-edge/message/v1\0"


class Kind(str, Enum):
    """Message kinds (the header's ``kind``)."""

    HELLO = "hello"  # device -> aggregator: identity, profile, backends, cached blobs
    PRESENCE = "presence"  # device -> retained presence topic: online/offline (also the last will)
    TASK = "task"  # aggregator -> device: train this stage/round from these blobs
    CHUNK = "chunk"  # either way: one chunk of a blob (body = the bytes)
    CHUNK_REQUEST = "chunk_request"  # either way: send me these chunks of this blob
    UPDATE = "update"  # device -> aggregator: my update is blob X (sample count, metrics)
    VERDICT = "verdict"  # aggregator -> device: update accepted, or rejected with a reason
    REFUSAL = "refusal"  # device -> aggregator: I will not run this task (reason)
    STATUS = "status"  # aggregator -> retained status topic: the run's progress


class Reason(str, Enum):
    """Reason codes of rejections, refusals and protocol errors."""

    MALFORMED = "malformed"  # not an envelope, bad JSON, missing fields
    VERSION = "version"  # unsupported protocol version
    UNKNOWN_DEVICE = "unknown_device"  # sender never said hello / not in the registry
    WRONG_SENDER = "wrong_sender"  # the update is not from the device the task was for
    WRONG_RUN = "wrong_run"
    STALE = "stale"  # for a stage/round that is not open (late update)
    DUPLICATE = "duplicate"  # this device already delivered an update for the round
    HASH = "hash"  # blob sha256 mismatch after reassembly
    SHAPE = "shape"  # tensor names/shapes/dtypes differ from the task's LoRA
    NOT_FINITE = "not_finite"  # NaN or inf in an update
    NORM = "norm"  # update norm above the configured bound
    PACK = "pack"  # the pack failed verification (detail: the pack's Refusal)
    MEMORY = "memory"  # the task does not fit the device's memory budget
    RETAINED = "retained"  # a retained message on an uplink: an old message replayed by the broker
    UNSIGNED = "unsigned"  # no seal, or a payload too short to carry one
    SIGNATURE = "signature"  # the seal does not verify with the key trusted for the topic
    STORAGE = "storage"  # the receiver has no room for it now (quota or disk full); retry later
    RATE = "rate"  # the sender asks faster than the receiver serves one peer
    INTERNAL = "internal"  # the receiver failed; see its log


class ProtocolError(DevFTError):
    """A message that cannot be accepted; ``reason`` is the code to log or report."""

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason.value}: {message}")


ERROR_FIELDS = frozenset({"re", "accepted", "note", "detail"})
"""What a message with a reason may carry in ``data``: the message it answers, the verdict, and
text that explains the reason."""


@dataclass(frozen=True)
class Envelope:
    """One protocol message."""

    kind: Kind
    sender: str
    run: str = ""
    stage: int = 0
    round: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    reason: Reason | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sent: float = field(default_factory=time.time)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.reason is not None and (self.body or (isinstance(self.data, dict) and self.data.keys() - ERROR_FIELDS)):
            extra = sorted(self.data.keys() - ERROR_FIELDS) if isinstance(self.data, dict) else []
            raise ValueError(f"a message with a reason carries no content (body or data {extra[:5]})")

    def encode(self) -> bytes:
        """The MQTT payload."""
        header = {
            "v": self.version,
            "kind": self.kind.value,
            "id": self.id,
            "sender": self.sender,
            "run": self.run,
            "stage": self.stage,
            "round": self.round,
            "sent": self.sent,
            "data": self.data,
        }
        if self.reason is not None:
            header["reason"] = self.reason.value
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        return struct.pack(">I", len(raw)) + raw + self.body

    def reply(self, kind: Kind, sender: str, **fields: Any) -> Envelope:
        """A message about the same run/stage/round, with ``data['re']`` naming this one."""
        data = {"re": self.id, **fields.pop("data", {})}
        return Envelope(kind=kind, sender=sender, run=self.run, stage=self.stage, round=self.round, data=data, **fields)


def decode(payload: bytes) -> Envelope:
    """Parse a payload; raises :class:`ProtocolError` (``malformed`` or ``version``) when it is not one."""
    if len(payload) < 4:
        raise ProtocolError(Reason.MALFORMED, f"payload of {len(payload)} bytes has no header length")
    (length,) = struct.unpack(">I", payload[:4])
    if length > MAX_HEADER_BYTES or 4 + length > len(payload):
        raise ProtocolError(Reason.MALFORMED, f"header length {length} exceeds the payload or the limit")
    try:
        header = bounded_json.loads(payload[4 : 4 + length], MAX_JSON_DEPTH)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(Reason.MALFORMED, f"header is not bounded JSON: {str(error)[:200]}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Reason.MALFORMED, "header is not an object")
    if type(header.get("v")) is not int or header["v"] != PROTOCOL_VERSION:  # 1.0 and true equal 1
        raise ProtocolError(Reason.VERSION, f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    try:
        kind = Kind(header["kind"])
        reason = Reason(header["reason"]) if "reason" in header else None
        envelope = Envelope(
            kind=kind,
            sender=_text(header, "sender"),
            run=_text(header, "run"),
            stage=_count(header, "stage"),
            round=_count(header, "round"),
            data=header.get("data", {}),
            body=payload[4 + length :],
            reason=reason,
            id=_text(header, "id"),
            sent=float(header.get("sent", 0.0)),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise ProtocolError(Reason.MALFORMED, f"bad header field: {error}") from None
    if not isinstance(envelope.data, dict) or not MESSAGE_ID.fullmatch(envelope.id):
        raise ProtocolError(Reason.MALFORMED, f"header needs an id matching {MESSAGE_ID.pattern} and an object 'data'")
    if len(envelope.run) > MAX_RUN_CHARS or (
        envelope.sender != AGGREGATOR and not DEVICE_ID.fullmatch(envelope.sender)
    ):
        raise ProtocolError(Reason.MALFORMED, "header's run or sender is not a valid id")
    if not math.isfinite(envelope.sent):  # NaN or an integer past float range
        raise ProtocolError(Reason.MALFORMED, "sent must be a finite number")
    return envelope


def _sealed_bytes(topic: str, payload: bytes) -> bytes:
    return _SEAL_DOMAIN + topic.encode() + b"\0" + payload


def seal(payload: bytes, topic: str, key: Ed25519PrivateKey) -> bytes:
    """``payload`` (an encoded envelope) followed by ``key``'s signature over it and ``topic``."""
    return payload + key.sign(_sealed_bytes(topic, payload))


def unseal(payload: bytes, topic: str, key: Ed25519PublicKey | None) -> bytes:
    """The envelope bytes of a sealed ``payload`` received on ``topic``, its seal checked with ``key``.

    ``key=None`` strips the seal without checking it: for read-only monitors that only display
    what they see, never for anything that acts on a message.

    Raises:
        ProtocolError: ``unsigned`` when the payload cannot hold a seal, ``signature`` when the
            seal does not verify.
    """
    if len(payload) < SIGNATURE_BYTES + 4:
        raise ProtocolError(Reason.UNSIGNED, f"payload of {len(payload)} bytes carries no seal")
    message, signature = payload[:-SIGNATURE_BYTES], payload[-SIGNATURE_BYTES:]
    if key is not None and not verifies(key, _sealed_bytes(topic, message), signature):
        raise ProtocolError(Reason.SIGNATURE, f"the seal on {topic} does not verify with the trusted key")
    return message


def _text(header: dict[str, Any], key: str) -> str:
    value = header[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _count(header: dict[str, Any], key: str) -> int:
    value = header.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a non-negative int")
    return value


def check_device_id(device_id: str) -> str:
    """``device_id`` if it is a valid id, else a :class:`ProtocolError`."""
    if not DEVICE_ID.fullmatch(device_id):
        raise ProtocolError(Reason.MALFORMED, f"device id {device_id!r} must match {DEVICE_ID.pattern}")
    return device_id


@dataclass(frozen=True)
class Topics:
    """Every topic of one fleet, built in one place.

    A device publishes only under ``<prefix>/dev/<id>/up`` and its retained presence topic and
    subscribes only to ``<prefix>/dev/<id>/down`` and the aggregator status, so a broker ACL
    pattern on the username (``%u`` = device id; ``devft_edge.ops.broker_config``) confines each
    device to its own id.
    """

    prefix: str = "devft/default"

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "#+") or self.prefix.endswith("/"):
            raise ProtocolError(Reason.MALFORMED, f"topic prefix {self.prefix!r}: no wildcards, no trailing '/'")

    def up(self, device_id: str) -> str:
        """Device -> aggregator messages of one device."""
        return f"{self.prefix}/dev/{check_device_id(device_id)}/up"

    def down(self, device_id: str) -> str:
        """Aggregator -> device messages of one device."""
        return f"{self.prefix}/dev/{check_device_id(device_id)}/down"

    def presence(self, device_id: str) -> str:
        """Retained online/offline of one device (its last will says offline)."""
        return f"{self.prefix}/dev/{check_device_id(device_id)}/presence"

    @property
    def status(self) -> str:
        """Retained aggregator status."""
        return f"{self.prefix}/agg/status"

    @property
    def all_up(self) -> str:
        """What the aggregator subscribes to: every device's uplink."""
        return f"{self.prefix}/dev/+/up"

    @property
    def all_presence(self) -> str:
        """Every device's presence."""
        return f"{self.prefix}/dev/+/presence"

    def device_of(self, topic: str) -> str:
        """The device id in a ``dev/<id>/...`` topic (checked)."""
        parts = topic[len(self.prefix) + 1 :].split("/") if topic.startswith(self.prefix + "/") else []
        if len(parts) != 3 or parts[0] != "dev":
            raise ProtocolError(Reason.MALFORMED, f"topic {topic!r} is not a device topic of {self.prefix}")
        return check_device_id(parts[1])
