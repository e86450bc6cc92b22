"""Agent memory per stage: what a device's training task peaks at, against the planner.

The planner admits a device to a stage when :func:`devft_edge.memory.estimate_memory` fits its
budget, and the memory model was fitted to :mod:`devft_edge.memcheck`'s bare probe (random tokens,
no tokenizer, no data, no LoRA copies). A device runs the agent instead, so this benchmark
measures the agent's path for the stages a DevFT run trains: for each depth and quantization it
builds a stage submodel (layers grouped evenly and fused with DBLF, as ``plan --check`` does),
writes it as a signed pack, unpacks and verifies it as a device does, and then, in a fresh
process each, never two at once:

- **agent**: ``TorchTrainer.train`` on the verified pack with the start LoRA read from disk and 48
  synthetic examples, after :func:`devft_edge.allocator.bound_heap`, exactly as
  ``Agent._run_task`` calls it. The high-water mark is reset when the task starts (what the agent
  reports as the task's peak, pack loading included) and read again after the pack is loaded and
  after the last step; the training peak is the mark reset at the first batch;
- **probe**: :func:`devft_edge.memcheck.measure` on the same weights (the calibration's path).

    python benchmarks/agent_memory.py [--model smollm2] [--layers 4,8,15,30] [--quant none,int4]
    python benchmarks/agent_memory.py --model tiny --layers 1,2 --quant none,int4 --steps 2   # smoke

About ten minutes for the defaults on 2 cores; results go to
``benchmarks/results/system/agent_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine_load import load_average

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from devft_edge.training import TrainSettings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "system" / "agent_memory.json"
EXAMPLES = 48
"""Local training examples (an agent's ``synthetic:48:0`` data)."""


def cmd_worker(args: argparse.Namespace) -> int:
    """Child process: one agent task on ``--pack``; prints one JSON line of peaks in bytes."""
    from devft_edge.allocator import bound_heap

    bound_heap()
    import torch

    import devft_edge.data
    from devft_edge.backends import get_trainer
    from devft_edge.pack import VerifiedPack
    from devft_edge.pack_manifest import PackManifest
    from devft_edge.peak_memory import peak_bytes, reset_peak, status_bytes
    from devft_edge.tasks import generate_synthetic
    from devft_edge.training import TrainSettings
    from devft_edge.weights import read_safetensors

    torch.set_num_threads(args.threads)
    directory = Path(args.pack)
    pack = VerifiedPack(directory=directory, manifest=PackManifest.read(directory), signed=True)
    examples = generate_synthetic(EXAMPLES, seed=0)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch, seq_len=args.seq)
    marks: dict[str, int] = {"idle_rss": status_bytes("VmRSS")}
    batches = devft_edge.data.batches

    def stream(*a: Any, **k: Any) -> Iterator[Any]:
        """The trainer's batches; the first request means the pack is loaded."""
        for i, item in enumerate(batches(*a, **k)):
            if i == 0:
                marks["load_peak"] = peak_bytes()
                marks["loaded_rss"] = status_bytes("VmRSS")
                marks["train_mark_reset"] = reset_peak()
            yield item

    devft_edge.data.batches = stream  # type: ignore[assignment]  # the trainer imports it per call
    marks["task_mark_reset"] = reset_peak()  # as the agent does when a task starts
    start = {k: v.clone() for k, v in read_safetensors(directory / "lora.safetensors").items()}
    get_trainer("torch").train(pack, examples, settings, seed=0, start=start)
    marks["train_peak"] = peak_bytes()
    print(json.dumps(marks))
    return 0


def write_stage_pack(
    directory: Path, model_name: str, base: PreTrainedModel, layers: int, quant: str, training: TrainSettings
) -> tuple[Path, list[list[int]]]:
    """A signed pack of ``base``'s stage of ``layers`` layers (:func:`devft_edge.memcheck.stage_submodel`),
    unpacked and verified as a device does; its directory and groups. Also used by ``agent.py``."""
    from devft_edge.lora import LoraSettings, init_lora_state, lora_shapes
    from devft_edge.memcheck import stage_submodel
    from devft_edge.models import model_dir
    from devft_edge.pack import read_pack, write_pack
    from devft_edge.quantization import QuantSpec
    from devft_edge.signing import generate_keypair, load_private_key, load_public_key

    private, public = generate_keypair(directory / "keys")
    lora = LoraSettings()
    groups, sub = stage_submodel(base, layers)
    write_pack(
        directory / "stage.devpack",
        sub,
        init_lora_state(lora_shapes(sub, lora), lora.rank, 0),
        model_name=model_name,
        stage=1,
        stages=1,
        groups=groups,
        lora=lora,
        quant=QuantSpec(quant),
        training=training,
        tokenizer_dir=model_dir(model_name),
        created="2026-11-29T00:00:00Z",
        sign_key=load_private_key(private),
    )
    return read_pack(directory / "stage.devpack", directory / "pack", load_public_key(public)).directory, groups


