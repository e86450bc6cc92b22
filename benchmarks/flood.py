"""The attack as the adversarial benchmark runs it: the attacker's broker accounts, and the kinds of
hostile message sent one after another, each followed by a read of the aggregator's rejection
counters, so that what the aggregator counted for a kind stands beside what it must count.

The kinds besides :data:`hostile.KINDS` need the aggregator's answers or its state: replays of
messages it handled (their ids must be in its window), a flood of chunk requests against its serving
rate, a flood of offers against its upload quota, the transfer attacks of :mod:`attacker`, and the
retained poison left before it starts (:func:`leave_poison`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attacker import TRANSFER_ATTACKS, Client, Mallory, attack_the_transfer
from hostile import HONEST, KINDS, MALLORY, Target, device_of, header_of, hostile_messages, raw, sha, up, valid_profile
from watch import During, Probe

from devft_edge.blobs import BlobInfo
from devft_edge.mqtt import BrokerLogin
from devft_edge.protocol import Envelope, Kind, ProtocolError, Reason, decode, unseal
from devft_edge.signing import Ed25519PrivateKey

logger = logging.getLogger("adversarial")

GHOST = "ghost-0"
"""Behind the ACL: the one ghost with a broker account (a device provisioned on the broker, never enrolled)."""
UPLOAD_QUOTA = 4 * 2**20
"""The aggregator's ``upload_quota_bytes`` in the benchmark: 7 of the largest offers it admits in stage 2 (0.55 MB)."""
REPLAYS = 90
REQUESTS = 100
QUOTA_OFFERS = 60
RETAINED = 10
"""Counts at scale 1 of the kinds that are not in :data:`hostile.KINDS`."""


@dataclass(frozen=True)
class Phase:
    """One kind, as sent and as counted."""

    kind: str
    what: str
    round: int
    sent: int
    expected: dict[str, int]
    """Rejections the aggregator must count, by reason."""
    counted: dict[str, int]
    """The difference of its counters over the kind."""
    answered: int = 0
    """Requests it answered instead of rejecting (chunk-request and quota floods)."""
    dropped_by_broker: int = 0
    """Messages on topics the attacker's broker accounts may not write: the ACL drops them."""
    seconds: float = 0.0
    rss_max_bytes: int = 0
    """The aggregator's largest RSS sampled while the kind was sent and handled."""

    @property
    def ok(self) -> bool:
        return self.counted == self.expected


