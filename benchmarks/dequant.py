"""Training-step cost of dequantizing a quantized stage into fresh memory against a reused buffer.

A quantized layer dequantizes its weight twice per training step (forward, and again for the
input gradient). :meth:`devft_edge.quantization.Quantizer.dequantize_transient` writes it into a
per-thread buffer; ``fresh`` puts :meth:`~devft_edge.quantization.Quantizer.dequantize` (a new
tensor per call, as before) in its place for this comparison. Each mode runs in a fresh process on
one thread under the agent's heap setting (:func:`devft_edge.allocator.bound_heap`), takes
``--steps`` training steps the way the agent does and reports the mean of the steps after the
first two (optimizer state exists from the first): wall seconds, minor page faults, system and
user CPU seconds, and the peak resident memory of the steps.

    python benchmarks/dequant.py                        # SmolLM2, 30 layers, int4, 4 x 64 (~2 min)
    python benchmarks/dequant.py --layers 4 --scheme int8

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("fresh", "reused")


def child(directory: str, mode: str, steps: int, batch: int, seq: int) -> dict[str, float]:
    """Load the stage in ``directory`` and time ``steps`` training steps (run in its own process)."""
    from devft_edge.allocator import bound_heap

    bound_heap()
    import torch

    from devft_edge.data import batches
    from devft_edge.lora import LoraSettings, attach_lora
    from devft_edge.models import load_tokenizer
    from devft_edge.peak_memory import peak_bytes, reset_peak
    from devft_edge.quantization import QUANTIZERS, Quantizer
    from devft_edge.tasks import generate_synthetic
    from devft_edge.training import causal_batch
    from devft_edge.weights import load_base

    if mode == "fresh":
        for name in QUANTIZERS.names():
            type(QUANTIZERS.get(name)).dequantize_transient = Quantizer.dequantize_transient  # type: ignore[method-assign]
    torch.set_num_threads(1)
    model = attach_lora(load_base(directory), LoraSettings())
    stream = batches(generate_synthetic(48, seed=0), batch, 0, load_tokenizer("smollm2"), seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    model.train()
    reset_peak()
    rows = []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = model(**causal_batch(next(stream))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append(
            (
                time.perf_counter() - start,
                after.ru_minflt - before.ru_minflt,
                after.ru_stime - before.ru_stime,
                after.ru_utime - before.ru_utime,
            )
        )
    steady = rows[2:]
    keys = ("step_seconds", "page_faults", "system_seconds", "user_seconds")
    result = {key: sum(row[i] for row in steady) / len(steady) for i, key in enumerate(keys)}
    return {**result, "peak_mib": peak_bytes() / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--scheme", default="int4")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two are not counted)")
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.batch, args.seq)))
        return 0

    from devft_edge.memcheck import stage_submodel
    from devft_edge.models import load_model
    from devft_edge.quantization import QuantSpec
    from devft_edge.weights import save_base

    results = {}
    with tempfile.TemporaryDirectory(prefix="devft-dequant-") as tmp:
        _, sub = stage_submodel(load_model("smollm2"), args.layers)
        directory = save_base(sub, QuantSpec(args.scheme), Path(tmp) / "stage")
        del sub
        for mode in MODES:
            command = [sys.executable, __file__, "--child", str(directory), mode]
            command += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    setting = {key: getattr(args, key) for key in ("layers", "scheme", "steps", "batch", "seq")}
    print(json.dumps({"setting": setting, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
