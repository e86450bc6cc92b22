"""Convergence benchmark: DevFT against FedIT, FedSA-LoRA and FLoRA, and DevFT's ablations.

The paper's headline claims are about cost to converge (time, bytes) at equal or better quality, so
this benchmark measures eval loss against wall time and bytes, not only the final numbers.

``run`` executes a declarative list of simulator runs (``build_specs``), each in its own process:
every run then has its own peak RSS, and a crash of one run does not stop the others. A run whose
``summary.json`` exists is skipped, so the full benchmark can be run in parts. ``report`` turns a
results directory into markdown tables and a figure and works on partial results.

    python benchmarks/convergence.py run --suite main --seeds 0 1 2
    python benchmarks/convergence.py run --suite ablations --seeds 0
    python benchmarks/convergence.py report --markdown docs/convergence.md --figure docs/convergence.png
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METHODS = ("fedit", "devft", "fedsa", "devft+fedsa", "flora", "devft+flora")
"""The main suite's methods; ``devft`` is DevFT with FedIT aggregation."""
PAIRS = (("fedit", "devft"), ("fedsa", "devft+fedsa"), ("flora", "devft+flora"))
"""(baseline, DevFT on top of that baseline's aggregation rule)."""
SUITES = ("main", "ablations")
BASELINE = "devft"
"""The ablations vary one setting of this run; its default-settings run is shared with the main suite."""


def _flags(command_line: str) -> dict[str, str]:
    """``--per-round 2 ...`` -> ``{"per_round": "2", ...}``: settings written exactly as on the command line."""
    words = command_line.split()
    return {
        flag.removeprefix("--").replace("-", "_"): value for flag, value in zip(words[::2], words[1::2], strict=True)
    }


FULL_SETTINGS = _flags(
    "--model smollm2 --clients 10 --per-round 2 --stages 4 --rounds 12 --local-steps 8 --batch 4 --seq 64 --lr 3e-4 "
    "--eval-examples 48 --eval-every 1 --examples-per-client 48 --data-alpha 0.5 --round-split equal --quant none"
)
"""SmolLM2-135M with the demo's federation: the setting the results are reported for. The paper's
equal round split and fp32 weights are pinned: they are the protocol every run here used (the
simulator's default became the depth split because of this benchmark's ``round_split=depth``
ablation, and int4 packs, the deployment's, when the run configuration was unified)."""
QUICK_SETTINGS = _flags(
    "--model tiny --clients 4 --per-round 2 --stages 2 --rounds 4 --local-steps 2 --batch 2 --seq 48 --lr 1e-2 "
    "--eval-examples 8 --eval-every 2 --examples-per-client 8 --data-alpha 0.5 --round-split equal --quant none"
)
"""A random tiny model: seconds per run, to check the pipeline (CI), not to measure anything."""


@dataclass(frozen=True)
class RunSpec:
    """One simulator run: ``overrides`` (option name with underscores -> value) on top of the suite settings."""

    name: str
    suite: str
    method: str
    seed: int
    overrides: dict[str, str]

    @property
    def variant(self) -> str:
        """The name without the seed: runs that differ only in the seed are averaged together."""
        return self.name.rsplit("-s", 1)[0]


def _settings(quick: bool) -> dict[str, str]:
    return QUICK_SETTINGS if quick else FULL_SETTINGS


@cache
def _simulate_defaults() -> dict[str, str]:
    """The simulate command's own defaults (option name with underscores -> value), read from the
    simulator's config fields, so they are never restated here."""
    from devft_edge.cli.config_options import config_options
    from devft_edge.simulator import SimulationConfig

    def text(value: object) -> str:
        return "off" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    return {o.flag.removeprefix("--").replace("-", "_"): text(o.default) for o in config_options(SimulationConfig)}


