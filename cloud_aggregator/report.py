"""What a run leaves behind for people: ``metrics.jsonl``, ``summary.json`` and ``curves.png``.

The files have the simulator's format (one line per round with the same keys, the same summary
fields), so a run over the network and a simulated one are read, plotted and compared by the
same tools. They are derived from the checkpointed run state only, so a resumed run writes the
same files as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cloud_aggregator.config import AggregatorConfig
from cloud_aggregator.state import RunState
from devft_edge.peak_memory import peak_bytes

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"


def metrics_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One ``metrics.jsonl`` line from a history entry: the simulator's keys, plus the devices.

    ``round`` is 1-based like the simulator's; ``peak_rss_bytes`` is the largest peak any device
    of the round reported (the simulator's single process plays every device); over the network
    devices train in parallel, so ``parallel_seconds`` is the wall time.
    """
    clients = entry.get("clients", {})
    losses = [c["train_loss"] for c in clients.values()]
    return {
        "round": entry["round"] + 1,
        "stage": entry["stage"],
        "layers": entry["layers"],
        "train_loss": sum(losses) / len(losses) if losses else None,
        "eval_loss": entry.get("eval_loss"),
        "eval_accuracy": entry.get("eval_accuracy"),
        "eval_accuracy_by_task": entry.get("eval_accuracy_by_task"),
        "full_eval_loss": entry.get("full_eval_loss"),
        "full_eval_accuracy": entry.get("full_eval_accuracy"),
        "wall_seconds": entry["wall_seconds"],
        "parallel_seconds": entry["wall_seconds"],
        "compute": entry.get("compute", 0.0),
        "server_seconds": entry.get("server_seconds", 0.0),
        "bytes_up": entry["bytes_up"],
        "bytes_down": entry["bytes_down"],
        "bytes_down_pack": entry["bytes_down_pack"],
        "peak_rss_bytes": max((c["peak_rss_bytes"] for c in clients.values()), default=0),
        "devices": entry["devices"],
    }


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the whole history (idempotent across restarts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(metrics_row(e)) + "\n" for e in history))
    tmp.replace(path)


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


def _stage_end(history: list[dict[str, Any]], stage: int) -> dict[str, Any]:
    """The history entry of ``stage``'s last round ({} if it has none)."""
    return next((e for e in reversed(history) if e["stage"] == stage), {})


def write_summary(cfg: AggregatorConfig, state: RunState, adapter_dir: Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``curves.png`` of a finished run; returns the summary."""
    history = state.history
    final = history[-1] if history else {}
    rounds_per_stage = {s["stage"]: 0 for s in state.stages}
    device_peak = {s["stage"]: 0 for s in state.stages}
    for entry in history:
        rounds_per_stage[entry["stage"]] += 1
        for c in entry.get("clients", {}).values():
            device_peak[entry["stage"]] = max(device_peak[entry["stage"]], c["peak_rss_bytes"])
    rows = [metrics_row(e) for e in history]
    summary: dict[str, Any] = {
        "method": cfg.method,
        "model": cfg.model,
        "rounds": len(history),
        "stages": [
            {k: s[k] for k in ("stage", "layers", "groups", "pack_bytes")}
            | {"full_pack_bytes": s.get("full_pack_bytes", 0)}
            | {"heal": s.get("heal"), "full_eval_loss": _stage_end(history, s["stage"]).get("full_eval_loss")}
            | {
                "rounds": rounds_per_stage[s["stage"]],
                "predicted_peak_bytes": s.get("predicted_peak_bytes", 0),
                "device_peak_bytes": device_peak[s["stage"]],
            }
            for s in state.stages
        ],
        "initial_eval_loss": state.initial_eval.get("eval_loss"),
        "initial_eval_accuracy": state.initial_eval.get("eval_accuracy"),
        "final_eval_loss": final.get("eval_loss"),
        "final_eval_accuracy": final.get("eval_accuracy"),
        "wall_seconds": final.get("wall_seconds", 0.0),
        "parallel_seconds": final.get("wall_seconds", 0.0),
        "compute": final.get("compute", 0.0),
        "bytes_up": state.bytes_up,
        "bytes_down": state.bytes_down,
        "bytes_down_pack": state.bytes_down_pack,
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in rows), default=0),
        "aggregator_peak_rss_bytes": peak_bytes(),
        "devices": device_totals(history),
        "rejected": dict(sorted(state.rejected.items())),
        "adapter_dir": str(adapter_dir),
        "config": cfg.model_dump(mode="json"),
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    try:
        from devft_edge.plot import plot_curves

        plot_curves({cfg.method: rows}, cfg.out_dir / PLOT_FILE, reference=summary["initial_eval_loss"])
    except ImportError:  # matplotlib is optional on a server
        logger.warning("matplotlib is not installed: no %s", PLOT_FILE)
    return summary