class Attacker:
    """Mallory and, behind an ACL, the ghost's broker account; publishes each message with the account
    that may write its topic, or with mallory's when none may (the broker then drops it)."""

    def __init__(
        self,
        url: str,
        logins: dict[str, BrokerLogin],
        run_dir: Path,
        key: Ed25519PrivateKey,
        publish_rate: float = 0.0,
    ) -> None:
        """``logins``: the broker's users' logins, none when it is anonymous (and has no ACL)."""
        self.mallory = Mallory(url, run_dir, key, logins.get(MALLORY))
        self.clients: dict[str, Client] = {MALLORY: self.mallory}
        self.acl = bool(logins)
        if self.acl:
            self.clients[GHOST] = Client(url, GHOST, [], run_dir, key, logins.get(GHOST))
        self.publish_rate = publish_rate
        self.sniffer = None if self.acl else Client(url, "sniffer", [up(d) for d in HONEST], run_dir)
        """On an open broker anyone reads the honest uplinks: the replays' source. Behind the ACL nobody can."""
        self.own: list[tuple[str, bytes]] = []
        """What mallory sent on its own uplink: replayed later."""

    @property
    def key(self) -> Ed25519PrivateKey:
        assert self.mallory.key is not None  # mallory is enrolled
        return self.mallory.key

    def reaches(self, topic: str) -> bool:
        """Whether a message on ``topic`` gets past the broker."""
        return not self.acl or device_of(topic) in self.clients

    def send(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish, at most ``publish_rate`` a second (0: as fast as QoS 1 goes), and wait for the broker."""
        started = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            if self.publish_rate:
                time.sleep(max(0.0, started + i / self.publish_rate - time.monotonic()))
            self.clients.get(device_of(topic), self.mallory).publish(topic, payload)
            if device_of(topic) == MALLORY:
                self.own.append((topic, payload))
        for client in self.clients.values():
            client.flush()

    def close(self) -> None:
        for client in [*self.clients.values(), *([self.sniffer] if self.sniffer else [])]:
            client.close()


def _diff(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {
        k: now.get(k, 0) - before.get(k, 0) for k in sorted(set(now) | set(before)) if now.get(k, 0) != before.get(k, 0)
    }


class Flood:
    """Runs the kinds as phases and keeps the aggregator's counters between them."""

    def __init__(
        self, attacker: Attacker, probe: Probe, during: During, run_dir: Path, scale: float, rng: random.Random
    ) -> None:
        self.attacker, self.probe, self.during = attacker, probe, during
        self.run_dir, self.scale, self.rng = run_dir, scale, rng
        self.counters: dict[str, int] = {}
        self.phases: list[Phase] = []
        self.start: dict[str, Any] = {}
        """The open stage's LoRA (the transfer attacks' reference)."""

    @property
    def mallory(self) -> Mallory:
        return self.attacker.mallory

    def settle(self, expected: int, timeout: float = 120.0) -> dict[str, int]:
        """The counters' change since the last phase, read until it reaches ``expected`` rejections or
        has not moved for 3 s (what is missing is not coming), and the counters moved on."""
        deadline = time.monotonic() + timeout
        now = self.probe.counters()
        moved = time.monotonic()
        while sum(_diff(now, self.counters).values()) < expected:
            if time.monotonic() - moved > 3.0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
            latest = self.probe.counters()
            if latest != now:
                now, moved = latest, time.monotonic()
        change = _diff(now, self.counters)
        self.counters = now
        return change

    def record(self, kind: str, what: str, sent: int, expected: dict[str, int], started: float, **extra: int) -> Phase:
        counted = self.settle(sum(expected.values()))
        self.during.sample()  # a kind may be over between two samples of the watching thread
        phase = Phase(
            kind,
            what,
            self.mallory.task.round if self.mallory.task else -1,
            sent,
            expected,
            counted,
            seconds=round(time.monotonic() - started, 3),
            rss_max_bytes=self.during.rss_max(started),
            **extra,
        )
        self.phases.append(phase)
        logger.info(
            "%-20s sent %5d  expected %s  counted %s  RSS %.0f MB%s",
            kind,
            sent,
            expected,
            counted,
            phase.rss_max_bytes / 1e6,
            "" if phase.ok else "  MISMATCH",
        )
        return phase

    def run(self, name: str) -> Phase:
        if name in KINDS:
            return self.messages(name)
        if name in TRANSFER_ATTACKS:
            return self.transfer(name)
        return {"replay": self.replay, "request_flood": self.request_flood, "quota": self.quota}[name]()

    def messages(self, name: str) -> Phase:
        started = time.monotonic()
        assert self.mallory.task is not None
        target = Target(self.mallory.task, self.attacker.key, self.rng)
        if self.attacker.acl:
            target.ghosts = (GHOST,)
        batch = hostile_messages(target, self.scale, [name])
        expected: dict[str, int] = {}
        for message in batch:
            if self.attacker.reaches(message.topic) and message.reason is not None:
                expected[message.reason.value] = expected.get(message.reason.value, 0) + 1
        self.attacker.send([(m.topic, m.payload) for m in batch])
        dropped = sum(not self.attacker.reaches(m.topic) for m in batch)
        return self.record(name, KINDS[name].what, len(batch), expected, started, dropped_by_broker=dropped)

    def replay(self) -> Phase:
        """Sealed messages the aggregator handled, sent again byte for byte (mallory's own; on an
        open broker also the honest devices')."""
        started = time.monotonic()
        seen_log = (self.run_dir / "agg" / "state" / "seen.log").read_text().split()
        window = set(seen_log[-2048:])  # well inside the 4,096 remembered, whatever honest traffic adds
        candidates = []
        sniffed = self.attacker.sniffer.drain() if self.attacker.sniffer else []
        for topic, message, payload in sniffed:
            if message.id in window and message.sender == device_of(topic):
                candidates.append((topic, payload))
        for topic, payload in [*self.attacker.own, *((up(MALLORY), o) for o in self.mallory.offers)]:
            with contextlib.suppress(ProtocolError):
                message = decode(unseal(payload, topic, None))
                if message.id in window and message.sender == MALLORY:
                    candidates.append((topic, payload))
        assert candidates, "nothing handled to replay"
        count = math.ceil(REPLAYS * self.scale)
        self.rng.shuffle(candidates)
        batch = [candidates[i % len(candidates)] for i in range(count)]
        self.attacker.send(batch)
        honest = sum(device_of(t) != MALLORY for t, _ in batch)
        what = f"handled messages sent again ({honest} of them the honest devices')"
        return self.record("replay", what, count, {Reason.DUPLICATE.value: count}, started)

    def request_flood(self) -> Phase:
        """Chunk requests for a whole window of the pack each (4 MiB), as fast as mallory can send them."""
        started = time.monotonic()
        task = self.mallory.task
        assert task is not None
        pack = BlobInfo.from_json(task.data["pack"])
        data = {**pack.to_json(), "missing": list(range(min(64, pack.count)))}
        count = math.ceil(REQUESTS * self.scale)
        requests = [task.reply(Kind.CHUNK_REQUEST, MALLORY, data=data) for _ in range(count)]
        self.mallory.drain()
        for request in requests:
            self.mallory.publish(up(MALLORY), request)
        self.mallory.flush()
        self.probe.counters()  # everything before it handled: every answer is on its way
        answered = len(
            self.mallory.gather(
                Kind.CHUNK, 2.0, where=lambda m: m.data.get("blob") == pack.sha256 and m.data["index"] == 0
            )
        )
        what = "chunk requests for 64 chunks (4 MiB) of the pack each, back to back"
        expected = {Reason.RATE.value: count - answered}
        return self.record("request_flood", what, count, expected, started, answered=answered)

    def quota(self) -> Phase:
        """Offers of the largest update the aggregator admits, each started with one chunk, more than
        the upload quota could hold: each new offer replaces the device's previous partial upload,
        so one device holds one at a time and every offer is answered (no ``storage`` refusal)."""
        started = time.monotonic()
        task = self.mallory.task
        assert task is not None
        size = 2 * BlobInfo.from_json(task.data["lora"]).size
        offers = math.ceil(QUOTA_OFFERS * self.scale) + UPLOAD_QUOTA // size + 1
        answered, sent = 0, 0
        self.mallory.drain()
        for _ in range(offers):
            blob = self.rng.randbytes(Mallory.CHUNK)
            info, _ = self.mallory.offer(blob, claimed=sha(self.rng.randbytes(16)), size=size)
            sent += 1
            try:
                self.mallory.requested(info, timeout=2.0)
            except queue.Empty:  # refused: counted by the aggregator, and the phase shows it
                continue
            answered += 1
            self.mallory.chunk(info, 0, blob)
            sent += 1
        self.mallory.flush()
        what = (
            f"{offers} update offers of {size / 1e6:.2f} MB ({offers * size / 1e6:.1f} MB against a quota of "
            f"{UPLOAD_QUOTA / 1e6:.2f} MB), each begun with one chunk"
        )
        return self.record("quota", what, sent, {}, started, answered=answered)

    def transfer(self, name: str) -> Phase:
        started = time.monotonic()
        attack = TRANSFER_ATTACKS[name]
        repeats = max(1, math.ceil(self.scale))
        sent_before = self.mallory.sent
        counted: dict[str, int] = {}
        for _ in range(repeats):
            reason = attack_the_transfer(self.mallory, name, self.start, self.rng)
            key = "accepted" if reason is None else reason.value
            counted[key] = counted.get(key, 0) + 1
        self.mallory.flush()
        if counted != {attack.reason.value: repeats}:
            logger.warning("%s: verdicts %s", name, counted)
        expected = {attack.reason.value: repeats}
        return self.record(name, attack.what, self.mallory.sent - sent_before, expected, started)


def plan(rounds: int) -> list[list[str]]:
    """The kinds of each round: dealt out in turn over the rounds; the quota flood last."""
    names = [*KINDS, "replay", "request_flood", *TRANSFER_ATTACKS]
    per_round: list[list[str]] = [[] for _ in range(rounds)]
    for i, name in enumerate(names):
        per_round[i % rounds].append(name)
    per_round[-1].append("quota")
    return per_round


def leave_poison(attacker: Attacker, scale: float) -> int:
    """A hello whose round has 400 digits, left retained on uplinks before the aggregator starts: the
    broker hands it over at every (re)start (it once stopped the aggregator for good, issue 14). It
    must be counted as retained and nothing else. Returns how many uplinks hold one."""
    ghosts = [GHOST] if attacker.acl else [f"ghost-{i}" for i in range(math.ceil(RETAINED * scale) - 1)]
    for device in [MALLORY, *ghosts]:
        hello = Envelope(kind=Kind.HELLO, sender=device, data={"profile": valid_profile(), "n": 10**30})
        poison = raw({**header_of(hello), "round": 10**400})
        attacker.clients.get(device, attacker.mallory).publish(up(device), poison, retain=True)
    for client in attacker.clients.values():
        client.flush()
    return 1 + len(ghosts)
