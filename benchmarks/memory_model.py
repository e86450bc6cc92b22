"""Calibrate and test the memory model against measured peaks of real training steps.

Each configuration (stage depth, batch, seq, LoRA rank, quantization, gradient checkpointing) of
SmolLM2-135M is measured in a fresh process (:mod:`devft_edge.memcheck`: load the stage submodel,
take two LoRA training steps the way the device agent does, read the kernel's peak-RSS mark). The
coefficients of :mod:`devft_edge.memory` (runtime, activation, logit, heap-activation and
dequantization-hole terms) are fitted by non-negative least squares on the *calibration*
configurations only; the *held-out* configurations (never fitted: a grid of batch 1-16, seq
64-512, rank 4-32, fp32/int8/int4, with and without checkpointing) then show how far predictions
are off, against the goal :data:`GOAL`.

The peak itself moves between fresh-process runs of the same configuration (by up to 18% at
one int4 point, where it falls in one of two modes; the cause is not found). The planner must
admit a device by the peak it can hit, so every row keeps each run's peak
(``train_peak_runs``) and is fitted and judged by the highest (``train_peak_bytes``); ``measure
--repeat N`` adds N more runs to every row measured before.

    python benchmarks/memory_model.py measure            # 3 fresh runs per case (1 run each: ~25 min, 2 cores)
    python benchmarks/memory_model.py measure --missing  # only the cases not measured yet (3 runs each)
    python benchmarks/memory_model.py measure --repeat 2 # two more runs of every measured case
    python benchmarks/memory_model.py fit                # fitted coefficients (paste into memory.py)
    python benchmarks/memory_model.py report --markdown docs/memory_model.md

Run it on an otherwise idle machine: step times are reported too (``--loaded`` marks a session
whose step times are not to be fitted; peak memory does not depend on the load, so repeats may
run on a loaded machine: they add peaks, not step times).
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
from typing import Literal

import numpy as np

from devft_edge import memory
from devft_edge.memory import FLOAT, StepConfig, estimate_memory, model_shape, step_flops

RESULTS = Path(__file__).resolve().parent / "results-memory" / "measurements.json"
DEFAULT_HEAP_RESULTS = RESULTS.with_name("measurements-default-heap.json")
"""The same cases with glibc's default (dynamic) mmap threshold, for the allocator comparison."""
GOAL = (-2.0, 5.0)
"""Issue 16 item 3: every held-out prediction within -2% / +5% (%) of its measured peak."""


Role = Literal["calibration", "held-out"]


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    layers: int
    batch: int
    seq: int
    quant: str = "none"
    checkpointing: bool = False
    role: Role = "calibration"
    rank: int = 8

    def step(self) -> StepConfig:
        return StepConfig(
            layers=self.layers,
            batch=self.batch,
            seq=self.seq,
            rank=self.rank,
            quant=self.quant,
            checkpointing=self.checkpointing,
        )

    @property
    def key(self) -> tuple[int, int, int, str, bool, int]:
        """What identifies the configuration (the role is the design's, not the measurement's)."""
        return (self.layers, self.batch, self.seq, self.quant, self.checkpointing, self.rank)


def _held(layers: int, batch: int, seq: int, quant: str = "none", checkpointing: bool = False, rank: int = 8) -> Case:
    return Case(layers, batch, seq, quant, checkpointing, "held-out", rank)


