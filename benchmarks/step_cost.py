"""Step-cost table: seconds per local training step of a ``d``-layer stage submodel, on an idle machine.

DevFT's compute accounting (:mod:`devft_edge.step_cost`) weights every local step by the cost of
its submodel's depth relative to a full-model step. This measures that cost once: for each depth,
the submodel (even contiguous groups, DBLF), LoRA attached as the simulator and the agent do, the
synthetic training stream, and ``--steps`` timed steps of :func:`devft_edge.training.train_local`
after ``--warmup`` untimed ones, ``--repeats`` times in a rotating order; the median is kept. The
affine fit ``seconds = a + b d`` and the relative costs go beside the raw timings. Run it alone:
another process on the 2 cores makes every timing meaningless.

    python benchmarks/step_cost.py [--model smollm2] [--batch 4] [--seq 64]

Results: ``benchmarks/results/step_cost/<model>-b<batch>-s<seq>.json``; copy the medians into
``devft_edge.step_cost.MEASURED`` (``tests/test_step_cost.py`` checks that they agree).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from machine_load import load_average

from devft_edge.data import batches, generate_synthetic
from devft_edge.fusion import FUSIONS
from devft_edge.grouping import even_groups
from devft_edge.layers import num_layers
from devft_edge.lora import LoraSettings, attach_lora
from devft_edge.models import load_model, load_tokenizer
from devft_edge.step_cost import _affine_fit
from devft_edge.submodel import build_submodel
from devft_edge.training import TrainSettings, train_local

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Measure, fit, write the JSON and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="default: 1 2 4 8 15 30-ish")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base, tokenizer = load_model(args.model), load_tokenizer(args.model)
    total = num_layers(base.config)
    depths = args.depths or sorted({1, 2, 4, 8, -(-total // 2), total})
    examples = generate_synthetic(64, seed=0)
    models = {
        d: attach_lora(build_submodel(base, even_groups(total, d), FUSIONS.get("dblf")).model, LoraSettings())
        for d in depths
    }
    load_before = load_average()
    times: dict[int, list[float]] = {d: [] for d in depths}
    for repeat in range(args.repeats):
        order = depths[repeat % len(depths) :] + depths[: repeat % len(depths)]
        for d in order:
            stream = batches(examples, args.batch, repeat, tokenizer, args.seq)
            torch.manual_seed(repeat)
            train_local(models[d], stream, TrainSettings(steps=args.warmup, batch_size=args.batch, seq_len=args.seq))
            started = time.perf_counter()
            train_local(models[d], stream, TrainSettings(steps=args.steps, batch_size=args.batch, seq_len=args.seq))
            times[d].append((time.perf_counter() - started) / args.steps)
            print(f"depth {d:3d}: {times[d][-1]:.4f} s/step", flush=True)
    medians = {d: statistics.median(t) for d, t in times.items()}
    a, b = _affine_fit(medians)
    result = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "total_layers": total,
        "median_seconds": {str(d): round(s, 5) for d, s in medians.items()},
        "all_seconds": {str(d): [round(x, 5) for x in t] for d, t in times.items()},
        "fit": {"a": a, "b": b, "intercept_share": a / (a + b * total)},
        "relative": {str(d): round(medians[d] / medians[total], 4) for d in depths} if total in medians else {},
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "command": f"python benchmarks/step_cost.py --model {args.model} --batch {args.batch} --seq {args.seq}",
    }
    out = HERE / "results" / "step_cost" / f"{args.model}-b{args.batch}-s{args.seq}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "fit", "relative")}, indent=1))


if __name__ == "__main__":
    main()
