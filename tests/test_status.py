"""The retained status stays bounded whatever the fleet's size."""

from __future__ import annotations

import json

from cloud_aggregator.state import Device, RunState
from cloud_aggregator.status import STATUS_DEVICES, status_document
from devft_edge.profiles import load_profile


def test_the_status_of_a_huge_fleet_fits_an_agents_message_limit() -> None:
    profile = load_profile("x86-cpu").model_dump(mode="json", exclude={"name"})
    state = RunState(run_id="r", devices={f"device-{i:05d}-" + "x" * 40: Device(profile, 0.0) for i in range(20_000)})
    doc = status_document(state, boot="b", stages=4, rounds=12)
    assert len(json.dumps(doc)) < 8 * 1024  # agents refuse messages over 64 KiB
    assert len(doc["devices_online"]) == STATUS_DEVICES and doc["devices_online_count"] == 20_000
    assert doc["devices_known"] == 20_000 and doc["round_open"] is None
