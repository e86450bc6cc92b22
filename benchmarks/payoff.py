"""Does DevFT pay off? DevFT configurations against FedIT, costed in device compute and bytes.

The question of issue 13: is there a DevFT configuration that reaches FedIT's final eval loss with
at most 0.6x FedIT's device compute and 0.6x its bytes (packs included) on every seed, and is at
or below FedIT at equal compute? Every run is ``devft-edge simulate`` on SmolLM2 with the demo's
federation (10 non-IID clients, 2 per round, 8 local steps of 4 x 64 tokens, lr 3e-4, LoRA r = 8)
and the real system's int4 packs: the bytes are the packs and LoRA states the devices would
download and upload, the compute is local steps weighted by their submodel's measured step cost
(:mod:`devft_edge.step_cost`, full-model-step equivalents), both exact whatever else the machine
was doing; wall seconds stay beside them but are only comparable inside one invocation.

Suites (each variant x seed is one process; finished runs are skipped, so suites run in parts):

- ``main``: FedIT, the paper's literal DevFT and the project's candidates at 12 rounds;
- ``long``: FedIT, the paper and the best candidate at 36 rounds;
- ``fleet``: DevFT's edge case: 5 clients are Raspberry Pi 4 2 GB boards the planner excludes
  from the full-depth stage and hold task families the 5 others lack (per-family exact match).

    python benchmarks/payoff.py run --suite main --seeds 0 1 2 [--jobs 2 --threads 1]
    python benchmarks/payoff.py report --markdown docs/payoff.md --figure docs/payoff.png
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convergence import _cpu_model, _stat, _table, _torch_version

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results-payoff"
GOAL = 0.6
"""Largest compute and bytes ratio (DevFT / FedIT, to FedIT's final loss) that counts as paying off."""

FEDERATION = (
    "--model smollm2 --clients 10 --per-round 2 --local-steps 8 --batch 4 --seq 64 --lr 3e-4 --eval-examples 48 "
    "--eval-every 1 --examples-per-client 48 --data-alpha 0.5 --quant int4 --exact-match stage_end"
).split()
QUICK = (
    "--model tiny --clients 4 --per-round 2 --local-steps 2 --batch 2 --seq 48 --lr 1e-2 --eval-examples 8 "
    "--eval-every 1 --examples-per-client 8 --data-alpha 0.5 --quant int4 --exact-match stage_end"
).split()
FLEET = "--client-profiles rpi4-2gb,rpi5-8gb --data-split by_profile".split()
"""Clients alternate between a Pi 4 2 GB (fits the 4-, 8- and 15-layer int4 stages, not 30) and a
Pi 5 8 GB; each kind holds three of the six task families."""

VARIANTS: dict[str, list[str]] = {
    "fedit": ["--method", "fedit"],
    "paper": ["--preset", "paper"],
    "two-stage": ["--capacities", "15,30"],
    "best": ["--heal", "bake", "--capacities", "15,30", "--delivery", "full_pack"],
}
"""Method flags on top of the federation. ``paper`` is the paper's literal DevFT (4 doubling stages,
equal rounds, copy transfer, stage packs); ``two-stage`` starts at 15 layers (the ablation that helped most in issue 3);
``best`` adds to it what the hand-over screening favoured (healing; copy transfer) and the full-pack
delivery (docs/results.md)."""
SUITES: dict[str, tuple[tuple[str, ...], int, list[str]]] = {
    "main": (("fedit", "paper", "two-stage", "best"), 12, []),
    "long": (("fedit", "paper", "best"), 36, []),
    "fleet": (("fedit", "paper", "best"), 12, FLEET),
}
"""suite -> (variants, rounds, extra flags)."""


@dataclass(frozen=True)
class Spec:
    """One run: a variant of a suite with one seed."""

    suite: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        """Directory name of the run."""
        return f"{self.suite}-{self.variant}-s{self.seed}"

    def command(self, quick: bool, out: Path) -> list[str]:
        """The exact simulate process this run is."""
        variants, rounds, extra = SUITES[self.suite]
        flags = [*(QUICK if quick else FEDERATION), *extra, *VARIANTS[self.variant]]
        rounds = 4 if quick else rounds
        if quick and "--capacities" in flags:  # the tiny model has 8 layers
            flags[flags.index("--capacities") + 1] = "4,8"
        if quick and self.variant == "paper":
            flags += ["--stages", "2"]
        head = [sys.executable, "-m", "devft_edge", "simulate", "--seed", str(self.seed), "--rounds", str(rounds)]
        return [*head, *flags, "--out", str(out), "--json"]


def build_specs(suites: Sequence[str], seeds: Sequence[int]) -> list[Spec]:
    """Every run of ``suites`` for ``seeds``."""
    return [Spec(suite, variant, seed) for suite in suites for seed in seeds for variant in SUITES[suite][0]]


# ---------------------------------------------------------------- run


def _run_one(spec: Spec, results: Path, quick: bool, threads: int | None) -> str | None:
    out = results / spec.name
    if (out / "summary.json").exists():
        return None
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:  # oversubscribed OpenMP threads make CPU runs 10-100x slower
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    with (out / "run.log").open("w") as log:
        done = subprocess.run(spec.command(quick, out), stdout=log, stderr=subprocess.STDOUT, env=env)
    took = time.perf_counter() - started
    if done.returncode != 0 or not (out / "summary.json").exists():
        return f"{spec.name}: exit code {done.returncode} after {took:.0f} s (log {out / 'run.log'})"
    loss = json.loads((out / "summary.json").read_text())["final_eval_loss"]
    print(f"{spec.name}: ok in {took:.0f} s, final eval loss {loss:.4f}", flush=True)
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    results: Path = args.results or (HERE / "results-payoff-quick" if args.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    specs = [
        s
        for s in build_specs([args.suite] if args.suite != "all" else list(SUITES), args.seeds)
        if any(fnmatch.fnmatchcase(s.name, p) for p in args.only or ["*"])
    ]
    log = results / "invocations.jsonl"
    entry = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "jobs": args.jobs,
        "threads": args.threads,
        "torch": _torch_version(),
        "runs": [s.name for s in specs],
    }
    with log.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        failures = [f for f in pool.map(lambda s: _run_one(s, results, args.quick, args.threads), specs) if f]
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


# ---------------------------------------------------------------- report


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load(results: Path, specs: Sequence[Spec]) -> dict[Spec, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The finished runs among ``specs``: (summary, metrics rows)."""
    found = {}
    for spec in specs:
        out = results / spec.name
        if (out / "summary.json").exists():
            found[spec] = (json.loads((out / "summary.json").read_text()), _rows(out / "metrics.jsonl"))
    return found


def _bytes(row: Mapping[str, Any]) -> int:
    return int(row["bytes_up"]) + int(row["bytes_down"])


def cost_to(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, float] | None:
    """Compute, bytes and wall seconds at the first evaluated round with eval loss <= ``target``."""
    for row in rows:
        if row.get("eval_loss") is not None and row["eval_loss"] <= target:
            return {"compute": row["compute"], "bytes": _bytes(row), "wall": row["wall_seconds"]}
    return None


def compute_to(rows: Sequence[Mapping[str, Any]], target: float, start: float) -> float | None:
    """Device compute at which the eval loss first reaches ``target``, linear between evaluated rounds
    from ``start`` (the untuned loss) at compute 0; None if it never does."""
    points = [(0.0, start)] + [(float(r["compute"]), r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if start <= target:
        return 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def loss_at(rows: Sequence[Mapping[str, Any]], key: str, budget: float) -> float | None:
    """Eval loss at cost ``budget`` of ``key`` (``compute`` or ``bytes``), linear between evaluated rounds."""
    points = [(0.0, None)] + [
        (float(_bytes(r) if key == "bytes" else r[key]), r["eval_loss"]) for r in rows if r.get("eval_loss") is not None
    ]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= budget <= x1:
            return y1 if y0 is None or x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
    return points[-1][1] if budget > points[-1][0] else None


class Report:
    """Tables over one suite's finished runs, paired with FedIT by seed."""

    def __init__(self, suite: str, runs: Mapping[Spec, tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
        self.suite = suite
        self.variants = SUITES[suite][0]
        self.runs = {(s.variant, s.seed): r for s, r in runs.items() if s.suite == suite}
        self.seeds = sorted({s for _, s in self.runs})

    def done(self, variant: str) -> list[tuple[int, dict[str, Any], list[dict[str, Any]]]]:
        """(seed, summary, rows) of the finished runs of ``variant``."""
        return [(seed, *self.runs[(variant, seed)]) for seed in self.seeds if (variant, seed) in self.runs]

    def outcome(self) -> list[str]:
        """Final quality and total cost per variant."""
        rows = []
        for v in self.variants:
            runs = [s for _, s, _ in self.done(v)]
            if not runs:
                rows.append([v, "0", *["missing"] * 8])
                continue
            rows.append(
                [
                    v,
                    str(len(runs)),
                    _stat([s["final_eval_loss"] for s in runs], 4),
                    _stat([100 * s["final_eval_accuracy"] for s in runs], 1),
                    _stat([s["compute"] for s in runs], 1),
                    _stat([(s["bytes_up"] + s["bytes_down"]) / 1e6 for s in runs], 1),
                    _stat([s["bytes_down_pack"] / 1e6 for s in runs], 1),
                    _stat([s["wall_seconds"] for s in runs], 0),
                    _stat([s["server_seconds"] for s in runs], 0),
                    " / ".join(f"{st['layers']}x{st['rounds']}" for st in runs[0]["stages"]),
                ]
            )
        header = (
            "variant | seeds | final eval loss | exact match % | device compute (full steps) | MB total | MB packs "
            "| wall s | server s (healing) | stages (layers x rounds)"
        )
        return _table(header, rows)

    def handover(self) -> list[str]:
        """The full model with each stage's transferred LoRA: what every stage hands over."""
        rows = []
        for v in self.variants:
            runs = self.done(v)
            if not runs or len(runs[0][1]["stages"]) < 2:
                continue
            n = len(runs[0][1]["stages"])
            cells = [
                _stat([s["stages"][k]["full_eval_loss"] for _, s, _ in runs if len(s["stages"]) == n], 3)
                + f" @ {_stat([self._compute_at_stage(r, k + 1) for _, _, r in runs], 1)}"
                for k in range(n)
            ]
            rows.append([v, *cells, *[""] * (4 - n), self._efficiency(runs)])
        start = _stat([s["initial_eval_loss"] for _, s, _ in self.done("fedit")], 3)
        return [
            f"Untuned model: {start}. Cells: full-model eval loss after the stage's transfer @ device compute spent. "
            "Hand-over efficiency: the device compute FedIT (same seed) needs to reach the loss handed over by the "
            "last stage below full depth, over the compute DevFT spent to get there (linear between FedIT's "
            "rounds; above 1 the early stages are cheaper than FedIT's own first rounds).",
            "",
            *_table(
                "variant | after stage 1 | after stage 2 | after stage 3 | after stage 4 | hand-over efficiency", rows
            ),
        ]

    def _efficiency(self, runs: Sequence[tuple[int, dict[str, Any], list[dict[str, Any]]]]) -> str:
        fedit = {seed: (s, rows) for seed, s, rows in self.done("fedit")}
        found = []
        for seed, s, rows in runs:
            if seed not in fedit:
                continue
            last = len(s["stages"]) - 1  # the stage before full depth
            spent = self._compute_at_stage(rows, last)
            needed = compute_to(fedit[seed][1], s["stages"][last - 1]["full_eval_loss"], s["initial_eval_loss"])
            if needed is not None and spent > 0:
                found.append(needed / spent)
        return _stat(found, 2) if found else "missing"

    @staticmethod
    def _compute_at_stage(rows: Sequence[Mapping[str, Any]], stage: int) -> float:
        return max(r["compute"] for r in rows if r["stage"] == stage)

    def goal(self) -> list[str]:
        """Per DevFT variant: cost to FedIT's final loss relative to FedIT, and loss at FedIT-equal compute."""
        fedit = {seed: (s, rows) for seed, s, rows in self.done("fedit")}
        out = []
        for v in self.variants:
            if v == "fedit":
                continue
            compute, nbytes, wall, at_compute, reached, met = [], [], [], [], 0, 0
            runs = [(seed, s, rows) for seed, s, rows in self.done(v) if seed in fedit]
            for seed, s, rows in runs:
                base_summary, base_rows = fedit[seed]
                target = base_summary["final_eval_loss"]
                base, mine = cost_to(base_rows, target), cost_to(rows, target)
                fedit_there = loss_at(base_rows, "compute", s["compute"])
                at_compute.append(s["final_eval_loss"] - fedit_there if fedit_there is not None else float("nan"))
                if base is None or mine is None:
                    continue
                reached += 1
                compute.append(mine["compute"] / base["compute"])
                nbytes.append(mine["bytes"] / base["bytes"])
                wall.append(mine["wall"] / base["wall"])
                met += compute[-1] <= GOAL and nbytes[-1] <= GOAL and at_compute[-1] <= 0
            never = "not reached" if runs else "missing"
            out.append(
                [
                    v,
                    f"{reached}/{len(runs)}",
                    _stat(compute, 2) if compute else never,
                    _stat(nbytes, 2) if nbytes else never,
                    _stat(wall, 2) if wall else never,
                    _stat(at_compute, 4) if at_compute else "missing",
                    f"{met}/{len(runs)}" if runs else "missing",
                ]
            )
        return [
            f"Ratios DevFT / FedIT of the cost to reach the same seed's FedIT final eval loss (goal: <= {GOAL} on "
            "compute and bytes); loss gap at equal compute: DevFT's final eval loss minus FedIT's eval loss "
            "at DevFT's total compute (linear between FedIT's rounds; <= 0: DevFT at or below FedIT).",
            "",
            *_table(
                "variant | reached | compute ratio | bytes ratio | wall ratio | loss gap at equal compute | goal met",
                out,
            ),
        ]

    def families(self) -> list[str]:
        """Final exact match per task family (the fleet suite)."""
        tasks = sorted({t for _, s, _ in self.done("fedit") for t in (s.get("final_eval_accuracy_by_task") or {})})
        rows = []
        for v in self.variants:
            runs = [s for _, s, _ in self.done(v)]
            if runs:
                rows.append(
                    [
                        v,
                        *(
                            _stat([100 * (s["final_eval_accuracy_by_task"] or {}).get(t, 0.0) for s in runs], 1)
                            for t in tasks
                        ),
                    ]
                )
        return _table("variant | " + " | ".join(tasks), rows) if tasks else ["No fleet runs."]


def plot(reports: Sequence[Report], path: Path) -> Path | None:
    """Eval loss against device compute and against MB, every run (one colour per variant); squares
    mark the full model after each stage's transfer (the hand-over). The loss axis stops a little
    above the untuned model: the fused submodels' first rounds (up to ~18) would hide the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [r for r in reports if r.runs]
    if not reports:
        return None
    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 3.8 * len(reports)), squeeze=False)
    for (ax_c, ax_b), report in zip(axes, reports, strict=True):
        top = 1.0
        for v in report.variants:
            colour = f"C{list(VARIANTS).index(v)}"
            for k, (_, s, rows) in enumerate(report.done(v)):
                top = max(top, s["initial_eval_loss"] + 1.0)
                points = [r for r in rows if r.get("eval_loss") is not None]
                loss = [s["initial_eval_loss"], *(r["eval_loss"] for r in points)]
                style = {"color": colour, "alpha": 0.8, "lw": 1.2, "label": v if k == 0 else None}
                ax_c.plot([0.0, *(r["compute"] for r in points)], loss, **style)
                ax_b.plot([0.0, *(_bytes(r) / 1e6 for r in points)], loss, **style)
                handed = [r for r in rows if r.get("full_eval_loss") is not None]
                mark = {"color": colour, "marker": "s", "ms": 4, "ls": "none"}
                ax_c.plot([r["compute"] for r in handed], [r["full_eval_loss"] for r in handed], **mark)
                ax_b.plot([_bytes(r) / 1e6 for r in handed], [r["full_eval_loss"] for r in handed], **mark)
        ax_c.set(
            xlabel="device compute (full-model steps)", ylabel="eval loss", title=f"{report.suite}: loss vs compute"
        )
        ax_b.set(
            xlabel="MB up + down (int4 packs included)", ylabel="eval loss", title=f"{report.suite}: loss vs bytes"
        )
        for ax in (ax_c, ax_b):
            ax.set_ylim(top=top)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cmd_report(args: argparse.Namespace) -> int:
    results: Path = args.results
    specs = build_specs(list(SUITES), list(range(10)))
    runs = load(results, specs)
    reports = [Report(suite, runs) for suite in SUITES]
    invocations = _rows(results / "invocations.jsonl") if (results / "invocations.jsonl").exists() else []
    lines = [
        "# Does DevFT pay off? (issue 13)",
        "",
        f"Report made {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `benchmarks/payoff.py report`.",
        "Runs made by (jobs = runs side by side, threads = torch threads per run):",
        "",
        *_table(
            "date (UTC) | CPU | cores | jobs | threads | command",
            [
                [i["date"], i["cpu"], str(i["cores"]), str(i["jobs"]), str(i["threads"]), f"`{i['command']}`"]
                for i in invocations
            ],
        ),
        "",
        "Mean ± sample std over seeds. Device compute: local steps x step cost of their depth (a full-model "
        "step = 1). MB: bytes up + down as the real system sends them (int4 packs, LoRA states). Wall s: "
        "process time of the federated work with the clients one after another, evaluation and healing excluded; "
        "comparable only between runs made side by side in the same invocation.",
    ]
    for report in reports:
        if not report.runs:
            continue
        rounds = SUITES[report.suite][1]
        lines += ["", f"## Suite `{report.suite}` ({rounds} rounds{', fleet' if SUITES[report.suite][2] else ''})"]
        lines += [
            "",
            "### Outcome",
            "",
            *report.outcome(),
            "",
            "### What each stage hands over",
            "",
            *report.handover(),
        ]
        lines += ["", "### Cost to FedIT's quality, and loss at equal compute", "", *report.goal()]
        if SUITES[report.suite][2]:
            lines += ["", "### Exact match per task family (%)", "", *report.families()]
    figure = plot(reports, args.figure or results / "payoff.png")
    if figure is not None:
        base = args.markdown.parent if args.markdown else Path.cwd()
        lines += ["", f"![eval loss vs compute and bytes]({os.path.relpath(figure.resolve(), base.resolve())})"]
    lines += ["", "## Variants", "", *(f"- `{v}`: `{' '.join(f) or '(defaults)'}`" for v, f in VARIANTS.items())]
    lines += [
        "",
        "Federation flags of every run: `" + " ".join(FEDERATION) + "`; fleet suite adds `" + " ".join(FLEET) + "`.",
    ]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.markdown:
        args.markdown.write_text(markdown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``run`` and ``report``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite's simulations that have no summary.json yet")
    run.add_argument("--suite", choices=[*SUITES, "all"], default="main")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--only", nargs="+", metavar="NAME_GLOB", help="only runs whose name matches, e.g. 'main-fedit-*'")
    run.add_argument("--jobs", type=int, default=1, help="runs side by side (use --threads 1 with 2 jobs on 2 cores)")
    run.add_argument("--threads", type=int, default=None, help="torch threads per run (OMP_NUM_THREADS)")
    run.add_argument("--quick", action="store_true", help="the tiny model, seconds per run: a pipeline check")
    run.add_argument("--results", type=Path, default=None)
    run.set_defaults(func=_cmd_run)
    report = sub.add_parser("report", help="tables and figure (partial results fine)")
    report.add_argument("--results", type=Path, default=RESULTS)
    report.add_argument("--markdown", type=Path, default=None)
    report.add_argument("--figure", type=Path, default=None)
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