CASES = [
    # calibration (the fit sees only these): every depth, 64 to 4,096 tokens per step (below and
    # above the mmap threshold of every block output), ranks 4-32, each quantization, checkpointing
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
    Case(4, 1, 64),
    Case(30, 1, 64),
    Case(15, 2, 64),
    Case(8, 1, 256, rank=32),
    Case(30, 2, 128, rank=4),
    Case(15, 1, 512, "int4", rank=16),
    Case(30, 1, 128, "int8", checkpointing=True),
    Case(8, 4, 256, "int8", checkpointing=True, rank=32),
    Case(15, 8, 128, "int8"),
    Case(4, 8, 512, checkpointing=True, rank=16),
    # added 2026-11-30 where the held-out misses are and the calibration had nothing: small steps on a
    # quantized base without checkpointing, and quantized 30-layer steps with it (token counts no
    # held-out row of the same depth, quantization and checkpointing has, so none is fitted twice)
    Case(8, 1, 128, "int4"),
    Case(30, 2, 64, "int8"),
    Case(30, 3, 128, "int4", checkpointing=True),
    Case(30, 6, 128, "int8", checkpointing=True),
    # held out (never fitted): the grid batch 1-8 x seq 64-512 x rank 4-32 x none/int8/int4 x
    # checkpointing, its corners first; the first four are `plan --check --batch 1 --seq 128`
    _held(4, 1, 128),
    _held(8, 1, 128),
    _held(15, 1, 128),
    _held(30, 1, 128),
    _held(30, 1, 64, rank=32),
    _held(4, 1, 512, rank=4),
    _held(30, 1, 512, "int4", checkpointing=True),
    _held(8, 1, 64, "int4", checkpointing=True, rank=32),
    _held(15, 2, 256, "int8", rank=32),
    _held(4, 2, 128, "int4", rank=32),
    _held(30, 2, 256, "int8", checkpointing=True),
    _held(15, 4, 512, "int8", rank=4),
    _held(30, 4, 512, "int4", rank=32),
    _held(8, 8, 512, "int4", checkpointing=True, rank=4),
    _held(15, 8, 64, checkpointing=True, rank=32),
    _held(30, 8, 512, checkpointing=True, rank=16),
    # added after the model was fixed: checkpointing at 256 tokens, where the model predicts every
    # block's heap holes pinned under heap-sized block inputs (its largest extrapolation)
    _held(30, 2, 128, "int4", checkpointing=True),
    _held(15, 4, 64, checkpointing=True, rank=16),
    # added to test the label of three misses ("rank 32 on a quantized base"): their rank-8 twins
    _held(8, 1, 64, "int4", checkpointing=True),
    _held(15, 2, 256, "int8"),
    _held(4, 2, 128, "int4"),
    # held out since the first calibration (then called validation)
    _held(4, 8, 128),
    _held(8, 4, 64),
    _held(15, 8, 128),
    _held(30, 8, 128),
    _held(8, 4, 512),
    _held(15, 4, 64, "int8"),
    _held(30, 8, 128, "int8"),
    _held(8, 8, 256, "int4"),
    _held(30, 4, 64, "int4"),
    _held(15, 16, 128, "int4", checkpointing=True),
    _held(30, 16, 128, checkpointing=True),
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
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = " ".join(sys.argv)
    kept = json.loads(results.read_text()) if (args.missing or args.repeat) and results.exists() else None
    rows = list(kept["rows"]) if kept else []
    if args.repeat:
        by_key = {_case(r).key: r for r in rows}
        for case, more in _probe_all([c for c in CASES if c.key in by_key], args.threads, args.repeat):
            row = by_key[case.key]
            row["train_peak_runs"] = [*peak_runs(row), *(m.train_peak_bytes for m in more)]
            row["train_peak_bytes"] = max(row["train_peak_runs"])
    else:
        done = {_case(r).key for r in rows}
        for case, runs in _probe_all([case for case in CASES if case.key not in done], args.threads, args.runs):
            peaks = [m.train_peak_bytes for m in runs]
            row = {**asdict(case), **asdict(runs[0]), "train_peak_bytes": max(peaks), "train_peak_runs": peaks}
            rows.append({**row, "measured": date, "idle": not args.loaded})
    if kept:  # the matmul probe belongs to the idle session whose step times the efficiency is fitted on
        header = {k: kept[k] for k in ("date", "machine", "matmul_gflops", "command")}
        header["added"] = [*kept.get("added", []), {"date": date, "command": command, "idle": not args.loaded}]
    else:
        from devft_edge.device_probe import matmul_gflops

        header = {
            "date": date,
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
            "matmul_gflops": round(matmul_gflops(seconds=3.0), 1),
            "command": command,
        }
    order = {case.key: i for i, case in enumerate(CASES)}
    for row in rows:  # the role is the design's: a row measured before keeps up with it
        row["role"] = CASES[order[_case(row).key]].role if _case(row).key in order else row["role"]
    rows.sort(key=lambda r: order.get(_case(r).key, len(order)))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {results}")
    return 0


def peak_runs(row: dict) -> list[int]:
    """Every run's training peak of a row (rows of the first sessions kept only one)."""
    return list(row.get("train_peak_runs", [row["train_peak_bytes"]]))


def run_spread(row: dict) -> float:
    """(max - min) / min of a row's peaks, in %."""
    runs = peak_runs(row)
    return 100.0 * (max(runs) - min(runs)) / min(runs)


def _probe_all(cases: list[Case], threads: int | None, times: int = 1) -> list[tuple[Case, list]]:
    """Measure each case ``times`` times, each in a fresh process (submodels built once per depth and quantization)."""
    from devft_edge.memcheck import measure, stage_submodel
    from devft_edge.models import load_model
    from devft_edge.quantization import QuantSpec
    from devft_edge.weights import save_base

    base = load_model("smollm2")
    out = []
    with tempfile.TemporaryDirectory(prefix="devft-memory-") as tmp:
        built: dict[tuple[int, str], Path] = {}
        for number, case in enumerate(cases, start=1):
            key = (case.layers, case.quant)
            if key not in built:
                _, sub = stage_submodel(base, case.layers)
                built[key] = save_base(sub, QuantSpec(case.quant), Path(tmp) / f"{case.layers}-{case.quant}")
            results = []
            for _ in range(times):
                start = time.perf_counter()
                m = measure(
                    built[key],
                    "smollm2",
                    case.batch,
                    case.seq,
                    rank=case.rank,
                    checkpointing=case.checkpointing,
                    threads=threads,
                )
                results.append(m)
                print(
                    f"[{number}/{len(cases)}] {case}: train peak {m.train_peak_bytes / 2**20:.0f} MiB, "
                    f"load peak {m.load_peak_bytes / 2**20:.0f} MiB, step {m.step_seconds:.2f} s "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            out.append((case, results))
    return out


def _features(shape: memory.ModelShape, case: Case) -> tuple[np.ndarray, float]:
    """Regressors (runtime, activations, logits, heap activations, dequantization holes) and the
    fixed part, in bytes."""
    step = case.step()
    counts = memory.step_counts(shape, step)
    parts = estimate_memory(shape, step).parts
    fixed = parts["weights"] + parts["lora"] + parts["delta"] + memory.dequant_chunk_bytes(shape, step)
    regressors = [1.0, counts.saved, counts.logits, counts.heap, counts.dequant_holes]
    return np.array([1.0, *(FLOAT * x for x in regressors[1:])]), float(fixed + FLOAT * counts.boundaries)


def fit_efficiency(rows: list[dict], shape: memory.ModelShape, gflops: float) -> float:
    """Median fraction of the matmul probe's throughput the calibration steps achieved (timed on
    the idle machine the probe ran on)."""
    cal = [r for r in rows if r["role"] == "calibration" and r.get("idle", True)]
    return float(np.median([step_flops(shape, _case(r).step()) / (r["step_seconds"] * gflops * 1e9) for r in cal]))


def fit(rows: list[dict], shape: memory.ModelShape) -> dict[str, float]:
    """Non-negative least squares of the model's coefficients on the calibration rows.

    Relative errors (every configuration counts the same, whatever its size), aimed at the middle
    of :data:`GOAL` rather than at zero: the goal is lopsided (2% under, 5% over) and one
    prediction is judged against the highest of a few runs, so a fit centred on zero would leave
    half its remaining scatter on the side with the smaller margin.
    """
    from scipy.optimize import nnls

    aim = 1.0 + (GOAL[0] + GOAL[1]) / 200.0
    cal = [r for r in rows if _case(r).role == "calibration"]
    features, targets, measured = [], [], []
    for r in cal:
        x, fixed = _features(shape, _case(r))
        features.append(x)
        targets.append(aim * r["train_peak_bytes"] - fixed)
        measured.append(r["train_peak_bytes"])
    scale = np.array(measured, dtype=float)
    coef, _ = nnls(np.array(features) / scale[:, None], np.array(targets) / scale)
    names = ("RUNTIME_BYTES", "ACT_COEF", "LOGIT_COEF", "HEAP_COEF", "DEQUANT_HOLE_COEF")
    return dict(zip(names, coef, strict=True))


def _fitted_peak(shape: memory.ModelShape, case: Case, fitted: dict[str, float]) -> float:
    """Predicted peak (bytes) of ``case`` with coefficients from :func:`fit` instead of those in use."""
    regressors, fixed = _features(shape, case)
    return float(regressors @ np.array(list(fitted.values())) + fixed)


def _case(row: dict) -> Case:
    role = "held-out" if row["role"] == "validation" else row["role"]
    fields = {k: row[k] for k in ("layers", "batch", "seq", "quant", "checkpointing")}
    return Case(**fields, role=role, rank=row.get("rank", 8))


def cmd_fit(args: argparse.Namespace) -> int:
    data = json.loads(RESULTS.read_text())
    coef = fit(data["rows"], _shape())
    print(f"RUNTIME_BYTES = {coef['RUNTIME_BYTES'] / 2**20:.0f} * 2**20")
    for name in ("ACT_COEF", "LOGIT_COEF", "HEAP_COEF", "DEQUANT_HOLE_COEF"):
        print(f"{name} = {coef[name]:.3f}")
    print(f"STEP_EFFICIENCY = {fit_efficiency(data['rows'], _shape(), data['matmul_gflops']):.3f}")
    return 0


_COEFFICIENTS = {
    "RUNTIME_BYTES": "runtime",
    "ACT_COEF": "activations",
    "LOGIT_COEF": "logits",
    "HEAP_COEF": "heap activations",
    "DEQUANT_HOLE_COEF": "dequantization holes",
}


def _coefficients(values: dict[str, float]) -> str:
    return ", ".join(
        f"{label} {values[name] / 2**20:.0f} MiB" if name == "RUNTIME_BYTES" else f"{label} {values[name]:.3f}"
        for name, label in _COEFFICIENTS.items()
    )


def cmd_report(args: argparse.Namespace) -> int:
    data = json.loads(RESULTS.read_text())
    shape = _shape()
    fitted = fit(data["rows"], shape)
    in_use = {name: getattr(memory, name) for name in _COEFFICIENTS}
    low, high = GOAL
    added = "".join(
        f"; {'runs' if 'repeat' in a['command'] or 'spread' in a['command'] else 'rows'} added {a['date']} "
        f"by `{a['command']}`" + ("" if a["idle"] else " on a loaded machine")
        for a in data.get("added", [])
    )
    lines = [
        "# Memory model calibration",
        "",
        f"Measurements of {data['date']} on {data['machine']} (matmul probe {data['matmul_gflops']} GFLOP/s) by "
        f"`{data['command']}`{added}; this page by `python benchmarks/memory_model.py report --markdown ...`.",
        "",
        f"Coefficients in `devft_edge/memory.py`, fitted on the calibration rows only: {_coefficients(fitted)}, "
        f"step efficiency {fit_efficiency(data['rows'], shape, data['matmul_gflops']):.3f}; in use: "
        f"{_coefficients(in_use)}, step efficiency {memory.STEP_EFFICIENCY}.",
        "",
        f"Goal (issue 16 item 3): every held-out prediction within {low:+.0f}% / {high:+.0f}% of the measured "
        "peak (over-prediction turns away devices that fit; under-prediction lets one run out of memory).",
        "",
        "Measured: the highest training peak of the row's fresh-process runs (runs, and their spread "
        "(max - min) / min).",
        "",
        "| role | layers | batch | seq | rank | quant | ckpt | predicted MiB | measured MiB | runs | spread % "
        "| error % | load peak MiB | step s | predicted step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors: dict[str, list[tuple[float, Case]]] = {"calibration": [], "held-out": []}
    step_errors: list[float] = []
    for row in data["rows"]:
        case = _case(row)
        predicted = estimate_memory(shape, case.step()).peak_bytes
        error = 100.0 * (predicted - row["train_peak_bytes"]) / row["train_peak_bytes"]
        errors[case.role].append((error, case))
        step_s = step_flops(shape, case.step()) / (data["matmul_gflops"] * 1e9 * memory.STEP_EFFICIENCY)
        idle = row.get("idle", True)
        if idle:
            step_errors.append(100.0 * (step_s - row["step_seconds"]) / row["step_seconds"])
        flag = "" if low <= error <= high or case.role == "calibration" else " **"
        lines.append(
            f"| {case.role} | {case.layers} | {case.batch} | {case.seq} | {case.rank} | {case.quant} | "
            f"{'yes' if case.checkpointing else 'no'} | {predicted / 2**20:.0f} | "
            f"{row['train_peak_bytes'] / 2**20:.0f} | {len(peak_runs(row))} | {run_spread(row):.1f} | "
            f"{error:+.1f}{flag} | {row['load_peak_bytes'] / 2**20:.0f} | "
            f"{row['step_seconds']:.2f}{'' if idle else ' (loaded)'} | {step_s:.2f} |"
        )
    lines.append("")
    for role, pairs in errors.items():
        errs = [e for e, _ in pairs]
        within = sum(low <= e <= high for e in errs)
        lines.append(
            f"- {role}: {within}/{len(errs)} within {low:+.0f}% / {high:+.0f}%, largest over-prediction "
            f"{max(errs):+.1f}%, largest under-prediction {min(errs):+.1f}%, mean |error| "
            f"{np.mean(np.abs(errs)):.1f}%."
        )
    misses = [(e, c) for e, c in errors["held-out"] if not low <= e <= high]
    verdict = "met" if not misses else f"not met at {len(misses)} of {len(errors['held-out'])} held-out points"
    lines.append(f"- goal: {verdict}" + ("." if not misses else ": marked ** above."))
    refit = [
        100.0 * (_fitted_peak(shape, case, fitted) - row["train_peak_bytes"]) / row["train_peak_bytes"]
        for row in data["rows"]
        if (case := _case(row)).role == "held-out"
    ]
    lines.append(
        f"- held-out with the coefficients fitted above instead: {sum(low <= e <= high for e in refit)}/"
        f"{len(refit)} within, {min(refit):+.1f}% to {max(refit):+.1f}%."
    )
    spreads = [run_spread(r) for r in data["rows"] if len(peak_runs(r)) > 1]
    if spreads:
        lines.append(
            f"- run-to-run spread of the peak, {len(spreads)} rows with repeats: median {np.median(spreads):.1f}%, "
            f"largest {max(spreads):.1f}%."
        )
    lines.append(
        f"- step time (rows timed on the idle machine): mean |error| {np.mean(np.abs(step_errors)):.1f}%, "
        f"max |error| {max(map(abs, step_errors)):.1f}%; step times marked (loaded) were taken while other "
        "work shared the machine and are not fitted."
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
        other = by_key.get(tuple(row[k] for k in keys)) if row.get("rank", 8) == 8 else None
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
    m.add_argument("--missing", action="store_true", help="measure only cases not yet in the results; keep the rest")
    m.add_argument(
        "--loaded", action="store_true", help="the machine is not idle: step times are kept out of the efficiency fit"
    )
    m.add_argument("--repeat", type=int, default=0, help="add this many runs to every row measured before")
    m.add_argument("--runs", type=int, default=3, help="runs of each case measured for the first time")
    m.set_defaults(func=cmd_measure)
    sub.add_parser("fit", help="print fitted coefficients").set_defaults(func=cmd_fit)
    r = sub.add_parser("report", help="predicted vs measured table")
    r.add_argument("--markdown", default=None, help="also write the table here")
    r.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
