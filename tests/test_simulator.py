"""End-to-end federated simulations on the tiny model, and the CLI's argument errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import PeftModel

from devft_edge.cli import main
from devft_edge.data import train_eval_split
from devft_edge.errors import ConfigError
from devft_edge.methods import METHODS
from devft_edge.models import load_model, load_tokenizer
from devft_edge.simulator import SimulationConfig, simulate
from devft_edge.training import TrainSettings, evaluate

METRIC_KEYS = {
    "round",
    "stage",
    "layers",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "wall_seconds",
    "compute",
    "full_eval_loss",
    "full_eval_accuracy",
    "server_seconds",
    "bytes_up",
    "bytes_down",
    "peak_rss_bytes",
}
SUMMARY_KEYS = {
    "method",
    "rounds",
    "final_eval_loss",
    "final_eval_accuracy",
    "wall_seconds",
    "bytes_up",
    "bytes_down",
    "adapter_dir",
}

BASE = SimulationConfig(
    model="tiny",
    clients=4,
    per_round=2,
    stages=2,
    rounds=4,
    train=TrainSettings(steps=3, batch_size=4, seq_len=48, lr=1e-2),
    examples_per_client=16,
    eval_examples=8,
    eval_every=2,
    quant="none",
)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


QUICK_METHODS = ("devft", "fedit")
"""Simulated end to end in ``make test``; the others only in ``make test-long``, to keep ``make test``
under 20 minutes (it still runs FLoRA's resume in ``test_run_loop.py`` and devft+fedsa in
``test_one_engine.py``; fedsa and devft+flora run in ``make test-long`` only)."""


@pytest.mark.parametrize(
    "method",
    [m if m in QUICK_METHODS else pytest.param(m, marks=pytest.mark.long) for m in METHODS if m != "devft+fedit"],
)
def test_two_stage_simulation_end_to_end(method, tmp_path):
    summary = simulate(BASE.replace(method=method), tmp_path, progress=False)
    rows = _lines(tmp_path / "metrics.jsonl")
    assert len(rows) == 4 and all(METRIC_KEYS <= row.keys() for row in rows)
    assert SUMMARY_KEYS <= summary.keys()
    assert json.loads((tmp_path / "summary.json").read_text())["final_eval_loss"] == summary["final_eval_loss"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    if method.startswith("devft"):
        # default depth split of 4 rounds over stages of 4 and 8 layers: 1 and 3 rounds
        assert [r["layers"] for r in rows] == [4, 8, 8, 8] and [r["stage"] for r in rows] == [1, 2, 2, 2]
    else:
        assert [r["layers"] for r in rows] == [8] * 4
    # Byte counters are cumulative and positive both ways.
    assert all(b > a for a, b in zip([0] + [r["bytes_up"] for r in rows], [r["bytes_up"] for r in rows], strict=False))
    assert rows[-1]["bytes_down"] > rows[0]["bytes_down"] >= rows[0]["bytes_down_pack"] > 0
    if "flora" not in method:  # FLoRA sends no LoRA down: clients restart it from a seed
        assert rows[0]["bytes_down"] > rows[0]["bytes_down_pack"]
    assert summary["bytes_down_pack"] == rows[-1]["bytes_down_pack"]
    # The hand-over is measured after every stage; at full depth it is the stage's own evaluation.
    assert rows[-1]["full_eval_loss"] == rows[-1]["eval_loss"] == summary["final_eval_loss"]
    if method.startswith("devft"):
        assert rows[0]["full_eval_loss"] is not None and rows[1]["full_eval_loss"] is None
    # Device compute: local steps weighted by the step cost of their submodel's depth.
    costs = [s["step_cost"] for s in summary["stages"]]
    expected = sum(
        s["rounds"] * BASE.per_round * s["local_steps"] * c for s, c in zip(summary["stages"], costs, strict=True)
    )
    assert summary["compute"] == pytest.approx(expected, rel=1e-4)
    assert costs[-1] == 1.0 and all(0 < c <= 1 for c in costs)
    # Training makes progress on the held-out set (FLoRA restarts LoRA from B = 0 every round,
    # so with 3 local steps it moves least).
    margin = 0.01 if "flora" in method else 0.1
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - margin
    # The exported adapter, loaded by stock peft on a fresh base, reproduces the final eval loss.
    peft_model = PeftModel.from_pretrained(load_model("tiny", seed=0), summary["adapter_dir"])
    _, held_out = train_eval_split(BASE.clients * BASE.examples_per_client, BASE.eval_examples, BASE.seed)
    result = evaluate(peft_model, load_tokenizer("tiny"), held_out, BASE.train.seq_len)
    assert result.loss == pytest.approx(summary["final_eval_loss"], abs=2e-3)


def test_devft_saves_bytes_and_uses_fused_stage(tmp_path):
    devft = simulate(BASE.replace(method="devft"), tmp_path / "d", progress=False)
    fedit = simulate(BASE.replace(method="fedit"), tmp_path / "f", progress=False)
    assert devft["stages"][0]["layers"] == 4 and len(devft["stages"][0]["groups"]) == 4
    assert devft["stages"][0]["pack_bytes"] < fedit["stages"][0]["pack_bytes"]
    assert devft["compute"] < fedit["compute"]
    # The first (half-depth) stage sends half the LoRA bytes per update.
    d_rows, f_rows = _lines(tmp_path / "d" / "metrics.jsonl"), _lines(tmp_path / "f" / "metrics.jsonl")
    assert d_rows[0]["bytes_up"] * 2 == pytest.approx(f_rows[0]["bytes_up"], rel=0.01)


def test_one_stage_devft_equals_fedit(tmp_path):
    cfg = BASE.replace(stages=1, rounds=2)
    a = simulate(cfg.replace(method="devft"), tmp_path / "a", progress=False)
    b = simulate(cfg.replace(method="fedit"), tmp_path / "b", progress=False)
    for key in ("final_eval_loss", "final_eval_accuracy", "bytes_up", "bytes_down"):
        assert a[key] == b[key], key
    ra, rb = _lines(tmp_path / "a" / "metrics.jsonl"), _lines(tmp_path / "b" / "metrics.jsonl")
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    from safetensors.torch import load_file

    wa = load_file(f"{a['adapter_dir']}/adapter_model.safetensors")
    wb = load_file(f"{b['adapter_dir']}/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_adaptive_schedule_advances_on_plateau(tmp_path):
    # min_delta so large that no evaluation counts as progress: each stage but the last ends after
    # its first two evaluations (the first sets the best), and the unused rounds carry over.
    cfg = BASE.replace(
        stages=2, rounds=6, eval_every=1, adaptive_patience=1, adaptive_min_delta=100.0, round_split="equal"
    )
    summary = simulate(cfg, tmp_path, progress=False)
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["layers"] for r in rows] == [4, 4, 8, 8, 8, 8]
    assert [s["rounds"] for s in summary["stages"]] == [2, 4]
    fixed = simulate(cfg.replace(adaptive_patience=0), tmp_path / "fixed", progress=False)
    assert [s["rounds"] for s in fixed["stages"]] == [3, 3]


def test_flora_equals_fedit_for_one_client_and_round(tmp_path):
    """One client, one round: FLoRA's merged product is exactly FedIT's LoRA from the same start."""
    cfg = BASE.replace(clients=1, per_round=1, stages=1, rounds=1)
    fedit = simulate(cfg.replace(method="fedit"), tmp_path / "a", progress=False)
    flora = simulate(cfg.replace(method="flora"), tmp_path / "b", progress=False)
    assert flora["final_eval_loss"] == pytest.approx(fedit["final_eval_loss"], abs=1e-4)
    assert abs(fedit["final_eval_loss"] - fedit["initial_eval_loss"]) > 1e-3  # training did change the model


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "fedavg"}, "unknown method"),
        ({"per_round": 9}, "per_round must be in 1..clients"),
        ({"full_eval": "always"}, "full_eval: Input should be"),
        ({"stage_steps": "x"}, "stage_steps: Input should be"),
        ({"quant": "int3"}, "quant: Input should be"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        BASE.replace(**changes)


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as err:
        BASE.replace(method="x", full_eval="y", clients=0)
    assert len(err.value.problems) >= 2  # the method is checked once the fields are valid


def test_quantized_packs_stage_steps_and_capacities(tmp_path):
    """int4 packs are what devices download (smaller than fp32) and what they train on; compute-
    matched stages take more local steps where a step is cheaper; capacities set the stages."""
    cfg = BASE.replace(
        rounds=3,
        round_split="equal",
        capacities=(2, 4, 8),
        stage_steps="compute",
        full_eval="round",
        train=replace(BASE.train, steps=6),
    )
    fp32 = simulate(cfg, tmp_path / "n", progress=False)
    int4 = simulate(cfg.replace(quant="int4", stage_steps="fixed"), tmp_path / "i", progress=False)
    assert [s["layers"] for s in fp32["stages"]] == [2, 4, 8]
    # the tiny model's 3M-parameter embedding dominates its steps: costs 0.90, 0.93, 1
    steps = [s["local_steps"] for s in fp32["stages"]]
    assert steps == [round(6 / s["step_cost"]) for s in fp32["stages"]] and steps[0] > steps[2] == 6
    assert [s["local_steps"] for s in int4["stages"]] == [6, 6, 6]
    assert int4["bytes_down_pack"] < 0.5 * fp32["bytes_down_pack"]
    # full_pack delivery: the full pack once per client, then only the small stage plans
    once_cfg = cfg.replace(quant="int4", stage_steps="fixed", delivery="full_pack")
    once = simulate(once_cfg, tmp_path / "f", progress=False)
    assert once["final_eval_loss"] == int4["final_eval_loss"]  # the same training, other bytes
    assert once["bytes_down_pack"] < int4["bytes_down_pack"]
    assert all(s["pack_bytes"] < 0.05 * int4["stages"][-1]["pack_bytes"] for s in once["stages"])
    assert int4["final_eval_loss"] != fp32["final_eval_loss"]  # trained on other (quantized) weights
    rows = _lines(tmp_path / "n" / "metrics.jsonl")
    assert all(r["full_eval_loss"] is not None for r in rows)  # full_eval = round


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "9"], "stages"),
        (["--beta", "1.5"], "beta"),
        (["--transfer", "x"], "unknown transfer rule"),
        (["--heal-steps", "3"], "--heal-steps needs --heal bake|adapter"),
        (["--method", "nope"], "unknown method"),
        (["--model", "tiny-bert"], "tiny config"),
    ],
)
def test_cli_bad_arguments(argv, message, tmp_path, capsys):
    code = main(["simulate", "--model", "tiny", "--out", str(tmp_path), "--rounds", "4", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert "devft-edge: error:" in err and message in err


def test_cli_unsupported_architecture(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model(
        "bert", vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path / "bert")
    assert main(["simulate", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o")]) == 2
    assert "supported: gpt2, gpt_neox, llama" in capsys.readouterr().err


def test_cli_json_summary(tmp_path, capsys):
    argv = [
        "simulate",
        "--model",
        "tiny",
        "--clients",
        "3",
        "--per-round",
        "2",
        "--stages",
        "2",
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--batch",
        "2",
        "--seq",
        "48",
        "--examples-per-client",
        "8",
        "--eval-examples",
        "6",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "devft" and summary["rounds"] == 2


def test_fleet_of_two_kinds_selects_by_fit_and_splits_families(tmp_path):
    """DevFT's edge case: half the clients cannot train the full-depth stage (the planner says so)
    and hold task families the others lack; they train the shallow stage only."""
    import yaml

    from devft_edge.memory import StepConfig, estimate_memory, model_shape
    from devft_edge.models import load_config
    from devft_edge.profiles import PROFILES_DIR

    shape = model_shape(load_config("tiny"))
    peaks = [estimate_memory(shape, StepConfig(layers=n, batch=4, seq=48)).peak_bytes for n in (4, 8)]
    small = yaml.safe_load((PROFILES_DIR / "rpi4-4gb.yaml").read_text())
    small["memory"] = {"total_gb": (sum(peaks) / 2) / 2**30 + 0.5, "reserved_gb": 0.5, "shared_with_gpu": True}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    cfg = BASE.replace(
        clients=4,
        client_profiles=(str(tmp_path / "small.yaml"), "rpi5-8gb"),
        data_split="by_profile",
        exact_match="stage_end",
        eval_every=1,
    )
    summary = simulate(cfg, tmp_path / "run", progress=False)
    assert [s["eligible_clients"] for s in summary["stages"]] == [4, 2]
    rows = _lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["eval_accuracy"] is not None for r in rows] == [True, False, False, True]  # stage ends only
    assert set(rows[-1]["eval_accuracy_by_task"]) == set(summary["final_eval_accuracy_by_task"])
    assert len(summary["stages"][0]["full_eval_accuracy_by_task"]) >= 2
    fedit = simulate(cfg.replace(method="fedit"), tmp_path / "fedit", progress=False)
    assert fedit["stages"][0]["eligible_clients"] == 2


def test_partition_by_kind_gives_each_kind_its_own_families():
    from devft_edge.data import partition_by_kind

    examples = train_eval_split(120, 10, seed=0)[0]
    parts = partition_by_kind(examples, ["a", "b", "a", "b"], seed=0, alpha=0.5)
    assert sum(map(len, parts)) == len(examples) and all(parts)
    families = [{ex.task for ex in part} for part in parts]
    assert (families[0] | families[2]).isdisjoint(families[1] | families[3])
    with pytest.raises(ConfigError, match="task families"):
        partition_by_kind(examples[:3], [str(i) for i in range(5)], seed=0)
