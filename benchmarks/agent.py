"""Agent benchmark: the device agent's training step against a bare peft loop, and its peak memory.

A device spends its round in ``Trainer.train``; whatever our pack loading, LoRA plumbing, data
stream or allocator setting add to a plain peft training step is paid on every device, every
round. This benchmark builds a full-depth pack of the model (every layer its own group, fp32
weights, signed and verified as the agent does) and times, each in a fresh process and never two
at once:

- **agent**: what ``Agent._run_task`` calls: ``get_trainer("torch").train(pack, examples,
  settings, seed, start)`` on the verified pack, after :func:`devft_edge.allocator.bound_heap` as
  the agent process does at start;
- **bare**: a hand-written loop on the same model loaded with ``transformers``:
  ``peft.get_peft_model(model, LoraConfig(r=8, same targets))``, AdamW, the same batches (batch x
  seq tokens from the same data), the same gradient clipping, the same number of steps and threads;

each with the agent's bounded heap and with glibc's default (``DEVFT_EDGE_HEAP=default``), so the
allocator's cost is measured separately from the trainer's. Step times are the intervals between
successive batch requests; the first step (AdamW creates its state) is left out of the median.
The four contenders run back to back in a rotating order, ``--repeats`` times; reported are the
median ratios agent / bare at each heap setting and bounded / default for each.

Memory: the agent's training peak (the kernel's high-water mark, reset when the first batch is
drawn, i.e. after the pack is loaded: what :mod:`devft_edge.memcheck` calls the train peak) and
the whole process's ``ru_maxrss``, against the planner's prediction for that step
(:func:`devft_edge.memory.estimate_memory`) and against the planner's own probe
(:func:`devft_edge.memcheck.measure` on the same weights), which the memory model was fitted to.

    python benchmarks/agent.py [--model smollm2] [--steps 20] [--batch 4] [--seq 64] [--repeats 3]
    python benchmarks/agent.py --model tiny --steps 2 --repeats 1     # smoke mode

About five minutes for the defaults on 2 cores; results go to ``benchmarks/results/system/agent.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent_memory import write_stage_pack
from machine_load import load_average

from devft_edge.peak_memory import peak_bytes, reset_peak  # light: no torch before bound_heap()

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "system" / "agent.json"
GOAL_VS_BARE = 0.95
EXAMPLES = 48
"""Local training examples (an agent's ``synthetic:48:0`` data)."""
ROLES = ("agent", "bare")
HEAPS = ("bounded", "default")


class Clock:
    """Timestamps of the batch requests; resets the peak-memory mark at the first one."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.peak_reset = False

    def tick(self) -> None:
        if not self.stamps:
            self.peak_reset = reset_peak()
        self.stamps.append(time.perf_counter())

    def timed(self, stream: Iterator[Any]) -> Iterator[Any]:
        """``stream``, ticking before each item is handed out."""
        for item in stream:
            self.tick()
            yield item


# ---- the measured processes ---------------------------------------------------------------------


def run_agent(args: argparse.Namespace, clock: Clock) -> None:
    """``TorchTrainer.train`` on the verified pack, as ``Agent._run_task`` calls it."""
    import devft_edge.data
    from devft_edge.backends import get_trainer
    from devft_edge.pack import VerifiedPack
    from devft_edge.pack_manifest import PackManifest
    from devft_edge.tasks import generate_synthetic
    from devft_edge.training import TrainSettings
    from devft_edge.weights import read_safetensors

    directory = Path(args.pack)
    pack = VerifiedPack(directory=directory, manifest=PackManifest.read(directory), signed=True)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch, seq_len=args.seq)
    start = {k: v.clone() for k, v in read_safetensors(directory / "lora.safetensors").items()}
    examples = generate_synthetic(EXAMPLES, seed=0)
    # The trainer imports ``batches`` from devft_edge.data when it is called: timing the stream it
    # returns times the steps without touching the trainer.
    batches = devft_edge.data.batches
    devft_edge.data.batches = lambda *a, **k: clock.timed(batches(*a, **k))  # type: ignore[assignment]
    get_trainer("torch").train(pack, examples, settings, seed=0, start=start)


def run_bare(args: argparse.Namespace, clock: Clock) -> None:
    """The minimal peft loop on the same model, batches and steps."""
    import torch
    from peft import LoraConfig, get_peft_model

    from devft_edge.data import batches
    from devft_edge.layers import architecture_of
    from devft_edge.models import load_model, load_tokenizer
    from devft_edge.tasks import generate_synthetic

    model = load_model(args.model)
    targets = list(architecture_of(model).lora_targets)
    config = LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    stream = batches(generate_synthetic(EXAMPLES, seed=0), args.batch, 0, load_tokenizer(args.model), args.seq)
    data = [next(stream) for _ in range(args.steps)]  # the same batches the agent trains on, made before timing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    model.train()
    for batch in data:
        clock.tick()
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


def cmd_worker(args: argparse.Namespace) -> int:
    """Child process: one contender; prints one JSON line."""
    from devft_edge.allocator import bound_heap

    # The agent calls bound_heap() before loading anything (it honours DEVFT_EDGE_HEAP=default);
    # the bare loop gets the bounded heap only when asked, as a control.
    bounded = bound_heap() if args.role == "agent" or args.heap == "bounded" else False
    import torch

    torch.set_num_threads(args.threads)
    clock = Clock()
    began = time.perf_counter()
    (run_agent if args.role == "agent" else run_bare)(args, clock)
    ended = time.perf_counter()
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    print(
        json.dumps(
            {
                "role": args.role,
                "heap": args.heap,
                "heap_bounded": bounded,
                "threads": torch.get_num_threads(),
                "step_seconds": [round(s, 4) for s in steps],
                "steady_step_seconds": statistics.median(steps[1:] or steps),
                "setup_seconds": round(clock.stamps[0] - began, 3),
                "total_seconds": round(ended - began, 3),
                "train_peak_bytes": peak_bytes(),
                "peak_mark_reset": clock.peak_reset,
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )
    return 0


# ---- the run ------------------------------------------------------------------------------------


def build(model_name: str, directory: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The verified full-depth pack (as a device unpacks it) and the same weights for the memory probe."""
    from devft_edge.layers import num_layers
    from devft_edge.models import load_model
    from devft_edge.quantization import QuantSpec
    from devft_edge.training import TrainSettings
    from devft_edge.weights import save_base

    base = load_model(model_name)
    training = TrainSettings(steps=args.steps, batch_size=args.batch, seq_len=args.seq)
    pack, _ = write_stage_pack(directory, model_name, base, num_layers(base.config), "none", training)
    probe = save_base(load_model(model_name), QuantSpec("none"), directory / "probe")
    return pack, probe


def worker(args: argparse.Namespace, pack: Path, role: str, heap: str) -> dict[str, Any]:
    """One contender in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if heap == "default":
        env["DEVFT_EDGE_HEAP"] = "default"
    else:
        env.pop("DEVFT_EDGE_HEAP", None)
    command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps)]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    command += ["worker", "--role", role, "--heap", heap, "--pack", str(pack)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{role}/{heap} worker failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerators, denominators, strict=True)), 3)


def main_run(args: argparse.Namespace) -> int:
    from devft_edge.memcheck import measure
    from devft_edge.memory import StepConfig, estimate_memory, model_shape
    from devft_edge.models import load_config

    load_before = load_average()
    config = load_config(args.model)
    step = StepConfig(layers=int(config.num_hidden_layers), batch=args.batch, seq=args.seq)
    predicted = estimate_memory(model_shape(config), step)
    contenders = [(role, heap) for heap in HEAPS for role in ROLES]
    runs: dict[str, list[dict[str, Any]]] = {f"{role}/{heap}": [] for role, heap in contenders}
    with tempfile.TemporaryDirectory(prefix="devft-agent-bench-") as tmp:
        pack, probe_dir = build(args.model, Path(tmp), args)
        for repeat in range(args.repeats):
            shift = repeat % len(contenders)
            for role, heap in contenders[shift:] + contenders[:shift]:
                row = worker(args, pack, role, heap)
                row["load"] = load_average()[0]
                runs[f"{role}/{heap}"].append(row)
                print(
                    f"repeat {repeat + 1} {role}/{heap}: {1 / row['steady_step_seconds']:.2f} steps/s "
                    f"(setup {row['setup_seconds']} s), train peak {row['train_peak_bytes'] / 2**20:.0f} MiB, "
                    f"load {row['load']}",
                    flush=True,
                )
        probe = measure(probe_dir, args.model, args.batch, args.seq, threads=args.threads)
    rate = {name: [1 / r["steady_step_seconds"] for r in rows] for name, rows in runs.items()}
    whole = {name: [args.steps / r["total_seconds"] for r in rows] for name, rows in runs.items()}
    ratios = {
        "agent_vs_bare_bounded_heap": median_ratio(rate["agent/bounded"], rate["bare/bounded"]),
        "agent_vs_bare_default_heap": median_ratio(rate["agent/default"], rate["bare/default"]),
        "agent_bounded_vs_bare_default": median_ratio(rate["agent/bounded"], rate["bare/default"]),
        "agent_bounded_vs_default_heap": median_ratio(rate["agent/bounded"], rate["agent/default"]),
        "bare_bounded_vs_default_heap": median_ratio(rate["bare/bounded"], rate["bare/default"]),
        "whole_call_agent_vs_bare_default_heap": median_ratio(whole["agent/default"], whole["bare/default"]),
    }
    agent_peak = statistics.median(r["train_peak_bytes"] for r in runs["agent/bounded"])
    report = {
        "benchmark": "agent",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": load_average(),
        "model": args.model,
        "layers": step.layers,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "goal_ratio_vs_bare": GOAL_VS_BARE,
        "median_steps_per_s": {name: round(statistics.median(values), 3) for name, values in rate.items()},
        "ratios": ratios,
        "meets_goal": ratios["agent_vs_bare_default_heap"] >= GOAL_VS_BARE,
        "memory": {
            "predicted_peak_bytes": predicted.peak_bytes,
            "predicted_parts": predicted.parts,
            "agent_train_peak_bytes": int(agent_peak),
            "agent_process_peak_bytes": int(statistics.median(r["ru_maxrss_bytes"] for r in runs["agent/bounded"])),
            "agent_default_heap_train_peak_bytes": int(
                statistics.median(r["train_peak_bytes"] for r in runs["agent/default"])
            ),
            "probe_train_peak_bytes": probe.train_peak_bytes,
            "probe_load_peak_bytes": probe.load_peak_bytes,
            "prediction_error_vs_agent": round((predicted.peak_bytes - agent_peak) / agent_peak, 3),
            "prediction_error_vs_probe": round(
                (predicted.peak_bytes - probe.train_peak_bytes) / probe.train_peak_bytes, 3
            ),
        },
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("median steps/s:", report["median_steps_per_s"])
    print("ratios:", ratios, f"(goal agent/bare >= {GOAL_VS_BARE}: {'met' if report['meets_goal'] else 'missed'})")
    mem = report["memory"]
    print(
        f"train peak: agent {agent_peak / 2**20:.0f} MiB, planner probe {probe.train_peak_bytes / 2**20:.0f} MiB, "
        f"predicted {predicted.peak_bytes / 2**20:.0f} MiB (error vs agent {mem['prediction_error_vs_agent']:+.1%})"
    )
    print(f"load average before {load_before}, after {report['load_after']}; wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker_parser = sub.add_parser("worker", help="internal: one contender in a fresh process")
    worker_parser.add_argument("--role", choices=ROLES, required=True)
    worker_parser.add_argument("--heap", choices=HEAPS, required=True)
    worker_parser.add_argument("--pack", required=True, help="verified pack directory")
    parser.add_argument("--model", default="smollm2", help="smollm2, or tiny for a smoke run")
    parser.add_argument("--steps", type=int, default=20, help="training steps per contender run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every contender")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return cmd_worker(args)
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
