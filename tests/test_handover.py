"""The cost warning: compute of the stages below full depth, against what they were measured to hand over."""

from __future__ import annotations

import json

import pytest

from devft_edge import handover
from devft_edge.cli import main
from devft_edge.handover import Handover, cost_warning, early_rounds


def test_early_rounds_counts_only_stages_below_full_depth():
    def cost(depth):
        return depth / 30

    assert early_rounds((4, 8, 15, 30), (1, 2, 3, 6), cost) == pytest.approx((4 + 16 + 45) / 30)
    assert early_rounds((15, 30), (4, 8), cost, step_ratio=(2.0, 1.0)) == pytest.approx(4.0)
    assert early_rounds((30,), (12,), cost) == 0


def test_warning_follows_the_measured_efficiency(monkeypatch):
    assert cost_warning("smollm2", 0.0) is None  # FedIT, or nothing below full depth
    monkeypatch.setitem(handover.MEASURED, "smollm2", Handover(efficiency=0.15, source="x"))
    text = cost_warning("smollm2", 2.0)
    assert "predicted to cost more device compute than FedIT" in text and "1.7 rounds more" in text  # 2 x (1 - 0.15)
    assert "never measured" in cost_warning("my-model", 2.0)
    monkeypatch.setitem(handover.MEASURED, "smollm2", Handover(efficiency=1.5, source="x"))
    assert cost_warning("smollm2", 2.0) is None


def test_plan_prints_the_warning(capsys):
    assert main(["plan", "--model", "smollm2", "--profile", "rpi4-4gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert "more device compute than FedIT" in plan["cost_warning"]
    assert main(["plan", "--model", "smollm2", "--profile", "rpi4-4gb", "--stages", "1"]) == 0
    assert "warning:" not in capsys.readouterr().out
