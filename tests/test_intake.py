"""The aggregator's update intake in one process: a real blob store in ``tmp_path``, real small
LoRA tensors, the aggregator's own discard policy, and an outbox instead of a broker. Norms are
computed by hand from the tensors' constant values."""

from __future__ import annotations

import hashlib
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save as safetensors_save

from cloud_aggregator.intake import OFFER_SLACK_BYTES, IntakeLimits, UpdateIntake
from cloud_aggregator.service import Aggregator
from cloud_aggregator.state import OpenRound, RunState
from devft_edge.blobs import BlobInfo, BlobStore
from devft_edge.messages import Chunk, ChunkRequest, UpdateOffer, Verdict
from devft_edge.protocol import ProtocolError, Reason

A, B = "layers.0.q_proj.lora_A", "layers.0.q_proj.lora_B"
CHUNK = 1000
"""The smallest chunk size a description may name: an update of ~2 kB comes in three chunks."""
LORA_BYTES = 4 * (4 * 64 + 64 * 4)
"""fp32 bytes of the stage's LoRA: A is 4 x 64, B is 64 x 4."""


def lora(a: float, b: float) -> dict[str, torch.Tensor]:
    return {A: torch.full((4, 64), a), B: torch.full((64, 4), b)}


class Fleet:
    """An intake over a round 0 in which pi-1 and pi-2 have tasks, starting from the all-zero LoRA."""

    def __init__(self, tmp_path, quota: int = 2**30, max_norm: float | None = 10.0) -> None:
        self.store = BlobStore(tmp_path / "blobs")
        self.state = RunState(run_id="r")
        self.state.stage_lora = self.store.add_bytes(safetensors_save(lora(0.0, 0.0)), CHUNK).sha256
        self.round = OpenRound(index=0, selected=["pi-1", "pi-2"], tasks={"pi-1": "t1", "pi-2": "t2"}, deadline=1e12)
        self.state.open_round = self.round
        self.sent: list[tuple[str, object, Reason | None]] = []
        self.events: list[str] = []
        self.intake = UpdateIntake(
            self.store,
            self.state,
            IntakeLimits(upload_quota_bytes=quota, disk_reserve_bytes=0, max_update_norm=max_norm),
            lora_bytes=lambda: LORA_BYTES,
            start=lambda: lora(0.0, 0.0),
            shared=lambda state: {k: v for k, v in state.items() if k.endswith("lora_A")},  # FedSA: A only
            discard=partial(Aggregator._discard, SimpleNamespace(state=self.state, store=self.store)),
            checkpoint=self.checkpoint,
            send=self.send,
        )

    def checkpoint(self) -> None:
        self.events.append(f"checkpoint with {sorted(self.round.accepted)} accepted")

    def send(self, device: str, payload: object, reason: Reason | None) -> bool:
        self.sent.append((device, payload, reason))
        self.events.append(f"{type(payload).__name__} to {device}")
        return True

    def offer(self, device: str, blob: bytes, message_id: str = "m1", **numbers: object) -> tuple[BlobInfo, bool]:
        info = BlobInfo(hashlib.sha256(blob).hexdigest(), len(blob), CHUNK)
        offer = UpdateOffer.from_data({**info.to_json(), "num_samples": 8, "train_loss": 1.5, **numbers})
        return info, self.intake.offer(device, message_id, self.round, offer)

    def requests(self, info: BlobInfo | None = None) -> list[tuple[int, ...]]:
        """The chunks asked for, request by request (of ``info`` only, if given)."""
        return [p.missing for _, p, _ in self.sent if isinstance(p, ChunkRequest) and info in (None, p.blob)]

    def verdicts(self) -> list[tuple[Verdict, Reason | None]]:
        return [(p, r) for _, p, r in self.sent if isinstance(p, Verdict)]

    def pull(self, device: str, info: BlobInfo, blob: bytes) -> bool:
        """Answer the intake's chunk requests until it stops asking; whether the update was accepted."""
        answered, accepted = 0, False
        while answered < len(self.requests(info)):
            for index in self.requests(info)[answered]:
                data = Chunk(info, index).to_data()
                accepted |= self.intake.chunk(device, data, blob[index * CHUNK : (index + 1) * CHUNK])
            answered += 1
        return accepted

    def leftovers(self) -> list[str]:
        """Files an upload left in the store: anything but the stage LoRA."""
        files = [p for p in self.store.root.rglob("*") if p.is_file()]
        return sorted(p.name for p in files if p.name != self.state.stage_lora)


