"""The aggregator's retained status document: what ``devft-edge status``, the demo's progress bar
and every agent (which re-announces itself on a new ``boot``) read.

Built from the checkpointed run state only, as a typed :class:`~devft_edge.messages.Status`,
bounded whatever the fleet's size (:data:`~devft_edge.messages.STATUS_DEVICES`).
"""

from __future__ import annotations

from cloud_aggregator.state import RunState
from devft_edge.messages import STATUS_DEVICES, RoundStatus, Status


def status_document(state: RunState, boot: str, stages: int, rounds: int) -> Status:
    """The status of ``state``; ``boot`` changes on every aggregator start and reconnect."""
    last = state.history[-1] if state.history else {}
    online = sorted(d for d, v in state.devices.items() if v.online)
    round_ = state.open_round
    return Status(
        run=state.run_id,
        boot=boot,
        stage=state.stage,
        stages=stages,
        round=state.rounds_done,
        rounds=rounds,
        finished=state.finished,
        devices_online=tuple(online[:STATUS_DEVICES]),
        devices_online_count=len(online),
        devices_known=len(state.devices),
        round_open=None
        if round_ is None
        else RoundStatus(round_.index, tuple(round_.selected), tuple(sorted(round_.accepted)), round_.deadline),
        bytes_up=state.bytes_up,
        bytes_down=state.bytes_down,
        eval_loss=last.get("eval_loss"),
        eval_accuracy=last.get("eval_accuracy"),
        rejected=dict(state.rejected),
        refusals=dict(state.refusals),
    )
