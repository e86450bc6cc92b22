"""Hostile messages against a running aggregator: one registered kind per attack, each with the reason
code the aggregator must count for it.

Mallory is an enrolled device selected for the open round (:attr:`Target.task` is its task); the
honest devices are enrolled too and ghosts are not. Every payload is sealed with mallory's key, so
what it sends on its own uplink reaches the parser and must be refused there with the kind's reason;
on an honest device's uplink the seal does not verify (``signature``), and a ghost is refused as
``unknown_device``, both before a byte is parsed. None of them may change the run. A kind's
messages depend only on the task and a seeded generator, so a run can be repeated message for
message; what needs the aggregator's answers (replays, transfers, floods against its limits) is in
``attacker.py`` and ``adversarial.py``.

Used by ``benchmarks/adversarial.py`` (thousands of messages, both brokers) and by
``tests/test_system_failures.py`` through it (the subset ``make test`` runs).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from devft_edge.blobs import BlobInfo
from devft_edge.profiles import load_profile
from devft_edge.protocol import MAX_HEADER_BYTES, Envelope, Kind, Reason, seal
from devft_edge.signing import Ed25519PrivateKey

PREFIX = "devft/t"
"""Topic prefix of the fleet ``t`` that ``tests/system_harness.write_configs`` sets up."""
MALLORY = "mallory"
HONEST = ("dev-0", "dev-1")


def up(device: str) -> str:
    """A device's uplink."""
    return f"{PREFIX}/dev/{device}/up"


def down(device: str) -> str:
    """A device's downlink."""
    return f"{PREFIX}/dev/{device}/down"


def device_of(topic: str) -> str:
    """The device id in a ``dev/<id>/...`` topic."""
    return topic.split("/")[-2]


def valid_profile() -> dict[str, Any]:
    """A profile every stage of the tiny model fits, as an agent's hello carries it."""
    return load_profile("x86-cpu").model_dump(mode="json", exclude={"name"})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw(header: object, body: bytes = b"") -> bytes:
    """An envelope around any JSON header (the encoder would refuse most of what the attacks need)."""
    encoded = json.dumps(header).encode()
    return struct.pack(">I", len(encoded)) + encoded + body


def header_of(message: Envelope) -> dict[str, Any]:
    """The JSON header ``message`` encodes to."""
    payload = message.encode()
    (length,) = struct.unpack(">I", payload[:4])
    return json.loads(payload[4 : 4 + length])


@dataclass
class Target:
    """What the hostile messages are made against: mallory's task in the open round, its key, the
    device ids to use and the generator that makes the run repeatable."""

    task: Envelope
    key: Ed25519PrivateKey
    rng: random.Random
    honest: tuple[str, ...] = HONEST
    ghosts: tuple[str, ...] = tuple(f"ghost-{i}" for i in range(1000))
    """Devices that are not enrolled. Behind the generated ACL only those with a broker account of
    their own reach the aggregator (see ``adversarial.py``); on an open broker any id does."""

    def ghost(self, i: int) -> str:
        return self.ghosts[i % len(self.ghosts)]

    @property
    def uplinks(self) -> list[str]:
        """The enrolled devices' uplinks: the honest ones and mallory's."""
        return [up(d) for d in (*self.honest, MALLORY)]

    def fake_blob(self) -> dict[str, Any]:
        """A plausible description of a blob nobody has."""
        return BlobInfo(sha(self.rng.randbytes(8)), 1000, 16384).to_json()

    def message(self, kind: Kind, sender: str, **fields: Any) -> Envelope:
        """A message about the open run, stage and round (``fields`` override)."""
        base = {"run": self.task.run, "stage": self.task.stage, "round": self.task.round}
        return Envelope(kind=kind, sender=sender, **{**base, **fields})

    def update(self, sender: str, **fields: Any) -> Envelope:
        """An update offer of a fake blob; ``data=`` entries override its fields."""
        data = {**self.fake_blob(), "num_samples": 8, "train_loss": 1.0, **fields.pop("data", {})}
        return self.message(Kind.UPDATE, sender, data=data, **fields)

    @cached_property
    def header(self) -> dict[str, Any]:
        """The header of one of mallory's updates, for variations."""
        return header_of(self.update(MALLORY))

    @cached_property
    def sample(self) -> bytes:
        """One of mallory's updates, encoded."""
        return self.update(MALLORY).encode()

    def expected(self, topic: str, payload: bytes, reason: Reason | None) -> Reason | None:
        """What the aggregator counts for ``payload`` sealed by mallory on ``topic`` when it would count
        ``reason`` on mallory's own uplink: the topic's checks come first."""
        device = device_of(topic)
        if device not in (*self.honest, MALLORY):
            return Reason.UNKNOWN_DEVICE
        if len(payload) < 4:
            return Reason.UNSIGNED  # sealed, still too short to be a sealed envelope at all
        return reason if device == MALLORY else Reason.SIGNATURE


