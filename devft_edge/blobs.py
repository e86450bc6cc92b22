"""Content-addressed blobs and their chunked, resumable transfer over small messages.

Packs, LoRA states and updates move as blobs named by their sha256. The sender cuts a blob into
fixed-size chunks (small enough for brokers with 128-256 KB message limits by default) and serves
any chunk on request; the receiver writes each chunk at its offset in a partial file on disk
(never the whole blob in memory), keeps a small sidecar recording which chunks it has, asks for
the missing ones, and when it has them all verifies the sha256 and moves the file into its cache.
An interrupted transfer resumes from the sidecar, even across restarts; a blob already in the
cache is never transferred again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from devft_edge.protocol import ProtocolError, Reason

DEFAULT_CHUNK_BYTES = 96 * 1024
"""Default chunk size: with the envelope header it stays under a 128 KB broker message limit."""
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def check_sha(blob: str) -> str:
    """``blob`` if it is a lowercase hex sha256, else a :class:`ProtocolError`."""
    if not isinstance(blob, str) or not SHA256.fullmatch(blob):
        raise ProtocolError(Reason.MALFORMED, f"blob id {blob!r} is not a sha256 hex digest")
    return blob


@dataclass(frozen=True)
class BlobInfo:
    """What a receiver needs to know to reassemble a blob."""

    sha256: str
    size: int
    chunk_bytes: int

    @property
    def count(self) -> int:
        """Number of chunks (at least one, so an empty blob still completes)."""
        return max(1, math.ceil(self.size / self.chunk_bytes))

    def to_json(self) -> dict[str, object]:
        return {"blob": self.sha256, "size": self.size, "chunk_bytes": self.chunk_bytes}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> BlobInfo:
        """Parse and check a message's blob fields."""
        try:
            size, chunk = int(data["size"]), int(data["chunk_bytes"])  # type: ignore[call-overload]
            sha = check_sha(data["blob"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(Reason.MALFORMED, f"bad blob description {data!r}") from None
        if size < 0 or not 1 <= chunk <= 64 * 2**20:
            raise ProtocolError(Reason.MALFORMED, f"blob size {size} / chunk size {chunk} out of range")
        return cls(sha, size, chunk)


class BlobStore:
    """A directory of complete blobs named by sha256, plus partial ones being received."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        """Where the complete blob ``sha`` lives (whether or not it is there)."""
        return self.root / check_sha(sha)

    def has(self, sha: str) -> bool:
        """Whether the complete, verified blob is in the store."""
        return self.path(sha).is_file()

    def add_file(self, source: str | Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobInfo:
        """Copy (or hard-link) a file into the store; returns its description."""
        sha = sha256_file(source)
        target = self.path(sha)
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            try:
                os.link(source, tmp)
            except OSError:  # another file system: copy instead
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        return BlobInfo(sha, target.stat().st_size, chunk_bytes)

    def add_bytes(self, data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobInfo:
        """Store ``data`` as a blob; returns its description."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return BlobInfo(sha, len(data), chunk_bytes)

    def info(self, sha: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobInfo:
        """Description of a complete blob."""
        return BlobInfo(sha, self.path(sha).stat().st_size, chunk_bytes)

    def read_chunk(self, info: BlobInfo, index: int) -> bytes:
        """Chunk ``index`` of a complete blob."""
        if not 0 <= index < info.count:
            raise ProtocolError(Reason.MALFORMED, f"chunk {index} outside 0..{info.count - 1} of {info.sha256[:12]}")
        with self.path(info.sha256).open("rb") as f:
            f.seek(index * info.chunk_bytes)
            return f.read(info.chunk_bytes)

    def chunks(self, info: BlobInfo, indices: list[int] | None = None) -> Iterator[tuple[int, bytes]]:
        """``(index, bytes)`` of the requested chunks (all by default), read one at a time."""
        for index in range(info.count) if indices is None else indices:
            yield index, self.read_chunk(info, index)

    def receiver(self, info: BlobInfo) -> BlobReceiver:
        """The (resumable) receiver of ``info`` in this store."""
        return BlobReceiver(self, info)


class BlobReceiver:
    """Reassembles one blob on disk from chunks in any order, duplicates included."""

    def __init__(self, store: BlobStore, info: BlobInfo) -> None:
        self.store, self.info = store, info
        self.part = store.root / "partial" / f"{info.sha256}.part"
        self.have_file = self.part.with_suffix(".have")
        self.have: set[int] = set()
        if self.have_file.exists() and self.part.exists():
            self.have = self._saved_indices()

    @property
    def complete(self) -> bool:
        """Whether the verified blob is in the store."""
        return self.store.has(self.info.sha256)

    def missing(self) -> list[int]:
        """Chunk indices still needed (empty once complete)."""
        if self.complete:
            return []
        return [i for i in range(self.info.count) if i not in self.have]

    def add(self, index: int, data: bytes) -> bool:
        """Write chunk ``index``; returns True when this completed and verified the blob.

        Raises:
            ProtocolError: ``malformed`` for an index or length that does not fit the blob,
                ``hash`` when the reassembled blob does not match its sha256 (the partial is
                discarded, so a fresh transfer starts).
        """
        if self.complete:
            return False
        info = self.info
        if not 0 <= index < info.count:
            raise ProtocolError(Reason.MALFORMED, f"chunk {index} outside 0..{info.count - 1}")
        expected = min(info.chunk_bytes, info.size - index * info.chunk_bytes) if info.size else 0
        if len(data) != expected:
            raise ProtocolError(Reason.MALFORMED, f"chunk {index} has {len(data)} bytes, expected {expected}")
        if index not in self.have:
            mode = "r+b" if self.part.exists() else "wb"
            with self.part.open(mode) as f:
                f.seek(index * info.chunk_bytes)
                f.write(data)
            self.have.add(index)
            self._save_index(index)
        if len(self.have) < info.count:
            return False
        return self._finish()

    def _save_index(self, index: int) -> None:
        """Append ``index`` to the sidecar (O(1) per chunk: rewriting the whole list after every
        chunk cost 15% of a 100 MB transfer). Its first line names the blob's layout."""
        if not self.have_file.exists() or len(self.have) == 1:
            header = json.dumps({"size": self.info.size, "chunk_bytes": self.info.chunk_bytes})
            self.have_file.write_text(f"{header}\n{index}\n")
            return
        with self.have_file.open("a") as f:
            f.write(f"{index}\n")

    def _saved_indices(self) -> set[int]:
        """The sidecar's chunk indices; empty when it is for another layout or unreadable (a
        torn last line is skipped: that chunk is fetched again, the hash check guards the result)."""
        try:
            header, *lines = self.have_file.read_text().split("\n")
            layout = json.loads(header)
            if layout.get("size") != self.info.size or layout.get("chunk_bytes") != self.info.chunk_bytes:
                return set()
        except (OSError, ValueError, AttributeError):
            return set()
        return {int(x) for x in lines if x.isdigit() and int(x) < self.info.count}

    def _finish(self) -> bool:
        if not self.part.exists():  # an empty blob has no bytes to write
            self.part.write_bytes(b"")
        actual = sha256_file(self.part)
        if actual != self.info.sha256 or self.part.stat().st_size != self.info.size:
            self.discard()
            raise ProtocolError(Reason.HASH, f"blob {self.info.sha256[:12]}... reassembled to sha256 {actual[:12]}...")
        os.replace(self.part, self.store.path(self.info.sha256))
        self.have_file.unlink(missing_ok=True)
        return True

    def discard(self) -> None:
        """Forget the partial blob."""
        self.part.unlink(missing_ok=True)
        self.have_file.unlink(missing_ok=True)
        self.have = set()


WINDOW = 64
"""Chunks outstanding at most: the receiver asks for more only as chunks arrive, so neither side
ever queues more than this many (flow control by the receiver)."""


def chunk_index(value: object) -> int:
    """A chunk message's ``index`` field, checked to be an int (whether it fits the blob is the receiver's check)."""
    if type(value) is not int:
        raise ProtocolError(Reason.MALFORMED, f"chunk index {value!r} is not an integer")
    return value


def chunk_indices(value: object, limit: int = WINDOW) -> list[int]:
    """A chunk request's ``missing`` field: a list of ints, of which the first ``limit`` are served."""
    if not isinstance(value, list) or any(type(i) is not int for i in value):
        raise ProtocolError(Reason.MALFORMED, f"missing chunks {str(value)[:80]} is not a list of integers")
    return value[:limit]


class Download:
    """A pulled transfer: the receiver side's window bookkeeping around a :class:`BlobReceiver`.

    The holder of a blob only ever sends the chunks it is asked for; this object decides what to
    ask for next (the missing chunks, a window at a time) and when to ask again because nothing
    arrived for ``stall_seconds``.
    """

    def __init__(self, receiver: BlobReceiver, stall_seconds: float = 10.0) -> None:
        self.receiver = receiver
        self.stall_seconds = stall_seconds
        self.requested: set[int] = set()
        self.last_activity = 0.0

    @property
    def complete(self) -> bool:
        """Whether the blob is verified and in the store."""
        return self.receiver.complete

    def request(self, clock: float) -> list[int]:
        """Indices to ask for now: once half the window has arrived, enough missing chunks to fill
        it again (a sliding window: the holder never idles waiting for the last chunk of a window,
        and never has more than :data:`WINDOW` chunks outstanding). Empty when complete."""
        if self.complete or len(self.requested) > WINDOW // 2:
            return []
        free = WINDOW - len(self.requested)
        more = [i for i in self.receiver.missing() if i not in self.requested][:free]
        self.requested.update(more)
        if more:
            self.last_activity = clock
        return more

    def add(self, index: int, data: bytes, clock: float) -> bool:
        """Feed one chunk; True when it completed the blob (raises ``ProtocolError`` like the receiver)."""
        self.last_activity = clock
        self.requested.discard(index)
        try:
            return self.receiver.add(index, data)
        except ProtocolError:
            self.requested.clear()
            raise

    def stalled(self, clock: float) -> bool:
        """Nothing arrived for ``stall_seconds`` while chunks are outstanding: time to ask again."""
        if self.complete or not self.requested or clock - self.last_activity < self.stall_seconds:
            return False
        self.requested.clear()
        return True
