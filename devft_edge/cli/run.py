"""``simulate`` and ``demo``: a whole federation on this machine, in one process or as the real services."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from devft_edge.cli.options import add_delivery_option, beta, recipe_options
from devft_edge.profiles import QUANTIZATIONS

if TYPE_CHECKING:
    from devft_edge.cli.options import Subparsers


def _add_simulation_options(p: argparse.ArgumentParser, defaults: dict[str, object]) -> None:
    from devft_edge.methods import METHODS
    from devft_edge.schedule import DEFAULT_MIN_DELTA

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
    p.add_argument(
        "--preset",
        choices=["default", "paper"],
        default="default",
        help="paper: the paper's literal DevFT (equal round split, copy transfer, no healing, no kept ends); "
        "options given explicitly override the preset",
    )
    p.add_argument("--similarity", default=None, help="layer similarity: cka (default) | weights")
    p.add_argument(
        "--grouping", default=None, help="contiguous (default) | contiguous_ratiocut | spectral | random | even"
    )
    p.add_argument("--fusion", default=None, help="dblf (default) | one | sum | mean")
    p.add_argument("--beta", type=beta, default=None, help="DBLF beta in (0, 1] or 'auto' (default 0.1)")
    p.add_argument("--transfer", default=None, help="knowledge transfer: copy (the paper) | inv_n (B/n per member)")
    p.add_argument("--keep-ends", type=int, default=None, help="keep the first and last k layers unfused")
    p.add_argument("--heal", choices=["off", "bake", "adapter"], default=None, help="heal fused submodels (server)")
    p.add_argument("--heal-steps", type=int, default=None, help="distillation steps per stage submodel")
    p.add_argument("--heal-rank", type=int, default=None, help="rank of the heal adapter (--heal adapter)")
    p.add_argument("--capacities", default=None, help="comma-separated stage depths, e.g. 8,15,30")
    p.add_argument("--stage-steps", choices=["fixed", "compute"], default=None, help="local steps per stage round")
    p.add_argument("--quant", choices=QUANTIZATIONS, default="none", help="pack quantization (bytes, trained base)")
    add_delivery_option(p, "stage_packs")
    p.add_argument(
        "--exact-match",
        choices=["every_eval", "stage_end"],
        default="every_eval",
        help="measure exact match at every evaluation, or only at each stage's end (eval loss always)",
    )
    p.add_argument(
        "--client-profiles",
        default=None,
        help="comma-separated device profile per client (cycled); clients only train stages that fit",
    )
    p.add_argument(
        "--data-split",
        choices=["dirichlet", "by_profile"],
        default="dirichlet",
        help="by_profile: each profile's clients hold task families the others lack",
    )
    p.add_argument("--stop-after", type=int, default=None, help="end after this stage's transfer (screening)")
    p.add_argument(
        "--full-eval",
        choices=["stage", "round", "off"],
        default="stage",
        help="evaluate the full model with the transferred LoRA after each stage (default), round, or never",
    )
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
    p.add_argument(
        "--adaptive-min-delta", type=float, default=DEFAULT_MIN_DELTA, help="eval-loss decrease that counts as progress"
    )
    p.add_argument(
        "--round-split",
        choices=["equal", "depth"],
        default=None,
        help="rounds per stage: in proportion to stage depth (default), or equal (the paper)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, sampling, init and training")
    p.add_argument("--out", type=Path, default=d["out"], help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _run_simulation(args: argparse.Namespace) -> int:
    from devft_edge.lora import LoraSettings
    from devft_edge.presets import method_settings
    from devft_edge.simulator import SimulationConfig, simulate
    from devft_edge.training import TrainSettings

    method = method_settings(
        args.preset,
        **recipe_options(args),
        heal=args.heal,
        heal_steps=args.heal_steps,
        heal_rank=args.heal_rank,
        round_split=args.round_split,
        stage_steps=args.stage_steps,
        capacities=args.capacities,
    )
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
        recipe=method.recipe,
        seed=args.seed,
        data=args.data,
        examples_per_client=args.examples_per_client,
        data_alpha=args.data_alpha or None,
        eval_examples=args.eval_examples,
        eval_every=args.eval_every,
        export_merged=args.export_merged,
        adaptive_patience=args.adaptive_patience,
        adaptive_min_delta=args.adaptive_min_delta,
        round_split=method.round_split,
        capacities=method.capacities,
        stage_steps=method.stage_steps,
        quant=args.quant,
        delivery=args.delivery,
        full_eval=args.full_eval,
        exact_match=args.exact_match,
        client_profiles=tuple(args.client_profiles.split(",")) if args.client_profiles else None,
        data_split=args.data_split,
        stop_after=args.stop_after,
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


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    from devft_edge.methods import METHODS
    from devft_edge.ops.demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--model", default=d.model, help="smollm2 | tiny[-family] | PATH")
    p.add_argument("--method", choices=METHODS, default=d.method, help="federated method the fleet runs")
    p.add_argument("--devices", type=int, default=d.devices, help="device agents to start")
    p.add_argument("--per-round", type=int, default=d.per_round, help="devices selected per round K")
    p.add_argument("--stages", type=int, default=d.stages, help="DevFT stages S")
    p.add_argument("--rounds", type=int, default=d.rounds, help="total round budget, split over stages")
    p.add_argument("--round-split", choices=["depth", "equal"], default=d.round_split, help="rounds per stage")
    p.add_argument("--local-steps", type=int, default=d.local_steps, help="optimizer steps per device round")
    p.add_argument("--batch", type=int, default=d.batch, help="examples per step")
    p.add_argument("--seq", type=int, default=d.seq, help="tokens per example")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the devices")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--quant", choices=QUANTIZATIONS, default=d.quant, help="pack base-weight storage")
    p.add_argument("--examples-per-client", type=int, default=d.examples_per_client, help="private examples per device")
    p.add_argument("--data-alpha", type=float, default=d.data_alpha, help="Dirichlet alpha over tasks; 0 = IID")
    p.add_argument(
        "--eval-examples", type=int, default=d.eval_examples, help="held-out examples the aggregator evaluates"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data, selection, init and training")
    p.add_argument(
        "--profile",
        action="append",
        default=None,
        help=f"device profile, repeatable, cycled (default: {', '.join(d.profiles)})",
    )
    p.add_argument("--transfer", choices=["copy", "inv_n"], default=d.transfer, help="knowledge transfer rule")
    p.add_argument("--keep-ends", type=int, default=d.keep_ends, help="keep the first and last k layers unfused")
    p.add_argument("--beta", type=beta, default=d.beta, help="DBLF beta in (0, 1] or 'auto'")
    p.add_argument("--stage-steps", choices=["fixed", "compute"], default=d.stage_steps, help="local steps per stage")
    p.add_argument(
        "--adaptive-patience", type=int, default=d.adaptive_patience, help="leave a stage after this many stale evals"
    )
    p.add_argument(
        "--adaptive-min-delta", type=float, default=d.adaptive_min_delta, help="eval-loss decrease that is progress"
    )
    p.add_argument("--heal", choices=["off", "bake", "adapter"], default=d.heal, help="heal fused submodels")
    p.add_argument("--heal-steps", type=int, default=d.heal_steps, help="distillation steps per stage submodel")
    p.add_argument("--heal-prompts", type=int, default=d.heal_prompts, help="server-text sequences to heal on")
    add_delivery_option(p, d.delivery)
    p.add_argument(
        "--broker", default=None, help="mqtt://host:port of a running broker (default: start the embedded one)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _run_demo(args: argparse.Namespace) -> int:
    from devft_edge.methods import uses_devft
    from devft_edge.ops.demo import DemoConfig, render_summary, run_demo

    cfg = DemoConfig(
        model=args.model,
        method=args.method,
        devices=args.devices,
        per_round=args.per_round,
        stages=args.stages if uses_devft(args.method) else 1,
        rounds=args.rounds,
        round_split=args.round_split,
        local_steps=args.local_steps,
        batch=args.batch,
        seq=args.seq,
        checkpointing=args.checkpointing,
        lr=args.lr,
        rank=args.rank,
        quant=args.quant,
        examples_per_client=args.examples_per_client,
        data_alpha=args.data_alpha or None,
        eval_examples=args.eval_examples,
        seed=args.seed,
        broker=args.broker,
        transfer=args.transfer,
        keep_ends=args.keep_ends,
        beta=args.beta,
        stage_steps=args.stage_steps,
        adaptive_patience=args.adaptive_patience,
        adaptive_min_delta=args.adaptive_min_delta,
        heal=args.heal,
        heal_steps=args.heal_steps,
        heal_prompts=args.heal_prompts,
        delivery=args.delivery,
        **({"profiles": tuple(args.profile)} if args.profile else {}),
    )
    summary = run_demo(cfg, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_summary(summary))
        print(
            f"metrics: {args.out / 'metrics.jsonl'}  plot: {args.out / 'curves.png'}  adapter: {summary['adapter_dir']}"
            f"  logs: {args.out / 'logs'}"
        )
    return 0


def add_simulate(sub: Subparsers) -> None:
    """``simulate``: a federated simulation in one process."""
    sim = sub.add_parser("simulate", help="run a federated simulation in one process")
    _add_simulation_options(sim, SIMULATE_DEFAULTS)
    sim.set_defaults(func=_run_simulation)


def add_demo(sub: Subparsers) -> None:
    """``demo``: broker, aggregator and device agents as processes on this machine."""
    demo = sub.add_parser(
        "demo", help="the main job: broker, aggregator and device agents as processes; DevFT on SmolLM2-135M"
    )
    _add_demo_options(demo)
    demo.set_defaults(func=_run_demo)
