"""What a run leaves behind for people: ``metrics.jsonl``, ``summary.json`` and ``curves.png``.

Written here for both engines, the simulator and the aggregator, so a run over the network and
a simulated one are read, plotted and compared by the same tools (``benchmarks/``, ``devft-edge
status``, the demo's report): one row type (:class:`RoundMetrics`), one summary skeleton
(:func:`summarise`, each engine adds what only it measures) and one writer of the files
(:func:`write_metrics`, :func:`write_report`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devft_edge.plot import plot_curves

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"


@dataclass(frozen=True)
class RoundMetrics:
    """One line of ``metrics.jsonl``: a closed round."""

    round: int
    """1-based."""
    stage: int
    layers: int
    train_loss: float | None
    """Mean of the round's clients' local training losses."""
    eval_loss: float | None
    """The stage submodel (with the round's aggregated LoRA) on the held-out set."""
    eval_accuracy: float | None
    eval_accuracy_by_task: dict[str, float] | None
    full_eval_loss: float | None
    """The full model with the LoRA transferred from this stage so far: what the stage hands over.
    Set on a stage's last round (``full_eval = stage``) or every round (``round``); at full depth it
    equals ``eval_loss``."""
    full_eval_accuracy: float | None
    wall_seconds: float
    parallel_seconds: float
    """Wall time had the round's clients trained in parallel (a fleet's wall time)."""
    compute: float
    """Cumulative device compute: local steps weighted by their submodel's step cost, in
    full-model-step equivalents (:mod:`devft_edge.step_cost`)."""
    server_seconds: float
    """Cumulative server time spent healing fused submodels (not in ``wall_seconds``)."""
    bytes_up: int
    bytes_down: int
    bytes_down_pack: int
    """Part of ``bytes_down`` that is model weights (stage packs or plans); the rest is LoRA state
    (and FLoRA's merged updates)."""
    peak_rss_bytes: int
    """The largest peak memory of a process that trained the round (the simulator plays every
    client in one process)."""
    devices: list[str] = field(default_factory=list)
    """Who trained the round: device ids, or the simulator's client indices."""


def write_metrics(path: Path, rows: Sequence[RoundMetrics]) -> None:
    """Rewrite ``metrics.jsonl`` from every row so far, atomically: a reader (``status``, a
    plot) never sees half a line, and a resumed run writes the same file as an uninterrupted one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))
    tmp.replace(path)


def summarise(
    method: str,
    model: str,
    rows: Sequence[RoundMetrics],
    initial: Mapping[str, Any],
    stages: list[dict[str, Any]],
    adapter_dir: Path,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """The summary fields both engines share, from the run's rows.

    ``initial`` is the untuned base model's evaluation (``eval_loss``, ``eval_accuracy``,
    ``eval_accuracy_by_task``); ``stages`` one dictionary per stage as its engine records it.
    Costs are the last row's (they are cumulative); an engine overrides what it counts after the
    last round (the simulator: FedSA-LoRA's final upload of the private B, its own process peak).
    """
    final = rows[-1] if rows else None
    return {
        "method": method,
        "model": model,
        "rounds": len(rows),
        "stages": stages,
        "initial_eval_loss": initial.get("eval_loss"),
        "initial_eval_accuracy": initial.get("eval_accuracy"),
        "initial_eval_accuracy_by_task": initial.get("eval_accuracy_by_task"),
        "final_eval_loss": final.eval_loss if final else None,
        "final_eval_accuracy": final.eval_accuracy if final else None,
        "final_eval_accuracy_by_task": final.eval_accuracy_by_task if final else None,
        "wall_seconds": final.wall_seconds if final else 0.0,
        "parallel_seconds": final.parallel_seconds if final else 0.0,
        "compute": final.compute if final else 0.0,
        "server_seconds": final.server_seconds if final else 0.0,
        "bytes_up": final.bytes_up if final else 0,
        "bytes_down": final.bytes_down if final else 0,
        "bytes_down_pack": final.bytes_down_pack if final else 0,
        "peak_rss_bytes": max((r.peak_rss_bytes for r in rows), default=0),
        "adapter_dir": str(adapter_dir),
        "config": json.loads(json.dumps(config, default=str)),
    }


def write_report(out_dir: Path, summary: Mapping[str, Any], rows: Sequence[RoundMetrics]) -> None:
    """Write ``summary.json`` and ``curves.png`` of a finished run (the plot is skipped, with a
    warning, where matplotlib is not installed: it is optional on a server)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot_curves(
            {str(summary["method"]): [asdict(r) for r in rows]},
            out_dir / PLOT_FILE,
            reference=summary.get("initial_eval_loss"),
        )
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", PLOT_FILE)
