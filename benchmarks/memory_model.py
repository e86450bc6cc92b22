"""Calibrate and test the memory model against measured peaks of real training steps.

Each configuration (stage depth, batch, seq, LoRA rank, quantization, gradient checkpointing) of
SmolLM2-135M is measured in a fresh process (:mod:`devft_edge.memcheck`: load the stage submodel,
take two LoRA training steps the way the device agent does, read the kernel's peak-RSS mark). The
coefficients of :mod:`devft_edge.memory` (runtime, activation, logit and heap-activation
terms) are fitted by non-negative least squares on the *calibration*
configurations only; the *held-out* configurations (never fitted: a grid of batch 1-16, seq
64-512, rank 4-32, fp32/int8/int4, with and without checkpointing) then show how far predictions
are off, against the goal :data:`GOAL`.

With the agent's mmap threshold at 1 MiB the peak moved between fresh-process runs of the same
configuration (by up to 20%, bimodal at one int4 point); with it at 128 KiB the runs agree (the
``heap`` comparison's repeats). A row keeps each run's peak (``train_peak_runs``) and is fitted
and judged by the highest (``train_peak_bytes``); ``measure --repeat N`` adds N more runs to every
row measured before.

    python benchmarks/memory_model.py measure            # 3 fresh runs per case (1 run each: ~25 min, 2 cores)
    python benchmarks/memory_model.py measure --missing  # only the cases not measured yet (3 runs each)
    python benchmarks/memory_model.py measure --repeat 2 # two more runs of every measured case
    python benchmarks/memory_model.py heap               # the allocator comparison (idle machine, ~10 min)
    python benchmarks/memory_model.py fit                # fitted coefficients (paste into memory.py)
    python benchmarks/memory_model.py report --markdown docs/memory_model.md

Run it on an otherwise idle machine: step times are reported too (``--loaded`` marks a session
whose step times are not to be fitted; peak memory does not depend on the load, so repeats may
run on a loaded machine: they add peaks, not step times).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from devft_edge import memory
from devft_edge.allocator import MMAP_THRESHOLD_BYTES
from devft_edge.memcheck import Measurement, measure
from devft_edge.memory import FLOAT, StepConfig, estimate_memory, model_shape, step_flops

RESULTS = Path(__file__).resolve().parent / "results-memory" / "measurements.json"
ONE_MIB_RESULTS = RESULTS.with_name("measurements-1mib.json")
"""The grid as measured while the agent's mmap threshold was 1 MiB (until 2026-11-30), kept for the comparison."""
HEAP_RESULTS = RESULTS.with_name("heap-settings.json")
"""The allocator comparison: :data:`HEAP_CASES` under each heap setting (``heap`` command)."""
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
    # added with the 128 KiB threshold: checkpointed block inputs on the heap (below 57 tokens),
    # where every block pins its holes (memory.step_counts)
    _held(30, 1, 48, checkpointing=True),
    _held(8, 2, 24, "int4", checkpointing=True),
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

    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = " ".join(sys.argv)
    kept = json.loads(RESULTS.read_text()) if (args.missing or args.repeat) and RESULTS.exists() else None
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


def peak_runs(row: dict) -> list[int]:
    """Every run's training peak of a row (rows of the first sessions kept only one)."""
    return list(row.get("train_peak_runs", [row["train_peak_bytes"]]))


def run_spread(row: dict) -> float:
    """(max - min) / min of a row's peaks, in %."""
    runs = peak_runs(row)
    return 100.0 * (max(runs) - min(runs)) / min(runs)


@contextlib.contextmanager
def _submodels() -> Iterator[Callable[[Case], Path]]:
    """A function from a case to its saved stage submodel, built once per depth and quantization
    (in a temporary directory that lives as long as the context)."""
    from devft_edge.memcheck import stage_submodel
    from devft_edge.models import load_model
    from devft_edge.quantization import QuantSpec
    from devft_edge.weights import save_base

    base = load_model("smollm2")
    with tempfile.TemporaryDirectory(prefix="devft-memory-") as tmp:
        built: dict[tuple[int, str], Path] = {}

        def path(case: Case) -> Path:
            key = (case.layers, case.quant)
            if key not in built:
                _, sub = stage_submodel(base, case.layers)
                built[key] = save_base(sub, QuantSpec(case.quant), Path(tmp) / f"{case.layers}-{case.quant}")
            return built[key]

        yield path


