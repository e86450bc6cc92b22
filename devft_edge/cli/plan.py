"""``plan`` and ``profile``: device memory profiles, and each stage's submodel planned against them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from devft_edge.profiles import QUANTIZATIONS

if TYPE_CHECKING:
    from devft_edge.cli.options import Subparsers


def _run_plan(args: argparse.Namespace) -> int:
    from devft_edge.memcheck import measure_stages
    from devft_edge.memory import model_shape
    from devft_edge.models import load_config, tokenizer_bytes
    from devft_edge.planner import PlanSettings, plan, render, with_measurements
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
        rounds=args.rounds,
        round_split=args.round_split,
    )
    profiles = load_profiles(args.profile, args.profiles_dir)
    shape = model_shape(load_config(args.model))
    result = plan(shape, args.model, profiles, settings)
    if args.check:
        quant = QuantSpec(args.quant, embeddings=not args.fp32_embeddings)
        layers = [s.layers for s in result.stages]
        measured = measure_stages(args.model, layers, quant, args.batch, args.seq, args.rank, args.checkpointing)
        result = with_measurements(result, shape, [m.train_peak_bytes for m in measured])
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
    return 0


def _run_profile(args: argparse.Namespace) -> int:
    from devft_edge.device_probe import measure_profile
    from devft_edge.profiles import dump_profile

    profile = measure_profile(args.name, probe_seconds=args.probe_seconds, step_model=args.measure_step)
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


def add_plan(sub: Subparsers) -> None:
    """``plan``: each stage's submodel against device memory profiles."""
    pl = sub.add_parser("plan", help="plan each stage's submodel against device memory profiles")
    pl.add_argument("--model", default="smollm2", help="smollm2 | tiny[-family] | PATH")
    pl.add_argument("--profile", action="append", required=True, help="profile name or YAML path (repeatable)")
    pl.add_argument("--profiles-dir", action="append", default=[], help="extra directory of profile YAML files")
    pl.add_argument("--stages", type=int, default=4, help="DevFT stages S")
    pl.add_argument("--rank", type=int, default=8, help="LoRA rank")
    pl.add_argument("--batch", type=int, default=4, help="examples per local step")
    pl.add_argument("--seq", type=int, default=64, help="tokens per example")
    pl.add_argument("--quant", choices=QUANTIZATIONS, default="none", help="pack base weights")
    pl.add_argument("--fp32-embeddings", action="store_true", help="keep embedding/head fp32 in quantized packs")
    pl.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the devices")
    pl.add_argument("--rounds", type=int, default=12, help="round budget (for the cost predicted against FedIT)")
    pl.add_argument("--round-split", choices=["depth", "equal"], default="depth", help="rounds per stage")
    pl.add_argument("--check", action="store_true", help="measure one training step per stage on this machine")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_run_plan)


def add_profile(sub: Subparsers) -> None:
    """``profile``: measure this machine and write a device profile."""
    pr = sub.add_parser("profile", help="measure this machine and write a device profile YAML")
    pr.add_argument("--name", default="this-device", help="profile name (the YAML file stem)")
    pr.add_argument("--out", type=Path, default=None, help="YAML file to write (default: print)")
    pr.add_argument("--probe-seconds", type=float, default=2.0, help="length of the matmul throughput probe")
    pr.add_argument(
        "--measure-step",
        metavar="MODEL",
        default=None,
        help="also measure a real training step of MODEL's first stage (e.g. smollm2); plan uses it for step time",
    )
    pr.set_defaults(func=_run_profile)
