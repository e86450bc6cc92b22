"""The aggregator's retained status document: what ``devft-edge status``, the demo's progress bar
and every agent (which re-announces itself on a new ``boot``) read.

Built from the checkpointed run state only, and bounded whatever the fleet's size: agents refuse
messages over 64 KiB, and a status that grew with the fleet (1,000 ghost hellos pushed it past
that once) would cut every device off.
"""

from __future__ import annotations

from typing import Any

from cloud_aggregator.state import RunState

STATUS_DEVICES = 64
"""Device ids the status lists by name (the rest are counted)."""


def status_document(state: RunState, boot: str, stages: int, rounds: int) -> dict[str, Any]:
    """The status ``data`` of ``state``; ``boot`` changes on every aggregator start and reconnect."""
    last = state.history[-1] if state.history else {}
    online = sorted(d for d, v in state.devices.items() if v.online)
    round_ = state.open_round
    return {
        "run": state.run_id,
        "boot": boot,
        "stage": state.stage,
        "stages": stages,
        "round": state.rounds_done,
        "rounds": rounds,
        "finished": state.finished,
        "devices_online": online[:STATUS_DEVICES],
        "devices_online_count": len(online),
        "devices_known": len(state.devices),
        "round_open": None
        if round_ is None
        else {
            "index": round_.index,
            "selected": round_.selected,
            "accepted": sorted(round_.accepted),
            "deadline": round_.deadline,
        },
        "bytes_up": state.bytes_up,
        "bytes_down": state.bytes_down,
        "eval_loss": last.get("eval_loss"),
        "eval_accuracy": last.get("eval_accuracy"),
        "rejected": dict(sorted(state.rejected.items())),
    }
