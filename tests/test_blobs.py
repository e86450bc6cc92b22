"""Bounded resources in the blob layer (issue 14): chunk-size and chunk-count bounds, a receiver's
memory, a download's cost per request, a full disk, admission, reaping and eviction. Real files in
``tmp_path``; a full disk is simulated by replacing ``os.pwrite`` for one test at a time."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import time
import tracemalloc

import pytest

from devft_edge.blob_transfer import Download
from devft_edge.blobs import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    WINDOW,
    BlobInfo,
    BlobReceiver,
    BlobStore,
    StorageFull,
)
from devft_edge.errors import ConfigError
from devft_edge.protocol import ProtocolError, Reason

SHA = hashlib.sha256(b"some blob").hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pull(download: Download, sender: BlobStore, rounds: int = 10_000) -> list[list[int]]:
    """Run ``download`` to completion against ``sender``; the requests it made."""
    asked = []
    for _ in range(rounds):
        if download.complete:
            return asked
        indices = download.request(clock=0.0)
        assert indices, "a download that is not complete must ask for something"
        asked.append(indices)
        for index in indices:
            download.add(index, sender.read_chunk(download.receiver.info, index), clock=0.0)
    raise AssertionError("the download did not finish")


def description(size: int, chunk_bytes: int) -> dict[str, object]:
    return {"blob": SHA, "size": size, "chunk_bytes": chunk_bytes}


# ---- bounds on a description ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,chunk_bytes",
    [
        (270_000_000, 1),  # the attack: 270 million one-byte chunks
        (10**6, MIN_CHUNK_BYTES - 1),
        (10**9, MAX_CHUNK_BYTES + 1),
        (10, 0),
        (10, 5),  # a tiny blob may be one chunk, not several tiny ones
    ],
)
def test_chunk_sizes_out_of_bounds_are_malformed(size, chunk_bytes):
    with pytest.raises(ProtocolError) as error:
        BlobInfo.from_json(description(size, chunk_bytes))
    assert error.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    "size,chunk_bytes",
    [(10**6, MIN_CHUNK_BYTES), (10**9, MAX_CHUNK_BYTES), (10, 10), (10, 1000), (0, 1), (10**8, 96 * 1024)],
)
def test_chunk_sizes_in_bounds_and_one_chunk_blobs_are_accepted(size, chunk_bytes):
    assert BlobInfo.from_json(description(size, chunk_bytes)) == BlobInfo(SHA, size, chunk_bytes)


def test_a_receiver_takes_at_most_max_chunks(tmp_path):
    store = BlobStore(tmp_path)
    store.receiver(BlobInfo(SHA, MAX_CHUNKS * 16, 16))
    with pytest.raises(ProtocolError) as error:
        store.receiver(BlobInfo(SHA, MAX_CHUNKS * 16 + 1, 16))
    assert error.value.reason is Reason.MALFORMED
    assert not list((tmp_path / "partial").iterdir())


# ---- memory and time per chunk --------------------------------------------------------------------


def test_a_request_on_a_million_chunk_blob_allocates_no_list_of_all_chunks(tmp_path):
    """Listing the missing chunks on every request cost 3.5 s and ~1 GB at 2.8 million chunks; a
    request must cost (in memory) the window it returns, not the blob it belongs to."""
    count = 10**6
    info = BlobInfo(SHA, count * 16, 16)
    download = Download(BlobStore(tmp_path).receiver(info))
    first = download.request(clock=0.0)
    assert first == list(range(WINDOW))
    for index in first[: WINDOW // 2 + 1]:
        download.add(index, b"x" * 16, clock=0.0)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        more = download.request(clock=1.0)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert more == list(range(WINDOW, WINDOW + WINDOW // 2 + 1))
    assert peak < 64 * 1024, f"one request allocated {peak} bytes"
    assert elapsed < 0.05


def test_a_receiver_holds_one_byte_per_chunk_also_when_resumed(tmp_path):
    """A set of chunk indices cost ~50 bytes per chunk (150 MB at 2.8 million chunks)."""
    count = 4096
    data = random.Random(0).randbytes(count * 4)
    info = BlobInfo(sha(data), len(data), 4)
    store = BlobStore(tmp_path)
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        receiver = store.receiver(info)
        for index in range(count - 1):
            receiver.add(index, data[4 * index : 4 * index + 4])
        held, _ = tracemalloc.get_traced_memory()
        del receiver
        before_resume, _ = tracemalloc.get_traced_memory()
        resumed = store.receiver(info)
        after_resume, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held - baseline < 2 * count + 16 * 1024
    assert after_resume - before_resume < 2 * count + 16 * 1024
    assert resumed.missing() == [count - 1]
    assert resumed.add(count - 1, data[-4:]) is True and store.path(info.sha256).read_bytes() == data


def test_a_sidecar_of_another_format_or_damaged_is_ignored(tmp_path):
    """Index lists written by earlier versions, and bitmaps with stray bytes, mean "start over"."""
    data = bytes(range(100))
    info = BlobInfo(sha(data), len(data), 10)
    store = BlobStore(tmp_path)
    receiver = store.receiver(info)
    for index in range(5):
        receiver.add(index, data[10 * index : 10 * index + 10])
    assert store.receiver(info).missing() == [5, 6, 7, 8, 9]
    sidecar = receiver.have_file.read_bytes()
    receiver.have_file.write_bytes(sidecar[:-1] + b"\x07")
    assert store.receiver(info).missing() == list(range(10)) and not receiver.have_file.exists()
    receiver.have_file.write_text('{"size": 100, "chunk_bytes": 10}\n0\n1\n2\n3\n4\n')
    sender = BlobStore(tmp_path / "sender")
    sender.add_bytes(data, chunk_bytes=10)
    assert [i for r in pull(Download(store.receiver(info)), sender) for i in r] == list(range(10))


def test_a_sidecar_recording_every_chunk_is_finished_on_resume(tmp_path, monkeypatch):
    """A crash between recording the last chunk and the hash check: the next receiver finishes the
    blob at once (before, it had nothing missing, asked for nothing and never completed)."""
    data = bytes(range(50))
    info = BlobInfo(sha(data), len(data), 10)
    store = BlobStore(tmp_path)
    receiver = store.receiver(info)

    class Crash(Exception):
        """The process dying right after the sidecar recorded the last chunk."""

    def crash(self: BlobReceiver) -> bool:
        raise Crash

    monkeypatch.setattr(BlobReceiver, "_finish", crash)
    with pytest.raises(Crash):
        for index in range(5):
            receiver.add(index, data[10 * index : 10 * index + 10])
    monkeypatch.undo()
    assert not store.has(info.sha256)
    assert store.receiver(info).complete and store.path(info.sha256).read_bytes() == data


# ---- a full disk -----------------------------------------------------------------------------------


def failing_pwrite(monkeypatch, code: int, on_call: int) -> None:
    """Make the ``on_call``-th ``os.pwrite`` from now fail with ``code`` (1: the chunk, 2: the sidecar)."""
    real, calls = os.pwrite, [0]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        calls[0] += 1
        if calls[0] == on_call:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("on_call", [1, 2], ids=["chunk", "sidecar"])
def test_a_full_disk_is_storage_full_and_the_chunk_is_asked_for_again(tmp_path, monkeypatch, code, on_call):
    data = random.Random(1).randbytes(40)
    info = BlobInfo(sha(data), len(data), 10)
    store = BlobStore(tmp_path)
    download = Download(store.receiver(info))
    assert download.request(clock=0.0) == [0, 1, 2, 3]
    download.add(0, data[:10], clock=0.0)
    failing_pwrite(monkeypatch, code, on_call)
    with pytest.raises(StorageFull):
        download.add(1, data[10:20], clock=0.0)
    monkeypatch.undo()
    assert download.receiver.missing() == [1, 2, 3] and store.receiver(info).missing() == [1, 2, 3]
    assert download.request(clock=0.0) == [1, 2, 3]  # starts over from the first missing chunk
    assert [download.add(i, data[10 * i : 10 * i + 10], clock=0.0) for i in (1, 2, 3)] == [False, False, True]
    assert store.path(info.sha256).read_bytes() == data


def test_other_write_errors_stay_os_errors(tmp_path, monkeypatch):
    info = BlobInfo(SHA, 20, 10)
    receiver = BlobStore(tmp_path).receiver(info)
    failing_pwrite(monkeypatch, errno.EIO, 1)
    with pytest.raises(OSError) as error:
        receiver.add(0, b"x" * 10)
    assert error.value.errno == errno.EIO and receiver.missing() == [0, 1]


# ---- admission -------------------------------------------------------------------------------------


def partial(store: BlobStore, size: int, chunk_bytes: int, seed: int, chunks: int = 1) -> BlobInfo:
    """A partial blob of ``size`` random bytes with its first ``chunks`` chunks received."""
    data = random.Random(seed).randbytes(size)
    info = BlobInfo(sha(data), size, chunk_bytes)
    receiver = store.receiver(info)
    for index in range(chunks):
        receiver.add(index, data[index * chunk_bytes : (index + 1) * chunk_bytes])
    return info


def test_admit_counts_every_partial_at_its_full_size(tmp_path):
    store = BlobStore(tmp_path)
    started = partial(store, 100_000, 10_000, seed=0)  # 10 kB on disk, 100 kB when done
    new = BlobInfo(SHA, 60_000, 10_000)
    with pytest.raises(StorageFull):
        store.admit(new, quota_bytes=150_000, reserve_bytes=0)
    store.admit(new, quota_bytes=160_100, reserve_bytes=0)
    store.admit(started, quota_bytes=100_010, reserve_bytes=0)  # resuming counts once
    complete = store.add_bytes(b"here already")
    store.admit(complete, quota_bytes=0, reserve_bytes=10**18)


def test_admit_keeps_the_disk_reserve(tmp_path):
    store = BlobStore(tmp_path)
    new = BlobInfo(SHA, 10_000, 10_000)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StorageFull):
        store.admit(new, quota_bytes=10**18, reserve_bytes=free)
    store.admit(new, quota_bytes=10**18, reserve_bytes=0)


def test_negative_limits_are_config_errors(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(ConfigError) as error:
        store.admit(BlobInfo(SHA, 1, 1), quota_bytes=-1, reserve_bytes=-2)
    assert len(error.value.problems) == 2
    for call in (
        lambda: store.reap_partials(-1.0, 0),
        lambda: store.evict_lru(-1),
        lambda: store.recent(-1),
    ):
        with pytest.raises(ConfigError):
            call()


# ---- reaping partial blobs -------------------------------------------------------------------------


def age(store: BlobStore, info: BlobInfo, seconds: float) -> None:
    """Make ``info``'s partial files last written ``seconds`` ago."""
    stamp = time.time() - seconds
    for suffix in ("part", "have"):
        os.utime(store.root / "partial" / f"{info.sha256}.{suffix}", (stamp, stamp))


