"""Aggregation benchmark: FedIT's streaming merge against memory bandwidth, and its memory as clients grow.

Closing a round merges every accepted update into the stage LoRA; with hundreds of devices per
round that merge must be bandwidth-bound and must not hold all updates at once. Two measurements
on LoRA states the size of SmolLM2-135M's full-model rank-8 LoRA (every projection of all 30
blocks: 420 tensors, 2.44 M float32 values, 9.8 MB; shapes from :func:`devft_edge.lora.lora_shapes`
on a meta-device skeleton of the model, values random):

- **throughput**: ``RULES.get("fedit").aggregate`` over ``--clients`` updates, (a) from memory (a
  generator cycling through a few distinct states) and (b) from safetensors files on disk, read
  one at a time with :func:`devft_edge.weights.read_safetensors` as the aggregator's
  ``_close_round`` does, against numpy's ``acc += w * x`` on one flat float32 array of the same
  number of elements (the memory-bandwidth floor of a weighted sum). The contenders run back to
  back in a rotating order, ``--repeats`` times; the median ratio is reported.
- **streaming**: peak resident memory of the disk-fed merge for 10, 100 and 1000 clients, each in
  a fresh process (nothing left from an earlier run): the kernel's high-water mark is reset after
  setup (``/proc/self/clear_refs``) and read after the merge, so the figure is what the merge
  itself added. It must not grow with the number of clients.

    python benchmarks/aggregation.py [--model smollm2] [--clients 50] [--repeats 5] [--scaling 10 100 1000] [--variants]

``--variants`` also times other ways to accumulate the same sum (no float64 copy, float32, one
flat vector per update) against the same axpy, to show where the merge's time goes.

About two minutes on 2 cores; results go to ``benchmarks/results/system/aggregation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from machine_load import load_average
from safetensors.torch import save_file

from devft_edge.aggregation import RULES, GlobalState
from devft_edge.lora import LoraSettings, LoraState, lora_shapes
from devft_edge.peak_memory import peak_bytes, reset_peak, status_bytes
from devft_edge.weights import read_safetensors

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "system" / "aggregation.json"
DISTINCT = 4
"""Distinct update states (and files) the clients cycle through: enough to defeat the CPU caches
(4 x 9.8 MB) without writing 1000 files."""
GOAL_VS_AXPY = 0.5


def lora_layout(model: str, rank: int) -> dict[str, tuple[int, int]]:
    """``layers.{i}.{module}`` -> (in, out) of every LoRA target of ``model``, counted on a skeleton."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from devft_edge.models import load_config

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(load_config(model), dtype=torch.float32)
    return lora_shapes(skeleton, LoraSettings(rank=rank))


