"""`devft-edge demo`: the whole fleet as real processes (embedded broker, aggregator, agents).

The quick demo on the tiny model, and the files it must leave (the simulator's, with the same
keys), are checked in ``tests/test_one_engine.py``, beside the simulator's run of the same settings.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devft_edge.errors import ConfigError
from devft_edge.ops.demo import DemoConfig, write_fleet


def test_each_device_gets_a_private_disjoint_share_and_a_valid_config(tmp_path):
    cfg = DemoConfig(model="tiny", devices=3, per_round=2, stages=2, rounds=4, examples_per_client=10)
    aggregator, agents = write_fleet(cfg, tmp_path)
    shares = [(tmp_path / "devices" / d / "data" / "train.jsonl").read_text().splitlines() for d in cfg.device_ids()]
    assert sum(len(s) for s in shares) == 30 and all(shares)
    assert len(agents) == 3 and aggregator.exists()


@pytest.mark.parametrize(
    "bad", [dict(devices=0), dict(per_round=5, devices=2), dict(method="fedavg"), dict(profiles=())]
)
def test_demo_config_errors_are_clear(bad):
    with pytest.raises(ConfigError):
        DemoConfig(**bad)


def test_full_pack_delivery_devices_fuse_each_stage_over_mqtt(tmp_path):
    """Item 8 of the DevFT pay-off issue, over the real system: devices download the signed full pack
    once and fuse every stage from a signed stage plan carrying a heal adapter; they send fewer pack
    bytes than stage packs, and train on what the plan describes."""
    common = ["--model", "tiny", "--devices", "2", "--stages", "2", "--rounds", "3", "--local-steps", "2"]
    common += ["--examples-per-client", "8", "--eval-examples", "4", "--quant", "int4", "--json"]
    common += ["--transfer", "inv_n", "--keep-ends", "1"]
    runs = {}
    for delivery in ("stage_packs", "full_pack"):
        out = tmp_path / delivery
        command = [sys.executable, "-m", "devft_edge", "demo", *common, "--delivery", delivery, "--out", str(out)]
        if delivery == "full_pack":
            command += ["--heal", "adapter", "--heal-steps", "3", "--heal-prompts", "8"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:] + (out / "logs" / "aggregator.log").read_text()[-3000:]
        runs[delivery] = json.loads(done.stdout)
    full, staged = runs["full_pack"], runs["stage_packs"]
    assert full["rejected"] == {} and full["final_eval_loss"] < full["initial_eval_loss"]
    assert full["stages"][0]["heal"] is not None and full["stages"][0]["groups"][0] == [0]  # kept end
    # the full pack crossed once per device, then a small plan per stage
    assert full["stages"][0]["full_pack_bytes"] > 10 * full["stages"][1]["pack_bytes"]
    assert full["bytes_down_pack"] < staged["bytes_down_pack"]
    logs = "".join((tmp_path / "full_pack" / "logs" / f"{d}.log").read_text() for d in full["demo"]["device_profiles"])
    assert "fused from the full pack" in logs