def _spec(suite: str, method: str, seed: int, overrides: Mapping[str, str], quick: bool) -> RunSpec:
    """A spec whose name encodes exactly the settings that differ from what the run would use anyway.

    Overrides equal to the suite setting or the simulator default are dropped, so an ablation value
    that is the default (grouping ``contiguous``, DBLF with beta 0.1, ...) gets the baseline's name
    and shares its run.
    """
    implied = {**_simulate_defaults(), **_settings(quick)}
    kept = {key: value for key, value in overrides.items() if implied.get(key) != value}
    parts = [method, *(f"{key.replace('_', '-')}-{value}" for key, value in kept.items())]
    return RunSpec(name="-".join(parts) + f"-s{seed}", suite=suite, method=method, seed=seed, overrides=kept)


def _ablation_overrides(quick: bool) -> list[dict[str, str]]:
    """One-setting variations of DevFT+FedIT: the paper's ablations plus the choices this project added."""
    return [
        *({"grouping": g} for g in ("random", "even", "contiguous", "contiguous_ratiocut", "spectral")),
        *({"similarity": s} for s in ("weights", "cka")),
        *({"fusion": f} for f in ("one", "sum", "mean")),
        *({"fusion": "dblf", "beta": b} for b in ("0.05", "0.1", "0.2", "auto")),
        *({"stages": s} for s in (("1", "2") if quick else ("2", "3", "4"))),
        *({"adaptive_patience": p} for p in ("1", "0")),
        *({"round_split": r} for r in ("depth", "equal")),
    ]


def build_specs(quick: bool, seeds: list[int]) -> list[RunSpec]:
    """Every run of both suites, without duplicates (a name is its settings, the first suite keeps it)."""
    candidates = [_spec("main", method, seed, {}, quick) for seed in seeds for method in METHODS]
    candidates += [_spec("ablations", BASELINE, seed, o, quick) for seed in seeds for o in _ablation_overrides(quick)]
    unique: dict[str, RunSpec] = {}
    for spec in candidates:
        unique.setdefault(spec.name, spec)
    return list(unique.values())


def in_suite(spec: RunSpec, suite: str) -> bool:
    """Suite membership; the ablations include their baseline, which is stored as a main-suite run."""
    if suite == "all" or spec.suite == suite:
        return True
    return suite == "ablations" and spec.method == BASELINE and not spec.overrides


def simulate_command(spec: RunSpec, quick: bool, out: Path) -> list[str]:
    """The exact process a spec runs: ``python -m devft_edge simulate ...`` (flags only for set values)."""
    settings = {**_settings(quick), **spec.overrides}
    flags = [item for key, value in settings.items() for item in (f"--{key.replace('_', '-')}", value)]
    head = [sys.executable, "-m", "devft_edge", "simulate", "--method", spec.method, "--seed", str(spec.seed)]
    return [*head, *flags, "--out", str(out), "--json"]


# ---------------------------------------------------------------- run


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def _update_plan(results: Path, specs: Sequence[RunSpec], quick: bool, threads: int | None) -> None:
    """Record what was planned and how it was run in ``plan.json``, merged over earlier invocations.

    The report reads it to know which runs are missing and to print the machine and command lines.
    """
    path = results / "plan.json"
    plan: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"specs": [], "invocations": []}
    known = {entry["name"] for entry in plan["specs"]}
    for spec in specs:
        if spec.name not in known:
            command = shlex.join(simulate_command(spec, quick, results / spec.name))
            plan["specs"].append({**asdict(spec), "command": command})
    plan["invocations"].append(
        {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "threads": threads,
            "torch": _torch_version(),
        }
    )
    path.write_text(json.dumps(plan, indent=2) + "\n")


