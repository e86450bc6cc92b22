"""The services' message dispatch as an error boundary, with the real protocol and keys beside it:
whatever a handler raises is counted and the service goes on; retained replays are skipped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cloud_aggregator.service import Aggregator
from cloud_aggregator.state import RunState
from devft_edge.identity import Enrolment, enroll
from devft_edge.mqtt import Incoming
from devft_edge.protocol import AGGREGATOR, Envelope, Kind, Topics, seal
from devft_edge.signing import generate_keypair, load_private_key, load_public_key
from device_agent.agent import Agent

TOPICS = Topics("devft/t")


def _failing(error: Exception):
    def handler(*args: object) -> None:
        raise error

    return handler


@pytest.fixture
def aggregator(tmp_path):
    """An aggregator's dispatch over a real enrolment whose hello handler fails like a bug would."""
    private, _ = enroll("pi-1", tmp_path / "keys")
    handlers = {name: _failing(AssertionError("a bug")) for name in ("_on_hello", "_on_presence", "_on_chunk_request")}
    handlers |= {name: _failing(AssertionError("a bug")) for name in ("_on_update", "_on_chunk", "_on_refusal")}
    published: list[tuple[str, bytes, bool]] = []
    fake = SimpleNamespace(
        topics=TOPICS,
        published=published,
        connection=SimpleNamespace(
            publish=lambda topic, payload, retain=False: published.append((topic, payload, retain))
        ),
        enrolment=Enrolment(tmp_path / "keys"),
        state=RunState(run_id="r"),
        cfg=SimpleNamespace(device_keys=tmp_path / "keys"),
        **handlers,
    )
    return fake, load_private_key(private)


def test_a_handler_that_raises_anything_is_counted_as_internal_and_the_next_message_is_handled(aggregator) -> None:
    fake, key = aggregator
    topic = TOPICS.up("pi-1")
    for _ in range(2):
        hello = Envelope(kind=Kind.HELLO, sender="pi-1").encode()
        Aggregator._dispatch(fake, Incoming(topic, seal(hello, topic, key)))  # type: ignore[arg-type]
    Aggregator._dispatch(fake, Incoming(topic, b"not even an envelope"))  # type: ignore[arg-type]
    assert fake.state.rejected == {"internal": 2, "unsigned": 1}


def test_a_retained_uplink_message_is_skipped_before_its_seal_or_parse_and_cleared(aggregator) -> None:
    fake, key = aggregator
    topic = TOPICS.up("pi-1")
    hello = seal(Envelope(kind=Kind.HELLO, sender="pi-1").encode(), topic, key)
    Aggregator._dispatch(fake, Incoming(topic, hello, retained=True))  # type: ignore[arg-type]
    Aggregator._dispatch(fake, Incoming(TOPICS.up("ghost"), b"x", retained=True))  # type: ignore[arg-type]
    assert fake.state.rejected == {"retained": 2}
    assert fake.published == [(topic, b"", True), (TOPICS.up("ghost"), b"", True)]  # cleared on the broker
    Aggregator._dispatch(fake, Incoming(topic, b""))  # type: ignore[arg-type]  # the broker's echo of the clear
    assert fake.state.rejected == {"retained": 2}


def test_the_agent_skips_retained_downlink_messages_and_survives_a_failing_handler(tmp_path, caplog) -> None:
    private, public = generate_keypair(tmp_path / "agg")
    key = load_private_key(private)
    calls: list[str] = []

    def task(message: Envelope) -> None:
        calls.append(message.id)
        raise KeyError("a bug")

    fake = SimpleNamespace(topics=TOPICS, public_key=load_public_key(public), _on_task=task)
    for name in ("_on_chunk", "_on_chunk_request", "_on_verdict", "_on_status"):
        setattr(fake, name, _failing(AssertionError("unexpected")))
    down = TOPICS.down("pi-1")
    old = Envelope(kind=Kind.TASK, sender=AGGREGATOR)
    Agent._dispatch(fake, Incoming(down, seal(old.encode(), down, key), retained=True))  # type: ignore[arg-type]
    assert calls == [] and "retained" in caplog.text
    fresh = Envelope(kind=Kind.TASK, sender=AGGREGATOR)
    for _ in range(2):
        Agent._dispatch(fake, Incoming(down, seal(fresh.encode(), down, key)))  # type: ignore[arg-type]
    assert calls == [fresh.id, fresh.id] and "failed; ignored" in caplog.text
    forger = load_private_key(generate_keypair(tmp_path / "forger")[0])
    forged = Envelope(kind=Kind.TASK, sender=AGGREGATOR)
    for payload in (seal(forged.encode(), down, forger), forged.encode(), b"\x00" * 10):  # wrong key, none, junk
        Agent._dispatch(fake, Incoming(down, payload))  # type: ignore[arg-type]
    assert calls == [fresh.id, fresh.id]  # nothing but the aggregator's sealed messages reaches a handler
