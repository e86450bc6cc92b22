"""The pulled chunk transfer of a blob, both halves, shared by the aggregator and the agent.

A transfer is pulled by its receiver (``docs/protocol.md``, Blobs): the receiver asks for the
chunks it lacks, a window at a time (:class:`Download`, :meth:`Download.next_request`), and the
holder sends exactly those (:func:`wanted`, then :func:`send_chunks`). The aggregator pulls
updates from devices and serves packs and LoRA states to them; the agent does the reverse; both
go through these functions, so the two sides cannot drift apart. What is stored and how chunks
are reassembled on disk is :mod:`devft_edge.blobs`; what goes in the messages is
:mod:`devft_edge.messages`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from devft_edge.blobs import WINDOW, BlobInfo, BlobReceiver, BlobStore, StorageFull
from devft_edge.messages import Chunk, ChunkRequest
from devft_edge.protocol import ProtocolError, Reason


def wanted(request: ChunkRequest, served: Callable[[str], BlobInfo | None]) -> tuple[BlobInfo, tuple[int, ...]]:
    """Check a chunk request against what the holder serves; returns the blob's description and
    the chunk indices to send (the first :data:`WINDOW` asked for).

    ``served(sha)`` is the holder's own description of a blob it serves, or None. The request
    must describe the blob exactly so: a requester that picked its own chunk size could ask for one
    chunk larger than the broker's message limit.

    Raises:
        ProtocolError: ``stale`` for a blob not served, ``malformed`` for another description.
    """
    offered = served(request.blob.sha256)
    if offered is None:
        raise ProtocolError(Reason.STALE, f"blob {request.blob.sha256[:12]}... is not served here")
    if request.blob != offered:
        raise ProtocolError(Reason.MALFORMED, f"asked for {request.blob}, the blob is served as {offered}")
    return offered, request.missing[:WINDOW]


@dataclass(frozen=True)
class Sent:
    """What :func:`send_chunks` sent: the first ``chunks`` of those asked for, ``bytes`` in all."""

    chunks: int
    bytes: int


def send_chunks(
    store: BlobStore, info: BlobInfo, indices: tuple[int, ...], send: Callable[[Chunk, bytes], bool]
) -> Sent:
    """Send chunks ``indices`` of the complete blob ``info`` from ``store``, read one at a time.

    ``send(chunk, body)`` publishes one chunk message; it returns False when the message was
    dropped (a full send queue), which stops the loop: the requester asks again for what did not
    come once its download stalls.

    Raises:
        ProtocolError: ``malformed`` for an index outside the blob, before anything is sent.
    """
    outside = [i for i in indices if not 0 <= i < info.count]
    if outside:
        raise ProtocolError(Reason.MALFORMED, f"chunks {outside[:5]} outside 0..{info.count - 1} of {info.sha256[:12]}")
    count = total = 0
    for index, body in store.chunks(info, list(indices)):
        if not send(Chunk(info, index), body):
            break
        count, total = count + 1, total + len(body)
    return Sent(count, total)


class Download:
    """A pulled transfer: the receiver side's window bookkeeping around a :class:`BlobReceiver`.

    The holder of a blob only ever sends the chunks it is asked for; this object decides what to
    ask for next (the missing chunks, a window at a time) and when to ask again because nothing
    arrived for ``stall_seconds``. It walks the blob with a cursor: every chunk below it is in or
    outstanding, so a request looks only at the chunks after it (listing every missing chunk per
    request cost 3.5 s and ~1 GB at 2.8 million chunks). After a stall or an error it starts
    over from chunk 0, which the receiver's bitmap search skips through in C.
    """

    def __init__(self, receiver: BlobReceiver, stall_seconds: float = 10.0) -> None:
        self.receiver = receiver
        self.stall_seconds = stall_seconds
        self.requested: set[int] = set()
        self.last_activity = 0.0
        self._cursor = 0

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
        more = self._scan(free)
        if not more and not self.requested:  # chunks behind the cursor were lost (a reaped partial)
            self._cursor = 0
            more = self._scan(free)
        self.requested.update(more)
        if more:
            self.last_activity = clock
        return more

    def next_request(self, clock: float) -> ChunkRequest | None:
        """The chunk request to send now (:meth:`request`), None when there is nothing to ask for."""
        missing = self.request(clock)
        return ChunkRequest(self.receiver.info, tuple(missing)) if missing else None

    def add(self, index: int, data: bytes, clock: float) -> bool:
        """Feed one chunk; True when it completed the blob.

        Raises:
            ProtocolError, StorageFull, OSError: as :meth:`BlobReceiver.add`; the next request
                then starts over from the first missing chunk.
        """
        self.last_activity = clock
        self.requested.discard(index)
        try:
            return self.receiver.add(index, data)
        except (ProtocolError, StorageFull, OSError):
            self.requested.clear()
            self._cursor = 0
            raise

    def stalled(self, clock: float) -> bool:
        """Nothing arrived for ``stall_seconds`` while chunks are outstanding: time to ask again."""
        if self.complete or not self.requested or clock - self.last_activity < self.stall_seconds:
            return False
        self.requested.clear()
        self._cursor = 0
        return True

    def _scan(self, limit: int) -> list[int]:
        """Up to ``limit`` missing, unrequested chunks from the cursor on; moves the cursor past them."""
        more: list[int] = []
        while len(more) < limit:
            index = self.receiver.next_missing(self._cursor)
            if index is None:
                self._cursor = self.receiver.info.count
                break
            self._cursor = index + 1
            if index not in self.requested:
                more.append(index)
        return more
