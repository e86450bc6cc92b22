"""Issue 15: every method runs over the network, and the simulator and the fleet agree.

``devft-edge simulate`` (in-process clients) and ``devft-edge demo`` (aggregator, agents and a
broker as real processes) run the same stage builder, aggregation rules, client halves, selection
and seeds, so with fp32 packs and the same settings they report the same per-round eval loss. The
method that exercises the most (a rule's private factors carried across DevFT stages) runs in
``make test``; all six, and every method on mosquitto with int4 packs, in ``make test-long``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from devft_edge.methods import METHODS, uses_devft

COMMON = ["--model", "tiny", "--per-round", "2", "--stages", "2", "--rounds", "4", "--local-steps", "2"]
COMMON += ["--examples-per-client", "12", "--eval-examples", "6", "--seed", "0", "--json"]
QUICK = ("devft+fedsa",)
"""In ``make test`` (which must stay under 20 minutes): the method whose devices carry the most
between rounds and stages; FLoRA's update beside the packs runs in ``make test-long``."""


def _cli(*args: str, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "devft_edge", *args, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    log = out / "logs" / "aggregator.log"
    assert done.returncode == 0, done.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    return json.loads(done.stdout)


def _eval_losses(out: Path) -> list[float]:
    return [json.loads(line)["eval_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _methods(quick: tuple[str, ...]) -> list[object]:
    return [m if m in quick else pytest.param(m, marks=pytest.mark.long) for m in METHODS if m != "devft+fedit"]


def _check_fleet_files(out: Path, summary: dict) -> None:
    """A DevFT demo (2 stages, 4 rounds, 3 devices, gradient checkpointing) left the simulator's
    files with the same keys, the planner's predictions beside what devices measured, the
    hand-over, and an adapter that stock peft loads."""
    from peft import PeftModel

    from devft_edge.models import load_model
    from devft_edge.run_report import RoundMetrics

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


@pytest.mark.parametrize("method", _methods(QUICK))
def test_demo_and_simulate_report_the_same_eval_loss(tmp_path, method):
    """Also: gradient checkpointing on the devices changes no number (it recomputes, exactly)."""
    pytest.importorskip("amqtt")
    fp32 = [*COMMON, "--quant", "none", "--data-alpha", "0", "--method", method]
    simulated = _cli("simulate", *fp32, "--clients", "3", out=tmp_path / "sim")
    fleet = _cli("demo", *fp32, "--devices", "3", "--checkpointing", out=tmp_path / "demo")
    if uses_devft(method):
        _check_fleet_files(tmp_path / "demo", fleet)
    sim, net = _eval_losses(tmp_path / "sim"), _eval_losses(tmp_path / "demo")
    assert len(sim) == len(net) == 4
    assert sim == pytest.approx(net, abs=1e-4), (sim, net)
    assert fleet["rejected"] == {} and simulated["final_eval_loss"] == pytest.approx(fleet["final_eval_loss"], abs=1e-4)
    # the devices' training moved the model: equal numbers are not two untrained runs
    assert len(set(net)) == 4
    # one stage record: the loop's, in both summaries (the fleet adds what devices reported)
    shared = ("stage", "layers", "rounds", "local_steps", "step_cost", "groups", "heal")
    for sim_stage, net_stage in zip(simulated["stages"], fleet["stages"], strict=True):
        assert {k: sim_stage[k] for k in shared} == {k: net_stage[k] for k in shared}
        # the simulator sizes a pack of the same stage with placeholder metadata (pack_size.py)
        assert sim_stage["pack_bytes"] == pytest.approx(net_stage["pack_bytes"], rel=1e-5)
        for key in ("eval_loss", "full_eval_loss", "full_eval_accuracy"):
            assert sim_stage[key] == pytest.approx(net_stage[key], abs=1e-4), key
    if "fedsa" in method:  # each device that trained kept its own B, in full-model space, for the next stage
        kept = list((tmp_path / "demo" / "devices").glob("*/cache/runs/*/private.safetensors"))
        assert kept and len(kept) == len(fleet["devices"])
        # the server holds each device's last B only: a superseded one is deleted after the checkpoint
        state_dir = tmp_path / "demo" / "aggregator-state"
        private = json.loads((state_dir / "state.json").read_text())["private"]
        sizes = {(state_dir / "blobs" / p["blob"]).stat().st_size for p in private.values()}
        held = [b for b in (state_dir / "blobs").iterdir() if b.is_file() and b.stat().st_size in sizes]
        assert len(private) == len(fleet["devices"]) and len(held) == len(private)


@pytest.mark.parametrize("method", _methods(()))
def test_every_method_runs_over_mosquitto_with_int4_packs(tmp_path, method, broker):
    from peft import PeftModel

    from devft_edge.models import load_model

    summary = _cli("demo", *COMMON, "--devices", "3", "--method", method, "--broker", broker, out=tmp_path / "demo")
    assert summary["rejected"] == {} and summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert summary["method"] == method
    base = load_model("tiny", seed=0)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "demo" / "adapter")(ids).logits
    assert not torch.allclose(before, tuned)


@pytest.mark.long
def test_devft_options_give_the_same_numbers_over_the_network(tmp_path):
    """The adaptive stage advance, compute-scaled local steps, beta auto and the equal round split,
    all at once: the fleet ends stage 1 early and carries its rounds over as the simulator does."""
    pytest.importorskip("amqtt")
    options = ["--model", "tiny", "--per-round", "2", "--stages", "2", "--rounds", "8", "--round-split", "equal"]
    options += ["--local-steps", "4", "--examples-per-client", "12", "--eval-examples", "6", "--seed", "0", "--json"]
    options += ["--quant", "none", "--data-alpha", "0", "--method", "devft", "--beta", "auto"]
    options += ["--adaptive-patience", "1", "--adaptive-min-delta", "1.0", "--stage-steps", "compute"]
    simulated = _cli("simulate", *options, "--clients", "3", out=tmp_path / "sim")
    fleet = _cli("demo", *options, "--devices", "3", out=tmp_path / "demo")
    sim, net = _eval_losses(tmp_path / "sim"), _eval_losses(tmp_path / "demo")
    assert sim == pytest.approx(net, abs=1e-4), (sim, net)
    assert [s["rounds"] for s in simulated["stages"]] == [s["rounds"] for s in fleet["stages"]] == [2, 6]
    assert fleet["rejected"] == {}
