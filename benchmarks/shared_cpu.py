"""A shared CPU: the training step rate alone and beside one competing CPU-bound process.

Each measurement is a fresh subprocess (so OpenMP's environment is read before torch starts its
thread pool): a stage submodel (``--model``, ``--layers``; the ``tiny`` model's 2 layers by default)
with LoRA attached as the simulator and the agent do, ``--warmup`` untimed steps of
:func:`devft_edge.training.train_local`, then ``--steps`` timed ones. "Shared" runs it while a
competitor subprocess (a torch matmul loop with torch's default threads and OpenMP settings) runs on
the same cores; the competitor is started first and killed after. Settings differ only in the
worker's environment. Run it alone on the machine.

    python benchmarks/shared_cpu.py [--repeats 3] [--steps 30]
    python benchmarks/shared_cpu.py --model smollm2 --layers 4 --settings default configure_threads

Results: ``benchmarks/results/system/shared_cpu-MODEL-LAYERS.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> environment given to the worker (on top of the inherited one, from which every OpenMP and
# devft thread variable is removed first)
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "threads1": {"OMP_NUM_THREADS": "1"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spincount0": {"GOMP_SPINCOUNT": "0"},
    "configure_threads": {"DEVFT_CONFIGURE_THREADS": "1"},
}
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "DEVFT_CONFIGURE_THREADS")

WORKER = """
import json, os, sys, time
if os.environ.get("DEVFT_CONFIGURE_THREADS"):
    from devft_edge.threads import configure_threads
    configure_threads()
import torch
from devft_edge.data import batches, generate_synthetic
from devft_edge.fusion import FUSIONS
from devft_edge.grouping import even_groups
from devft_edge.layers import num_layers
from devft_edge.lora import LoraSettings, attach_lora
from devft_edge.models import load_model, load_tokenizer
from devft_edge.submodel import build_submodel
from devft_edge.training import TrainSettings, train_local
steps, warmup, name, layers = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
base, tok = load_model(name), load_tokenizer(name)
model = attach_lora(build_submodel(base, even_groups(num_layers(base.config), layers), FUSIONS.get("dblf")).model,
                    LoraSettings())
stream = batches(generate_synthetic(64, seed=0), 4, 0, tok, 64)
torch.manual_seed(0)
train_local(model, stream, TrainSettings(steps=warmup, batch_size=4, seq_len=64))
started = time.perf_counter()
train_local(model, stream, TrainSettings(steps=steps, batch_size=4, seq_len=64))
elapsed = time.perf_counter() - started
print(json.dumps({"steps_per_s": steps / elapsed, "threads": torch.get_num_threads()}))
"""

COMPETITOR = """
import torch
a = torch.randn(512, 512)
while True:
    a = torch.mm(a, a).clamp_(-1, 1)
"""


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def measure(setting: str, steps: int, warmup: int, shared: bool, model: str, layers: int) -> dict[str, float]:
    """One worker run; with ``shared`` a competitor runs beside it."""
    competitor = None
    if shared:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=_env({}))
        time.sleep(2.0)  # its torch import done, its matmul loop running
    try:
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(steps), str(warmup), model, str(layers)],
            env=_env(SETTINGS[setting]),
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure every setting alone and shared, write the JSON and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="tiny", help="model spec whose stage submodel trains")
    parser.add_argument("--layers", type=int, default=2, help="depth of that stage submodel")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: by model and depth)")
    args = parser.parse_args()
    out: Path = args.out or HERE / "results" / "system" / f"shared_cpu-{args.model}-{args.layers}.json"

    load_before = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    runs: dict[str, dict[str, list[float]]] = {s: {"idle": [], "shared": []} for s in args.settings}
    threads: dict[str, int] = {}
    for repeat in range(args.repeats):
        for setting in args.settings:
            for mode in ("idle", "shared"):
                result = measure(setting, args.steps, args.warmup, mode == "shared", args.model, args.layers)
                runs[setting][mode].append(result["steps_per_s"])
                threads[setting] = result["threads"]
                print(f"repeat {repeat} {setting:18s} {mode:6s}: {result['steps_per_s']:.2f} steps/s", flush=True)
    reference = statistics.median(runs["default"]["idle"]) if "default" in runs else None
    table = {}
    for setting, modes in runs.items():
        row: dict[str, object] = {"env": SETTINGS[setting], "torch_threads": threads[setting]}
        for mode, values in modes.items():
            row[mode] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
        if reference:
            row["shared_over_idle_default"] = statistics.median(modes["shared"]) / reference
            row["idle_over_idle_default"] = statistics.median(modes["idle"]) / reference
        table[setting] = row
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        "load_before": load_before,
        "load_after": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
        "workload": f"{args.model} model, {args.layers}-layer DBLF stage submodel, LoRA, batch 4, seq 64, "
        f"{args.warmup} warm-up + "
        f"{args.steps} timed train_local steps",
        "competitor": "torch.mm 512x512 loop, torch default threads and OpenMP settings",
        "repeats": args.repeats,
        "settings": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'setting':18s} {'idle/s':>8s} {'shared/s':>9s} {'shared/idle(default)':>21s}")
    for setting, row in table.items():
        idle, shared = row["idle"], row["shared"]
        print(
            f"{setting:18s} {idle['median']:8.2f} {shared['median']:9.2f} "
            f"{row.get('shared_over_idle_default', float('nan')):21.2f}"
        )


if __name__ == "__main__":
    main()