def test_reap_removes_old_partials_then_the_oldest_over_quota_but_never_kept_ones(tmp_path):
    store = BlobStore(tmp_path)
    old, older, new = (partial(store, 400_000, 65_536, seed=s, chunks=2) for s in range(3))
    age(store, old, 3600)
    age(store, older, 7200)
    each = store.partial_bytes() // 3
    assert each >= 2 * 65_536  # allocated: the two chunks written, not the sparse 400 kB
    assert store.reap_partials(max_age_s=5400, quota_bytes=10**12, keep=[older.sha256]) == []
    assert store.reap_partials(max_age_s=5400, quota_bytes=10**12) == [older.sha256]
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == sorted(
        f"{i.sha256}.{s}" for i in (old, new) for s in ("part", "have")
    )
    assert store.reap_partials(max_age_s=10**6, quota_bytes=store.partial_bytes() - 1) == [old.sha256]
    assert store.reap_partials(max_age_s=0, quota_bytes=0, keep={new.sha256}) == []
    assert store.receiver(new).missing(limit=1) == [2]


def test_a_download_whose_partial_was_reaped_starts_over_and_completes(tmp_path):
    data = random.Random(4).randbytes(200 * 1000)
    sender = BlobStore(tmp_path / "sender")
    info = sender.add_bytes(data, chunk_bytes=1000)
    store = BlobStore(tmp_path / "receiver")
    download = Download(store.receiver(info))
    for index in download.request(clock=0.0):
        download.add(index, sender.read_chunk(info, index), clock=0.0)
    assert store.reap_partials(max_age_s=0, quota_bytes=0) == [info.sha256]
    asked = pull(download, sender)
    assert sorted(i for r in asked for i in r) == list(range(200))  # every chunk again, none twice
    assert store.path(info.sha256).read_bytes() == data