def random_state(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> LoraState:
    """A trained-looking update: both factors random (a fresh LoRA's B would be all zeros)."""
    gen = torch.Generator().manual_seed(seed)
    state: LoraState = {}
    for key, (fan_in, fan_out) in shapes.items():
        state[f"{key}.lora_A"] = torch.randn(rank, fan_in, generator=gen) * 0.02
        state[f"{key}.lora_B"] = torch.randn(fan_out, rank, generator=gen) * 0.02
    return state


def from_memory(states: list[LoraState], clients: int) -> Iterator[tuple[LoraState, float]]:
    """``clients`` updates cycling through ``states``, weights 1..clients (sample counts differ)."""
    for k in range(clients):
        yield states[k % len(states)], float(1 + k % 7)


def from_disk(paths: list[Path], clients: int) -> Iterator[tuple[LoraState, float]]:
    """As the aggregator's ``_close_round``: one update read from its file at a time."""
    for k in range(clients):
        yield read_safetensors(paths[k % len(paths)]), float(1 + k % 7)


def merge(start: LoraState, updates: Iterator[tuple[LoraState, float]]) -> float:
    """Seconds for FedIT to aggregate ``updates`` onto ``start``."""
    began = time.perf_counter()
    RULES.get("fedit").aggregate(GlobalState(lora=start), updates, round_index=0, seed=0)
    return time.perf_counter() - began


def axpy(vectors: list[np.ndarray], clients: int) -> float:
    """Seconds for ``acc += w * x`` over ``clients`` flat float32 vectors (numpy, one thread)."""
    acc = np.zeros_like(vectors[0])
    began = time.perf_counter()
    for k in range(clients):
        acc += np.float32(1 + k % 7) * vectors[k % len(vectors)]
    return time.perf_counter() - began


@dataclass(frozen=True)
class Throughput:
    """Per repetition: seconds for ``clients`` updates; medians of rates and ratios."""

    clients: int
    memory_seconds: list[float]
    disk_seconds: list[float]
    axpy_seconds: list[float]
    ratio_memory_vs_axpy: list[float]
    ratio_disk_vs_axpy: list[float]
    median_updates_per_s_memory: float
    median_updates_per_s_disk: float
    median_updates_per_s_axpy: float
    median_mb_per_s_memory: float
    median_mb_per_s_disk: float
    median_mb_per_s_axpy: float
    median_ratio_memory_vs_axpy: float
    median_ratio_disk_vs_axpy: float
    meets_goal: bool


def measure_throughput(
    states: list[LoraState], paths: list[Path], start: LoraState, clients: int, repeats: int
) -> Throughput:
    """The three contenders ``repeats`` times, back to back in a rotating order."""
    vectors = [torch.cat([t.flatten() for t in s.values()]).numpy() for s in states]
    state_mb = vectors[0].nbytes / 1e6
    seconds: dict[str, list[float]] = {"memory": [], "disk": [], "axpy": []}
    run = {
        "memory": lambda: merge(start, from_memory(states, clients)),
        "disk": lambda: merge(start, from_disk(paths, clients)),
        "axpy": lambda: axpy(vectors, clients),
    }
    names = list(run)
    for name in names:  # warm-up: page cache, allocator, lazy imports
        run[name]()
    for repeat in range(repeats):
        for name in names[repeat % 3 :] + names[: repeat % 3]:
            seconds[name].append(run[name]())
        print(
            f"repeat {repeat + 1}: {clients} updates from memory {seconds['memory'][-1]:.3f} s, "
            f"from disk {seconds['disk'][-1]:.3f} s, numpy axpy {seconds['axpy'][-1]:.3f} s; "
            f"load {load_average()[0]}",
            flush=True,
        )
    vs_memory = [a / m for a, m in zip(seconds["axpy"], seconds["memory"], strict=True)]
    vs_disk = [a / d for a, d in zip(seconds["axpy"], seconds["disk"], strict=True)]
    rate = {name: clients / statistics.median(values) for name, values in seconds.items()}
    return Throughput(
        clients=clients,
        memory_seconds=[round(x, 4) for x in seconds["memory"]],
        disk_seconds=[round(x, 4) for x in seconds["disk"]],
        axpy_seconds=[round(x, 4) for x in seconds["axpy"]],
        ratio_memory_vs_axpy=[round(x, 3) for x in vs_memory],
        ratio_disk_vs_axpy=[round(x, 3) for x in vs_disk],
        median_updates_per_s_memory=round(rate["memory"], 1),
        median_updates_per_s_disk=round(rate["disk"], 1),
        median_updates_per_s_axpy=round(rate["axpy"], 1),
        median_mb_per_s_memory=round(rate["memory"] * state_mb, 1),
        median_mb_per_s_disk=round(rate["disk"] * state_mb, 1),
        median_mb_per_s_axpy=round(rate["axpy"] * state_mb, 1),
        median_ratio_memory_vs_axpy=round(statistics.median(vs_memory), 3),
        median_ratio_disk_vs_axpy=round(statistics.median(vs_disk), 3),
        meets_goal=statistics.median(vs_memory) >= GOAL_VS_AXPY,
    )


def variant(states: list[LoraState], clients: int, dtype: torch.dtype, flat: bool) -> float:
    """Seconds for a weighted sum done differently from :class:`RunningWeightedSum` (see ``--variants``).

    ``dtype`` is the accumulator's; the float32 updates are added to it directly (``add_`` casts
    on the fly), never copied to float64 first. ``flat`` sums one contiguous vector per update, as
    if the aggregator summed the data buffer :func:`read_safetensors` already holds each file in.
    """
    if flat:
        parts: list[dict[str, torch.Tensor]] = [{"all": torch.cat([t.flatten() for t in s.values()])} for s in states]
    else:
        parts = states
    total = {key: torch.zeros(t.shape, dtype=dtype) for key, t in parts[0].items()}
    began = time.perf_counter()
    for k in range(clients):
        for key, tensor in parts[k % len(parts)].items():
            total[key].add_(tensor, alpha=float(1 + k % 7))
    return time.perf_counter() - began


VARIANTS = {
    "fp64_per_tensor_no_copy": (torch.float64, False),
    "fp32_per_tensor": (torch.float32, False),
    "fp64_flat": (torch.float64, True),
    "fp32_flat": (torch.float32, True),
}
"""Where the merge's time goes: the float64 copy, float64 arithmetic, and one op per tensor."""


def measure_variants(states: list[LoraState], clients: int, repeats: int) -> dict[str, object]:
    """Each variant against numpy axpy, back to back, ``repeats`` times: median ratios."""
    vectors = [torch.cat([t.flatten() for t in s.values()]).numpy() for s in states]
    found: dict[str, object] = {}
    for name, (dtype, flat) in VARIANTS.items():
        variant(states, clients, dtype, flat)  # warm-up
        ratios, seconds = [], []
        for repeat in range(repeats):  # alternate which of the two goes first
            if repeat % 2:
                floor = axpy(vectors, clients)
                ours = variant(states, clients, dtype, flat)
            else:
                ours = variant(states, clients, dtype, flat)
                floor = axpy(vectors, clients)
            ratios.append(floor / ours)
            seconds.append(ours)
        found[name] = {
            "median_ms_per_update": round(1e3 * statistics.median(seconds) / clients, 3),
            "median_ratio_vs_axpy": round(statistics.median(ratios), 3),
        }
        print(f"variant {name}: {found[name]}, load {load_average()[0]}", flush=True)
    return found


# ---- streaming: one fresh process per number of clients -----------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    """Child process: merge ``--clients`` updates from the files in ``--files``; print one JSON line."""
    directory = Path(args.files)
    paths = sorted(directory.glob("update-*.safetensors"))
    start = read_safetensors(directory / "start.safetensors")  # as the aggregator's _round_start
    merge(start, from_disk(paths, 2))  # first-use allocations are not the merge's growth
    before = status_bytes("VmRSS")
    reset = reset_peak()
    seconds = merge(start, from_disk(paths, args.clients))
    peak = peak_bytes()
    print(
        json.dumps(
            {
                "clients": args.clients,
                "seconds": round(seconds, 3),
                "rss_before_bytes": before,
                "peak_bytes": peak,
                "peak_growth_bytes": peak - before,
                "peak_mark_reset": reset,
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )
    return 0


def measure_scaling(directory: Path, counts: list[int], threads: int) -> list[dict[str, object]]:
    """One fresh process per number of clients; their JSON lines."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows = []
    for clients in counts:
        command = [sys.executable, __file__, "worker", "--files", str(directory), "--clients", str(clients)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"worker for {clients} clients failed: {done.stderr[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["load"] = load_average()[0]
        rows.append(row)
        print(
            f"{clients} clients: {row['seconds']} s, peak growth {row['peak_growth_bytes'] / 2**20:.1f} MiB "
            f"(RSS before {row['rss_before_bytes'] / 2**20:.0f} MiB), load {row['load']}",
            flush=True,
        )
    return rows


def main_run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    load_before = load_average()
    shapes = lora_layout(args.model, args.rank)
    states = [random_state(shapes, args.rank, seed) for seed in range(DISTINCT)]
    start = random_state(shapes, args.rank, 1000)
    state_bytes = sum(t.numel() * 4 for t in start.values())
    with tempfile.TemporaryDirectory(prefix="devft-aggregation-") as tmp_name:
        directory = Path(tmp_name)
        paths = []
        for k, state in enumerate(states):
            paths.append(directory / f"update-{k}.safetensors")
            save_file(state, str(paths[-1]))
        save_file(start, str(directory / "start.safetensors"))
        throughput = measure_throughput(states, paths, start, args.clients, args.repeats)
        variants = measure_variants(states, args.clients, args.repeats) if args.variants else {}
        scaling = measure_scaling(directory, args.scaling, args.threads)
    growth = [int(row["peak_growth_bytes"]) for row in scaling]  # type: ignore[call-overload]
    report = {
        "benchmark": "aggregation",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
        f"numpy {np.__version__}, {args.threads} torch threads",
        "load_before": load_before,
        "load_after": load_average(),
        "model": args.model,
        "rank": args.rank,
        "tensors": len(start),
        "elements": state_bytes // 4,
        "state_bytes": state_bytes,
        "goal_ratio_vs_axpy": GOAL_VS_AXPY,
        "throughput": asdict(throughput),
        "variants": variants,
        "scaling": scaling,
        "peak_growth_spread_bytes": max(growth) - min(growth),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    t = throughput
    print(
        f"{len(start)} tensors, {state_bytes / 1e6:.1f} MB per update; {t.clients} updates: from memory "
        f"{t.median_updates_per_s_memory} updates/s ({t.median_mb_per_s_memory} MB/s), from disk "
        f"{t.median_updates_per_s_disk}/s ({t.median_mb_per_s_disk} MB/s), numpy axpy {t.median_mb_per_s_axpy} MB/s; "
        f"median ratio {t.median_ratio_memory_vs_axpy} from memory, {t.median_ratio_disk_vs_axpy} from disk "
        f"(goal >= {GOAL_VS_AXPY}: {'met' if t.meets_goal else 'missed'})"
    )
    print(f"peak growth by clients: {dict(zip(args.scaling, [g // 2**20 for g in growth], strict=True))} MiB")
    print(f"load average before {load_before}, after {report['load_after']}; wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="internal: one streaming measurement in a fresh process")
    worker.add_argument("--files", required=True)
    worker.add_argument("--clients", type=int, required=True)
    parser.add_argument("--model", default="smollm2", help="model whose LoRA shapes to use (smollm2, tiny)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", type=int, default=50, help="updates per merge in the throughput measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scaling", type=int, nargs="+", default=[10, 100, 1000], help="client counts for the peak")
    parser.add_argument("--variants", action="store_true", help="also time other ways to accumulate (see VARIANTS)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the aggregator's default is all)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return cmd_worker(args)
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