Make = Callable[[Target, int], tuple[str, "bytes | Envelope"]]


@dataclass(frozen=True)
class MessageKind:
    """One attack: ``make(target, i)`` is its ``i``-th (topic, payload), ``count`` of them at scale 1."""

    name: str
    what: str
    count: int
    reason: Reason | None
    """What the aggregator counts for it on mallory's uplink; None: it accepts it (bounded)."""
    make: Make
    sealed_by_make: bool = False
    """``make`` returns the payload as sent (its seal missing or wrong on purpose)."""

    def scaled(self, scale: float) -> int:
        """How many messages at ``scale``: at least one."""
        return max(1, math.ceil(self.count * scale))


@dataclass(frozen=True)
class Hostile:
    """One message as sent and the reason it must be refused with (None: accepted)."""

    kind: str
    topic: str
    payload: bytes
    reason: Reason | None


KINDS: dict[str, MessageKind] = {}
"""Every kind, in the order a run sends them."""


def kind(
    name: str, count: int, reason: Reason | None, what: str, sealed_by_make: bool = False
) -> Callable[[Make], Make]:
    """Register ``make`` as the kind ``name``."""

    def register(make: Make) -> Make:
        assert name not in KINDS, name
        KINDS[name] = MessageKind(name, what, count, reason, make, sealed_by_make)
        return make

    return register


def hostile_messages(target: Target, scale: float = 1.0, kinds: list[str] | None = None) -> list[Hostile]:
    """The messages of ``kinds`` (default: all), ``scale`` times their counts (about 1,100 at 1)."""
    out = []
    for spec in (KINDS[name] for name in kinds or KINDS):
        for i in range(spec.scaled(scale)):
            topic, payload = spec.make(target, i)
            encoded = payload.encode() if isinstance(payload, Envelope) else payload
            if spec.sealed_by_make:  # an empty payload is what clearing a retained message looks like: ignored
                out.append(Hostile(spec.name, topic, encoded, spec.reason if encoded else None))
            else:
                sealed = seal(encoded, topic, target.key)
                out.append(Hostile(spec.name, topic, sealed, target.expected(topic, encoded, spec.reason)))
    return out


# ---- not an envelope at all ---------------------------------------------------------------------


@kind("garbage", 120, Reason.MALFORMED, "0-300 random bytes on any uplink")
def _garbage(t: Target, i: int) -> tuple[str, bytes]:
    return t.rng.choice([*t.uplinks, up(t.ghost(i))]), t.rng.randbytes(t.rng.randint(0, 300))


@kind("truncated", 100, Reason.MALFORMED, "an update cut short anywhere in its header")
def _truncated(t: Target, i: int) -> tuple[str, bytes]:
    (length,) = struct.unpack(">I", t.sample[:4])
    return up(MALLORY), t.sample[: t.rng.randrange(0, 4 + length)]


@kind("header_length", 100, Reason.MALFORMED, "a header length past the payload, past 64 KiB, or short of the JSON")
def _header_length(t: Target, i: int) -> tuple[str, bytes]:
    (length,) = struct.unpack(">I", t.sample[:4])
    lies = [
        lambda: struct.pack(">I", length + t.rng.randint(1, 5000)) + t.sample[4 : 4 + length],
        lambda: struct.pack(">I", t.rng.randint(MAX_HEADER_BYTES + 1, 2**32 - 1)) + t.sample[4:],
        lambda: struct.pack(">I", t.rng.randint(1, length - 1)) + t.sample[4:],
    ]
    return up(MALLORY), lies[i % 3]()


@kind("not_an_object", 10, Reason.MALFORMED, "a header that is JSON but not an object")
def _not_an_object(t: Target, i: int) -> tuple[str, bytes]:
    return up(MALLORY), raw(t.rng.choice([[1, 2], "hello", None, 3.5]))