def test_a_resumed_download_asks_only_for_the_missing_chunks_in_order(tmp_path):
    data = random.Random(5).randbytes(300 * 1000)
    sender = BlobStore(tmp_path / "sender")
    info = sender.add_bytes(data, chunk_bytes=1000)
    store = BlobStore(tmp_path / "receiver")
    receiver = store.receiver(info)
    for index in range(0, 300, 2):
        receiver.add(index, sender.read_chunk(info, index))
    asked = pull(Download(store.receiver(info)), sender)
    odd = list(range(1, 300, 2))
    assert asked[0] == odd[:WINDOW] and [i for r in asked for i in r] == odd


# ---- evicting complete blobs -----------------------------------------------------------------------


def test_eviction_goes_by_last_use_and_spares_kept_blobs(tmp_path):
    store = BlobStore(tmp_path)
    a, b, c = (store.add_bytes(bytes([i]) * 1000) for i in range(3))
    now = time.time()
    for seconds, info in ((300, a), (200, b), (100, c)):
        os.utime(store.path(info.sha256), (now - seconds, now - seconds))
    store.touch(a.sha256)
    assert store.recent(2) == [a.sha256, c.sha256] and store.recent(10) == [a.sha256, c.sha256, b.sha256]
    assert store.evict_lru(quota_bytes=3000) == []
    assert store.evict_lru(quota_bytes=2500) == [b.sha256]
    assert store.evict_lru(quota_bytes=0, keep=[a.sha256]) == [c.sha256]
    assert store.recent(10) == [a.sha256] and store.has(a.sha256)


