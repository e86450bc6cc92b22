"""The aggregator shapes chunk serving per device: a request its token bucket cannot pay for yet
waits (one per device) and is served once the bucket has refilled; only a second ask meanwhile
is refused with ``rate``. The handlers run unbound on a namespace holding the real rate limiter. Also: what the
service logs of a closed round's metrics."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from cloud_aggregator.service import Aggregator, _metrics_text
from devft_edge.blobs import BlobInfo
from devft_edge.messages import ChunkRequest
from devft_edge.protocol import Envelope, Kind, ProtocolError, Reason
from devft_edge.ratelimit import RateLimiter

CHUNK = 1000
PACK = BlobInfo(sha256="a" * 64, size=10 * CHUNK, chunk_bytes=CHUNK)
OLD = BlobInfo(sha256="b" * 64, size=10 * CHUNK, chunk_bytes=CHUNK)


@pytest.fixture
def holder() -> SimpleNamespace:
    """The parts of an aggregator chunk serving touches; ``served`` records what went out."""
    served: list[tuple[str, str, tuple[int, ...]]] = []
    blobs = {PACK.sha256: PACK}
    fake = SimpleNamespace(
        cfg=SimpleNamespace(serve_rate_bytes_per_s=20_000.0),
        serving=RateLimiter(20_000.0, burst=3 * CHUNK),  # 20 chunks/s, bursts of 3
        _waiting={},
        _require_known=lambda device: None,
        _served=blobs.get,
        served=served,
        blobs=blobs,
    )
    fake._serve = lambda device, info, indices: served.append((device, info.sha256, indices))
    return fake


def ask(holder: SimpleNamespace, device: str, blob: BlobInfo, chunks: int) -> None:
    data = ChunkRequest(blob=blob, missing=tuple(range(chunks))).to_data()
    Aggregator._on_chunk_request(holder, device, Envelope(kind=Kind.CHUNK_REQUEST, sender=device, data=data))  # type: ignore[arg-type]


def test_a_request_past_the_rate_waits_and_is_served_when_the_bucket_refills(holder) -> None:
    ask(holder, "pi-1", PACK, 2)  # within the burst: served at once
    ask(holder, "pi-1", PACK, 2)  # 1 chunk left in the bucket: waits, not refused
    assert [s[2] for s in holder.served] == [(0, 1)] and "pi-1" in holder._waiting
    with pytest.raises(ProtocolError) as refused:  # a second ask while one waits: policed
        ask(holder, "pi-1", PACK, 2)
    assert refused.value.reason is Reason.RATE
    ask(holder, "pi-2", PACK, 3)  # another device has its own bucket
    assert holder.served[-1] == ("pi-2", PACK.sha256, (0, 1, 2))
    Aggregator._serve_waiting(holder)  # type: ignore[arg-type]
    assert len(holder.served) == 2  # not yet paid for
    time.sleep(0.1)  # 20 chunks/s: two more chunks' worth
    Aggregator._serve_waiting(holder)  # type: ignore[arg-type]
    assert holder.served[-1] == ("pi-1", PACK.sha256, (0, 1)) and not holder._waiting


def test_a_waiting_request_for_a_blob_no_longer_served_is_dropped(holder) -> None:
    holder.blobs[OLD.sha256] = OLD
    ask(holder, "pi-1", OLD, 3)
    ask(holder, "pi-1", OLD, 3)
    assert "pi-1" in holder._waiting
    del holder.blobs[OLD.sha256]  # the stage moved on
    time.sleep(0.2)
    Aggregator._serve_waiting(holder)  # type: ignore[arg-type]
    assert not holder._waiting and len(holder.served) == 1


def test_the_round_log_names_exact_match_only_where_it_was_measured() -> None:
    """A round without exact match (``--exact-match stage_end``, the default) logs its loss alone."""
    assert _metrics_text({"eval_loss": 1.23456, "eval_accuracy": None}) == "eval loss 1.2346"
    assert _metrics_text({"eval_loss": 1.0, "eval_accuracy": 0.125}) == "eval loss 1.0000, exact match 12.5%"
    assert _metrics_text({"eval_loss": None}) == "no eval"
