"""Protocol envelope, topics and chunked blob transfer (no broker: pure encoding and files)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct

import pytest

from devft_edge.blobs import BlobInfo, BlobStore
from devft_edge.protocol import Envelope, Kind, ProtocolError, Reason, Topics, decode


def test_envelope_round_trip_with_body_and_reason():
    message = Envelope(kind=Kind.CHUNK, sender="pi-7", run="r1", stage=2, round=5, data={"index": 3}, body=b"\x00\xff")
    back = decode(message.encode())
    assert back == message
    refusal = message.reply(Kind.REFUSAL, "pi-7", reason=Reason.PACK, data={"detail": "hash"})
    back = decode(refusal.encode())
    assert back.reason is Reason.PACK and back.data == {"re": message.id, "detail": "hash"} and back.round == 5


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"", Reason.MALFORMED),
        (b"\x00\x00\x00\x10{}", Reason.MALFORMED),  # header longer than payload
        (struct.pack(">I", 3) + b"{x}", Reason.MALFORMED),
        (struct.pack(">I", 2) + b"[]", Reason.MALFORMED),
        (struct.pack(">I", 9) + b'{"v": 99}', Reason.VERSION),
        (struct.pack(">I", 10) + b'{"v": 1.0}', Reason.VERSION),  # equal to 1 in Python, not the version
        (struct.pack(">I", 11) + b'{"v": true}', Reason.VERSION),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(payload, reason):
    with pytest.raises(ProtocolError) as error:
        decode(payload)
    assert error.value.reason is reason


def _with_header_text(replace: str, by: str) -> bytes:
    text = json.dumps(json.loads(Envelope(kind=Kind.HELLO, sender="a").encode()[4:])).replace(replace, by, 1)
    assert by in text
    return struct.pack(">I", len(text)) + text.encode()


@pytest.mark.parametrize(
    "replace,by",
    [
        ('"round": 0', '"round": ' + "9" * 5000),  # a several-thousand-digit integer
        ('"round": 0', '"round": -' + "1" * 20),
        ('"data": {}', '"data": {"z": ' + "[" * 30000 + "]" * 30000 + "}"),  # nesting past the recursion limit
        ('"data": {}', '"data": {"z": ' + "[" * 15 + "]" * 15 + "}"),  # past MAX_JSON_DEPTH
        ('"round": 0', '"round": 1e400'),  # overflows to inf
        ('"data": {}', '"data": {"size": -1e999}'),
        ('"data": {}', '"data": {"size": Infinity}'),
    ],
)
def test_unbounded_json_is_refused_before_any_handler_sees_it(replace, by):
    """Each of these is valid JSON that once escaped ``decode`` or reached the handlers (issue 14)."""
    payload = _with_header_text(replace, by)
    with pytest.raises(ProtocolError) as error:
        decode(payload)
    assert error.value.reason is Reason.MALFORMED
    assert "Expecting" not in str(error.value)  # refused for its bounds, not as broken JSON


def test_bounded_json_still_passes():
    deep = decode(_with_header_text('"data": {}', '"data": {"z": ' + "[" * 12 + "]" * 12 + "}"))
    assert deep.data["z"] == [[[[[[[[[[[[]]]]]]]]]]]]
    big = decode(_with_header_text('"round": 0', '"round": ' + "9" * 19))
    assert big.round == 10**19 - 1
    loss = decode(Envelope(kind=Kind.UPDATE, sender="a", data={"train_loss": float("nan")}).encode())
    assert loss.data["train_loss"] != loss.data["train_loss"]  # NaN: a device with no loss to report


def test_bad_header_fields():
    good = json.loads(Envelope(kind=Kind.HELLO, sender="a").encode()[4:])
    for change in ({"kind": "dance"}, {"stage": -1}, {"round": "3"}, {"sender": 5}, {"id": ""}, {"data": []}):
        header = json.dumps({**good, **change}).encode()
        with pytest.raises(ProtocolError) as error:
            decode(struct.pack(">I", len(header)) + header)
        assert error.value.reason is Reason.MALFORMED, change


def test_topics_confine_devices():
    t = Topics("devft/fleet1")
    assert t.up("pi-7") == "devft/fleet1/dev/pi-7/up"
    assert t.device_of("devft/fleet1/dev/pi-7/up") == "pi-7"
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ProtocolError):
            t.up(bad)
    with pytest.raises(ProtocolError):
        t.device_of("devft/other/dev/pi-7/up")
    with pytest.raises(ProtocolError):
        Topics("devft/#")


def test_blob_transfer_out_of_order_with_duplicates_and_resume(tmp_path):
    data = random.Random(0).randbytes(10_000)
    sender = BlobStore(tmp_path / "a")
    info = sender.add_bytes(data, chunk_bytes=1_000)
    assert info.count == 10 and info.sha256 == hashlib.sha256(data).hexdigest()
    receiving = BlobStore(tmp_path / "b")
    rx = receiving.receiver(BlobInfo.from_json(info.to_json()))
    order = list(sender.chunks(info))
    random.Random(1).shuffle(order)
    for index, chunk in order[:6] + order[:2]:  # some, plus duplicates
        assert rx.add(index, chunk) is False
    # a restart: a new receiver picks up what the sidecar recorded
    rx = receiving.receiver(info)
    assert sorted(rx.missing()) == sorted(i for i, _ in order[6:])
    done = [rx.add(i, c) for i, c in sender.chunks(info, rx.missing())]
    assert done[-1] is True and receiving.path(info.sha256).read_bytes() == data
    assert rx.missing() == [] and receiving.receiver(info).complete
    assert not list((tmp_path / "b" / "partial").iterdir())


def test_corrupt_chunk_fails_the_hash_and_restarts(tmp_path):
    data = bytes(range(256)) * 20
    sender, receiving = BlobStore(tmp_path / "a"), BlobStore(tmp_path / "b")
    info = sender.add_bytes(data, chunk_bytes=1024)
    rx = receiving.receiver(info)
    chunks = list(sender.chunks(info))
    bad = bytes([chunks[0][1][0] ^ 1]) + chunks[0][1][1:]
    rx.add(0, bad)
    with pytest.raises(ProtocolError) as error:
        for i, c in chunks[1:]:
            rx.add(i, c)
    assert error.value.reason is Reason.HASH
    assert not receiving.has(info.sha256) and rx.missing() == list(range(info.count))


def test_chunk_bounds_and_lengths_are_checked(tmp_path):
    store = BlobStore(tmp_path)
    info = BlobInfo(hashlib.sha256(b"abc").hexdigest(), 3, 2)
    rx = store.receiver(info)
    with pytest.raises(ProtocolError):
        rx.add(2, b"c")
    with pytest.raises(ProtocolError):
        rx.add(1, b"cd")
    assert rx.add(0, b"ab") is False and rx.add(1, b"c") is True
    empty = store.receiver(BlobInfo(hashlib.sha256(b"").hexdigest(), 0, 1024))
    assert empty.missing() == [0] and empty.add(0, b"") is True
    for bad in (
        {"blob": "xyz", "size": 1, "chunk_bytes": 1},
        {"blob": info.sha256, "size": -1, "chunk_bytes": 1},
        {"blob": info.sha256, "size": 1},
    ):
        with pytest.raises(ProtocolError):
            BlobInfo.from_json(bad)


def test_download_asks_a_window_at_a_time_and_again_when_stalled(tmp_path):
    from devft_edge.blob_transfer import Download
    from devft_edge.blobs import WINDOW

    data = random.Random(2).randbytes(100 * 10)
    sender, receiving = BlobStore(tmp_path / "a"), BlobStore(tmp_path / "b")
    info = sender.add_bytes(data, chunk_bytes=10)
    download = Download(receiving.receiver(info), stall_seconds=5.0)
    first = download.request(clock=0.0)
    assert first == list(range(WINDOW)) and download.request(clock=1.0) == []  # one window outstanding
    for index in first[:10]:
        download.add(index, sender.read_chunk(info, index), clock=2.0)
    assert not download.stalled(clock=6.0) and download.stalled(clock=7.5)  # 5 s without a chunk
    again = download.request(clock=7.5)
    assert again[0] == 10 and len(again) == WINDOW
    for index in range(10, 100):
        download.add(index, sender.read_chunk(info, index), clock=8.0)
    assert download.complete and download.request(clock=9.0) == []


def test_download_after_a_hash_failure_asks_for_the_whole_blob_again(tmp_path):
    """The agent re-requests after a failed chunk; a corrupt partial must lead to a fresh transfer."""
    from devft_edge.blob_transfer import Download

    data = random.Random(3).randbytes(50)
    sender, receiving = BlobStore(tmp_path / "a"), BlobStore(tmp_path / "b")
    info = sender.add_bytes(data, chunk_bytes=10)
    receiving.receiver(info).add(0, b"x" * 10)  # what a crash mid-write can leave in the partial file
    download = Download(receiving.receiver(info))
    assert download.request(clock=0.0) == [1, 2, 3, 4]
    with pytest.raises(ProtocolError) as error:
        for index in (1, 2, 3, 4):
            download.add(index, sender.read_chunk(info, index), clock=1.0)
    assert error.value.reason is Reason.HASH
    assert download.request(clock=1.0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("value", [None, "3", 1.0, True, [0], -1, 2**20])
def test_a_chunk_index_from_the_wire_must_be_an_integer(value):
    from devft_edge.messages import Chunk

    blob = BlobInfo(hashlib.sha256(b"x").hexdigest(), 1, 1000)
    assert Chunk.from_data({**blob.to_json(), "index": 7}) == Chunk(blob, 7)
    with pytest.raises(ProtocolError) as error:
        Chunk.from_data({**blob.to_json(), "index": value})
    assert error.value.reason is Reason.MALFORMED and "index" in str(error.value)


@pytest.mark.parametrize("value", [None, "all", 5, [None], ["1"], [[1]], [False], [1.0]])
def test_missing_chunks_from_the_wire_must_be_a_list_of_integers(value):
    from devft_edge.blob_transfer import wanted
    from devft_edge.blobs import WINDOW
    from devft_edge.messages import ChunkRequest

    blob = BlobInfo(hashlib.sha256(b"x").hexdigest(), 10**6, 1000)
    assert ChunkRequest.from_data({**blob.to_json(), "missing": [3, 1]}).missing == (3, 1)
    asked = ChunkRequest.from_data({**blob.to_json(), "missing": list(range(200))})
    assert wanted(asked, {blob.sha256: blob}.get) == (blob, tuple(range(WINDOW)))  # a window is served
    with pytest.raises(ProtocolError) as error:
        ChunkRequest.from_data({**blob.to_json(), "missing": value})
    assert error.value.reason is Reason.MALFORMED and "missing" in str(error.value)


def test_service_configs_report_file_and_field(tmp_path):
    from cloud_aggregator.config import AggregatorConfig
    from devft_edge.errors import ConfigError
    from device_agent.config import AgentConfig

    bad = tmp_path / "aggregator.yaml"
    bad.write_text("run_id: r1\nsign_key: k.pem\nper_round: 2\nquorum: 3\ntrain: {steps: 0}\ncolour: red\n")
    with pytest.raises(ConfigError) as error:
        AggregatorConfig.from_file(bad)
    text = "; ".join(error.value.problems)
    assert "aggregator.yaml: train: local steps must be >= 1" in text and "aggregator.yaml: colour" in text
    agent = tmp_path / "agent.yaml"
    agent.write_text("device_id: 'bad id'\npublic_key: p.pem\n")
    with pytest.raises(ConfigError, match="agent.yaml: device_id"):
        AgentConfig.from_file(agent)
    with pytest.raises(ConfigError, match="cannot read config"):
        AgentConfig.from_file(tmp_path / "missing.yaml")


def test_ids_must_match_whole_not_up_to_a_trailing_newline():
    """``$`` in a Python pattern also matches before a final newline (issue 14)."""
    from devft_edge.blobs import check_sha
    from devft_edge.protocol import check_device_id

    assert check_device_id("dev-0") == "dev-0"
    with pytest.raises(ProtocolError):
        check_device_id("dev-0\n")
    digest = hashlib.sha256(b"x").hexdigest()
    assert check_sha(digest) == digest
    with pytest.raises(ProtocolError):
        check_sha(digest + "\n")


@pytest.mark.parametrize("content", [{"data": {"detail": "x", "blob": "ab"}}, {"body": b"chunk"}])
def test_a_message_with_a_reason_carries_no_content(content):
    """The envelope's rule, enforced: a refusal or verdict explains itself and carries nothing to act on."""
    with pytest.raises(ValueError, match="carries no content"):
        Envelope(kind=Kind.REFUSAL, sender="pi-7", reason=Reason.PACK, **content)
    header = {"v": 1, "kind": "refusal", "sender": "pi-7", "id": "m1", "reason": "pack", "data": {"blob": "ab"}}
    raw = json.dumps(header).encode()
    with pytest.raises(ProtocolError) as refused:
        decode(struct.pack(">I", len(raw)) + raw)
    assert refused.value.reason is Reason.MALFORMED