def test_adding_a_blob_marks_it_used_even_from_an_old_file(tmp_path):
    store = BlobStore(tmp_path / "store")
    first = store.add_bytes(b"first")
    os.utime(store.path(first.sha256), (1, 1))
    source = tmp_path / "old.bin"
    source.write_bytes(b"an old file")
    os.utime(source, (0, 0))
    second = store.add_file(source)  # hard-linked: without a touch it would look 1970-old
    assert store.recent(1) == [second.sha256]
    earlier = time.time() - 10
    os.utime(store.path(second.sha256), (earlier, earlier))
    store.add_bytes(b"first")  # already there: used again
    assert store.recent(2) == [first.sha256, second.sha256]
    with pytest.raises(FileNotFoundError):
        store.touch(SHA)


def test_send_chunks_sends_what_was_asked_and_stops_at_the_first_dropped_message(tmp_path):
    """The holder's half, shared by the aggregator and the agent: a request is checked whole before
    anything is sent, and a full send queue stops the answer (the requester asks again on a stall)."""
    from devft_edge.blob_transfer import send_chunks, wanted
    from devft_edge.messages import ChunkRequest

    store = BlobStore(tmp_path)
    info = store.add_bytes(bytes(range(250)) * 10, chunk_bytes=1000)  # 2500 bytes: chunks of 1000, 1000, 500
    sent: list[tuple[int, int]] = []

    def send(chunk, body: bytes) -> bool:
        sent.append((chunk.index, len(body)))
        return len(sent) < 2  # the queue takes one more

    result = send_chunks(store, info, (2, 0, 1), send)
    assert sent == [(2, 500), (0, 1000)] and (result.chunks, result.bytes) == (1, 500)
    with pytest.raises(ProtocolError) as error:
        send_chunks(store, info, (0, 3), send)
    assert error.value.reason is Reason.MALFORMED and len(sent) == 2  # nothing of a bad request went out
    with pytest.raises(ProtocolError) as error:
        wanted(ChunkRequest(BlobInfo(info.sha256, info.size, 2000), (0,)), {info.sha256: info}.get)
    assert error.value.reason is Reason.MALFORMED  # the holder's chunk size, not the requester's
