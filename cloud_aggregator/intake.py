"""The aggregator's update intake: a device's offered update, from its offer to a verdict.

A selected device that has trained offers its update (an UPDATE: the blob's description and what
the device reports). Before anything is pulled the intake checks what it can: the size against
the open stage's LoRA (an offer of 1 TB is refused, not admitted), the reported numbers (the
message's parse, :class:`~devft_edge.messages.UpdateOffer`), and the upload quota and disk
reserve. It then pulls the blob's chunks (one partial upload per device, resumable), and once
the blob is complete validates it: a safetensors file with exactly the round-start LoRA's
tensors, finite, within the norm bound (:func:`~devft_edge.update_check.check_update`). Only then
is it admitted to the open round as :class:`~cloud_aggregator.state.Accepted`, and only once the
checkpoint listing it is on disk is the device told so.

Every rejection is counted by reason in the run state, answered with a verdict naming the reason,
and its upload deleted (unless the run holds the same blob: the ``discard`` dependency decides),
so a device cannot grow the state directory by retrying bad uploads. An update that completes
after its round closed is ``stale``: it never counts in a later round.

The intake is given its dependencies rather than the aggregator, so that a test drives it with a
real store and real tensors, and no broker, model or stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud_aggregator.state import Accepted, OpenRound, RunState
from devft_edge.blob_transfer import Download
from devft_edge.blobs import BlobInfo, BlobReceiver, BlobStore, StorageFull
from devft_edge.errors import DataError
from devft_edge.messages import Chunk, Payload, UpdateOffer, Verdict
from devft_edge.protocol import ProtocolError, Reason
from devft_edge.update_check import check_update

logger = logging.getLogger(__name__)

OFFER_SLACK_BYTES = 65536
"""What an update's file may exceed twice its fp32 tensors by: the safetensors header."""

Send = Callable[[str, Payload, Reason | None], bool]
"""Publish a payload to a device, with the envelope's reason code (None: content); False when dropped."""


@dataclass(frozen=True)
class IntakeLimits:
    """What the intake admits (the aggregator's config)."""

    upload_quota_bytes: int
    """Bytes all partial uploads may hold at once."""
    disk_reserve_bytes: int
    """Free disk an admitted upload must leave once complete."""
    max_update_norm: float | None
    """Bound on ``||update - start||``; None: unbounded."""


@dataclass(frozen=True)
class _Upload:
    """One device's update being pulled, and the offer it came with."""

    download: Download
    offer: UpdateOffer
    message_id: str
    """The UPDATE message's id: what the verdict answers."""
    round: int
    """The round the offer was made in: an update that completes in another is stale."""