def run_specs(specs: Sequence[RunSpec], results: Path, quick: bool, threads: int | None) -> list[str]:
    """Run each spec in its own process, one after another (timings must not compete); returns failures."""
    env = dict(os.environ)
    if threads is not None:  # oversubscribed OpenMP threads make CPU timings meaningless (100x slower seen)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    failures: list[str] = []
    start = time.perf_counter()
    for index, spec in enumerate(specs, 1):
        out = results / spec.name
        prefix = f"[{index}/{len(specs)}] {spec.name}"
        if (out / "summary.json").exists():
            print(f"{prefix}: done earlier, skipped", flush=True)
            continue
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with (out / "run.log").open("w") as log:
            code = subprocess.run(simulate_command(spec, quick, out), stdout=log, stderr=subprocess.STDOUT, env=env)
        took, elapsed = time.perf_counter() - t0, time.perf_counter() - start
        if code.returncode == 0 and (out / "summary.json").exists():
            loss = json.loads((out / "summary.json").read_text())["final_eval_loss"]
            print(f"{prefix}: ok in {took:.0f} s, final eval loss {loss:.4f} (elapsed {elapsed:.0f} s)", flush=True)
        else:
            last = next((x for x in reversed((out / "run.log").read_text().splitlines()) if x.strip()), "")
            failures.append(f"{spec.name}: exit code {code.returncode}: {last} (log {out / 'run.log'})")
            print(f"{prefix}: FAILED in {took:.0f} s (elapsed {elapsed:.0f} s)", flush=True)
    return failures


def _cmd_run(args: argparse.Namespace) -> int:
    results: Path = args.results or HERE / ("results-quick" if args.quick else "results")
    results.mkdir(parents=True, exist_ok=True)
    if args.results is None and args.quick:  # the quick default is scratch space: keep it out of git
        (results / ".gitignore").write_text("*\n")
    planned = [s for s in build_specs(args.quick, args.seeds) if in_suite(s, args.suite)]
    patterns: list[str] = args.only or ["*"]
    selected = [s for s in planned if any(fnmatch.fnmatchcase(s.name, pattern) for pattern in patterns)]
    if not selected:
        print(f"no run matches --only {' '.join(patterns)}", file=sys.stderr)
        return 2
    _update_plan(results, planned, args.quick, args.threads)
    failures = run_specs(selected, results, args.quick, args.threads)
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"{len(selected) - len(failures)}/{len(selected)} runs done; results in {results}")
    return 1 if failures else 0


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class Reach:
    """Cumulative cost at the first evaluated round whose eval loss reached a target."""

    round: int
    wall_seconds: float
    parallel_seconds: float
    bytes_up: int
    bytes_down: int
    bytes_down_pack: int

    @property
    def bytes_total(self) -> int:
        """Both directions together, model packs included."""
        return self.bytes_up + self.bytes_down

    @property
    def bytes_lora(self) -> int:
        """LoRA traffic only (both directions, packs excluded): what the paper's communication figures count."""
        return self.bytes_total - self.bytes_down_pack


def time_to_target(rows: Sequence[Mapping[str, Any]], target: float) -> Reach | None:
    """First round (in ``metrics.jsonl`` order) with ``eval_loss <= target``; rows not evaluated are skipped.

    None when the target is never reached. The cost columns are cumulative in the rows already.
    """
    for row in rows:
        if row.get("eval_loss") is not None and row["eval_loss"] <= target:
            return Reach(
                row["round"],
                row["wall_seconds"],
                row["parallel_seconds"],
                row["bytes_up"],
                row["bytes_down"],
                row.get("bytes_down_pack", 0),
            )
    return None


@dataclass(frozen=True)
class RunResult:
    """A finished run: its ``summary.json`` and its ``metrics.jsonl`` rows."""

    spec: RunSpec
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def _loss_at(rows: Sequence[Mapping[str, Any]], cost: str, budget: float) -> float | None:
    """Eval loss of the last evaluated round whose cumulative ``cost`` is within ``budget``.

    ``cost`` is a metrics key, or ``bytes_lora`` (both directions without packs).
    """
    best = None
    for row in rows:
        value = (
            (row["bytes_up"] + row["bytes_down"] - row.get("bytes_down_pack", 0)) if cost == "bytes_lora" else row[cost]
        )
        if value <= budget and row.get("eval_loss") is not None:
            best = row["eval_loss"]
    return best


