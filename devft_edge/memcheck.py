"""Measure the peak memory of local LoRA training steps, in a fresh process.

The planner's predictions are only worth something if they are checked against the real thing,
so ``devft-edge plan --check`` and the calibration benchmark run this module as a subprocess on a
stage submodel written by :func:`devft_edge.weights.save_base`: the process loads only that
submodel (as a device loading its pack does), attaches LoRA, takes training steps on random
tokens of the planned batch and sequence length, and prints one JSON line.

Peak memory is the kernel's high-water mark of resident memory (``VmHWM``, what ``ru_maxrss`` and
GNU ``time -v`` report). The mark is read after loading and then reset (``/proc/self/clear_refs``)
so the training peak and the load peak are separate numbers. Two steps are taken because the
optimizer state exists only from the first ``step()``: the second step's backward is the steady
state a device lives in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devft_edge.errors import DevFTError
from devft_edge.layers import num_layers
from devft_edge.quantization import QuantSpec

STEPS = 2


@dataclass(frozen=True)
class Measurement:
    """What one probe process measured."""

    train_peak_bytes: int
    """Highest resident memory during the training steps (model loaded before)."""
    load_peak_bytes: int
    """Highest resident memory while importing and loading the submodel."""
    step_seconds: float
    """Wall time of the last (steady-state) step."""


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise DevFTError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe(directory: Path, batch: int, seq: int, rank: int, checkpointing: bool) -> Measurement:
    """Load the submodel in ``directory`` and take :data:`STEPS` LoRA training steps."""
    from devft_edge.allocator import bound_heap

    bound_heap()  # as the device agent does: measure the configuration devices run
    import torch

    from devft_edge.lora import LoraSettings, attach_lora
    from devft_edge.weights import load_base

    model = load_base(directory)
    peft_model = attach_lora(model, LoraSettings(rank=rank, alpha=2.0 * rank))
    if checkpointing:
        peft_model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    load_peak = _status_kb("VmHWM") * 1024
    if not _reset_peak():
        raise DevFTError(
            "cannot reset the peak-memory mark (/proc/self/clear_refs); the measurement would mix load and training"
        )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    peft_model.train()
    elapsed = 0.0
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        start = time.perf_counter()
        loss = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        elapsed = time.perf_counter() - start
    return Measurement(train_peak_bytes=_status_kb("VmHWM") * 1024, load_peak_bytes=load_peak, step_seconds=elapsed)


def measure(
    directory: str | Path, batch: int, seq: int, rank: int = 8, checkpointing: bool = False, threads: int | None = None
) -> Measurement:
    """Run :func:`probe` in a fresh Python process (nothing else in its memory) and return its result."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [
        sys.executable,
        "-m",
        "devft_edge.memcheck",
        str(directory),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--rank",
        str(rank),
    ] + (["--checkpointing"] if checkpointing else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise DevFTError(f"memory probe failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def measure_stages(
    model_spec: str,
    capacities: Sequence[int],
    quant: QuantSpec,
    batch: int,
    seq: int,
    rank: int = 8,
    checkpointing: bool = False,
    threads: int | None = None,
) -> list[Measurement]:
    """Build each stage's submodel of ``model_spec`` and measure a training step of it.

    Layers are grouped evenly and fused with DBLF: peak memory depends on the submodel's shape,
    not on which layers were fused, so the planner's check does not need the similarity pass.
    """
    from devft_edge.fusion import FUSIONS
    from devft_edge.grouping import even_sizes
    from devft_edge.models import load_model
    from devft_edge.submodel import build_submodel
    from devft_edge.weights import save_base

    base = load_model(model_spec)
    total = num_layers(base.config)
    results = []
    with tempfile.TemporaryDirectory(prefix="devft-memcheck-") as tmp:
        for capacity in capacities:
            sizes = even_sizes(total, capacity)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            groups = [list(range(a, a + n)) for a, n in zip(starts, sizes, strict=True)]
            sub = build_submodel(base, groups, FUSIONS.get("dblf")).model
            directory = save_base(sub, quant, Path(tmp) / f"layers-{capacity}")
            del sub
            results.append(measure(directory, batch, seq, rank, checkpointing, threads))
            shutil.rmtree(directory)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devft_edge.memcheck", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="submodel written by devft_edge.weights.save_base")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args(argv)
    result = probe(args.directory, args.batch, args.seq, args.rank, args.checkpointing)
    print(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
