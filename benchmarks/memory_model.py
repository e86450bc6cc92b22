"""Calibrate and validate the memory model against measured peaks of real training steps.

Each configuration (stage depth, batch, seq, quantization, gradient checkpointing) of SmolLM2-135M
is measured in a fresh process (:mod:`devft_edge.memcheck`: load the stage submodel, take two
LoRA training steps the way the device agent does, read the kernel's peak-RSS mark). The coefficients of
:mod:`devft_edge.memory` (runtime, activation, heap-activation and logit terms) are fitted by
non-negative least squares on the *calibration* configurations only; the *validation*
configurations (other depths, shapes and quantizations) then show how far predictions are off.

    python benchmarks/memory_model.py measure            # ~10 min on 2 cores, writes results JSON
    python benchmarks/memory_model.py fit                # fitted coefficients (paste into memory.py)
    python benchmarks/memory_model.py report --markdown docs/memory_model.md

Run it on an otherwise idle machine: step times are reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from devft_edge import memory
from devft_edge.memory import FLOAT, StepConfig, estimate_memory, model_shape, step_flops

RESULTS = Path(__file__).resolve().parent / "results-memory" / "measurements.json"
DEFAULT_HEAP_RESULTS = RESULTS.with_name("measurements-default-heap.json")
"""The same cases with glibc's default (dynamic) mmap threshold, for the allocator comparison."""


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    layers: int
    batch: int
    seq: int
    quant: str = "none"
    checkpointing: bool = False
    role: str = "calibration"

    def step(self) -> StepConfig:
        return StepConfig(
            layers=self.layers, batch=self.batch, seq=self.seq, quant=self.quant, checkpointing=self.checkpointing
        )


CASES = [
    # calibration: fp32 weights, varying depth, tokens and sequence length
    Case(4, 4, 64),
    Case(4, 16, 256),
    Case(8, 8, 128),
    Case(15, 4, 256),
    Case(30, 4, 64),
    Case(30, 2, 512),
    Case(8, 16, 64, checkpointing=True),
    Case(30, 8, 256, checkpointing=True),
    Case(15, 4, 128, "int4"),
    Case(30, 8, 64, "int8"),
    # validation: other shapes, quantized weights, checkpointing
    Case(4, 8, 128, role="validation"),
    Case(8, 4, 64, role="validation"),
    Case(15, 8, 128, role="validation"),
    Case(30, 8, 128, role="validation"),
    Case(8, 4, 512, role="validation"),
    Case(15, 4, 64, "int8", role="validation"),
    Case(30, 8, 128, "int8", role="validation"),
    Case(8, 8, 256, "int4", role="validation"),
    Case(30, 4, 64, "int4", role="validation"),
    Case(15, 16, 128, "int4", checkpointing=True, role="validation"),
    Case(30, 16, 128, checkpointing=True, role="validation"),
]


def _shape() -> memory.ModelShape:
    from devft_edge.models import load_config

    return model_shape(load_config("smollm2"))


