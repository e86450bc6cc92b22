"""Device identities and sealed messages: what a receiver accepts before it parses a byte."""

from __future__ import annotations

import pytest

from devft_edge.errors import ConfigError
from devft_edge.identity import Enrolment, enroll, identity
from devft_edge.protocol import Envelope, Kind, ProtocolError, Reason, decode, seal, unseal
from devft_edge.signing import generate_keypair, load_private_key, load_public_key

TOPIC = "devft/t/dev/pi-1/up"


def _keys(tmp_path, name="k"):
    private, public = generate_keypair(tmp_path / name)
    return load_private_key(private), load_public_key(public)


def test_a_sealed_message_opens_only_with_its_key_on_its_topic(tmp_path) -> None:
    key, public = _keys(tmp_path)
    _, other = _keys(tmp_path, "other")
    payload = Envelope(kind=Kind.HELLO, sender="pi-1").encode()
    sealed = seal(payload, TOPIC, key)
    assert unseal(sealed, TOPIC, public) == payload
    assert decode(unseal(sealed, TOPIC, public)).sender == "pi-1"
    cases = {
        "other key": (sealed, TOPIC, other),
        "other topic": (sealed, "devft/t/dev/pi-2/up", public),  # no replay onto another device's topics
        "tampered": (sealed[:10] + bytes([sealed[10] ^ 1]) + sealed[11:], TOPIC, public),
        "unsealed": (payload + bytes(64), TOPIC, public),
    }
    for what, (data, topic, trusted) in cases.items():
        with pytest.raises(ProtocolError) as error:
            unseal(data, topic, trusted)
        assert error.value.reason is Reason.SIGNATURE, what
    with pytest.raises(ProtocolError) as error:
        unseal(b"\x00\x00\x00\x02{}", TOPIC, public)
    assert error.value.reason is Reason.UNSIGNED


def test_header_ids_are_bounded() -> None:
    for fields in ({"id": "x" * 65}, {"id": "a\nb"}, {"sender": "../etc"}, {"run": "r" * 129}):
        with pytest.raises(ProtocolError) as error:
            decode(Envelope(kind=Kind.HELLO, **{"sender": "pi-1", **fields}).encode())
        assert error.value.reason is Reason.MALFORMED, fields


def test_enrolment_finds_enrolled_devices_and_bounds_lookups_of_unknown_ones(tmp_path) -> None:
    keys = tmp_path / "device_keys"
    private, enrolled = enroll("pi-1", keys)
    assert private.stat().st_mode & 0o777 == 0o600
    assert (keys / "private").stat().st_mode & 0o777 == 0o700
    enrolment = Enrolment(keys, recheck_s=10.0)
    assert enrolment.key("pi-1", clock=0.0) is not None
    assert enrolment.key("pi-2", clock=0.0) is None
    enroll("pi-2", keys)  # enrolled while the aggregator runs: seen after the recheck interval
    assert enrolment.key("pi-2", clock=5.0) is None
    assert enrolment.key("pi-2", clock=11.0) is not None
    (keys / "junk.pem").write_text("not a key")
    assert enrolment.key("junk", clock=0.0) is None
    assert enrolment.key("../device_keys/pi-1", clock=0.0) is None
    for i in range(5000):  # a flood of ids: the negative cache stays bounded
        enrolment.key(f"ghost-{i}", clock=0.0)
    assert len(enrolment._unknown) <= 4096


def test_enrol_refuses_to_rekey_and_identity_reuses_the_kept_key(tmp_path) -> None:
    keys = tmp_path / "device_keys"
    first = identity("pi-1", keys)
    assert identity("pi-1", keys) == first
    with pytest.raises(ConfigError, match="already enrolled"):
        enroll("pi-1", keys)
    first.unlink()
    with pytest.raises(ConfigError, match="private key"):
        identity("pi-1", keys)
    with pytest.raises(ConfigError, match="no such directory"):
        Enrolment(tmp_path / "absent")
