"""The retained status: bounded whatever the fleet's size, and typed (a status that does not parse is named)."""

from __future__ import annotations

import json

import pytest

from cloud_aggregator.state import Device, OpenRound, RunState
from cloud_aggregator.status import status_document
from devft_edge.messages import STATUS_DEVICES, Status
from devft_edge.profiles import load_profile
from devft_edge.protocol import ProtocolError, Reason


def test_the_status_of_a_huge_fleet_fits_an_agents_message_limit() -> None:
    profile = load_profile("x86-cpu").model_dump(mode="json", exclude={"name"})
    state = RunState(run_id="r", devices={f"device-{i:05d}-" + "x" * 40: Device(profile, 0.0) for i in range(20_000)})
    doc = status_document(state, boot="b", stages=4, rounds=12).to_data()
    assert len(json.dumps(doc)) < 8 * 1024  # agents refuse messages over 64 KiB
    assert len(doc["devices_online"]) == STATUS_DEVICES and doc["devices_online_count"] == 20_000
    assert doc["devices_known"] == 20_000 and doc["round_open"] is None


def test_a_status_round_trips_through_the_wire() -> None:
    state = RunState(run_id="r", stage=2, rounds_done=3, rejected={"seal": 2}, refusals={"memory": 1})
    state.open_round = OpenRound(index=3, selected=["b", "a"], tasks={}, deadline=9.5)
    state.history.append({"eval_loss": 1.25, "eval_accuracy": None})
    status = status_document(state, boot="b", stages=4, rounds=12)
    assert Status.from_data(json.loads(json.dumps(status.to_data()))) == status
    assert status.round_open is not None and status.round_open.selected == ("b", "a") and status.eval_loss == 1.25


@pytest.mark.parametrize(
    ("changes", "named"),
    [({"stage": "2"}, "stage"), ({"rejected": {"seal": -1}}, "rejected"), ({"round_open": {"index": True}}, "index")],
)
def test_a_bad_status_names_its_field(changes: dict, named: str) -> None:
    data = {**status_document(RunState(run_id="r"), boot="b", stages=4, rounds=12).to_data(), **changes}
    with pytest.raises(ProtocolError, match=named) as error:
        Status.from_data(data)
    assert error.value.reason is Reason.MALFORMED
