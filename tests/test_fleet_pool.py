"""The fleet as the round loop's client pool, in process: what :meth:`FleetPool.train` makes of a
closed round's accepted updates (the MQTT system tests run it end to end; this checks its own
arithmetic beside it): robust weights and clipped changes, the rule's shared and private factors,
and the round's tally."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cloud_aggregator.fleet import FleetPool, RunBlobs
from cloud_aggregator.state import Accepted, OpenRound, RunState
from devft_edge.aggregation import RULES
from devft_edge.blobs import BlobStore
from devft_edge.run_loop import ClientRound, Costs

A, B = "layers.0.self_attn.q_proj.lora_A", "layers.0.self_attn.q_proj.lora_B"


def _pool(tmp_path, rule: str, updates: dict[str, tuple[dict[str, torch.Tensor], int]], start) -> FleetPool:
    """A pool over a run whose open round 0 accepted ``updates`` (device -> (state, declared samples))."""
    blobs = RunBlobs(BlobStore(tmp_path / "blobs"), chunk_bytes=1 << 16)
    accepted = {
        device: Accepted(
            blob=blobs.put(state),
            num_samples=samples,
            message_id=f"m-{device}",
            train_loss=float(i),
            seconds=10.0 + i,
            peak_rss_bytes=100 * (i + 1),
            norm=float(torch.linalg.vector_norm(torch.cat([(state[k] - start[k]).flatten() for k in (A, B)]))),
        )
        for i, (device, (state, samples)) in enumerate(updates.items())
    }
    state = RunState(run_id="r", bytes_up=5_000, bytes_down=9_000, bytes_down_pack=4_000)
    state.open_round = OpenRound(index=0, selected=sorted(updates), tasks={}, deadline=0.0, accepted=accepted)
    cfg = SimpleNamespace(max_weight_ratio=2.0, max_norm_ratio=3.0)
    costs = Costs(bytes_up=1_000, bytes_down=2_000, bytes_down_pack=500)
    unused = None  # shipping's parts: base model, LoRA settings, shape, key, planner step, full state
    return FleetPool(
        cfg,  # type: ignore[arg-type]
        state,
        blobs,
        RULES.get(rule),
        unused,
        unused,  # type: ignore[arg-type]
        unused,  # type: ignore[arg-type]
        unused,
        1,
        step=unused,  # type: ignore[arg-type]
        round_start=lambda: start,
        costs=lambda: costs,
        full=unused,  # type: ignore[arg-type]
    )


def _states(scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: scale * torch.randn(4, 8, generator=g), B: scale * torch.randn(8, 4, generator=g)}


def test_one_round_is_weighted_clipped_and_tallied(tmp_path) -> None:
    """FedIT: the device claiming 2**53 samples weighs twice the others' median; its change 1000x
    theirs comes out at three times their median change norm; the tally is the round's."""
    start = {A: torch.zeros(4, 8), B: torch.zeros(8, 4)}
    updates = {"b": (_states(0.01, 1), 48), "a": (_states(0.01, 2), 40), "evil": (_states(10.0, 3), 2**53)}
    pool = _pool(tmp_path, "fedit", updates, start)
    tally = ClientRound()
    out = list(pool.train(0, SimpleNamespace(to_full=lambda s: s), tally))

    assert [w for _, w in out] == [48.0, 40.0, 88.0]  # in accepted order; evil capped at 2 x median(48, 40)
    honest = [float(torch.linalg.vector_norm(torch.cat([s[k].flatten() for k in (A, B)]))) for s, _ in out[:2]]
    for (state, _), (sent, _) in zip(out[:2], list(updates.values())[:2], strict=True):
        assert all(torch.equal(state[k], sent[k]) for k in (A, B))  # honest changes pass unclipped
    evil_norm = float(torch.linalg.vector_norm(torch.cat([out[2][0][k].flatten() for k in (A, B)])))
    assert evil_norm == pytest.approx(3.0 * (honest[0] + honest[1]) / 2)  # 3 x the others' median
    assert tally.devices == ["a", "b", "evil"] and tally.losses == [0.0, 1.0, 2.0]
    assert tally.client_seconds == [10.0, 11.0, 12.0] and tally.peak_rss_bytes == 300
    assert (tally.bytes_up, tally.bytes_down, tally.bytes_down_pack) == (4_000, 7_000, 3_500)  # since the last row
    assert pool.state.private == {}  # FedIT keeps nothing on the devices


def test_fedsa_shares_a_and_keeps_each_devices_b_in_full_model_space(tmp_path) -> None:
    """FedSA-LoRA: only A is yielded for aggregation; each device's B is stored as the stage maps
    it to the full model, and read back as the devices' memories with their capped weights."""
    start = {A: torch.zeros(4, 8), B: torch.zeros(8, 4)}
    updates = {"a": (_states(0.01, 1), 48), "b": (_states(0.01, 2), 2**53)}
    pool = _pool(tmp_path, "fedsa", updates, start)
    doubled = SimpleNamespace(to_full=lambda s: {k: 2 * v for k, v in s.items()})
    out = list(pool.train(0, doubled, ClientRound()))

    assert [sorted(state) for state, _ in out] == [[A], [A]]
    assert sorted(pool.state.private) == ["a", "b"]
    memories = list(pool.memories())
    assert [m.num_samples for m in memories] == [48.0, 96.0]
    for memory, (sent, _) in zip(memories, updates.values(), strict=True):
        assert sorted(memory.private) == [B] and torch.equal(memory.private[B], 2 * sent[B])


def test_a_round_other_than_the_open_one_is_refused(tmp_path) -> None:
    start = {A: torch.zeros(4, 8), B: torch.zeros(8, 4)}
    pool = _pool(tmp_path, "fedit", {"a": (_states(0.01, 1), 48)}, start)
    with pytest.raises(AssertionError):
        list(pool.train(1, SimpleNamespace(to_full=lambda s: s), ClientRound()))
