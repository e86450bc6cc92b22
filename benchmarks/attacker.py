"""The attacker's MQTT clients: a bare client that seals what it publishes and opens what it receives,
and Mallory, an enrolled device selected for a round that plays every trick on the update transfer.

The transfer attacks need the aggregator's answers (its chunk requests, its verdict), so each is a
small exchange rather than a list of messages: :data:`TRANSFER_ATTACKS` names them, and each must
end in a rejecting verdict with its reason. Every attack offers a blob of its own (the round's
LoRA varied by the run's generator), so a repetition transfers afresh instead of finding its blob
already in the aggregator's store.
"""

from __future__ import annotations

import contextlib
import queue
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import torch
from hostile import MALLORY, down, sha, up
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from devft_edge.blobs import BlobInfo
from devft_edge.mqtt import BrokerAddress, BrokerLogin
from devft_edge.protocol import Envelope, Kind, ProtocolError, Reason, decode, seal, unseal
from devft_edge.signing import Ed25519PrivateKey, load_public_key


class Client:
    """A bare MQTT client: publishes raw payloads (envelopes sealed with ``key``), queues what it
    subscribed to and opens it with the aggregator's public key (``run_dir/keys/public.pem``).

    ``login`` logs in to a secured broker (``mqtts://``, a password, a client certificate) as a
    service config would; without it the broker must be anonymous.
    """

    def __init__(
        self,
        broker: str,
        client_id: str,
        subscriptions: list[str],
        run_dir: Path,
        key: Ed25519PrivateKey | None = None,
        login: BrokerLogin | None = None,
    ) -> None:
        self.key = key
        self.client_id = client_id
        self.trust = load_public_key(run_dir / "keys" / "public.pem")
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pending: list[paho.MQTTMessageInfo] = []
        self.sent = 0
        """Messages published so far."""
        address = BrokerAddress.parse(broker).with_login(login, client_id)
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if address.tls is not None:
            tls = address.tls
            self.client.tls_set(
                str(tls.ca) if tls.ca else None, str(tls.cert) if tls.cert else None, str(tls.key) if tls.key else None
            )
        self.subscriptions = subscriptions
        self.strays: list[str] = []
        """Topics of messages the broker delivered without a subscription to them (amqtt 0.12 does,
        with retained messages); kept out of the inbox."""
        self.client.on_message = self._received
        self.client.connect(address.host, address.port)
        # as the services' Connection does: with Nagle's algorithm on, a small publish after another
        # waits ~40 ms for the delayed ACK, which a latency probe would measure instead of the aggregator
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic in subscriptions:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _received(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if any(paho.topic_matches_sub(pattern, message.topic) for pattern in self.subscriptions):
            self.inbox.put((message.topic, bytes(message.payload)))
        else:
            self.strays.append(message.topic)

    def publish(self, topic: str, payload: bytes | Envelope, retain: bool = False) -> bytes:
        """QoS 1 publish of raw bytes or a sealed envelope (returned); :meth:`flush` waits until the broker has them."""
        if isinstance(payload, Envelope):
            assert self.key is not None, "an envelope needs a key to be sealed with"
            payload = seal(payload.encode(), topic, self.key)
        self.pending.append(self.client.publish(topic, payload, qos=1, retain=retain))
        self.sent += 1
        return payload

    def flush(self) -> None:
        """Wait until the broker acknowledged every publish so far."""
        for info in self.pending:
            info.wait_for_publish(60)
        self.pending.clear()

    def next(self, kind: Kind, timeout: float = 60.0, where: Callable[[Envelope], bool] = lambda m: True) -> Envelope:
        """The next received message of ``kind`` that satisfies ``where`` (others are dropped).

        Raises:
            queue.Empty: none within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            topic, payload = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            message = decode(unseal(payload, topic, self.trust))
            if message.kind is kind and where(message):
                return message

    def gather(self, kind: Kind, quiet: float, where: Callable[[Envelope], bool] = lambda m: True) -> list[Envelope]:
        """The received messages of ``kind`` that satisfy ``where`` until none came for ``quiet`` seconds."""
        found = []
        with contextlib.suppress(queue.Empty):
            while True:
                found.append(self.next(kind, quiet, where))
        return found

    def drain(self) -> list[tuple[str, Envelope, bytes]]:
        """Everything received so far that is a sealed envelope: topic, envelope and the payload as sent."""
        items = []
        while True:
            try:
                topic, payload = self.inbox.get_nowait()
            except queue.Empty:
                return items
            with contextlib.suppress(ProtocolError):
                items.append((topic, decode(unseal(payload, topic, None)), payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Mallory(Client):
    """An enrolled device, selected for the round of :attr:`task`, that attacks the update transfer."""

    CHUNK = 16384

    def __init__(self, broker: str, run_dir: Path, key: Ed25519PrivateKey, login: BrokerLogin | None = None) -> None:
        super().__init__(broker, MALLORY, [down(MALLORY)], run_dir, key, login)
        self.task: Envelope | None = None
        self.offers: list[bytes] = []
        """Every update offer as sent (replayed later, byte for byte)."""

    def offer(self, blob: bytes, claimed: str | None = None, size: int | None = None) -> tuple[BlobInfo, Envelope]:
        """Announce an update of ``blob`` (under the hash ``claimed``, default its own; of ``size`` bytes,
        default its length)."""
        assert self.task is not None
        info = BlobInfo(claimed or sha(blob), len(blob) if size is None else size, self.CHUNK)
        data = {**info.to_json(), "num_samples": 8, "train_loss": 1.0}
        message = self.task.reply(Kind.UPDATE, MALLORY, data=data)
        self.offers.append(self.publish(up(MALLORY), message))
        return info, message

    def requested(self, info: BlobInfo, timeout: float = 60.0) -> list[int]:
        """The chunks the aggregator asks for next of ``info``."""
        request = self.next(Kind.CHUNK_REQUEST, timeout, where=lambda m: m.data.get("blob") == info.sha256)
        return list(request.data["missing"])

    def chunk(self, info: BlobInfo, index: object, body: bytes) -> None:
        assert self.task is not None
        data = {**info.to_json(), "index": index}
        self.publish(up(MALLORY), self.task.reply(Kind.CHUNK, MALLORY, data=data, body=body))

    def piece(self, blob: bytes, index: int) -> bytes:
        return blob[index * self.CHUNK : (index + 1) * self.CHUNK]

    def send_asked(self, info: BlobInfo, blob: bytes) -> None:
        """The chunks the aggregator asks for first: all of them, for the blobs of the attacks (at most
        a window, 64 chunks)."""
        for index in self.requested(info):
            self.chunk(info, index, self.piece(blob, index))

    def verdict(self, *updates: Envelope) -> Envelope:
        ids = {u.id for u in updates}
        return self.next(Kind.VERDICT, where=lambda m: m.data.get("re") in ids)

    def pull(self, description: dict[str, Any]) -> bytes:
        """A blob of the open stage, fetched like an agent does."""
        assert self.task is not None
        info = BlobInfo.from_json(description)
        data = {**info.to_json(), "missing": list(range(info.count))}
        self.publish(up(MALLORY), self.task.reply(Kind.CHUNK_REQUEST, MALLORY, data=data))
        chunks: dict[int, bytes] = {}
        while len(chunks) < info.count:
            message = self.next(Kind.CHUNK, where=lambda m: m.data.get("blob") == info.sha256)
            chunks[message.data["index"]] = message.body
        return b"".join(chunks[i] for i in range(info.count))

    def start_lora(self) -> dict[str, Tensor]:
        """The LoRA the task's round starts from (the updates' reference)."""
        assert self.task is not None
        return safetensors_load(self.pull(self.task.data["lora"]))


# ---- transfer attacks ----------------------------------------------------------------------------


def _varied(start: dict[str, Tensor], rng: random.Random) -> dict[str, Tensor]:
    """``start`` with one value of its last tensor raised by a random whole number (so that it stays
    distinct as an integer too): a blob no earlier attack offered."""
    last = sorted(start)[-1]
    changed = start[last].clone()
    changed.view(-1)[rng.randrange(changed.numel())] += rng.randint(1, 2**20)
    return {**start, last: changed}


def _with_nan(start: dict[str, Tensor], rng: random.Random) -> bytes:
    first = sorted(start)[0]
    varied = _varied(start, rng)
    return safetensors_save({**varied, first: torch.full_like(start[first], float("nan"))})


Attack = Callable[["Mallory", dict[str, Tensor], random.Random], list[Envelope]]


@dataclass(frozen=True)
class TransferAttack:
    """One trick on the transfer; ``run`` returns the offers whose verdict must reject with ``reason``."""

    name: str
    what: str
    reason: Reason
    run: Attack


def _bad_index(index: Callable[[int], object]) -> Attack:
    def run(mallory: Mallory, start: dict[str, Tensor], rng: random.Random) -> list[Envelope]:
        blob = _with_nan(start, rng)
        info, offer = mallory.offer(blob)
        assert info.count >= 3, "the attacks need an update of several chunks"
        mallory.requested(info)
        mallory.chunk(info, index(info.count), mallory.piece(blob, 0))
        return [offer]

    return run


def _oversize_chunk(mallory: Mallory, start: dict[str, Tensor], rng: random.Random) -> list[Envelope]:
    blob = _with_nan(start, rng)
    info, offer = mallory.offer(blob)
    mallory.requested(info)
    mallory.chunk(info, 0, mallory.piece(blob, 0) + b"\x00" * 10)
    return [offer]


def _hash(mallory: Mallory, start: dict[str, Tensor], rng: random.Random) -> list[Envelope]:
    blob = _with_nan(start, rng)
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    info, offer = mallory.offer(bytes(tampered), claimed=sha(blob))
    mallory.send_asked(info, bytes(tampered))
    return [offer]


def _shape_resumed(mallory: Mallory, start: dict[str, Tensor], rng: random.Random) -> list[Envelope]:
    """Out of order with a chunk lost; offered again, only the lost chunk may be asked for."""
    first = sorted(start)[0]
    varied = _varied(start, rng)
    blob = safetensors_save({**varied, first: start[first][:-1].contiguous()})
    info, offer = mallory.offer(blob)
    asked = mallory.requested(info)
    assert asked == list(range(info.count)), asked
    lost = 1
    for index in reversed(asked):
        if index != lost:
            mallory.chunk(info, index, mallory.piece(blob, index))
    info, again = mallory.offer(blob)
    assert mallory.requested(info) == [lost], "a resumed upload asks for the lost chunk only"
    mallory.chunk(info, lost, mallory.piece(blob, lost))
    return [offer, again]


def _complete(make: Callable[[dict[str, Tensor], random.Random], bytes]) -> Attack:
    def run(mallory: Mallory, start: dict[str, Tensor], rng: random.Random) -> list[Envelope]:
        blob = make(start, rng)
        info, offer = mallory.offer(blob)
        mallory.send_asked(info, blob)
        return [offer]

    return run


TRANSFER_ATTACKS: dict[str, TransferAttack] = {
    attack.name: attack
    for attack in [
        TransferAttack(
            "chunk_index_past_end",
            "a chunk numbered past the blob's end",
            Reason.MALFORMED,
            _bad_index(lambda n: n + 2),
        ),
        TransferAttack("chunk_index_text", "a chunk numbered 'x'", Reason.MALFORMED, _bad_index(lambda n: "x")),
        TransferAttack("oversize_chunk", "a chunk 10 bytes longer than its slot", Reason.MALFORMED, _oversize_chunk),
        TransferAttack("hash", "chunks that reassemble to another sha256 than offered", Reason.HASH, _hash),
        TransferAttack(
            "shape_resumed",
            "a tensor one row short, sent out of order with a chunk lost, resumed",
            Reason.SHAPE,
            _shape_resumed,
        ),
        TransferAttack(
            "dtype",
            "the LoRA as int32",
            Reason.SHAPE,
            _complete(lambda s, rng: safetensors_save({k: v.to(torch.int32) for k, v in _varied(s, rng).items()})),
        ),
        TransferAttack("not_finite", "a tensor of NaN", Reason.NOT_FINITE, _complete(_with_nan)),
        TransferAttack(
            "not_safetensors",
            "20,000 random bytes",
            Reason.SHAPE,
            _complete(lambda s, rng: rng.randbytes(20000)),
        ),
    ]
}


def attack_the_transfer(mallory: Mallory, name: str, start: dict[str, Tensor], rng: random.Random) -> Reason | None:
    """Run one transfer attack; the reason of the verdict on it (None: the update was accepted)."""
    offers = TRANSFER_ATTACKS[name].run(mallory, start, rng)
    verdict = mallory.verdict(*offers)
    return None if verdict.data["accepted"] else verdict.reason