# ---- envelopes with a bad version, kind or field ------------------------------------------------


@kind("version", 60, Reason.VERSION, "protocol version 0, 2, 99, '1', null, -1, or none")
def _version(t: Target, i: int) -> tuple[str, bytes]:
    versions: list[object] = [0, 2, 99, "1", None, -1]
    if i % 7 == 6:
        return up(MALLORY), raw({k: v for k, v in t.header.items() if k != "v"})
    return up(MALLORY), raw({**t.header, "v": versions[i % len(versions)]})


@kind("message_kind", 40, Reason.MALFORMED, "kind 'dance', '', 'UPDATE', 7, null, or none")
def _message_kind(t: Target, i: int) -> tuple[str, bytes]:
    kinds: list[object] = ["dance", "", "UPDATE", 7, None]
    if i % 6 == 5:
        return up(MALLORY), raw({k: v for k, v in t.header.items() if k != "kind"})
    return up(MALLORY), raw({**t.header, "kind": kinds[i % len(kinds)]})


@kind("aggregator_kind", 21, Reason.MALFORMED, "a task, verdict or status from a device")
def _aggregator_kind(t: Target, i: int) -> tuple[str, Envelope]:
    return up(MALLORY), t.message([Kind.TASK, Kind.VERDICT, Kind.STATUS][i % 3], MALLORY)


@kind("bad_field", 40, Reason.MALFORMED, "stage -1, round '3', sender 5, id '' or 7, data [] or 'x', sent 'noon'")
def _bad_field(t: Target, i: int) -> tuple[str, bytes]:
    fields: list[tuple[str, object]] = [
        ("stage", -1),
        ("round", "3"),
        ("sender", 5),
        ("id", ""),
        ("id", 7),
        ("data", []),
        ("data", "x"),
        ("sent", "noon"),
    ]
    key, value = fields[i % len(fields)]
    return up(MALLORY), raw({**t.header, key: value})


@kind("long_id", 20, Reason.MALFORMED, "message ids of 65, 200 or 4,000 characters, or with a newline or a '/'")
def _long_id(t: Target, i: int) -> tuple[str, Envelope]:
    ids = ["a" * 65, "b" * 200, "c" * 4000, "ok\nforged-line", "../../state.json"]
    return up(MALLORY), t.update(MALLORY, id=ids[i % len(ids)])


# Valid JSON past the parser's bounds; each of these once stopped the aggregator (issue 14).


def _past_bounds(t: Target, old: str, new: str) -> tuple[str, bytes]:
    text = json.dumps(t.header)
    assert old in text, old
    encoded = text.replace(old, new, 1).encode()
    return up(MALLORY), struct.pack(">I", len(encoded)) + encoded


@kind("huge_int", 5, Reason.MALFORMED, "a round of 5,000 digits (quadratic to parse)")
def _huge_int(t: Target, i: int) -> tuple[str, bytes]:
    return _past_bounds(t, '"round": ' + json.dumps(t.task.round), '"round": ' + "7" * 5000)


@kind("deep_json", 5, Reason.MALFORMED, "data nested 20,000 deep (recursion)")
def _deep_json(t: Target, i: int) -> tuple[str, bytes]:
    return _past_bounds(t, '"data": {', '"data": {"z": ' + "[" * 20000 + "]" * 20000 + ", ")


@kind("float_overflow", 5, Reason.MALFORMED, "sent 1e400 (a float past its range)")
def _float_overflow(t: Target, i: int) -> tuple[str, bytes]:
    return _past_bounds(t, '"sent": ' + json.dumps(t.header["sent"]), '"sent": 1e400')


@kind("infinity", 5, Reason.MALFORMED, "size Infinity")
def _infinity(t: Target, i: int) -> tuple[str, bytes]:
    return _past_bounds(t, '"data": {', '"data": {"size": Infinity, ')


# ---- devices that are not enrolled, or say hello wrongly -----------------------------------------


@kind("ghost", 80, Reason.UNKNOWN_DEVICE, "update, chunk request or refusal from a device that is not enrolled")
def _ghost(t: Target, i: int) -> tuple[str, Envelope]:
    ghost = t.ghost(i)
    if i % 8 < 5:
        return up(ghost), t.update(ghost)
    if i % 8 < 7:
        return up(ghost), t.message(Kind.CHUNK_REQUEST, ghost, data={**t.task.data["lora"], "missing": [0]})
    return up(ghost), t.task.reply(Kind.REFUSAL, ghost, reason=Reason.MEMORY)