def test_a_good_update_is_pulled_checked_and_accepted_once_it_is_durable(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    blob = safetensors_save(lora(0.5, 0.25))
    info, at_once = fleet.offer("pi-1", blob, seconds=2.0, peak_rss_bytes=100)
    assert not at_once and fleet.requests() == [(0, 1, 2)] and info.count == 3  # ~2.3 kB in chunks of 1000
    assert fleet.pull("pi-1", info, blob)
    accepted = fleet.round.accepted["pi-1"]
    # the norm robust clipping scales is of the shared factor A only: sqrt(4 * 64 * 0.5**2) = 8
    assert accepted.norm == pytest.approx(8.0)
    assert (accepted.blob, accepted.num_samples, accepted.message_id) == (info.sha256, 8, "m1")
    assert (accepted.train_loss, accepted.seconds, accepted.peak_rss_bytes) == (1.5, 2.0, 100)
    assert fleet.verdicts() == [(Verdict("m1", True), None)]
    assert fleet.events[-2:] == ["checkpoint with ['pi-1'] accepted", "Verdict to pi-1"]  # durable, then told
    assert fleet.state.bytes_up == len(blob) and fleet.intake.uploads == {}
    assert fleet.store.has(info.sha256)


def test_an_offer_of_a_blob_already_held_is_accepted_at_once_and_another_offer_is_a_duplicate(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    held = safetensors_save(lora(0.1, 0.0))
    fleet.store.add_bytes(held, CHUNK)
    assert fleet.offer("pi-2", held)[1] is True and fleet.requests() == []  # nothing to pull
    assert fleet.round.accepted["pi-2"].norm == pytest.approx(math.sqrt(256 * 0.1**2))
    fleet.offer("pi-2", safetensors_save(lora(0.5, 0.0)), message_id="m2")
    assert fleet.verdicts() == [(Verdict("m1", True), None), (Verdict("m2", True, "duplicate: already accepted"), None)]
    assert fleet.requests() == [] and fleet.round.accepted["pi-2"].message_id == "m1"  # the first one counts


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({A: torch.zeros(4, 64), B: torch.zeros(63, 4)}, Reason.SHAPE),  # B one row short
        ({A: torch.zeros(4, 64), B: torch.zeros(64, 4, dtype=torch.int32)}, Reason.SHAPE),
        ({A: torch.zeros(4, 64)}, Reason.SHAPE),  # B missing
        ({**lora(0.0, 0.0), A: torch.full((4, 64), math.nan)}, Reason.NOT_FINITE),
        (lora(0.0, 1.0), Reason.NORM),  # ||B|| = sqrt(64 * 4 * 1) = 16 > 10, though A did not move
    ],
)
def test_a_bad_update_is_rejected_with_its_reason_and_leaves_no_file(tmp_path, update, reason) -> None:
    fleet = Fleet(tmp_path)
    blob = safetensors_save(update)
    info, _ = fleet.offer("pi-1", blob)
    assert fleet.pull("pi-1", info, blob) is False
    ((verdict, said),) = fleet.verdicts()
    assert said is reason and verdict.re == "m1" and not verdict.accepted and reason.value in verdict.note
    assert fleet.round.accepted == {} and fleet.state.rejected == {reason.value: 1}
    assert fleet.leftovers() == [] and fleet.intake.uploads == {}


