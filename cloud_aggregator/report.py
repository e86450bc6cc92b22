"""The aggregator's run report: its checkpointed history as :mod:`devft_edge.run_report` rows
and summary, the files the simulator writes too (``metrics.jsonl``, ``summary.json``,
``curves.png``), plus what only a fleet has: each device's totals and the rejected messages.

Everything is derived from the checkpointed run state only, so a resumed run writes the same
files as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cloud_aggregator.config import AggregatorConfig
from cloud_aggregator.state import RunState
from devft_edge.peak_memory import peak_bytes
from devft_edge.run_report import RoundMetrics, summarise, write_report

logger = logging.getLogger(__name__)


def metrics_row(entry: dict[str, Any]) -> RoundMetrics:
    """One ``metrics.jsonl`` row from a history entry.

    ``round`` is 1-based like the simulator's; ``peak_rss_bytes`` is the largest peak any device
    of the round reported; devices train in parallel, so ``parallel_seconds`` is the wall time.
    """
    clients = entry.get("clients", {})
    losses = [c["train_loss"] for c in clients.values()]
    return RoundMetrics(
        round=entry["round"] + 1,
        stage=entry["stage"],
        layers=entry["layers"],
        train_loss=sum(losses) / len(losses) if losses else None,
        eval_loss=entry.get("eval_loss"),
        eval_accuracy=entry.get("eval_accuracy"),
        eval_accuracy_by_task=entry.get("eval_accuracy_by_task"),
        full_eval_loss=entry.get("full_eval_loss"),
        full_eval_accuracy=entry.get("full_eval_accuracy"),
        wall_seconds=entry["wall_seconds"],
        parallel_seconds=entry["wall_seconds"],
        compute=entry.get("compute", 0.0),
        server_seconds=entry.get("server_seconds", 0.0),
        bytes_up=entry["bytes_up"],
        bytes_down=entry["bytes_down"],
        bytes_down_pack=entry["bytes_down_pack"],
        peak_rss_bytes=max((c["peak_rss_bytes"] for c in clients.values()), default=0),
        devices=list(entry["devices"]),
    )


def device_totals(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per device: updates accepted, training seconds, samples and the peak memory it reported."""
    totals: dict[str, dict[str, Any]] = {}
    for entry in history:
        for device, c in entry.get("clients", {}).items():
            t = totals.setdefault(device, {"updates": 0, "train_seconds": 0.0, "samples": 0, "peak_rss_bytes": 0})
            t["updates"] += 1
            t["train_seconds"] = round(t["train_seconds"] + c["seconds"], 3)
            t["samples"] = c["num_samples"]
            t["peak_rss_bytes"] = max(t["peak_rss_bytes"], c["peak_rss_bytes"])
    return dict(sorted(totals.items()))


def write_summary(cfg: AggregatorConfig, state: RunState, adapter_dir: Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``curves.png`` of a finished run; returns the summary."""
    history = state.history
    device_peak: dict[int, int] = {}
    for entry in history:
        for c in entry.get("clients", {}).values():
            device_peak[entry["stage"]] = max(device_peak.get(entry["stage"], 0), c["peak_rss_bytes"])
    rows = [metrics_row(e) for e in history]
    # the round loop's records (as the simulator's summary has them), with the peaks devices reported
    stages = [s | {"device_peak_bytes": device_peak.get(s["stage"], 0)} for s in state.stages]
    summary = summarise(
        cfg.method, cfg.model, rows, state.initial_eval, stages, adapter_dir, cfg.model_dump(mode="json")
    )
    summary |= {
        "bytes_up": state.bytes_up,
        "bytes_down": state.bytes_down,
        "bytes_down_pack": state.bytes_down_pack,
        "aggregator_peak_rss_bytes": peak_bytes(),
        "devices": device_totals(history),
        "rejected": dict(sorted(state.rejected.items())),
        "refusals": dict(sorted(state.refusals.items())),
    }
    write_report(cfg.out_dir, summary, rows)
    return summary
