"""Content-addressed blobs and their chunked, resumable transfer over small messages.

Packs, LoRA states and updates move as blobs named by their sha256. The sender cuts a blob into
fixed-size chunks (small enough for brokers with 128-256 KB message limits by default) and serves
any chunk on request; the receiver writes each chunk at its offset in a partial file on disk
(never the whole blob in memory), keeps a small sidecar recording which chunks it has, asks for
the missing ones, and when it has them all verifies the sha256 and moves the file into its cache.
An interrupted transfer resumes from the sidecar, even across restarts; a blob already in the
cache is never transferred again. This module is the store and the reassembly; the asking and
serving, a window at a time, is :mod:`devft_edge.blob_transfer`.

Everything a peer's description can make a receiver spend is bounded (issue 14: an offer of tiny
chunks, 2.8 million for a 270 MB blob, cost 3.5 s and ~1 GB of memory per 200-byte request):
chunk sizes lie in [:data:`MIN_CHUNK_BYTES`, :data:`MAX_CHUNK_BYTES`], a receiver takes at most
:data:`MAX_CHUNKS` chunks and remembers them in one byte each, and a download
(:class:`devft_edge.blob_transfer.Download`) finds the next missing chunks from a cursor instead
of listing them all. Disk is bounded by the store's owner: :meth:`BlobStore.admit` before a
transfer starts, :meth:`BlobStore.reap_partials` for abandoned ones, :meth:`BlobStore.evict_lru`
for the cache; a full disk is :class:`StorageFull`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devft_edge.errors import DevFTError, raise_if
from devft_edge.protocol import ProtocolError, Reason

DEFAULT_CHUNK_BYTES = 96 * 1024
"""Default chunk size: with the envelope header it stays under a 128 KB broker message limit."""
MIN_CHUNK_BYTES = 1000
"""Smallest chunk a description may name, unless the whole blob fits in one chunk: a chunk
message carries a ~280-byte header, so below 1 kB a transfer is mostly headers and messages (the
aggregator's config allows chunks from 1 KiB)."""
MAX_CHUNK_BYTES = 2**20
"""Largest chunk a description may name: a chunk is one broker message, held whole by the broker
and both clients, so with :data:`WINDOW` outstanding a transfer holds at most 64 MiB in flight."""
WINDOW = 64
"""Chunks outstanding at most in one transfer: the receiver asks for more only as chunks arrive,
so neither side ever queues more than this many (flow control by the receiver,
:class:`devft_edge.blob_transfer.Download`), and a holder serves at most this many per request."""
MAX_CHUNKS = 2**20
"""Most chunks a receiver takes on: its bitmap costs one byte per chunk (1 MiB at most); at the
default chunk size that is a 96 GiB blob, far beyond any pack."""
SHA256 = re.compile(r"^[0-9a-f]{64}$")
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""Write errors that mean "no space" (the file system, or the user's disk quota), not a bug."""


class StorageFull(DevFTError):
    """No room for a blob: a quota or the disk reserve would be exceeded, or the disk is full.

    The store is left consistent (a chunk that could not be written is not recorded, so it is asked
    for again); the caller refuses or postpones the transfer and may reap or evict to make room.
    """


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


@contextmanager
def _full_disk_is_storage_full(what: str) -> Iterator[None]:
    """Turn a "no space" ``OSError`` during ``what`` into :class:`StorageFull`; others pass through."""
    try:
        yield
    except OSError as error:
        if error.errno in FULL_ERRNOS:
            raise StorageFull(f"{what}: {error.strerror}") from error
        raise


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
        """Parse and check a message's blob fields.

        Raises:
            ProtocolError: ``malformed`` for a missing or mistyped field, a negative size, or a
                chunk size outside [:data:`MIN_CHUNK_BYTES`, :data:`MAX_CHUNK_BYTES`] (smaller is
                allowed only for a blob that is one chunk). The chunk count is the receiver's
                check, so that a holder can still tell an oversize offer by its size.
        """
        try:
            size, chunk = int(data["size"]), int(data["chunk_bytes"])  # type: ignore[call-overload]
            sha = check_sha(data["blob"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(Reason.MALFORMED, f"bad blob description {data!r}") from None
        if size < 0 or not 1 <= chunk <= MAX_CHUNK_BYTES or (chunk < MIN_CHUNK_BYTES and chunk < size):
            raise ProtocolError(
                Reason.MALFORMED,
                f"blob size {size} / chunk size {chunk} out of range (chunks of {MIN_CHUNK_BYTES}.."
                f"{MAX_CHUNK_BYTES} bytes, or one chunk for the whole blob)",
            )
        return cls(sha, size, chunk)


def _sidecar_header(info: BlobInfo) -> bytes:
    """First line of a receiver's sidecar: the layout its bitmap is for (``bitmap`` tells it from
    the index lists earlier versions wrote, which are then ignored and the blob fetched again)."""
    return json.dumps({"size": info.size, "chunk_bytes": info.chunk_bytes, "bitmap": 1}).encode() + b"\n"


@dataclass(frozen=True)
class _Partial:
    """The files of one partial blob under ``root/partial``."""

    sha: str
    paths: tuple[Path, ...]
    allocated: int
    """Bytes on disk (``st_blocks * 512``: a part file is sparse until every chunk is in)."""
    mtime: float
    """Last write to either file."""


class BlobStore:
    """A directory of complete blobs named by sha256, plus partial ones being received.

    A complete blob's mtime is its last use (:meth:`touch`; atime is unreliable under
    ``noatime``/``relatime``), which :meth:`evict_lru` and :meth:`recent` go by.
    """

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
        """Copy (or hard-link) a file into the store and mark it used now; returns its description.

        A hard link shares the source's inode, so the source's mtime is set to now as well.
        """
        sha = sha256_file(source)
        target = self.path(sha)
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            try:
                os.link(source, tmp)
            except OSError:  # another file system: copy instead
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        self.touch(sha)
        return BlobInfo(sha, target.stat().st_size, chunk_bytes)

    def add_bytes(self, data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobInfo:
        """Store ``data`` as a blob and mark it used now; returns its description."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        self.touch(sha)
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
        """The (resumable) receiver of ``info`` in this store (raises like :class:`BlobReceiver`)."""
        return BlobReceiver(self, info)

    # ---- bounded disk: admission, reaping, eviction ------------------------------------------------

    def touch(self, sha: str) -> None:
        """Mark the complete blob ``sha`` used now (its mtime), so eviction keeps it longest.

        Raises:
            ProtocolError: ``malformed`` when ``sha`` is not a sha256.
            FileNotFoundError: the blob is not in the store.
        """
        os.utime(self.path(sha))

    def partial_bytes(self) -> int:
        """Bytes the partial blobs occupy on disk now (allocated blocks, not their final sizes)."""
        return sum(partial.allocated for partial in self._partials())

    def admit(self, info: BlobInfo, quota_bytes: int, reserve_bytes: int) -> None:
        """Check that a transfer of ``info`` fits before it starts; a blob already here always fits.

        Partials count at their full size (they fill in as chunks arrive), so admitting several at
        once cannot overshoot: the partials, this one included, must stay within ``quota_bytes``,
        and the file system must keep ``reserve_bytes`` free once all of them are complete. A
        partial of ``info`` already on disk (a resumed transfer) counts once.

        Raises:
            StorageFull: the quota or the reserve would be exceeded.
            ConfigError: ``quota_bytes`` or ``reserve_bytes`` is negative.
        """
        raise_if(_negative(quota_bytes=quota_bytes, reserve_bytes=reserve_bytes))
        if self.has(info.sha256):
            return
        need = info.size + info.count  # the part file and its bitmap
        committed = need
        growth = need
        for partial in self._partials():
            if partial.sha == info.sha256:
                growth = max(0, need - partial.allocated)
                continue
            final = max(partial.allocated, self._declared_size(partial.sha))
            committed += final
            growth += final - partial.allocated
        if committed > quota_bytes:
            raise StorageFull(
                f"blob {info.sha256[:12]}... ({info.size} bytes) would bring partial blobs to "
                f"{committed} bytes, over the quota of {quota_bytes}"
            )
        free = shutil.disk_usage(self.root).free
        if free - growth < reserve_bytes:
            raise StorageFull(
                f"blob {info.sha256[:12]}... ({info.size} bytes) would leave {free - growth} bytes free "
                f"on {self.root}, under the reserve of {reserve_bytes}"
            )

    def reap_partials(self, max_age_s: float, quota_bytes: int, keep: Collection[str] = ()) -> list[str]:
        """Remove abandoned partial blobs; returns their shas, oldest first.

        Removed are partials last written more than ``max_age_s`` ago, then, oldest first, as many
        others as it takes to bring the partials within ``quota_bytes`` (allocated bytes). Those in
        ``keep`` (transfers the caller still wants) are never removed, even if they alone exceed
        the quota. A receiver whose partial is removed starts its blob afresh.

        Raises:
            ConfigError: ``max_age_s`` or ``quota_bytes`` is negative.
        """
        raise_if(_negative(max_age_s=max_age_s, quota_bytes=quota_bytes))
        partials = self._partials()
        total = sum(partial.allocated for partial in partials)
        cutoff = time.time() - max_age_s
        removed = []
        for partial in sorted(partials, key=lambda p: (p.mtime, p.sha)):
            if partial.mtime >= cutoff and total <= quota_bytes:
                break
            if partial.sha in keep:
                continue
            for path in partial.paths:
                path.unlink(missing_ok=True)
            total -= partial.allocated
            removed.append(partial.sha)
        return removed

    def evict_lru(self, quota_bytes: int, keep: Collection[str] = ()) -> list[str]:
        """Remove complete blobs, least recently used first, until they total at most ``quota_bytes``.

        Blobs in ``keep`` (the open stage's pack and LoRA, say) are never removed, even if they
        alone exceed the quota. Returns the removed shas, least recently used first.

        Raises:
            ConfigError: ``quota_bytes`` is negative.
        """
        raise_if(_negative(quota_bytes=quota_bytes))
        blobs = self._complete()
        total = sum(size for _, _, size in blobs)
        removed = []
        for _, sha, size in blobs:
            if total <= quota_bytes:
                break
            if sha in keep:
                continue
            self.path(sha).unlink(missing_ok=True)
            total -= size
            removed.append(sha)
        return removed

    def recent(self, limit: int) -> list[str]:
        """The ``limit`` most recently used complete blobs, most recent first (a bounded hello).

        Raises:
            ConfigError: ``limit`` is negative.
        """
        raise_if(_negative(limit=limit))
        return [sha for _, sha, _ in reversed(self._complete())][:limit]

    def _complete(self) -> list[tuple[float, str, int]]:
        """``(mtime, sha, size)`` of every complete blob, least recently used first."""
        found = []
        for entry in os.scandir(self.root):
            if SHA256.fullmatch(entry.name):
                try:
                    status = entry.stat()
                except FileNotFoundError:  # removed meanwhile
                    continue
                if stat.S_ISREG(status.st_mode):
                    found.append((status.st_mtime, entry.name, status.st_size))
        return sorted(found)

    def _partials(self) -> list[_Partial]:
        """The partial blobs: each sha's ``.part`` and ``.have`` files (either may be missing)."""
        files: dict[str, list[tuple[Path, os.stat_result]]] = {}
        for entry in os.scandir(self.root / "partial"):
            sha, _, suffix = entry.name.partition(".")
            if suffix in ("part", "have") and SHA256.fullmatch(sha):
                try:
                    files.setdefault(sha, []).append((Path(entry.path), entry.stat()))
                except FileNotFoundError:  # removed meanwhile
                    continue
        return [
            _Partial(
                sha,
                tuple(path for path, _ in found),
                sum(status.st_blocks * 512 for _, status in found),
                max(status.st_mtime for _, status in found),
            )
            for sha, found in files.items()
        ]

    def _declared_size(self, sha: str) -> int:
        """The size a partial will have when complete, from its sidecar's header (0 if unreadable)."""
        try:
            with (self.root / "partial" / f"{sha}.have").open("rb") as f:
                size = json.loads(f.readline(256))["size"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        return size if type(size) is int and size >= 0 else 0


def _negative(**values: float) -> list[str]:
    """A problem for each of ``values`` that is negative."""
    return [f"{name} must be >= 0, got {value}" for name, value in values.items() if value < 0]


class BlobReceiver:
    """Reassembles one blob on disk from chunks in any order, duplicates included.

    Which chunks are in is a bitmap of one byte per chunk, in memory and in the sidecar
    ``<sha>.have`` (a JSON header line naming the layout, then the same bytes): recording a chunk
    is a one-byte write at its offset, resuming is one read, and memory is ``count`` bytes (the
    set of ints it replaces cost ~50 bytes per chunk, 150 MB for 2.8 million). A one-byte write
    cannot tear, so a crash leaves at worst a written chunk the sidecar does not record (fetched
    again) or, without fsync, a recorded chunk whose bytes were lost (the sha256 check catches it).
    """

    def __init__(self, store: BlobStore, info: BlobInfo) -> None:
        """Open (and resume) the partial blob of ``info``.

        Raises:
            ProtocolError: ``malformed`` when ``info`` has more than :data:`MAX_CHUNKS` chunks.
        """
        if info.count > MAX_CHUNKS:
            raise ProtocolError(
                Reason.MALFORMED, f"blob {info.sha256[:12]}... has {info.count} chunks, more than {MAX_CHUNKS}"
            )
        self.store, self.info = store, info
        self.part = store.root / "partial" / f"{info.sha256}.part"
        self.have_file = self.part.with_suffix(".have")
        self._header = _sidecar_header(info)
        self._have = bytearray(info.count)
        self._have_count = 0
        self._resume()

    @property
    def complete(self) -> bool:
        """Whether the verified blob is in the store."""
        return self.store.has(self.info.sha256)

    def next_missing(self, start: int = 0) -> int | None:
        """The first chunk index at or after ``start`` that this receiver lacks, None if there is none.

        A byte search in C over the bitmap: skipping a million received chunks takes well under a
        millisecond. (It does not look whether another receiver completed the blob: see ``complete``.)
        """
        index = self._have.find(0, start)
        return None if index < 0 else index

    def missing(self, limit: int | None = None) -> list[int]:
        """Chunk indices still needed, the first ``limit`` of them if given (empty once complete)."""
        found: list[int] = []
        index = None if self.complete else self.next_missing()
        while index is not None and (limit is None or len(found) < limit):
            found.append(index)
            index = self.next_missing(index + 1)
        return found

    def add(self, index: int, data: bytes) -> bool:
        """Write chunk ``index``; returns True when this completed and verified the blob.

        Raises:
            ProtocolError: ``malformed`` for an index or length that does not fit the blob,
                ``hash`` when the reassembled blob does not match its sha256 (the partial is
                discarded, so a fresh transfer starts).
            StorageFull: the disk (or the user's quota) is full; the chunk is not recorded.
            OSError: any other failure to write the partial files.
        """
        if self.complete:
            return False
        info = self.info
        if not 0 <= index < info.count:
            raise ProtocolError(Reason.MALFORMED, f"chunk {index} outside 0..{info.count - 1}")
        expected = min(info.chunk_bytes, info.size - index * info.chunk_bytes) if info.size else 0
        if len(data) != expected:
            raise ProtocolError(Reason.MALFORMED, f"chunk {index} has {len(data)} bytes, expected {expected}")
        if not self._have[index]:
            with _full_disk_is_storage_full(f"writing chunk {index} of blob {info.sha256[:12]}..."):
                self._write(index * info.chunk_bytes, data)
                self._record(index)
        if self._have_count < info.count:
            return False
        return self._finish()

    def discard(self) -> None:
        """Forget the partial blob."""
        self.part.unlink(missing_ok=True)
        self.have_file.unlink(missing_ok=True)
        self._have = bytearray(self.info.count)
        self._have_count = 0

    def _write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the part file (created sparse on the first chunk)."""
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)

    def _record(self, index: int) -> None:
        """Mark chunk ``index`` in the sidecar, then in memory (so a failed write records nothing).

        A missing sidecar means the partial was discarded or reaped underneath this receiver:
        what memory holds is then stale, and a fresh sidecar starts over.
        """
        try:
            fd = os.open(self.have_file, os.O_WRONLY)
        except FileNotFoundError:
            fd = self._new_sidecar()
        try:
            os.pwrite(fd, b"\x01", len(self._header) + index)
        finally:
            os.close(fd)
        self._have[index] = 1
        self._have_count += 1

    def _new_sidecar(self) -> int:
        """Create an empty sidecar (header, then ``count`` zero bytes, sparse); its open descriptor."""
        self._have = bytearray(self.info.count)
        self._have_count = 0
        fd = os.open(self.have_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self._header)
            os.ftruncate(fd, len(self._header) + self.info.count)
        except OSError:
            os.close(fd)
            self.have_file.unlink(missing_ok=True)
            raise
        return fd

    def _resume(self) -> None:
        """Load the sidecar's bitmap; a sidecar for another layout, of an earlier format, torn, or
        without its part file is removed (the blob is fetched afresh). One that records every chunk
        (a crash before the hash check) is finished now, or discarded if the hash fails."""
        try:
            with self.have_file.open("rb") as f:
                header = f.readline(len(self._header))
                bitmap = f.read(self.info.count + 1)
        except OSError:
            return
        if (
            header != self._header
            or len(bitmap) != self.info.count
            or bitmap.translate(None, b"\x00\x01")
            or not self.part.exists()
        ):
            self.have_file.unlink(missing_ok=True)
            return
        self._have[:] = bitmap
        self._have_count = self.info.count - bitmap.count(0)
        if self._have_count == self.info.count and not self.complete:
            try:
                self._finish()
            except ProtocolError:  # discarded: a fresh transfer starts
                pass

    def _finish(self) -> bool:
        actual = sha256_file(self.part)
        if actual != self.info.sha256 or self.part.stat().st_size != self.info.size:
            self.discard()
            raise ProtocolError(Reason.HASH, f"blob {self.info.sha256[:12]}... reassembled to sha256 {actual[:12]}...")
        os.replace(self.part, self.store.path(self.info.sha256))
        self.have_file.unlink(missing_ok=True)
        return True