@kind("bad_profile", 30, Reason.MALFORMED, "hello with profile {memory: 1}, null, a name, {}, or an extra field")
def _bad_profile(t: Target, i: int) -> tuple[str, Envelope]:
    profiles: list[object] = [{"memory": 1}, None, "x86-cpu", {}, {**valid_profile(), "name": "x"}]
    return up(MALLORY), Envelope(kind=Kind.HELLO, sender=MALLORY, data={"profile": profiles[i % len(profiles)]})


@kind("bad_hello_lists", 8, Reason.MALFORMED, "hello with backends or cached not a list of strings")
def _bad_hello_lists(t: Target, i: int) -> tuple[str, Envelope]:
    lists: list[dict[str, object]] = [{"backends": 5}, {"backends": [1, 2]}, {"cached": 7}, {"cached": [None]}]
    data = {"profile": valid_profile(), **lists[i % len(lists)]}
    return up(MALLORY), Envelope(kind=Kind.HELLO, sender=MALLORY, data=data)


def _cached_hello(t: Target, ids: int) -> Envelope:
    cached = [sha(t.rng.randbytes(8)) for _ in range(ids)]
    return Envelope(kind=Kind.HELLO, sender=MALLORY, data={"profile": valid_profile(), "cached": cached})


@kind("huge_cached", 5, Reason.MALFORMED, "hello listing 1,100 cached blobs: a 75 KB header, past 64 KiB")
def _huge_cached(t: Target, i: int) -> tuple[str, Envelope]:
    return up(MALLORY), _cached_hello(t, 1100)


@kind("long_cached", 5, None, "hello listing 900 cached blobs (61 KB): accepted, the first 256 kept")
def _long_cached(t: Target, i: int) -> tuple[str, Envelope]:
    return up(MALLORY), _cached_hello(t, 900)


# ---- someone else's id, run, stage or round ------------------------------------------------------


@kind("forged_sender", 80, Reason.WRONG_SENDER, "another device's id (or the aggregator's) in the header")
def _forged_sender(t: Target, i: int) -> tuple[str, Envelope]:
    topic, sender = [("dev-0", "dev-1"), ("dev-1", MALLORY), (MALLORY, "dev-0"), ("dev-0", "aggregator")][i % 4]
    kind_ = [Kind.UPDATE, Kind.HELLO, Kind.CHUNK, Kind.CHUNK_REQUEST, Kind.REFUSAL][i % 5]
    data = {"profile": valid_profile()} if kind_ is Kind.HELLO else {**t.fake_blob(), "index": 0, "missing": [0]}
    return up(topic), t.message(kind_, sender, data=data)


@kind("wrong_run", 70, Reason.WRONG_RUN, "an update or refusal naming another run")
def _wrong_run(t: Target, i: int) -> tuple[str, Envelope]:
    if i % 7 == 6:
        return up(MALLORY), t.message(Kind.REFUSAL, MALLORY, run="other-run")
    topic = t.uplinks[i % 3]
    return topic, t.update(device_of(topic), run=["other-run", "", f"{t.task.run}-2"][i % 3])


@kind("stale", 70, Reason.STALE, "an update or refusal for a later round or another stage")
def _stale(t: Target, i: int) -> tuple[str, Envelope]:
    if i % 7 == 6:
        return up(MALLORY), t.message(Kind.REFUSAL, MALLORY, round=t.task.round + 1 + i)
    topic = t.uplinks[i % 3]
    moved = {"round": t.task.round + t.rng.randint(1, 50)} if i % 2 else {"stage": t.task.stage + 1}
    return topic, t.update(device_of(topic), **moved)


# ---- blobs nobody awaits or holds, or described absurdly -----------------------------------------


@kind("unawaited_chunk", 60, Reason.STALE, "a 1000-byte chunk of an upload nobody asked for")
def _unawaited_chunk(t: Target, i: int) -> tuple[str, Envelope]:
    device = [*t.honest, MALLORY, t.ghost(i)][i % 4]
    data = {**t.fake_blob(), "index": 0}
    return up(device), t.message(Kind.CHUNK, device, data=data, body=t.rng.randbytes(1000))


