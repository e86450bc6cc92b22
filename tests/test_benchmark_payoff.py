"""The pay-off benchmark: its cost arithmetic, and its pipeline on the tiny model (seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import payoff  # noqa: E402


def _row(r, loss, compute, nbytes):
    return {
        "round": r,
        "stage": 1,
        "eval_loss": loss,
        "compute": compute,
        "bytes_up": nbytes,
        "bytes_down": 0,
        "wall_seconds": float(r),
    }


ROWS = [_row(1, 2.0, 16.0, 100), _row(2, None, 32.0, 200), _row(3, 1.5, 48.0, 300), _row(4, 1.2, 64.0, 400)]


def test_cost_to_target_and_loss_at_equal_cost():
    assert payoff.cost_to(ROWS, 1.5) == {"compute": 48.0, "bytes": 300, "wall": 3.0}
    assert payoff.cost_to(ROWS, 1.0) is None
    assert payoff.loss_at(ROWS, "compute", 48.0) == 1.5
    assert payoff.loss_at(ROWS, "compute", 56.0) == pytest.approx(1.35)  # halfway between rounds 3 and 4
    assert payoff.loss_at(ROWS, "bytes", 500) == 1.2  # past the end: the last loss
    assert payoff.loss_at(ROWS, "compute", 8.0) == 2.0  # before the first evaluation: that evaluation


def test_compute_to_a_handed_over_loss():
    assert payoff.compute_to(ROWS, 2.5, start=3.0) == pytest.approx(8.0)  # halfway from the untuned loss to round 1
    assert payoff.compute_to(ROWS, 1.75, start=3.0) == pytest.approx(32.0)  # the unevaluated round 2 is skipped
    assert payoff.compute_to(ROWS, 3.5, start=3.0) == 0.0  # no better than untuned: worth no compute
    assert payoff.compute_to(ROWS, 1.0, start=3.0) is None


def test_every_run_is_a_simulate_command_with_the_federation():
    specs = payoff.build_specs(["main", "fleet"], [0, 1])
    assert len({s.name for s in specs}) == len(specs) == 2 * (len(payoff.SUITES["main"][0]) + 3)
    fleet = next(s for s in specs if s.suite == "fleet" and s.variant == "best")
    command = fleet.command(quick=False, out=Path("x"))
    assert (
        command[2:4] == ["devft_edge", "simulate"] and "--client-profiles" in command and "rpi4-2gb,rpi5-8gb" in command
    )
    assert command[command.index("--rounds") + 1] == "12" and command[command.index("--quant") + 1] == "int4"


@pytest.mark.long  # a benchmark's quick run: `make test-long`
def test_quick_pipeline_runs_and_reports(tmp_path):
    code = payoff.main(
        [
            "run",
            "--quick",
            "--suite",
            "all",
            "--seeds",
            "0",
            "--results",
            str(tmp_path),
            "--only",
            "main-fedit-*",
            "main-paper-*",
            "fleet-fedit-*",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "main-paper-s0" / "summary.json").read_text())
    assert summary["stages"][0]["full_eval_loss"] is not None and summary["compute"] > 0
    md = tmp_path / "payoff.md"
    assert payoff.main(["report", "--results", str(tmp_path), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "What each stage hands over" in text and "| paper | 1 |" in text and "Exact match per task family" in text
