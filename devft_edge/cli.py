"""The ``devft-edge`` command line: thin wrappers over the library.

Each sub-command parses its options into the library's validated configs and calls one function;
logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from devft_edge.errors import DevFTError


def _beta(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _add_simulation_options(p: argparse.ArgumentParser, defaults: dict[str, object]) -> None:
    from devft_edge.simulator import METHODS

    d = defaults
    p.add_argument("--model", default=d["model"], help="smollm2 | tiny[-llama|-qwen2|-gpt2|-gpt_neox|-phi3] | PATH")
    p.add_argument("--method", default=d["method"], help=f"one of {', '.join(METHODS)}")
    p.add_argument("--clients", type=int, default=d["clients"], help="simulated clients N")
    p.add_argument("--per-round", type=int, default=d["per_round"], help="clients sampled per round K")
    p.add_argument("--stages", type=int, default=d["stages"], help="DevFT stages S")
    p.add_argument("--rounds", type=int, default=d["rounds"], help="total round budget, split over stages")
    p.add_argument("--local-steps", type=int, default=d["local_steps"], help="optimizer steps per client round")
    p.add_argument("--batch", type=int, default=d["batch"], help="examples per step")
    p.add_argument("--seq", type=int, default=d["seq"], help="tokens per example")
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--targets", default=None, help="comma-separated LoRA targets (default: all block projections)")
    p.add_argument("--similarity", default="cka", help="layer similarity: cka | weights")
    p.add_argument(
        "--grouping", default="contiguous", help="contiguous | contiguous_ratiocut | spectral | random | even"
    )
    p.add_argument("--fusion", default="dblf", help="dblf | one | sum | mean")
    p.add_argument("--beta", type=_beta, default=0.1, help="DBLF beta in (0, 1] or 'auto'")
    p.add_argument("--data", default=None, help="JSONL instruction data (default: synthetic multi-task)")
    p.add_argument("--examples-per-client", type=int, default=48, help="synthetic training examples per client")
    p.add_argument("--data-alpha", type=float, default=0.5, help="Dirichlet alpha over tasks (non-IID); 0 = IID")
    p.add_argument("--eval-examples", type=int, default=d["eval_examples"], help="held-out eval examples")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every this many rounds")
    p.add_argument("--export-merged", action="store_true", help="also save the merged model")
    p.add_argument(
        "--adaptive-patience",
        type=int,
        default=0,
        help="adaptive schedule: leave a stage after this many evals without improvement (0 = fixed rounds)",
    )
    p.add_argument("--adaptive-min-delta", type=float, default=0.01, help="eval-loss decrease that counts as progress")
    p.add_argument("--seed", type=int, default=0, help="seed for data, sampling, init and training")
    p.add_argument("--out", type=Path, default=d["out"], help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _run_simulation(args: argparse.Namespace) -> int:
    from devft_edge.lora import LoraSettings
    from devft_edge.simulator import SimulationConfig, simulate
    from devft_edge.training import TrainSettings

    cfg = SimulationConfig(
        model=args.model,
        method=args.method,
        clients=args.clients,
        per_round=args.per_round,
        stages=args.stages,
        rounds=args.rounds,
        train=TrainSettings(steps=args.local_steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr),
        lora=LoraSettings(
            rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")) if args.targets else None
        ),
        similarity=args.similarity,
        grouping=args.grouping,
        fusion=args.fusion,
        beta=args.beta,
        seed=args.seed,
        data=args.data,
        examples_per_client=args.examples_per_client,
        data_alpha=args.data_alpha or None,
        eval_examples=args.eval_examples,
        eval_every=args.eval_every,
        export_merged=args.export_merged,
        adaptive_patience=args.adaptive_patience,
        adaptive_min_delta=args.adaptive_min_delta,
    )
    summary = simulate(cfg, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['method']}: eval loss {summary['initial_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f}, "
            f"exact match {summary['initial_eval_accuracy']:.1%} -> {summary['final_eval_accuracy']:.1%}, "
            f"{summary['wall_seconds']:.0f} s, up {int(summary['bytes_up']) / 1e6:.1f} MB, "
            f"down {int(summary['bytes_down']) / 1e6:.1f} MB\n"
            f"metrics: {args.out / 'metrics.jsonl'}  plot: {args.out / 'curves.png'}  adapter: {summary['adapter_dir']}"
        )
    return 0


SIMULATE_DEFAULTS: dict[str, object] = dict(
    model="tiny",
    method="devft",
    clients=10,
    per_round=3,
    stages=4,
    rounds=12,
    local_steps=10,
    batch=4,
    seq=64,
    lr=3e-4,
    eval_examples=48,
    out=Path("runs/simulate"),
)
DEMO_DEFAULTS: dict[str, object] = dict(
    SIMULATE_DEFAULTS,
    model="smollm2",
    clients=10,
    per_round=2,
    rounds=12,
    local_steps=8,
    eval_examples=48,
    out=Path("runs/demo"),
)


def _run_plan(args: argparse.Namespace) -> int:
    from devft_edge.memcheck import measure_stages
    from devft_edge.memory import model_shape
    from devft_edge.models import load_config, tokenizer_bytes
    from devft_edge.planner import PlanSettings, plan, render
    from devft_edge.profiles import load_profiles
    from devft_edge.quantization import QuantSpec

    settings = PlanSettings(
        stages=args.stages,
        rank=args.rank,
        batch=args.batch,
        seq=args.seq,
        quant=args.quant,
        quant_embeddings=not args.fp32_embeddings,
        checkpointing=args.checkpointing,
        tokenizer_bytes=tokenizer_bytes(args.model),
    )
    profiles = load_profiles(args.profile, args.profiles_dir)
    result = plan(model_shape(load_config(args.model)), args.model, profiles, settings)
    if args.check:
        if args.quant == "nf4":
            raise DevFTError("--check measures CPU training; nf4 needs bitsandbytes on CUDA")
        measured = measure_stages(
            args.model,
            [s.layers for s in result.stages],
            QuantSpec(args.quant, embeddings=not args.fp32_embeddings),
            args.batch,
            args.seq,
            args.rank,
            args.checkpointing,
        )
        result = replace(
            result,
            stages=[
                replace(s, measured_peak_bytes=m.train_peak_bytes) for s, m in zip(result.stages, measured, strict=True)
            ],
        )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(render(result))
    if args.check:
        print("\npredicted vs measured peak of one training step on this machine (fresh process per stage):")
        for s in result.stages:
            predicted = next(iter(s.profiles.values()))
            predicted_cpu = predicted.parts and sum(predicted.parts.values()) - _cuda_extra(predicted.parts)
            error = 100.0 * (predicted_cpu - s.measured_peak_bytes) / s.measured_peak_bytes
            print(
                f"  stage {s.stage} ({s.layers:>2} layers): predicted {predicted_cpu / 2**20:7.0f} MiB, "
                f"measured {s.measured_peak_bytes / 2**20:7.0f} MiB, error {error:+.1f}%"
            )
    return 0


def _cuda_extra(parts: dict[str, int]) -> int:
    from devft_edge.memory import CUDA_RUNTIME_BYTES, RUNTIME_BYTES

    return CUDA_RUNTIME_BYTES if parts.get("runtime", 0) > RUNTIME_BYTES else 0


def _run_profile(args: argparse.Namespace) -> int:
    from devft_edge.device_probe import measure_profile
    from devft_edge.profiles import dump_profile

    profile = measure_profile(args.name, probe_seconds=args.probe_seconds)
    text = dump_profile(profile)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# {args.name}: written by devft-edge profile\n{text}")
        print(
            f"wrote {args.out} (usable budget {profile.budget_bytes / 2**30:.2f} GiB, "
            f"{profile.compute.sustained_gflops} GFLOP/s {profile.compute.backend})"
        )
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="devft-edge", description="Developmental federated LoRA tuning for edge devices."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated simulation in one process")
    _add_simulation_options(sim, SIMULATE_DEFAULTS)
    sim.set_defaults(func=_run_simulation)
    demo = sub.add_parser("demo", help="the main job: DevFT on SmolLM2-135M, simulated federation")
    _add_simulation_options(demo, DEMO_DEFAULTS)
    demo.set_defaults(func=_run_simulation)

    pl = sub.add_parser("plan", help="plan each stage's submodel against device memory profiles")
    pl.add_argument("--model", default="smollm2", help="smollm2 | tiny[-family] | PATH")
    pl.add_argument("--profile", action="append", required=True, help="profile name or YAML path (repeatable)")
    pl.add_argument("--profiles-dir", action="append", default=[], help="extra directory of profile YAML files")
    pl.add_argument("--stages", type=int, default=4, help="DevFT stages S")
    pl.add_argument("--rank", type=int, default=8, help="LoRA rank")
    pl.add_argument("--batch", type=int, default=4, help="examples per local step")
    pl.add_argument("--seq", type=int, default=64, help="tokens per example")
    pl.add_argument("--quant", choices=["none", "int8", "int4", "nf4"], default="none", help="pack base weights")
    pl.add_argument("--fp32-embeddings", action="store_true", help="keep embedding/head fp32 in quantized packs")
    pl.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the devices")
    pl.add_argument("--check", action="store_true", help="measure one training step per stage on this machine")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_run_plan)

    pr = sub.add_parser("profile", help="measure this machine and write a device profile YAML")
    pr.add_argument("--name", default="this-device", help="profile name (the YAML file stem)")
    pr.add_argument("--out", type=Path, default=None, help="YAML file to write (default: print)")
    pr.add_argument("--probe-seconds", type=float, default=2.0, help="length of the matmul throughput probe")
    pr.set_defaults(func=_run_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``devft-edge`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except DevFTError as exc:
        print(f"devft-edge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
