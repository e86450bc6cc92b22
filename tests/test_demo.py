"""`devft-edge demo`: the whole fleet as real processes (embedded broker, aggregator, agents).

The quick form on the tiny model runs the real system end to end and must leave the files the
simulator leaves, with the same keys, so both are read and plotted by the same tools.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from devft_edge.demo import DemoConfig, write_fleet
from devft_edge.errors import ConfigError
from devft_edge.simulator import RoundMetrics


def test_quick_demo_runs_the_fleet_and_writes_the_simulators_files(tmp_path):
    pytest.importorskip("amqtt")
    from peft import PeftModel

    from devft_edge.models import load_model

    out = tmp_path / "demo"
    command = [sys.executable, "-m", "devft_edge", "demo", "--model", "tiny", "--devices", "3", "--stages", "2"]
    command += ["--rounds", "4", "--local-steps", "2", "--examples-per-client", "12", "--eval-examples", "6"]
    command += ["--checkpointing"]  # over the network end to end (test_system covers the default)
    done = subprocess.run([*command, "--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + (out / "logs" / "aggregator.log").read_text()[-3000:]
    summary = json.loads(done.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert {f.name for f in fields(RoundMetrics)} <= set(rows[0])
    assert [s["layers"] for s in summary["stages"]] == [4, 8] and sum(s["rounds"] for s in summary["stages"]) == 4
    assert summary["config"]["train"]["checkpointing"] is True
    for stage in summary["stages"]:  # the planner's prediction beside the task peaks devices reported
        reported = [r["peak_rss_bytes"] for r in rows if r["stage"] == stage["stage"]]
        assert 2**27 < stage["device_peak_bytes"] == max(reported) < 2**33 and stage["predicted_peak_bytes"] > 2**27
    assert summary["final_eval_loss"] == rows[-1]["eval_loss"] < summary["initial_eval_loss"]
    # the hand-over: the full model with stage 1's transferred LoRA, measured by the aggregator
    assert rows[0]["full_eval_loss"] is not None and rows[1]["full_eval_loss"] is None
    assert rows[-1]["full_eval_loss"] == rows[-1]["eval_loss"]
    assert rows[-1]["compute"] > rows[0]["compute"] > 0
    assert summary["bytes_down_pack"] > 0 and summary["bytes_up"] > 0 and summary["rejected"] == {}
    assert sum(d["updates"] for d in summary["devices"].values()) == sum(len(r["devices"]) for r in rows)
    assert len(summary["demo"]["device_profiles"]) == 3
    assert (out / "curves.png").stat().st_size > 0
    for device in summary["demo"]["device_profiles"]:  # each device trained on its own file only
        assert (out / "devices" / device / "data" / "train.jsonl").exists()
        trained = [line for line in (out / "logs" / f"{device}.log").read_text().splitlines() if " trained: " in line]
        assert len(trained) >= summary["devices"].get(device, {}).get("updates", 0)
        assert all(line.endswith(", gradient checkpointing") for line in trained)
    base = load_model("tiny", seed=0)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert not torch.allclose(before, tuned)


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