def build(model_name: str, layers: int, quant: str, directory: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The verified stage pack (as a device unpacks it) and the same submodel for the probe."""
    from devft_edge.memcheck import stage_submodel
    from devft_edge.models import load_model
    from devft_edge.quantization import QuantSpec
    from devft_edge.training import TrainSettings
    from devft_edge.weights import save_base

    base = load_model(model_name)
    training = TrainSettings(steps=args.steps, batch_size=args.batch, seq_len=args.seq)
    pack, _ = write_stage_pack(directory, model_name, base, layers, quant, training)
    # built twice: writing a pack and writing the probe's weights both quantize the model in place
    probe = save_base(stage_submodel(base, layers)[1], QuantSpec(quant), directory / "probe")
    return pack, probe


def worker(args: argparse.Namespace, pack: Path) -> dict[str, Any]:
    """The agent's task in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("DEVFT_EDGE_HEAP", None)
    command = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch)]
    command += ["--seq", str(args.seq), "--threads", str(args.threads), "worker", "--pack", str(pack)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"agent worker failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def error(predicted: int, measured: int) -> float:
    """Relative error of a prediction; negative means it under-predicts."""
    return round((predicted - measured) / measured, 3)


def main_run(args: argparse.Namespace) -> int:
    from devft_edge.memcheck import measure
    from devft_edge.memory import StepConfig, estimate_memory, model_shape
    from devft_edge.models import load_config

    load_before = load_average()
    shape = model_shape(load_config(args.model))
    rows = []
    for quant in args.quant.split(","):
        for layers in (int(x) for x in args.layers.split(",")):
            with tempfile.TemporaryDirectory(prefix="devft-agent-memory-") as tmp:
                pack, probe_dir = build(args.model, layers, quant, Path(tmp), args)
                agent = worker(args, pack)
                probe = measure(probe_dir, args.model, args.batch, args.seq, threads=args.threads)
            step = StepConfig(layers=layers, batch=args.batch, seq=args.seq, quant=quant)
            predicted = estimate_memory(shape, step)
            task_peak = max(agent["load_peak"], agent["train_peak"])
            row = {
                "layers": layers,
                "quant": quant,
                "predicted_peak_bytes": predicted.peak_bytes,
                "predicted_parts": predicted.parts,
                "agent": agent,
                "agent_task_peak_bytes": task_peak,
                "probe_train_peak_bytes": probe.train_peak_bytes,
                "probe_load_peak_bytes": probe.load_peak_bytes,
                "error_vs_agent_task": error(predicted.peak_bytes, task_peak),
                "error_vs_agent_train": error(predicted.peak_bytes, agent["train_peak"]),
                "error_vs_probe": error(predicted.peak_bytes, probe.train_peak_bytes),
            }
            rows.append(row)
            print(
                f"{layers:>3} layers {quant:<5} predicted {predicted.peak_bytes / 2**20:6.0f} MiB | agent: load "
                f"{agent['load_peak'] / 2**20:6.0f}, train {agent['train_peak'] / 2**20:6.0f} "
                f"({row['error_vs_agent_train']:+.1%}) | probe train {probe.train_peak_bytes / 2**20:6.0f} "
                f"({row['error_vs_probe']:+.1%})",
                flush=True,
            )
    report = {
        "benchmark": "agent_memory",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "load_before": load_before,
        "load_after": load_average(),
        "rows": rows,
        "max_abs_error_vs_agent_task": max(abs(r["error_vs_agent_task"]) for r in rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"largest error vs the agent's task peak: {report['max_abs_error_vs_agent_task']:.1%}; wrote {out}")
    print(f"load average before {load_before}, after {report['load_after']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", default="4,8,15,30", help="stage depths, comma-separated")
    parser.add_argument("--quant", default="none,int4", help="pack quantizations, comma-separated")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("worker", help=argparse.SUPPRESS)
    child.add_argument("--pack", required=True)
    args = parser.parse_args(argv)
    return cmd_worker(args) if args.command == "worker" else main_run(args)


if __name__ == "__main__":
    sys.exit(main())
