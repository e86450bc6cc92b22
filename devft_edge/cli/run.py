"""``simulate`` and ``demo``: a whole federation on this machine, in one process or as the real services."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devft_edge.cli.options import Subparsers


def _add_run_options(p: argparse.ArgumentParser, config: type) -> None:
    """The run configuration's options (made from ``config``'s fields), a preset, and where to write."""
    from devft_edge.cli.config_options import add_config_options
    from devft_edge.presets import PRESETS

    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="default",
        help="paper: the paper's literal DevFT (equal round split, copy transfer, no healing, no kept ends); "
        "options given explicitly override the preset",
    )
    p.add_argument("--out", type=Path, default=Path(f"runs/{p.prog.split()[-1]}"), help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_config_options(p, config)


def _config(args: argparse.Namespace, config: type) -> Any:
    """``config`` from its defaults, the preset, then the options given (validated once)."""
    from devft_edge.cli.config_options import config_data
    from devft_edge.presets import preset_data

    return config(**config_data(args, config, preset_data(args.preset)))


def _run_simulation(args: argparse.Namespace) -> int:
    from devft_edge.simulator import SimulationConfig, simulate

    summary = simulate(_config(args, SimulationConfig), args.out)
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


def _run_demo(args: argparse.Namespace) -> int:
    from devft_edge.ops.demo import DemoConfig, render_summary, run_demo

    cfg = _config(args, DemoConfig)
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


def add_simulate(sub: Subparsers, full: bool = True) -> None:
    """``simulate``: a federated simulation in one process (its options only when ``full``: they
    come from the run configuration, whose import loads torch)."""
    sim = sub.add_parser("simulate", help="run a federated simulation in one process")
    if full:
        from devft_edge.simulator import SimulationConfig

        _add_run_options(sim, SimulationConfig)
    sim.set_defaults(func=_run_simulation)


def add_demo(sub: Subparsers, full: bool = True) -> None:
    """``demo``: broker, aggregator and device agents as processes on this machine."""
    demo = sub.add_parser(
        "demo", help="the main job: broker, aggregator and device agents as processes; DevFT on SmolLM2-135M"
    )
    if full:
        from devft_edge.ops.demo import DemoConfig

        _add_run_options(demo, DemoConfig)
    demo.set_defaults(func=_run_demo)