def test_a_blob_that_is_not_safetensors_is_a_shape_rejection(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    blob = bytes(range(256)) * 9
    info, _ = fleet.offer("pi-1", blob)
    fleet.pull("pi-1", info, blob)
    assert [r for _, r in fleet.verdicts()] == [Reason.SHAPE] and fleet.leftovers() == []


def test_an_offer_far_larger_than_the_lora_is_refused_before_anything_is_admitted(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    just = BlobInfo("a" * 64, 2 * LORA_BYTES + OFFER_SLACK_BYTES, CHUNK)
    fleet.intake.offer("pi-1", "m1", fleet.round, UpdateOffer(just, 8))  # the largest admitted
    with pytest.raises(ProtocolError) as error:
        fleet.intake.offer("pi-2", "m2", fleet.round, UpdateOffer(BlobInfo("b" * 64, just.size + 1, CHUNK), 8))
    assert error.value.reason is Reason.SHAPE and set(fleet.intake.uploads) == {"pi-1"}
    assert fleet.verdicts() == []  # a refused message is counted by the dispatch, not answered


def test_an_update_that_completes_after_its_round_closed_is_stale(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    blob = safetensors_save(lora(0.5, 0.0))
    info, _ = fleet.offer("pi-1", blob)
    fleet.state.open_round = OpenRound(index=1, selected=["pi-1"], tasks={"pi-1": "t3"}, deadline=1e12)
    fleet.pull("pi-1", info, blob)
    assert [(v.re, r) for v, r in fleet.verdicts()] == [("m1", Reason.STALE)]
    assert fleet.state.open_round.accepted == {} and fleet.leftovers() == []


def test_a_chunk_of_a_blob_not_being_pulled_is_stale_and_unanswered(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    blob = safetensors_save(lora(0.5, 0.0))
    info, _ = fleet.offer("pi-1", blob)
    other = BlobInfo("c" * 64, 10, CHUNK)
    for device, chunk in (("pi-1", Chunk(other, 0)), ("pi-2", Chunk(info, 0))):  # another blob; another device's
        with pytest.raises(ProtocolError) as error:
            fleet.intake.chunk(device, chunk.to_data(), b"x" * 10)
        assert error.value.reason is Reason.STALE
    assert fleet.verdicts() == [] and set(fleet.intake.uploads) == {"pi-1"}


@pytest.mark.parametrize(("index", "body"), [("x", b"y" * CHUNK), (5, b"y" * CHUNK), (0, b"y" * (CHUNK + 10))])
def test_a_chunk_that_does_not_fit_rejects_the_upload_and_removes_its_partial(tmp_path, index, body) -> None:
    fleet = Fleet(tmp_path)
    blob = safetensors_save(lora(0.5, 0.0))
    info, _ = fleet.offer("pi-1", blob)
    fleet.intake.chunk("pi-1", Chunk(info, 1).to_data(), blob[CHUNK : 2 * CHUNK])  # a partial on disk
    assert fleet.leftovers() != []
    fleet.intake.chunk("pi-1", {**info.to_json(), "index": index}, body)
    assert [(v.re, r) for v, r in fleet.verdicts()] == [("m1", Reason.MALFORMED)]
    assert fleet.leftovers() == [] and fleet.intake.uploads == {}


def test_a_new_offer_replaces_the_devices_partial_upload(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    first, second = safetensors_save(lora(0.5, 0.0)), safetensors_save(lora(0.25, 0.0))
    info, _ = fleet.offer("pi-1", first)
    fleet.intake.chunk("pi-1", Chunk(info, 0).to_data(), first[:CHUNK])
    again, _ = fleet.offer("pi-1", second, message_id="m2")
    assert all(name.startswith(again.sha256) for name in fleet.leftovers())  # the first partial is gone
    fleet.pull("pi-1", again, second)
    assert fleet.round.accepted["pi-1"].norm == pytest.approx(4.0)  # sqrt(256 * 0.25**2)
    assert fleet.verdicts() == [(Verdict("m2", True), None)]


def test_an_upload_over_the_quota_is_refused_for_storage(tmp_path) -> None:
    fleet = Fleet(tmp_path, quota=1000)
    fleet.offer("pi-1", safetensors_save(lora(0.5, 0.0)))
    assert [(v.re, r) for v, r in fleet.verdicts()] == [("m1", Reason.STORAGE)]
    assert fleet.intake.uploads == {} and fleet.requests() == [] and fleet.leftovers() == []