def load_results(results: Path, specs: Sequence[RunSpec]) -> dict[str, RunResult]:
    """The finished runs among ``specs``, by name; runs without a ``summary.json`` are simply absent."""
    found: dict[str, RunResult] = {}
    for spec in specs:
        summary_path, metrics_path = results / spec.name / "summary.json", results / spec.name / "metrics.jsonl"
        if not summary_path.exists():
            continue
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        found[spec.name] = RunResult(spec, json.loads(summary_path.read_text()), [json.loads(x) for x in lines if x])
    return found


def _stat(values: Sequence[float], digits: int) -> str:
    """Mean ± sample std (the std needs two values)."""
    if not values:
        return "missing"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _mb(n_bytes: float) -> float:
    return n_bytes / 1e6


def _gap(baseline: RunResult, other: RunResult, key: str) -> float:
    """``other`` minus ``baseline`` in one summary field (same seed: the pairing removes the seed's noise)."""
    return float(other.summary[key]) - float(baseline.summary[key])


def _table(header: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; ``header`` is the column names separated by `` | ``."""
    lines = [f"| {header} |", "|" + "---|" * len(header.split(" | "))]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


class Report:
    """Markdown tables over the planned runs; every missing run shows up as missing."""

    def __init__(self, specs: Sequence[RunSpec], runs: Mapping[str, RunResult]) -> None:
        self.specs, self.runs = specs, runs
        self.main = {(s.method, s.seed): s.name for s in specs if s.suite == "main"}
        self.seeds = sorted({s.seed for s in specs if s.suite == "main"})

    def run_for(self, method: str, seed: int) -> RunResult | None:
        """The finished main-suite run of ``method`` with ``seed``, if any."""
        name = self.main.get((method, seed))
        return self.runs.get(name) if name else None

    def _paired(self, baseline: str, method: str) -> list[tuple[RunResult, RunResult]]:
        pairs = ((self.run_for(baseline, seed), self.run_for(method, seed)) for seed in self.seeds)
        return [(b, m) for b, m in pairs if b is not None and m is not None]

    def main_tables(self) -> list[str]:
        """Quality and cost at the end; cost to reach the same seed's FedIT final eval loss."""
        end, reach = [], []
        for method in METHODS:
            done = [r for seed in self.seeds if (r := self.run_for(method, seed)) is not None]
            s = [r.summary for r in done]
            end.append(
                [
                    method,
                    f"{len(done)}/{len(self.seeds)}",
                    _stat([x["final_eval_loss"] for x in s], 4),
                    _stat([100 * x["final_eval_accuracy"] for x in s], 1),
                    _stat([x["wall_seconds"] for x in s], 1),
                    _stat([x["parallel_seconds"] for x in s], 1),
                    _stat([_mb(x["bytes_up"]) for x in s], 1),
                    _stat([_mb(x["bytes_down"]) for x in s], 1),
                    _stat([_mb(x["bytes_up"] + x["bytes_down"]) for x in s], 1),
                    _stat([_mb(x["bytes_up"] + x["bytes_down"] - x.get("bytes_down_pack", 0)) for x in s], 1),
                    _stat([_mb(x["peak_rss_bytes"]) for x in s], 0),
                ]
            )
            paired = self._paired("fedit", method)
            hits = [h for b, m in paired if (h := time_to_target(m.rows, b.summary["final_eval_loss"])) is not None]
            cells = [_stat([getattr(h, f) for h in hits], 1) for f in ("wall_seconds", "parallel_seconds")]
            cells += [
                _stat([_mb(getattr(h, f)) for h in hits], 1)
                for f in ("bytes_up", "bytes_down", "bytes_total", "bytes_lora")
            ]
            if paired and not hits:
                cells = ["not reached"] * len(cells)
            reach.append([method, f"{len(hits)}/{len(paired)}", *cells])
        return [
            "## Main comparison",
            "",
            "Mean ± sample std over seeds. Wall s: measured process time, clients one after another, evaluation "
            "excluded; parallel s: slowest client + server per round. MB = 10^6 bytes sent.",
            "",
            *_table(
                "method | runs | final eval loss | exact match % | wall s | parallel s | MB up | MB down | MB total"
                " | MB LoRA only | peak RSS MB",
                end,
            ),
            "",
            "### Cost to reach FedIT's final eval loss (same seed)",
            "",
            "First evaluated round whose eval loss <= the FedIT run's final eval loss; `reached` counts seeds "
            "(of those where both runs exist); the costs average the seeds that reached it.",
            "",
            *_table("method | reached | wall s | parallel s | MB up | MB down | MB total | MB LoRA only", reach),
        ]

    def ratio_table(self) -> list[str]:
        """DevFT on top of each baseline: speed-up and saving to the baseline's own final loss, quality deltas."""
        rows = []
        for baseline, method in PAIRS:
            paired = self._paired(baseline, method)
            ratios: dict[str, list[float]] = {
                "wall_seconds": [],
                "parallel_seconds": [],
                "bytes_total": [],
                "bytes_lora": [],
            }
            for b, m in paired:
                target = b.summary["final_eval_loss"]
                base_hit, dev_hit = time_to_target(b.rows, target), time_to_target(m.rows, target)
                if base_hit is None or dev_hit is None:
                    continue
                for field, values in ratios.items():
                    if getattr(dev_hit, field) > 0:
                        values.append(getattr(base_hit, field) / getattr(dev_hit, field))
            reached = len(ratios["bytes_total"])
            cells = [_stat(v, 2) if v else ("not reached" if paired else "missing") for v in ratios.values()]
            rows.append(
                [
                    f"{baseline} vs {method}",
                    f"{reached}/{len(paired)}",
                    *cells,
                    _stat([_gap(b, m, "final_eval_loss") for b, m in paired], 4),
                    _stat([100 * _gap(b, m, "final_eval_accuracy") for b, m in paired], 1),
                ]
            )
        return [
            "### DevFT against its baseline",
            "",
            "Ratios are baseline / DevFT (> 1: DevFT is faster or sends less) to reach the baseline's own final "
            "eval loss (bytes: everything sent, packs included; LoRA bytes: packs excluded), per seed, over the "
            "seeds where DevFT reached it (`reached`). Differences are DevFT - "
            "baseline (loss < 0 and points > 0: DevFT is better).",
            "",
            *_table(
                "pair | reached | wall-time ratio | parallel-time ratio | bytes ratio | LoRA-bytes ratio"
                " | final loss diff | exact match diff (points)",
                rows,
            ),
        ]

    def equal_cost_table(self) -> list[str]:
        """The other framing: the baseline at DevFT's total cost, and the baseline's cost to DevFT's final loss."""
        rows = []
        for baseline, method in PAIRS:
            paired = self._paired(baseline, method)
            at_wall, at_bytes, time_ratio, bytes_ratio, dev_loss = [], [], [], [], []
            for b, m in paired:
                end = m.rows[-1]
                dev_loss.append(m.summary["final_eval_loss"])
                lora_bytes = end["bytes_up"] + end["bytes_down"] - end.get("bytes_down_pack", 0)
                if (loss := _loss_at(b.rows, "wall_seconds", end["wall_seconds"])) is not None:
                    at_wall.append(loss)
                if (loss := _loss_at(b.rows, "bytes_lora", lora_bytes)) is not None:
                    at_bytes.append(loss)
                hit = time_to_target(b.rows, m.summary["final_eval_loss"])
                if hit is not None:
                    time_ratio.append(hit.wall_seconds / end["wall_seconds"])
                    bytes_ratio.append(hit.bytes_lora / lora_bytes)
            rows.append(
                [
                    f"{baseline} vs {method}",
                    str(len(paired)),
                    _stat(dev_loss, 4),
                    _stat(at_wall, 4) if at_wall else "-",
                    _stat(at_bytes, 4) if at_bytes else "-",
                    _stat(time_ratio, 2) if time_ratio else "-",
                    _stat(bytes_ratio, 2) if bytes_ratio else "-",
                ]
            )
        return [
            "### Equal cost",
            "",
            "Where the baseline was when it had spent what DevFT spent in total (its eval loss at the last "
            "evaluated round within DevFT's wall time / LoRA bytes), and the baseline's cost to reach DevFT's final "
            "eval loss relative to DevFT's total (< 1: the baseline got there cheaper).",
            "",
            *_table(
                "pair | seeds | DevFT final loss | baseline loss at DevFT's wall time | baseline loss at DevFT's "
                "LoRA bytes | baseline/DevFT wall time to DevFT's loss | baseline/DevFT LoRA bytes to DevFT's loss",
                rows,
            ),
        ]

    def ablation_table(self) -> list[str]:
        """One row per DevFT+FedIT variant, with the loss difference to the baseline of the same seed."""
        if not any(s.suite == "ablations" for s in self.specs):
            return ["## Ablations", "", "No ablation runs planned."]
        variants = [s for s in self.specs if in_suite(s, "ablations")]
        rows = []
        for variant in dict.fromkeys(s.variant for s in sorted(variants, key=lambda s: bool(s.overrides))):
            specs = [s for s in variants if s.variant == variant]
            done = [self.runs[s.name] for s in specs if s.name in self.runs]
            deltas = [
                _gap(base, r, "final_eval_loss")
                for r in done
                if (base := self.run_for(BASELINE, r.spec.seed)) is not None
            ]
            s = [r.summary for r in done]
            label = ", ".join(f"{k}={v}" for k, v in specs[0].overrides.items()) or "baseline (defaults)"
            rows.append(
                [
                    label,
                    f"{len(done)}/{len(specs)}",
                    _stat([x["final_eval_loss"] for x in s], 4),
                    _stat(deltas, 4),
                    _stat([100 * x["final_eval_accuracy"] for x in s], 1),
                    _stat([x["wall_seconds"] for x in s], 1),
                    _stat([_mb(x["bytes_up"] + x["bytes_down"]) for x in s], 1),
                ]
            )
        return [
            "## Ablations (DevFT + FedIT, one setting changed)",
            "",
            *_table(
                "variant | runs | final eval loss | loss diff vs baseline | exact match % | wall s | MB total", rows
            ),
        ]

    def run_table(self) -> list[str]:
        """Every planned run, so missing and odd runs (e.g. the adaptive schedule's stage lengths) are visible."""
        rows = []
        for spec in self.specs:
            result = self.runs.get(spec.name)
            if result is None:
                rows.append([spec.name, "missing", "", "", "", "", ""])
                continue
            s = result.summary
            stages = " / ".join(f"{st['layers']}L×{st['rounds']}" for st in s["stages"])
            rows.append(
                [
                    spec.name,
                    stages,
                    f"{s['initial_eval_loss']:.4f} → {s['final_eval_loss']:.4f}",
                    f"{100 * s['final_eval_accuracy']:.1f}",
                    f"{s['wall_seconds']:.1f}",
                    f"{_mb(s['bytes_up'] + s['bytes_down']):.1f}",
                    f"{_mb(s['peak_rss_bytes']):.0f}",
                ]
            )
        header = "run | stages (layers × rounds) | eval loss | exact match % | wall s | MB total | peak RSS MB"
        return ["## Runs", "", *_table(header, rows)]


def plot_main(runs: Mapping[str, RunResult], report: Report, path: Path) -> Path | None:
    """Eval loss vs wall seconds and vs MB for the main methods (lowest seed each); None if nothing ran.

    Each baseline and its DevFT variant share a colour (baseline dashed), and every curve starts at the
    untuned model's loss at zero cost, so the panels show where each method gets ahead.
    """
    firsts = ((m, next((r for seed in report.seeds if (r := report.run_for(m, seed))), None)) for m in METHODS)
    curves = {method: result for method, result in firsts if result is not None}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {m: f"C{i}" for i, pair in enumerate(PAIRS) for m in pair}
    for method, result in curves.items():
        points = [r for r in result.rows if r.get("eval_loss") is not None]
        loss = [result.summary["initial_eval_loss"], *(r["eval_loss"] for r in points)]
        style = {"color": colours[method], "linestyle": "-" if method.startswith("devft") else "--", "marker": "o"}
        label = f"{method} (seed {result.spec.seed})"
        ax_time.plot([0.0, *(r["wall_seconds"] for r in points)], loss, ms=3, label=label, **style)
        ax_bytes.plot([0.0, *(_mb(r["bytes_up"] + r["bytes_down"]) for r in points)], loss, ms=3, label=label, **style)
    ax_time.set(xlabel="wall time (s)", ylabel="eval loss", title="eval loss vs wall time")
    ax_bytes.set(xlabel="bytes up + down (MB)", ylabel="eval loss", title="eval loss vs communication")
    for ax in (ax_time, ax_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _header(plan: Mapping[str, Any]) -> list[str]:
    """Where and how the runs were made: machine, torch, date and the exact command lines."""
    rows = [
        [
            inv["date"],
            inv["cpu"],
            str(inv["cores"]),
            str(inv["threads"] or "default"),
            inv["torch"],
            f"`{inv['command']}`",
        ]
        for inv in plan["invocations"]
    ]
    return [
        "# Convergence benchmark",
        "",
        f"Report made {datetime.now(timezone.utc).isoformat(timespec='seconds')} by "
        f"`{shlex.join([sys.executable, *sys.argv])}`.",
        "",
        "Runs made by:",
        "",
        *_table("date (UTC) | CPU | cores | torch threads | torch | command", rows),
    ]


def _cmd_report(args: argparse.Namespace) -> int:
    results: Path = args.results
    plan_path = results / "plan.json"
    if not plan_path.exists():
        print(f"no {plan_path}: run `convergence.py run --results {results}` first", file=sys.stderr)
        return 2
    plan = json.loads(plan_path.read_text())
    specs = [
        RunSpec(**{k: entry[k] for k in ("name", "suite", "method", "seed", "overrides")}) for entry in plan["specs"]
    ]
    runs = load_results(results, specs)
    report = Report(specs, runs)
    figure = plot_main(runs, report, args.figure or results / "convergence.png")
    sections: list[list[str]] = [_header(plan), report.main_tables(), report.ratio_table()]
    if figure is not None:
        base = args.markdown.parent if args.markdown else Path.cwd()
        sections.append([f"![eval loss vs wall time and bytes]({os.path.relpath(figure.resolve(), base.resolve())})"])
    sections += [report.equal_cost_table(), report.ablation_table(), report.run_table()]
    sections.append(["## Simulator command lines", "", "```sh", *(e["command"] for e in plan["specs"]), "```"])
    markdown = "\n\n".join("\n".join(section) for section in sections) + "\n"
    print(markdown)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``run`` and ``report`` sub-commands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the planned simulations that have no summary.json yet")
    run.add_argument("--suite", choices=[*SUITES, "all"], default="main", help="which runs (default: main)")
    run.add_argument("--quick", action="store_true", help="tiny model, seconds per run: a pipeline check")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    run.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME_GLOB",
        help="run only specs whose name matches one of these globs, e.g. 'fedit-s*' 'devft-s*' (default: all)",
    )
    run.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results directory (default: benchmarks/results, with --quick benchmarks/results-quick)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (sets OMP_NUM_THREADS; default: inherit the environment)",
    )
    run.set_defaults(func=_cmd_run)
    report = sub.add_parser("report", help="tables and figure from a results directory (partial results fine)")
    report.add_argument("--results", type=Path, default=HERE / "results", help="results directory")
    report.add_argument("--markdown", type=Path, default=None, help="also write the markdown here")
    report.add_argument("--figure", type=Path, default=None, help="PNG path (default: RESULTS/convergence.png)")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python benchmarks/convergence.py run|report ...``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