def _probe(path: Path, case: Case, threads: int | None, label: str) -> Measurement:
    """One fresh-process measurement of ``case`` on the submodel saved at ``path``, logged."""
    start = time.perf_counter()
    m = measure(
        path, "smollm2", case.batch, case.seq, rank=case.rank, checkpointing=case.checkpointing, threads=threads
    )
    print(
        f"[{label}] {case}: train peak {m.train_peak_bytes / 2**20:.0f} MiB, load peak "
        f"{m.load_peak_bytes / 2**20:.0f} MiB, step {m.step_seconds:.2f} s ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return m


def _probe_all(cases: list[Case], threads: int | None, times: int = 1) -> list[tuple[Case, list[Measurement]]]:
    """Measure each case ``times`` times, each in a fresh process."""
    with _submodels() as path:
        return [
            (case, [_probe(path(case), case, threads, f"{n}/{len(cases)}") for _ in range(times)])
            for n, case in enumerate(cases, start=1)
        ]


def _features(shape: memory.ModelShape, case: Case) -> tuple[np.ndarray, float]:
    """Regressors (runtime, activations, logits, heap activations) and the fixed part, in bytes."""
    step = case.step()
    counts = memory.step_counts(shape, step)
    parts = estimate_memory(shape, step).parts
    fixed = parts["weights"] + parts["lora"] + parts["delta"] + memory.dequant_chunk_bytes(shape, step)
    regressors = [1.0, counts.saved, counts.logits, counts.heap]
    return np.array([1.0, *(FLOAT * x for x in regressors[1:])]), float(fixed + FLOAT * counts.boundaries)


def fit_efficiency(rows: list[dict], shape: memory.ModelShape, gflops: float) -> float:
    """Median fraction of the matmul probe's throughput ``rows``' steps achieved (timed on the idle
    machine the probe ran on)."""
    return float(np.median([step_flops(shape, _case(r).step()) / (r["step_seconds"] * gflops * 1e9) for r in rows]))


def idle_timing() -> tuple[float, list[dict]]:
    """The allocator comparison's matmul probe and its rows under the heap the agent runs, each with
    its median ``step_seconds``: the step times that are fitted, as that comparison is timed on an
    idle machine by design."""
    data = json.loads(HEAP_RESULTS.read_text())
    label = heap_label(str(MMAP_THRESHOLD_BYTES))
    rows = [{**row, "step_seconds": float(np.median(row["steps"][label]))} for row in data["rows"]]
    return data["matmul_gflops"], rows


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
    names = tuple(_COEFFICIENTS)
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
    for name in list(_COEFFICIENTS)[1:]:
        print(f"{name} = {coef[name]:.3f}")
    gflops, timed = idle_timing()
    print(f"STEP_EFFICIENCY = {fit_efficiency(timed, _shape(), gflops):.3f}")
    return 0


_COEFFICIENTS = {
    "RUNTIME_BYTES": "runtime",
    "ACT_COEF": "activations",
    "LOGIT_COEF": "logits",
    "HEAP_COEF": "heap activations",
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
    gflops, timed = idle_timing()
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
        f"step efficiency {fit_efficiency(timed, shape, gflops):.3f} (the allocator comparison's idle steps "
        f"below, matmul probe {gflops} GFLOP/s); in use: {_coefficients(in_use)}, step efficiency "
        f"{memory.STEP_EFFICIENCY}.",
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
    for row in data["rows"]:
        case = _case(row)
        predicted = estimate_memory(shape, case.step()).peak_bytes
        error = 100.0 * (predicted - row["train_peak_bytes"]) / row["train_peak_bytes"]
        errors[case.role].append((error, case))
        step_s = memory.estimate_step_seconds(shape, case.step(), gflops)
        idle = row.get("idle", True)
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
    step_errors = [
        100.0 * (memory.estimate_step_seconds(shape, _case(r).step(), gflops) - r["step_seconds"]) / r["step_seconds"]
        for r in timed
    ]
    lines.append(
        f"- step time, predicted with the idle matmul probe: mean |error| {np.mean(np.abs(step_errors)):.1f}%, "
        f"max |error| {max(map(abs, step_errors)):.1f}% on the allocator comparison's idle steps; step times "
        "marked (loaded) were taken while other work shared the machine."
    )
    lines += _against_one_mib(data["rows"], json.loads(ONE_MIB_RESULTS.read_text())["rows"])
    lines += _heap_comparison(json.loads(HEAP_RESULTS.read_text()))
    text = "\n".join(lines) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


def _against_one_mib(rows: list[dict], before: list[dict]) -> list[str]:
    """The same configurations' peaks with the threshold at 1 MiB: ratio and run-to-run spread."""
    old = {_case(r).key: r for r in before}
    pairs = [(r["train_peak_bytes"], old[_case(r).key]) for r in rows if _case(r).key in old]
    ratios = [peak / o["train_peak_bytes"] for peak, o in pairs]
    spreads = [run_spread(o) for _, o in pairs]
    return [
        f"- against the same {len(pairs)} configurations measured with the mmap threshold at 1 MiB "
        f"(`{ONE_MIB_RESULTS.name}`, the highest of 3 runs each): peak {np.median(ratios):.2f}x (median; "
        f"{min(ratios):.2f}-{max(ratios):.2f}); their runs had spread by {np.median(spreads):.1f}% (median), "
        f"up to {max(spreads):.1f}%.",
    ]


def _heap_comparison(data: dict) -> list[str]:
    """Peak and step time of :data:`HEAP_CASES` under each heap setting (``heap`` command)."""
    settings = data["settings"]
    lines = [
        "",
        "## Allocator: glibc's dynamic mmap threshold against fixed ones",
        "",
        f"Measured {data['date']} on {data['machine']} by `{data['command']}`, nothing else running: each "
        "configuration under every setting in turn, a fresh process each; highest peak MiB and seconds of the "
        "steady-state step (median of the runs); ratios are against the first setting.",
        "",
        "| layers | batch | seq | quant | ckpt | "
        + " | ".join(f"{h} MiB" for h in settings)
        + " | "
        + " | ".join(f"{h} step s" for h in settings)
        + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(settings)),
    ]
    ratios: dict[str, list[float]] = {h: [] for h in settings}
    peak_ratios: dict[str, list[float]] = {h: [] for h in settings}
    spreads: dict[str, list[float]] = {h: [] for h in settings}
    for row in data["rows"]:
        peaks = [max(row["peaks"][h]) / 2**20 for h in settings]
        steps = [float(np.median(row["steps"][h])) for h in settings]
        for h, step, peak in zip(settings, steps, peaks, strict=True):
            ratios[h].append(step / steps[0])
            peak_ratios[h].append(peak / peaks[0])
            spreads[h].append(100.0 * (max(row["peaks"][h]) - min(row["peaks"][h])) / min(row["peaks"][h]))
        lines.append(
            f"| {row['layers']} | {row['batch']} | {row['seq']} | {row['quant']} | "
            f"{'yes' if row['checkpointing'] else 'no'} | "
            + " | ".join(f"{p:.0f}" for p in peaks)
            + " | "
            + " | ".join(f"{t:.2f}" for t in steps)
            + " |"
        )
    lines.append("")
    for h in settings:
        against = (
            ""
            if h == settings[0]
            else f"peak {np.median(peak_ratios[h]):.2f}x the first setting's (median; {min(peak_ratios[h]):.2f}-"
            f"{max(peak_ratios[h]):.2f}), step time {np.median(ratios[h]):.2f}x ({min(ratios[h]):.2f}-"
            f"{max(ratios[h]):.2f}); "
        )
        lines.append(
            f"- {h}: {against}the peak's spread between runs of a configuration: median {np.median(spreads[h]):.1f}%, "
            f"largest {max(spreads[h]):.1f}%."
        )
    return lines


HEAP_CASES = [
    case
    for case in CASES
    if case.role == "calibration"
    and case.key
    in {
        (4, 4, 64, "none", False, 8),
        (8, 8, 128, "none", False, 8),
        (30, 4, 64, "none", False, 8),
        (30, 8, 256, "none", True, 8),
        (15, 4, 128, "int4", False, 8),
        (30, 8, 64, "int8", False, 8),
    }
]
"""The allocator comparison's configurations: calibration rows of every depth, 256 to 2,048 tokens,
fp32 and quantized, with and without checkpointing (six, to keep the idle run near ten minutes)."""


def heap_label(setting: str) -> str:
    """``default``, or the fixed threshold in KiB/MiB."""
    if setting == "default":
        return "default"
    size = int(setting)
    return f"{size >> 20} MiB" if size % 2**20 == 0 else f"{size >> 10} KiB"


def cmd_heap(args: argparse.Namespace) -> int:
    """Measure :data:`HEAP_CASES` under each heap setting, the settings taken in turn per configuration
    (rotated, so none always runs first) on an idle machine: step time is what this compares."""
    import os
    from unittest import mock

    from devft_edge.allocator import HEAP_ENV
    from devft_edge.device_probe import matmul_gflops

    labels = [heap_label(h) for h in args.settings]
    gflops = round(matmul_gflops(seconds=3.0), 1)
    rows = []
    with mock.patch.dict(os.environ), _submodels() as path:  # the caller's environment comes back
        for index, case in enumerate(HEAP_CASES):
            peaks: dict[str, list[int]] = {label: [] for label in labels}
            steps: dict[str, list[float]] = {label: [] for label in labels}
            shift = index % len(args.settings)
            for _ in range(args.runs):
                for setting in args.settings[shift:] + args.settings[:shift]:
                    os.environ[HEAP_ENV] = setting
                    label = f"{index + 1}/{len(HEAP_CASES)} {heap_label(setting)}"
                    m = _probe(path(case), case, args.threads, label)
                    peaks[heap_label(setting)].append(m.train_peak_bytes)
                    steps[heap_label(setting)].append(m.step_seconds)
            rows.append({**asdict(case), "peaks": peaks, "steps": steps})
    data = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "command": " ".join(sys.argv),
        "matmul_gflops": gflops,
        "settings": labels,
        "rows": rows,
    }
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print("\n".join(_heap_comparison(data)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure every configuration (fresh process each)")
    m.add_argument("--threads", type=int, default=None, help="torch threads per probe")
    m.add_argument("--missing", action="store_true", help="measure only cases not yet in the results; keep the rest")
    m.add_argument(
        "--loaded", action="store_true", help="the machine is not idle: step times are kept out of the efficiency fit"
    )
    m.add_argument("--repeat", type=int, default=0, help="add this many runs to every row measured before")
    m.add_argument("--runs", type=int, default=3, help="runs of each case measured for the first time")
    m.set_defaults(func=cmd_measure)
    h = sub.add_parser("heap", help="peak and step time under glibc's default heap and fixed mmap thresholds")
    h.add_argument("--settings", nargs="+", default=["default", str(2**20), str(MMAP_THRESHOLD_BYTES)])
    h.add_argument("--runs", type=int, default=1, help="runs of each configuration under each setting")
    h.add_argument("--threads", type=int, default=None, help="torch threads per probe")
    h.add_argument("--out", type=Path, default=HEAP_RESULTS, help="where the results go")
    h.set_defaults(func=cmd_heap)
    sub.add_parser("fit", help="print fitted coefficients").set_defaults(func=cmd_fit)
    r = sub.add_parser("report", help="predicted vs measured table")
    r.add_argument("--markdown", default=None, help="also write the table here")
    r.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