class UpdateIntake:
    """Offers in, chunks pulled, verdicts out; accepted updates land in ``state.open_round``."""

    def __init__(
        self,
        store: BlobStore,
        state: RunState,
        limits: IntakeLimits,
        *,
        lora_bytes: Callable[[], int],
        start: Callable[[], dict[str, Any]],
        shared: Callable[[dict[str, Any]], dict[str, Any]],
        discard: Callable[[str, BlobReceiver | None], None],
        checkpoint: Callable[[], None],
        send: Send,
    ) -> None:
        """``lora_bytes()``: bytes of the open stage's LoRA in fp32; ``start()``: the LoRA the open
        round started from (what an update must have the tensors of); ``shared(state)``: the
        factors of a LoRA state the rule aggregates (robust clipping scales by their change);
        ``discard(sha, receiver)``: remove a rejected upload unless the run references the blob;
        ``checkpoint()``: write the run state durably; ``send``: publish to a device."""
        self.store, self.state, self.limits = store, state, limits
        self.lora_bytes, self.start, self.shared = lora_bytes, start, shared
        self.discard, self.checkpoint, self.send = discard, checkpoint, send
        self._uploads: dict[str, _Upload] = {}

    @property
    def uploads(self) -> dict[str, Download]:
        """device -> the pull of its update (a copy: re-ask stalled ones, keep their partials)."""
        return {device: upload.download for device, upload in self._uploads.items()}

    def offer(self, device: str, message_id: str, round_: OpenRound, offer: UpdateOffer) -> bool:
        """Take ``device``'s offer in ``round_`` (the open round, in which it has a task); True when
        the update was accepted at once (its blob was already in the store).

        Raises:
            ProtocolError: ``shape`` for an offer far larger than the stage's LoRA, ``malformed``
                for a blob of more chunks than a receiver takes (counted by the caller, no verdict).
        """
        if device in round_.accepted:
            self.send(device, Verdict(message_id, True, "duplicate: already accepted"), None)
            return False
        expected = self.lora_bytes()
        if offer.blob.size > 2 * expected + OFFER_SLACK_BYTES:
            raise ProtocolError(Reason.SHAPE, f"update of {offer.blob.size} bytes for a LoRA of {expected}")
        previous = self._uploads.pop(device, None)
        if previous is not None and previous.download.receiver.info.sha256 != offer.blob.sha256:
            self._drop(previous.download)  # one partial upload per device
        try:
            self.store.admit(offer.blob, self.limits.upload_quota_bytes, self.limits.disk_reserve_bytes)
        except StorageFull as error:  # not the device's fault: told so, the round can reselect
            self._reject(device, ProtocolError(Reason.STORAGE, str(error)), message_id)
            return False
        download = Download(self.store.receiver(offer.blob))
        self._uploads[device] = _Upload(download, offer, message_id, round_.index)
        if download.complete:
            return self._finish(device)
        self.request_chunks(device, download)
        return False

    def chunk(self, device: str, data: dict[str, Any], body: bytes) -> bool:
        """Take one chunk of ``device``'s upload (a CHUNK message's data and body); True when it
        completed an update that was accepted. A chunk that does not fit (its index, its length,
        the reassembled hash, a full disk) rejects the upload with a verdict.

        Raises:
            ProtocolError: ``malformed`` for a bad blob description, ``stale`` for a chunk of a
                blob not being pulled from ``device`` (counted by the caller, no verdict).
        """
        info = BlobInfo.from_json(data)
        upload = self._uploads.get(device)
        if upload is None or upload.download.receiver.info.sha256 != info.sha256:
            raise ProtocolError(Reason.STALE, f"chunk of blob {info.sha256[:12]}... from {device} is not awaited")
        try:
            try:
                complete = upload.download.add(Chunk.from_data(data).index, body, time.monotonic())
            except StorageFull as error:
                raise ProtocolError(Reason.STORAGE, str(error)) from None
        except ProtocolError as error:
            del self._uploads[device]
            self._reject(device, error, upload.message_id, upload.download)
            return False
        self.state.bytes_up += len(body)
        if complete:
            return self._finish(device)
        self.request_chunks(device, upload.download)
        return False

    def request_chunks(self, device: str, download: Download) -> None:
        """Ask ``device`` for the next window of its upload's missing chunks, if any are due."""
        request = download.next_request(time.monotonic())
        if request is not None:
            self.send(device, request, None)

    def _finish(self, device: str) -> bool:
        """Validate ``device``'s complete upload and admit it to the open round; True if accepted."""
        from devft_edge.weights import read_safetensors

        upload = self._uploads.pop(device)
        sha, round_ = upload.download.receiver.info.sha256, self.state.open_round
        if round_ is None or device not in round_.selected or upload.round != round_.index:
            stale = ProtocolError(Reason.STALE, f"update from {device} completed after its round {upload.round}")
            self._reject(device, stale, upload.message_id, upload.download)
            return False
        try:
            try:
                update = read_safetensors(self.store.path(sha))
            except DataError as error:
                raise ProtocolError(Reason.SHAPE, f"not a LoRA state: {error}") from None
            start = self.start()
            check_update(update, start, self.limits.max_update_norm)
            norm = check_update(self.shared(update), self.shared(start), None)  # what robust clipping scales
        except ProtocolError as error:
            self._reject(device, error, upload.message_id, upload.download)
            return False
        offer = upload.offer
        round_.accepted[device] = Accepted(
            blob=sha,
            num_samples=offer.num_samples,
            message_id=upload.message_id,
            train_loss=offer.train_loss,
            seconds=offer.seconds,
            peak_rss_bytes=offer.peak_rss_bytes,
            norm=norm,
        )
        self.checkpoint()  # accepted only once it is durable
        logger.info(
            "round %d: update from %s accepted (norm %.3f, %d samples)", round_.index, device, norm, offer.num_samples
        )
        self.send(device, Verdict(upload.message_id, True), None)
        return True

    def _drop(self, download: Download) -> None:
        self.discard(download.receiver.info.sha256, download.receiver)

    def _reject(self, device: str, error: ProtocolError, message_id: str, download: Download | None = None) -> None:
        """Count ``error``, delete the upload's blob (partial or complete) and tell the device why."""
        if download is not None:
            self._drop(download)
        self.state.count_rejection(error.reason.value)
        logger.warning("update from %s rejected: %s", device, error)
        self.send(device, Verdict(message_id, False, str(error)), error.reason)
