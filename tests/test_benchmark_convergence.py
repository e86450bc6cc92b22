"""The convergence benchmark: spec list, time-to-target, and a quick run + report end to end (CI smoke test)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"


def _load_benchmark():
    """Import the script as a module (``benchmarks`` is not an installed package)."""
    spec = importlib.util.spec_from_file_location("convergence_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _row(number: int, eval_loss: float | None) -> dict[str, object]:
    """A metrics.jsonl line whose cumulative costs are easy to check: round n costs n s, 10n B up, 100n B down."""
    return {
        "round": number,
        "eval_loss": eval_loss,
        "wall_seconds": float(number),
        "parallel_seconds": number / 2,
        "bytes_up": 10 * number,
        "bytes_down": 100 * number,
        "bytes_down_pack": 90 * number,
    }


def test_time_to_target_first_evaluated_round_at_or_below_target():
    rows = [_row(1, 3.0), _row(2, None), _row(3, 2.0), _row(4, 1.0)]
    hit = bench.time_to_target(rows, 2.0)  # round 3 equals the target: reached (<=)
    assert hit == bench.Reach(
        round=3, wall_seconds=3.0, parallel_seconds=1.5, bytes_up=30, bytes_down=300, bytes_down_pack=270
    )
    assert hit.bytes_total == 330 and hit.bytes_lora == 60
    assert bench.time_to_target(rows, 0.5) is None  # never reached
    # round 2 has no eval: it is skipped, even though round 3 would otherwise be preceded by it
    assert bench.time_to_target([_row(1, 5.0), _row(2, None), _row(3, 2.5)], 2.6).round == 3
    assert bench.time_to_target([_row(1, None), _row(2, None)], 100.0) is None


@pytest.mark.parametrize("quick", [False, True])
def test_build_specs_unique_names_and_ablation_overrides(quick):
    specs = bench.build_specs(quick, [0, 1])
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    by_name = {s.name: s for s in specs}
    for seed in (0, 1):
        for method in bench.METHODS:
            assert by_name[f"{method}-s{seed}"].suite == "main"
            assert by_name[f"{method}-s{seed}"].overrides == {}
    assert by_name["devft-grouping-random-s0"].overrides == {"grouping": "random"}
    assert by_name["devft-similarity-weights-s1"].overrides == {"similarity": "weights"}
    assert by_name["devft-fusion-one-s0"].overrides == {"fusion": "one"}
    assert by_name["devft-beta-auto-s0"].overrides == {"beta": "auto"}
    assert by_name["devft-adaptive-patience-1-s0"].overrides == {"adaptive_patience": "1"}
    assert by_name["devft-adaptive-patience-1-s0"].suite == "ablations"
    # settings equal to the baseline's (contiguous, cka, dblf with beta 0.1, default stages, fixed) share its run
    ablations = [s for s in specs if s.suite == "ablations"]
    assert all(s.method == "devft" and s.overrides for s in ablations)
    assert not any(
        s.overrides.get(k) == v
        for s in ablations
        for k, v in {"grouping": "contiguous", "similarity": "cka", "beta": "0.1", "adaptive_patience": "0"}.items()
    )
    stages = sorted(s.overrides["stages"] for s in ablations if "stages" in s.overrides and s.seed == 0)
    assert stages == (["1"] if quick else ["2", "3"])
    # the ablation suite includes its baseline run, which belongs to the main suite
    chosen = {s.name for s in specs if bench.in_suite(s, "ablations")}
    assert "devft-s0" in chosen and "fedit-s0" not in chosen
    command = bench.simulate_command(by_name["devft-grouping-random-s0"], quick, Path("out"))
    assert command[command.index("--grouping") + 1] == "random"
    assert "--adaptive-patience" not in command  # optional settings are passed only when set


def _table_row(markdown: str, first_cell: str) -> list[str]:
    """The cells of the first markdown table row whose first cell is ``first_cell``."""
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.long  # a benchmark's quick run: `make test-long`
def test_quick_run_then_report(tmp_path):
    results = tmp_path / "results"
    run = [sys.executable, str(SCRIPT), "run", "--quick", "--suite", "main", "--seeds", "0", "--threads", "1"]
    run += ["--only", "fedit-s*", "devft-s*", "--results", str(results)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2/2 runs done" in first.stdout
    assert {p.name for p in results.iterdir() if (p / "summary.json").exists()} == {"fedit-s0", "devft-s0"}
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)  # resumable: nothing left to run
    assert again.returncode == 0 and again.stdout.count("skipped") == 2, again.stdout + again.stderr

    markdown_path, figure = tmp_path / "report.md", tmp_path / "curves.png"
    report = [sys.executable, str(SCRIPT), "report", "--results", str(results)]
    report += ["--markdown", str(markdown_path), "--figure", str(figure)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    markdown = markdown_path.read_text()
    assert markdown == done.stdout.rstrip("\n") + "\n"
    assert "## Main comparison" in markdown and "torch" in markdown and "convergence.py run --quick" in markdown
    for method in ("fedit", "devft"):
        cells = _table_row(markdown, method)
        assert cells[1] == "1/1"
        assert all(float(cell) >= 0 for cell in cells[2:])  # loss, accuracy, seconds, MB, RSS: all numbers
    assert _table_row(markdown, "flora")[2] == "missing"  # planned but not run: shown, not a crash
    ratio = _table_row(markdown, "fedit vs devft")
    assert ratio[1] in {"0/1", "1/1"}
    float(ratio[6])  # final loss difference is a number whether or not DevFT reached FedIT's loss
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({figure.name})" in markdown