def cmd_measure(args: argparse.Namespace) -> int:
    import os

    from devft_edge.allocator import HEAP_ENV

    results = DEFAULT_HEAP_RESULTS if args.default_heap else RESULTS
    if args.default_heap:
        os.environ[HEAP_ENV] = "default"
    from devft_edge.memcheck import measure, stage_submodel
    from devft_edge.models import load_model
    from devft_edge.quantization import QuantSpec
    from devft_edge.weights import save_base

    base = load_model("smollm2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="devft-memory-") as tmp:
        built: dict[tuple[int, str], Path] = {}
        for number, case in enumerate(CASES, start=1):
            key = (case.layers, case.quant)
            if key not in built:
                _, sub = stage_submodel(base, case.layers)
                built[key] = save_base(sub, QuantSpec(case.quant), Path(tmp) / f"{case.layers}-{case.quant}")
            start = time.perf_counter()
            m = measure(
                built[key], "smollm2", case.batch, case.seq, checkpointing=case.checkpointing, threads=args.threads
            )
            rows.append({**asdict(case), **asdict(m)})
            print(
                f"[{number}/{len(CASES)}] {case}: train peak {m.train_peak_bytes / 2**20:.0f} MiB, "
                f"load peak {m.load_peak_bytes / 2**20:.0f} MiB, step {m.step_seconds:.2f} s "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    from devft_edge.device_probe import matmul_gflops

    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
                "matmul_gflops": round(matmul_gflops(seconds=3.0), 1),
                "command": " ".join(sys.argv),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {results}")
    return 0


def _features(shape: memory.ModelShape, case: Case) -> tuple[np.ndarray, float]:
    """Regressors (runtime, activations, logits, heap activations) and the fixed part, in bytes."""
    step = case.step()
    tokens = step.batch * step.seq
    blocks = 1 if step.checkpointing else step.layers
    act = blocks * tokens * shape.act_width * FLOAT
    heap = blocks * tokens * memory.heap_width(shape, tokens) * FLOAT
    parts = estimate_memory(shape, step).parts
    fixed = parts["weights"] + parts["lora"] + parts["dequant"]
    if step.checkpointing:
        fixed += step.layers * tokens * shape.hidden * FLOAT
    return np.array([1.0, act, tokens * shape.vocab * FLOAT, heap]), float(fixed)


def fit_efficiency(rows: list[dict], shape: memory.ModelShape, gflops: float) -> float:
    """Median fraction of the matmul probe's throughput the calibration steps achieved."""
    cal = [r for r in rows if r["role"] == "calibration"]
    return float(np.median([step_flops(shape, _case(r).step()) / (r["step_seconds"] * gflops * 1e9) for r in cal]))


def fit(rows: list[dict], shape: memory.ModelShape) -> dict[str, float]:
    """Non-negative least squares of the model's coefficients on the calibration rows."""
    from scipy.optimize import nnls

    cal = [r for r in rows if r["role"] == "calibration"]
    features, targets = [], []
    for r in cal:
        x, fixed = _features(shape, _case(r))
        features.append(x)
        targets.append(r["train_peak_bytes"] - fixed)
    # Relative least squares: every configuration counts the same, whatever its size.
    a = np.array(features) / np.array(targets)[:, None]
    coef, _ = nnls(a, np.ones(len(targets)))
    names = ("RUNTIME_BYTES", "ACT_COEF", "LOGIT_COEF", "HEAP_COEF")
    return dict(zip(names, coef, strict=True))


def _case(row: dict) -> Case:
    return Case(**{k: row[k] for k in ("layers", "batch", "seq", "quant", "checkpointing", "role")})


def cmd_fit(args: argparse.Namespace) -> int:
    data = json.loads(RESULTS.read_text())
    coef = fit(data["rows"], _shape())
    print(f"RUNTIME_BYTES = {coef['RUNTIME_BYTES'] / 2**20:.0f} * 2**20")
    for name in ("ACT_COEF", "LOGIT_COEF", "HEAP_COEF"):
        print(f"{name} = {coef[name]:.3f}")
    print(f"STEP_EFFICIENCY = {fit_efficiency(data['rows'], _shape(), data['matmul_gflops']):.3f}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    data = json.loads(RESULTS.read_text())
    shape = _shape()
    fitted = fit(data["rows"], shape)
    lines = [
        "# Memory model calibration",
        "",
        f"Measurements of {data['date']} on {data['machine']} (matmul probe {data['matmul_gflops']} GFLOP/s) by "
        f"`{data['command']}`; this table by `python benchmarks/memory_model.py report --markdown ...`.",
        "",
        "Coefficients in `devft_edge/memory.py` (fit on the calibration rows of these measurements: "
        f"runtime {fitted['RUNTIME_BYTES'] / 2**20:.0f} MiB, "
        f"activations {fitted['ACT_COEF']:.3f}, logits {fitted['LOGIT_COEF']:.3f}, "
        f"heap activations {fitted['HEAP_COEF']:.3f}, "
        f"step efficiency {fit_efficiency(data['rows'], shape, data['matmul_gflops']):.3f}) and in use: "
        f"runtime {memory.RUNTIME_BYTES / 2**20:.0f} MiB, "
        f"activations {memory.ACT_COEF}, logits {memory.LOGIT_COEF}, "
        f"heap activations {memory.HEAP_COEF}, step efficiency {memory.STEP_EFFICIENCY}.",
        "",
        "| role | layers | batch | seq | quant | ckpt | predicted MiB | measured MiB | error % | load peak MiB "
        "| step s | predicted step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors: dict[str, list[float]] = {"calibration": [], "validation": []}
    step_errors: list[float] = []
    for row in data["rows"]:
        case = _case(row)
        predicted = estimate_memory(shape, case.step()).peak_bytes
        error = 100.0 * (predicted - row["train_peak_bytes"]) / row["train_peak_bytes"]
        errors[case.role].append(error)
        step_s = step_flops(shape, case.step()) / (data["matmul_gflops"] * 1e9 * memory.STEP_EFFICIENCY)
        step_errors.append(100.0 * (step_s - row["step_seconds"]) / row["step_seconds"])
        lines.append(
            f"| {case.role} | {case.layers} | {case.batch} | {case.seq} | {case.quant} | "
            f"{'yes' if case.checkpointing else 'no'} | {predicted / 2**20:.0f} | "
            f"{row['train_peak_bytes'] / 2**20:.0f} | "
            f"{error:+.1f} | {row['load_peak_bytes'] / 2**20:.0f} | {row['step_seconds']:.2f} | {step_s:.2f} |"
        )
    lines.append("")
    for role, errs in errors.items():
        if errs:
            within = sum(abs(e) <= 10 for e in errs)
            lines.append(
                f"- {role}: {within}/{len(errs)} within ±10%, max |error| {max(map(abs, errs)):.1f}%, "
                f"mean |error| {np.mean(np.abs(errs)):.1f}%."
            )
    lines.append(
        f"- step time (all rows): mean |error| {np.mean(np.abs(step_errors)):.1f}%, "
        f"max |error| {max(map(abs, step_errors)):.1f}%."
    )
    if DEFAULT_HEAP_RESULTS.exists():
        lines += _heap_comparison(data["rows"], json.loads(DEFAULT_HEAP_RESULTS.read_text()))
    text = "\n".join(lines) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


def _heap_comparison(bounded: list[dict], default: dict) -> list[str]:
    """Peak and step time with glibc's default heap against the bounded heap the agent uses."""
    lines = [
        "",
        "## Allocator: glibc default against the bounded heap",
        "",
        f"Same cases measured with `DEVFT_EDGE_HEAP=default` on {default['date']} by `{default['command']}`.",
        "",
        "| layers | batch | seq | quant | ckpt | default heap MiB | bounded MiB | ratio "
        "| default step s | bounded step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ("layers", "batch", "seq", "quant", "checkpointing")
    by_key = {tuple(r[k] for k in keys): r for r in default["rows"]}
    for row in bounded:
        other = by_key.get(tuple(row[k] for k in keys))
        if other is None:
            continue
        lines.append(
            f"| {row['layers']} | {row['batch']} | {row['seq']} | {row['quant']} | "
            f"{'yes' if row['checkpointing'] else 'no'} | {other['train_peak_bytes'] / 2**20:.0f} | "
            f"{row['train_peak_bytes'] / 2**20:.0f} | {other['train_peak_bytes'] / row['train_peak_bytes']:.2f} | "
            f"{other['step_seconds']:.2f} | {row['step_seconds']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure every configuration (fresh process each)")
    m.add_argument("--threads", type=int, default=None, help="torch threads per probe")
    m.add_argument("--default-heap", action="store_true", help="keep glibc's dynamic mmap threshold (comparison)")
    m.set_defaults(func=cmd_measure)
    sub.add_parser("fit", help="print fitted coefficients").set_defaults(func=cmd_fit)
    r = sub.add_parser("report", help="predicted vs measured table")
    r.add_argument("--markdown", default=None, help="also write the table here")
    r.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
