"""The system benchmarks (transport, aggregation, agent) in quick mode: each runs end to end as a
script and writes a results JSON with every figure present and sane; the numbers themselves are
measured by the full runs (docs/system_benchmarks.md)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from system_harness import needs_mosquitto

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, tmp_path: Path, *args: str, timeout: float = 240) -> dict[str, Any]:
    """Run ``benchmarks/<script>.py ARGS --out ...``; its results JSON."""
    out = tmp_path / f"{script}.json"
    command = [sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "load average before" in done.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == script
    assert len(report["load_before"]) == 3 and len(report["load_after"]) == 3
    assert f"{script}.py" in report["command"]
    return report


def _positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for v in values)


@needs_mosquitto
@pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
    reason="mosquitto-clients not installed",
)
def test_transport_quick(tmp_path):
    report = _run("transport", tmp_path, "--megabytes", "2", "--repeats", "1", "--chunk-kib", "96", "1024", "--profile")
    assert report["size_bytes"] == 2_000_000 and report["repeats"] == 1 and report["window_chunks"] == 64
    by_chunk = {r["chunk_bytes"]: r for r in report["results"]}
    assert set(by_chunk) == {96 * 1024, 1024 * 1024}
    assert by_chunk[96 * 1024]["chunks"] == 21 and by_chunk[1024 * 1024]["chunks"] == 2
    for r in by_chunk.values():
        for key in ("ours_mb_s", "c_clients_mb_s", "tcp_mb_s", "ratio_vs_c_clients", "ratio_vs_tcp", "verify_seconds"):
            assert len(r[key]) == 1 and _positive(*r[key]), (key, r[key])
        assert _positive(r["median_ours_mb_s"], r["median_ratio_vs_c_clients"], r["median_ratio_vs_tcp"])
        assert r["requests"] >= 1 and isinstance(r["meets_goal"], bool)
    for profile in report["profile"].values():  # one profiled transfer per chunk size, all four threads
        assert _positive(profile["mb_s_profiled"])
        for thread in ("receiver_worker", "receiver_network", "sender_worker", "sender_network"):
            assert profile[thread]["top"] and profile[thread]["total_seconds"] >= 0


@pytest.mark.long  # a benchmark's quick run: `make test-long`
def test_aggregation_quick(tmp_path):
    report = _run("aggregation", tmp_path, *"--model tiny --clients 5 --repeats 1 --scaling 2 6 --variants".split())
    # tiny Llama, rank 8: 8 blocks x 7 projections x (A, B); r * (in + out) per projection with hidden 64,
    # k/v 32 (2 of 4 heads), intermediate 128: q, o 128; k, v 96; gate, up, down 192
    assert report["tensors"] == 8 * 7 * 2
    assert report["elements"] == 8 * 8 * (2 * 128 + 2 * 96 + 3 * 192)
    assert report["state_bytes"] == 4 * report["elements"]
    t = report["throughput"]
    assert t["clients"] == 5
    for key in ("memory_seconds", "disk_seconds", "axpy_seconds", "ratio_memory_vs_axpy", "ratio_disk_vs_axpy"):
        assert len(t[key]) == 1 and _positive(*t[key]), (key, t[key])
    assert _positive(t["median_updates_per_s_memory"], t["median_mb_per_s_disk"], t["median_ratio_memory_vs_axpy"])
    assert set(report["variants"]) == {"fp64_per_tensor_no_copy", "fp32_per_tensor", "fp64_flat", "fp32_flat"}
    assert all(_positive(*v.values()) for v in report["variants"].values())
    assert [row["clients"] for row in report["scaling"]] == [2, 6]
    for row in report["scaling"]:
        assert _positive(row["seconds"], row["peak_bytes"], row["rss_before_bytes"], row["ru_maxrss_bytes"])
        assert row["peak_growth_bytes"] >= 0


@pytest.mark.long  # a benchmark's quick run: `make test-long`
@pytest.mark.slow
def test_agent_quick(tmp_path):
    report = _run("agent", tmp_path, "--model", "tiny", "--steps", "2", "--repeats", "1", timeout=400)
    assert report["model"] == "tiny" and report["layers"] == 8 and report["steps"] == 2
    assert set(report["median_steps_per_s"]) == {"agent/bounded", "bare/bounded", "agent/default", "bare/default"}
    assert _positive(*report["median_steps_per_s"].values(), *report["ratios"].values())
    runs = report["runs"]
    assert runs["agent/bounded"][0]["heap_bounded"] is True and runs["bare/bounded"][0]["heap_bounded"] is True
    assert runs["agent/default"][0]["heap_bounded"] is False and runs["bare/default"][0]["heap_bounded"] is False
    assert all(len(rows[0]["step_seconds"]) == 1 for rows in runs.values())  # 2 steps: one measured interval
    memory = report["memory"]
    assert _positive(memory["predicted_peak_bytes"], memory["agent_train_peak_bytes"], memory["probe_train_peak_bytes"])
    assert memory["agent_process_peak_bytes"] >= memory["agent_train_peak_bytes"]
    assert isinstance(report["meets_goal"], bool)


@pytest.mark.long  # a benchmark's quick run: `make test-long`
@pytest.mark.slow
def test_agent_memory_quick(tmp_path):
    report = _run("agent_memory", tmp_path, "--model", "tiny", "--layers", "2", "--quant", "int4", "--steps", "2")
    (row,) = report["rows"]
    assert (row["layers"], row["quant"]) == (2, "int4")
    agent = row["agent"]
    assert agent["task_mark_reset"] is True and agent["train_mark_reset"] is True
    assert _positive(row["predicted_peak_bytes"], row["probe_train_peak_bytes"], agent["load_peak"])
    assert agent["train_peak"] > agent["loaded_rss"] > 0  # training allocates on top of the loaded pack
    assert row["agent_task_peak_bytes"] == max(agent["load_peak"], agent["train_peak"])
    assert report["max_abs_error_vs_agent_task"] == abs(row["error_vs_agent_task"])
