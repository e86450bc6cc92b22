"""The simulator and the fleet, side by side: per-round eval loss of every method both ways.

For each method it runs ``devft-edge simulate`` (in-process clients) and ``devft-edge demo`` (an
embedded broker, the aggregator and the agents as real processes) with the same seed, model,
stages, rounds, clients = devices, per-round, local steps, batch, seq, lr, IID data and fp32 packs,
and reports the largest per-round difference of the eval loss, with the bytes and the wall time
of each side (the fleet's bytes are what crossed the broker; the simulator's what it counts).

    python benchmarks/one_engine.py [--methods fedit devft ...] [--markdown docs/one_engine.md]

About 6 minutes on 2 cores for the six methods on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("fedit", "fedsa", "flora", "devft", "devft+fedsa", "devft+flora")
SETTINGS = ["--model", "tiny", "--per-round", "2", "--stages", "2", "--rounds", "4", "--local-steps", "2"]
SETTINGS += ["--examples-per-client", "12", "--eval-examples", "6", "--seed", "0", "--quant", "none"]
SETTINGS += ["--data-alpha", "0", "--json"]


def _run(command: str, method: str, out: Path, count: str) -> tuple[dict, list[float], float]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "devft_edge", command, *SETTINGS, count, "3", "--method", method, "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    losses = [json.loads(line)["eval_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads(done.stdout), losses, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    header = "| method | max per-round \\|diff\\| | final eval loss (sim / fleet) | bytes up+down (sim / fleet) |"
    rows = [header + " seconds (sim / fleet) |"]
    rows.append("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="devft-one-engine-") as tmp:
        for method in args.methods:
            sim, sim_losses, sim_s = _run("simulate", method, Path(tmp) / f"sim-{method}", "--clients")
            net, net_losses, net_s = _run("demo", method, Path(tmp) / f"demo-{method}", "--devices")
            diff = max(abs(a - b) for a, b in zip(sim_losses, net_losses, strict=True))
            sim_bytes, net_bytes = sim["bytes_up"] + sim["bytes_down"], net["bytes_up"] + net["bytes_down"]
            rows.append(
                f"| {method} | {diff:.1e} | {sim['final_eval_loss']:.4f} / {net['final_eval_loss']:.4f} "
                f"| {sim_bytes / 1e6:.1f} / {net_bytes / 1e6:.1f} MB | {sim_s:.0f} / {net_s:.0f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