@kind("unknown_blob", 40, Reason.STALE, "a chunk request for a blob that is not the open stage's")
def _unknown_blob(t: Target, i: int) -> tuple[str, Envelope]:
    topic = t.uplinks[i % 3]
    return topic, t.message(Kind.CHUNK_REQUEST, device_of(topic), data=t.fake_blob())


@kind("bad_missing", 15, Reason.MALFORMED, "a chunk request for 'all', ['x'], 5, [null] or [[1]] of the LoRA")
def _bad_missing(t: Target, i: int) -> tuple[str, Envelope]:
    missing: list[object] = ["all", ["x"], 5, [None], [[1]]]
    data = {**t.task.data["lora"], "missing": missing[i % len(missing)]}
    return up(MALLORY), t.message(Kind.CHUNK_REQUEST, MALLORY, data=data)


@kind(
    "absurd_chunking",
    12,
    Reason.MALFORMED,
    "a chunk request describing the pack in chunks of 1 byte or 64 MiB, as 10**12 bytes, or the LoRA in 1 KiB chunks",
)
def _absurd_chunking(t: Target, i: int) -> tuple[str, Envelope]:
    pack, lora = t.task.data["pack"], t.task.data["lora"]
    lies = [{**pack, "chunk_bytes": 1}, {**pack, "chunk_bytes": 64 * 2**20}, {**pack, "size": 10**12}]
    lies.append({**lora, "chunk_bytes": 1024})
    data = {**lies[i % len(lies)], "missing": [0]}
    return up(MALLORY), t.message(Kind.CHUNK_REQUEST, MALLORY, data=data)


# ---- updates that must be refused before anything is pulled --------------------------------------


@kind("bad_blob", 20, Reason.MALFORMED, "an update or chunk with blob 'xyz' or null, size -1 or chunk_bytes 0")
def _bad_blob(t: Target, i: int) -> tuple[str, Envelope]:
    bad: dict[str, object] = [{"blob": "xyz"}, {"size": -1}, {"chunk_bytes": 0}, {"blob": None}][i % 4]
    if i % 5 == 4:
        return up(MALLORY), t.message(Kind.CHUNK, MALLORY, data={**t.fake_blob(), **bad, "index": 0}, body=b"x")
    return up(MALLORY), t.update(MALLORY, data=bad)


@kind("huge_offer", 20, Reason.SHAPE, "an update offer of 1 GB to 4.6 EB (the LoRA is ~0.1 MB)")
def _huge_offer(t: Target, i: int) -> tuple[str, Envelope]:
    size = [10**12, 2**40, 10**9, 2**62][i % 4]
    return up(MALLORY), t.update(MALLORY, data={"size": size, "chunk_bytes": 65536})


@kind("bad_numbers", 10, Reason.MALFORMED, "the unchanged LoRA offered with 0, -3, 1.5, true, 'many' samples or such")
def _bad_numbers(t: Target, i: int) -> tuple[str, Envelope]:
    metadata: list[dict[str, object]] = [
        {"num_samples": 0},
        {"num_samples": -3},
        {"num_samples": "many"},
        {"num_samples": None},
        {"num_samples": 1.5},
        {"num_samples": True},
        {"num_samples": float("inf")},
        {"num_samples": 10**400},
        {"train_loss": "low"},
        {"train_loss": [1]},
    ]
    return up(MALLORY), t.update(MALLORY, data={**t.task.data["lora"], **metadata[i % len(metadata)]})


# ---- mallory's own messages without its seal, sealed for another topic, or too short -------------


@kind("unsealed", 30, Reason.SIGNATURE, "an update without a seal (its last 64 bytes taken for one)", True)
def _unsealed(t: Target, i: int) -> tuple[str, bytes]:
    return up(MALLORY), t.update(MALLORY).encode()


@kind("other_topic_seal", 30, Reason.SIGNATURE, "an update sealed for dev-0's uplink, sent on mallory's", True)
def _other_topic_seal(t: Target, i: int) -> tuple[str, bytes]:
    return up(MALLORY), seal(t.update(MALLORY).encode(), up("dev-0"), t.key)


@kind("too_short", 30, Reason.UNSIGNED, "0-67 bytes: too short to carry a seal (0 bytes: ignored, uncounted)", True)
def _too_short(t: Target, i: int) -> tuple[str, bytes]:
    return up(MALLORY), t.update(MALLORY).encode()[: t.rng.randrange(0, 68)]
