"""Robust aggregation: one device, whatever it declares and uploads, moves the aggregate no more
than a bounded share (issue 14)."""

from __future__ import annotations

import pytest
import torch

from devft_edge.aggregation import RULES, GlobalState
from devft_edge.robust import clip_scales, clipped, robust_weights


def test_weights_are_capped_by_the_others_median():
    assert robust_weights([48, 48, 2**53], ratio=2.0) == [48.0, 48.0, 96.0]
    assert robust_weights([2**53, 48], ratio=2.0) == [96.0, 48.0]  # two devices: each capped by the other
    assert robust_weights([40, 48, 56], ratio=2.0) == [40.0, 48.0, 56.0]  # honest spread: unchanged
    assert robust_weights([7], ratio=2.0) == [7.0]


def test_change_norms_are_clipped_by_the_others_median():
    assert clip_scales([1.0, 1.2, 100.0], ratio=3.0) == pytest.approx([1.0, 1.0, 0.033])  # to 3 x median(1.0, 1.2)
    assert clip_scales([1.0, 2.0], ratio=3.0) == [1.0, 1.0]
    assert clip_scales([0.0, 5.0], ratio=3.0) == [1.0, 1.0]  # no usable median: nothing to clip by


def _aggregate(updates, weights, start):
    server = RULES.get("fedit").aggregate(GlobalState(lora=dict(start)), zip(updates, weights, strict=True), 0, 0)
    return server.lora["x"]


def test_one_malicious_device_cannot_take_over_the_round():
    """Two honest devices and one that claims 2**53 samples and uploads a change 1000x theirs:
    plain FedAvg becomes the attacker's update; the robust rule keeps the attacker's pull on the
    aggregate within its capped share (weight <= 2 honest devices) of its clipped change (<= 3x the
    honest norm)."""
    torch.manual_seed(0)
    start = {"x": torch.zeros(64)}
    honest = [{"x": torch.randn(64) * 0.01} for _ in range(2)]
    evil = {"x": torch.randn(64) * 10.0}
    counts = [48, 48, 2**53]
    updates = [*honest, evil]

    naive = _aggregate(updates, [float(c) for c in counts], start)
    assert torch.allclose(naive, evil["x"], atol=1e-6)  # the takeover this rule prevents

    norms = [float(torch.linalg.vector_norm(u["x"] - start["x"])) for u in updates]
    weights, scales = robust_weights(counts), clip_scales(norms)
    robust = _aggregate([clipped(u, start, s) for u, s in zip(updates, scales, strict=True)], weights, start)
    honest_mean = (honest[0]["x"] + honest[1]["x"]) / 2
    share = weights[2] / sum(weights)
    assert share <= 0.5  # capped at two honest devices' weight among three
    pull = float(torch.linalg.vector_norm(robust - honest_mean))
    honest_norm = max(norms[:2])
    assert pull <= share * (3.0 * honest_norm + float(torch.linalg.vector_norm(honest_mean))) + 1e-6
    assert pull < 0.01 * float(torch.linalg.vector_norm(evil["x"]))
