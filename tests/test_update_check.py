"""Update validation: every rejection reason, and the norm it reports."""

from __future__ import annotations

import math

import pytest
import torch

from devft_edge.protocol import ProtocolError, Reason
from devft_edge.update_check import check_update

START = {"layers.0.q_proj.lora_A": torch.zeros(2, 3), "layers.0.q_proj.lora_B": torch.zeros(3, 2)}


def test_good_update_returns_its_distance():
    update = {k: v + 1.0 for k, v in START.items()}
    assert check_update(update, START) == pytest.approx(math.sqrt(12))


@pytest.mark.parametrize(
    "update,reason",
    [
        ({"layers.0.q_proj.lora_A": torch.zeros(2, 3)}, Reason.SHAPE),
        ({**START, "layers.9.q_proj.lora_A": torch.zeros(2, 3)}, Reason.SHAPE),
        ({**START, "layers.0.q_proj.lora_B": torch.zeros(3, 3)}, Reason.SHAPE),
        ({**START, "layers.0.q_proj.lora_B": torch.zeros(3, 2, dtype=torch.int64)}, Reason.SHAPE),
        ({**START, "layers.0.q_proj.lora_B": torch.tensor([[0.0, float("nan")]] * 3)}, Reason.NOT_FINITE),
        ({**START, "layers.0.q_proj.lora_B": torch.full((3, 2), float("inf"))}, Reason.NOT_FINITE),
        ({**START, "layers.0.q_proj.lora_B": torch.full((3, 2), 100.0)}, Reason.NORM),
    ],
)
def test_bad_updates_are_rejected_with_their_reason(update, reason):
    with pytest.raises(ProtocolError) as error:
        check_update(update, START, max_norm=50.0)
    assert error.value.reason is reason


def test_norm_bound_can_be_disabled():
    assert check_update({k: v + 1e3 for k, v in START.items()}, START, max_norm=None) > 1e3
