"""Did the honest run come out right under attack? Each round's merge, recomputed from the blobs.

The aggregator records which devices a round merged and their declared sample counts, not the
weights it used; this module recomputes what the round must have produced, the robust weighted
mean of the honest updates (``devft_edge/robust.py``: counts capped at 2x the others' median,
changes clipped at 3x their median norm), and compares it with what the aggregator produced. The
mean weighted by the raw counts is computed beside it, to show the comparison can fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostile import HONEST

from devft_edge.protocol import Envelope

RUN = "test-run"
"""The run id ``tests/system_harness.write_configs`` sets (it names the tasks)."""


@dataclass(frozen=True)
class RoundCheck:
    """One round's merge, recomputed from the honest updates."""

    round: int
    stage: int
    devices: list[str]
    num_samples: dict[str, int]
    robust_weights: list[float]
    max_abs_diff: float | None
    """Largest difference between the aggregator's merge and the robust mean; None: not checkable."""
    fedavg_diff: float | None
    """The same against the mean weighted by the raw declared counts (shows the check can fail)."""
    note: str = ""


def check_rounds(run_dir: Path, tasks: dict[int, Envelope], state: dict[str, Any]) -> list[RoundCheck]:
    """Each round's merge against the robust mean of the honest updates, recomputed from their blobs.

    A round's merge is the LoRA the next round of its stage starts from (mallory's next task names
    it); the last round's is the run's final full LoRA once the last stage spans the whole model. The
    last round of an earlier stage is handed over to the next stage (fused differently): unchecked.
    """
    from devft_edge.robust import DEFAULT_WEIGHT_RATIO, robust_weights
    from devft_edge.weights import read_safetensors

    blobs = run_dir / "agg" / "state" / "blobs"
    done = {d: json.loads((run_dir / d / "tasks.json").read_text()) for d in HONEST}
    checks = []
    for entry in state["history"]:
        index, stage = entry["round"], entry["stage"]
        samples = {d: c["num_samples"] for d, c in entry["clients"].items()}
        counts = [samples[d] for d in entry["devices"]]
        weights = robust_weights(counts, DEFAULT_WEIGHT_RATIO)
        following = tasks.get(index + 1)
        if following is not None and following.stage == stage:
            result_sha, note = following.data["lora"]["blob"], ""
        elif index == len(state["history"]) - 1:
            result_sha, note = state["full_lora"], "against the final full LoRA"
        else:
            checks.append(RoundCheck(index, stage, entry["devices"], samples, weights, None, None, "handed over"))
            continue
        start = read_safetensors(blobs / tasks[index].data["lora"]["blob"])
        result = read_safetensors(blobs / result_sha)
        updates = [
            read_safetensors(blobs / done[d][f"task-{RUN}-{stage}-{index}-{d}"]["blob"]) for d in entry["devices"]
        ]
        if set(result) != set(start):
            checks.append(RoundCheck(index, stage, entry["devices"], samples, weights, None, None, "other names"))
            continue
        robust = _distance(_robust_mean(start, updates, weights, index), result)
        fedavg = _distance(_robust_mean(start, updates, [float(c) for c in counts], index), result)
        checks.append(RoundCheck(index, stage, entry["devices"], samples, weights, robust, fedavg, note))
    return checks


def _robust_mean(
    start: dict[str, Any], updates: list[dict[str, Any]], weights: list[float], index: int
) -> dict[str, Any]:
    """What the aggregator's round close computes: changes clipped to 3x the others' median norm,
    then the weighted mean (the ``fedit`` rule)."""
    from devft_edge.aggregation import RULES, GlobalState
    from devft_edge.robust import DEFAULT_NORM_RATIO, clip_scales, clipped
    from devft_edge.update_check import check_update

    scales = clip_scales([check_update(u, start, None) for u in updates], DEFAULT_NORM_RATIO)
    pairs = ((clipped(u, start, s), w) for u, s, w in zip(updates, scales, weights, strict=True))
    return RULES.get("fedit").aggregate(GlobalState(lora=dict(start)), pairs, index, 0).lora


def _distance(expected: dict[str, Any], result: dict[str, Any]) -> float:
    return max(float((expected[k] - result[k].float()).abs().max()) for k in result)
