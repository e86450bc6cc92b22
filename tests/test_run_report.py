"""The one writer of a run's files: rows, summary and plot, the same for both engines."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from cloud_aggregator.report import metrics_row
from devft_edge.run_report import METRICS_FILE, RoundMetrics, summarise, write_metrics, write_report


def _row(number: int, eval_loss: float | None, peak: int, **more: object) -> RoundMetrics:
    values: dict[str, object] = dict(
        round=number,
        stage=1,
        layers=4,
        train_loss=2.0,
        eval_loss=eval_loss,
        eval_accuracy=None,
        eval_accuracy_by_task=None,
        full_eval_loss=None,
        full_eval_accuracy=None,
        wall_seconds=1.5 * number,
        parallel_seconds=1.0 * number,
        compute=0.25 * number,
        server_seconds=0.0,
        bytes_up=100 * number,
        bytes_down=1000 * number,
        bytes_down_pack=900,
        peak_rss_bytes=peak,
        devices=["0", "2"],
    )
    values.update(more)
    return RoundMetrics(**values)  # type: ignore[arg-type]


def test_the_summary_is_the_last_row_and_the_largest_peak(tmp_path: Path) -> None:
    rows = [_row(1, 3.0, peak=700), _row(2, 2.5, peak=500, eval_accuracy=0.25)]
    initial = {"eval_loss": 3.5, "eval_accuracy": 0.0, "eval_accuracy_by_task": {"math": 0.0}}
    summary = summarise("devft", "tiny", rows, initial, [{"stage": 1}], tmp_path / "adapter", {"rank": 8})
    assert summary["rounds"] == 2 and summary["stages"] == [{"stage": 1}]
    assert (summary["initial_eval_loss"], summary["final_eval_loss"]) == (3.5, 2.5)
    assert summary["final_eval_accuracy"] == 0.25
    assert (summary["wall_seconds"], summary["parallel_seconds"], summary["compute"]) == (3.0, 2.0, 0.5)
    assert (summary["bytes_up"], summary["bytes_down"], summary["bytes_down_pack"]) == (200, 2000, 900)
    assert summary["peak_rss_bytes"] == 700  # the largest of the rows, not the last
    assert summary["adapter_dir"] == str(tmp_path / "adapter") and summary["config"] == {"rank": 8}


def test_the_files_are_written_whole(tmp_path: Path) -> None:
    rows = [_row(1, 3.0, peak=700), _row(2, None, peak=500)]
    write_metrics(tmp_path / METRICS_FILE, rows[:1])
    write_metrics(tmp_path / METRICS_FILE, rows)  # rewritten, not appended: a resumed run writes the same file
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines == [asdict(r) for r in rows] and not list(tmp_path.glob("*.tmp"))
    summary = summarise("fedit", "tiny", rows, {"eval_loss": 3.5}, [], tmp_path, {})
    write_report(tmp_path, summary, rows)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_fleet_round_becomes_the_same_row() -> None:
    """The aggregator's history entry in the simulator's row: 1-based round, mean client loss,
    the largest device peak, wall time as parallel time (devices train in parallel)."""
    entry = {
        "round": 0,
        "stage": 2,
        "layers": 8,
        "devices": ["dev-0", "dev-1"],
        "clients": {
            "dev-0": {"train_loss": 1.0, "peak_rss_bytes": 10},
            "dev-1": {"train_loss": 2.0, "peak_rss_bytes": 30},
        },
        "eval_loss": 1.25,
        "wall_seconds": 9.0,
        "compute": 0.5,
        "bytes_up": 1,
        "bytes_down": 2,
        "bytes_down_pack": 1,
    }
    row = metrics_row(entry)
    assert (row.round, row.stage, row.layers, row.train_loss, row.eval_loss) == (1, 2, 8, 1.5, 1.25)
    assert (row.peak_rss_bytes, row.parallel_seconds, row.devices) == (30, 9.0, ["dev-0", "dev-1"])
    assert {f.name for f in fields(RoundMetrics)} == set(asdict(row))
