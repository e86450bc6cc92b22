"""Measure the peak memory of local LoRA training steps, in a fresh process.

The planner's predictions are only worth something if they are checked against the real thing,
so ``devft-edge plan --check`` and the calibration benchmark run this module as a subprocess on a
stage submodel written by :func:`devft_edge.weights.save_base`: the process loads only that
submodel (as a device loading its pack does), attaches LoRA, and trains it the way the device
agent does (its tokenizer, its data stream, its training loop, its copies of the starting LoRA)
at the planned batch and sequence length, then prints one JSON line.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devft_edge.errors import DevFTError
from devft_edge.layers import num_layers
from devft_edge.peak_memory import peak_bytes, reset_peak
from devft_edge.quantization import QuantSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STEPS = 2
EXAMPLES = 48
"""The probe's local examples: an agent's ``synthetic:48:0`` data."""


@dataclass(frozen=True)
class Measurement:
    """What one probe process measured."""

    train_peak_bytes: int
    """Highest resident memory during the training steps (model loaded before)."""
    load_peak_bytes: int
    """Highest resident memory while importing and loading the submodel."""
    step_seconds: float
    """Wall time of the last (steady-state) step."""


def probe(directory: Path, tokenizer: str, batch: int, seq: int, rank: int, checkpointing: bool) -> Measurement:
    """Load the submodel in ``directory`` and take :data:`STEPS` training steps as a device agent does.

    The agent's path, not a bare loop, because the planner predicts what devices run: the tokenizer
    (of model spec ``tokenizer``) and the tokenized local data stay in memory, batches come from
    :func:`devft_edge.data.batches` (right-padded, answer-only labels) through
    :func:`devft_edge.training.train_local`, and two fp32 copies of the starting LoRA are held, as
    :class:`devft_edge.backends.TorchTrainer` (the pack's) and the agent (the round's) hold them.
    """
    from devft_edge.allocator import bound_heap

    bound_heap()  # as the device agent does: measure the configuration devices run
    from devft_edge.data import batches
    from devft_edge.lora import LoraSettings, attach_lora, get_lora_state
    from devft_edge.models import load_tokenizer
    from devft_edge.tasks import generate_synthetic
    from devft_edge.training import TrainSettings, train_local
    from devft_edge.weights import load_base

    model = load_base(directory)
    peft_model = attach_lora(model, LoraSettings(rank=rank))
    starting = [get_lora_state(peft_model) for _ in range(2)]
    stream = batches(generate_synthetic(EXAMPLES, seed=0), batch, 0, load_tokenizer(tokenizer), seq)
    load_peak = peak_bytes()
    if not reset_peak():
        raise DevFTError(
            "cannot reset the peak-memory mark (/proc/self/clear_refs); the measurement would mix load and training"
        )
    requested: list[float] = []

    def timed() -> Iterator[dict[str, Any]]:
        """The batches, stamped when the trainer asks for one (a step starts)."""
        for item in stream:
            requested.append(time.perf_counter())
            yield item

    settings = TrainSettings(steps=STEPS, batch_size=batch, seq_len=seq, checkpointing=checkpointing)
    train_local(peft_model, timed(), settings)
    last_step = time.perf_counter() - requested[-1]
    del starting
    return Measurement(train_peak_bytes=peak_bytes(), load_peak_bytes=load_peak, step_seconds=last_step)


def measure(
    directory: str | Path,
    tokenizer: str,
    batch: int,
    seq: int,
    rank: int = 8,
    checkpointing: bool = False,
    threads: int | None = None,
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
        "--tokenizer",
        tokenizer,
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


def stage_submodel(base: PreTrainedModel, capacity: int) -> tuple[list[list[int]], PreTrainedModel]:
    """The groups and the submodel a stage of ``capacity`` layers is measured on.

    Layers are grouped evenly and fused with DBLF: peak memory depends on the submodel's shape,
    not on which layers were fused, so measuring needs no similarity pass.
    """
    from devft_edge.fusion import FUSIONS
    from devft_edge.grouping import even_groups
    from devft_edge.submodel import build_submodel

    groups = even_groups(num_layers(base.config), capacity)
    return groups, build_submodel(base, groups, FUSIONS.get("dblf")).model


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
    """Build each stage's submodel of ``model_spec`` (:func:`stage_submodel`) and measure a
    training step of it."""
    from devft_edge.models import load_model
    from devft_edge.weights import save_base

    base = load_model(model_spec)
    results = []
    with tempfile.TemporaryDirectory(prefix="devft-memcheck-") as tmp:
        for capacity in capacities:
            _, sub = stage_submodel(base, capacity)
            directory = save_base(sub, quant, Path(tmp) / f"layers-{capacity}")
            del sub
            results.append(measure(directory, model_spec, batch, seq, rank, checkpointing, threads))
            shutil.rmtree(directory)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devft_edge.memcheck", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="submodel written by devft_edge.weights.save_base")
    parser.add_argument("--tokenizer", required=True, help="model spec whose tokenizer the data is encoded with")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args(argv)
    result = probe(args.directory, args.tokenizer, args.batch, args.seq, args.rank, args.checkpointing)
    print(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