def test_every_payload_round_trips_through_the_wire_with_the_documented_keys():
    from devft_edge.messages import Chunk, ChunkRequest, Hello, Presence, Refusal, UpdateOffer, Verdict

    blob = BlobInfo(hashlib.sha256(b"x").hexdigest(), 5000, 1000)
    keys = {"blob", "size", "chunk_bytes"}
    update = keys | {"num_samples", "train_loss", "seconds", "peak_rss_bytes"}
    payloads = [
        (Hello({"memory": 1}, ("torch",), (blob.sha256,)), {"profile", "backends", "cached", "agent_version"}),
        (Presence(online=False), {"online"}),
        (UpdateOffer(blob, 8, float("nan"), 1.5, 2**30), update),
        (Chunk(blob, 4), keys | {"index"}),
        (ChunkRequest(blob, (0, 3)), keys | {"missing"}),
        (Refusal("no room"), {"detail"}),
        (Verdict("m1", False, "shape: B"), {"re", "accepted", "note"}),
    ]
    for payload, wire_keys in payloads:
        message = Envelope(kind=payload.KIND, sender="pi-7", data=payload.to_data())
        back = type(payload).from_data(decode(message.encode()).data)
        assert set(payload.to_data()) == wire_keys
        if isinstance(payload, UpdateOffer):  # NaN is not equal to itself
            assert math.isnan(back.train_loss) and back == UpdateOffer(blob, 8, back.train_loss, 1.5, 2**30)
        else:
            assert back == payload
    assert Hello.from_data({"profile": {}}) == Hello({}, ("torch",), (), 1)  # what an older agent sends
    assert UpdateOffer.from_data({**blob.to_json(), "num_samples": 3}).seconds == 0.0


def test_a_payload_names_every_bad_field_at_once():
    from devft_edge.messages import Hello, UpdateOffer, Verdict

    bad = {"blob": "xyz", "size": 10, "chunk_bytes": 1000, "num_samples": 1.5, "seconds": "soon", "train_loss": [1]}
    with pytest.raises(ProtocolError) as error:
        UpdateOffer.from_data(bad)
    text = str(error.value)
    assert error.value.reason is Reason.MALFORMED and text.startswith("malformed: update: ")
    assert all(f in text for f in ("blob id 'xyz'", "num_samples", "seconds", "train_loss")), text
    assert "peak_rss_bytes" not in text  # absent: its default
    for samples in (0, 2**53 + 1, True, None):
        with pytest.raises(ProtocolError, match="num_samples must be an integer in 1..9007199254740992"):
            UpdateOffer.from_data({**bad, "blob": "a" * 64, "seconds": 1, "train_loss": 1, "num_samples": samples})
    with pytest.raises(ProtocolError, match="profile must be an object.*backends must be a list of strings"):
        Hello.from_data({"profile": None, "backends": [1]})
    with pytest.raises(ProtocolError, match="accepted must be true or false"):
        Verdict.from_data({"re": "m1", "accepted": "yes"})
