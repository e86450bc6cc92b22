"""Pack sizes, pack/load times and training quality per base-weight quantization, on SmolLM2 stages.

For every stage of S=4 (4, 8, 15, 30 layers) and every quantization (none, int8, int4, nf4) it
builds the stage pack as the aggregator does (CKA similarity, contiguous grouping, DBLF), and
reports its size and ratio to the fp32 weights, the time to write it, and the time to verify,
unpack and load it. For the stages listed in ``--train-stages`` it then trains the same local
round (same data, seed, steps) on each quantized base with the torch backend and reports the
eval loss before and after, so the cost of quantization in quality is measured, not assumed.

    python benchmarks/packs.py [--train-stages 2 4] [--steps 20] [--markdown docs/packs_benchmark.md]

About 6 minutes on 2 cores. Run it on an idle machine (times are reported).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from devft_edge.backends import get_trainer
from devft_edge.calibration import calibration_ids
from devft_edge.lora import LoraSettings, attach_lora, init_lora_state, lora_shapes, set_lora_state
from devft_edge.models import load_model, load_tokenizer, model_dir
from devft_edge.pack import load_pack, read_pack, write_pack
from devft_edge.quantization import QuantSpec
from devft_edge.schedule import StageSchedule
from devft_edge.signing import generate_keypair, load_private_key, load_public_key
from devft_edge.stage import StageBuilder, StageRecipe
from devft_edge.tasks import train_eval_split
from devft_edge.training import TrainSettings, evaluate

QUANTS = ("none", "int8", "int4", "nf4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-stages", type=int, nargs="*", default=[2, 4], help="stages to train on (1-based)")
    parser.add_argument("--steps", type=int, default=20, help="local training steps per quantization")
    parser.add_argument("--markdown", default=None, help="also write the tables here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = load_model("smollm2")
    tokenizer = load_tokenizer("smollm2")
    lora = LoraSettings()
    full_lora = init_lora_state(lora_shapes(base, lora), lora.rank, 0)
    schedule = StageSchedule(num_layers=30, num_stages=4, total_rounds=4)
    train_examples, held_out = train_eval_split(112, 48, seed=11)
    settings = TrainSettings(steps=args.steps, batch_size=4, seq_len=64)
    builder = StageBuilder(base, tokenizer, lora, StageRecipe(), calibration_ids(tokenizer), "smollm2", seed=0)
    size_rows, train_rows = [], []
    with tempfile.TemporaryDirectory(prefix="devft-packs-") as tmp:
        private, public = generate_keypair(Path(tmp) / "keys")
        key, public_key = load_private_key(private), load_public_key(public)
        for stage, capacity in enumerate(schedule.capacities, start=1):
            groups = builder.groups(stage, capacity, full_lora)  # the aggregator's stage pipeline
            start_lora = builder.contract(full_lora, groups)
            for quant in QUANTS:
                sub, _, _ = builder.submodel(groups)  # fresh per quantization: packing quantizes in place
                path = Path(tmp) / f"s{stage}-{quant}.devpack"
                t0 = time.perf_counter()
                manifest = write_pack(
                    path,
                    sub,
                    start_lora,
                    model_name="smollm2",
                    stage=stage,
                    stages=4,
                    groups=groups,
                    lora=lora,
                    quant=QuantSpec(quant),
                    training=settings,
                    tokenizer_dir=model_dir("smollm2"),
                    created="2026-11-22T00:00:00Z",
                    sign_key=key,
                )
                pack_s = time.perf_counter() - t0
                del sub
                t0 = time.perf_counter()
                pack = read_pack(path, Path(tmp) / f"u-s{stage}-{quant}", public_key)
                model, _ = load_pack(pack)
                load_s = time.perf_counter() - t0
                size = path.stat().st_size
                weights_ratio = manifest.members["model.safetensors"][0] / manifest.fp32_bytes
                size_rows.append(
                    (
                        stage,
                        capacity,
                        quant,
                        size,
                        weights_ratio,
                        pack_s,
                        load_s,
                        manifest.quant_error.mean_relative_rms,
                    )
                )
                print(
                    f"stage {stage} ({capacity} layers) {quant}: {size / 2**20:.1f} MiB "
                    f"({size / manifest.fp32_bytes:.3f} of fp32), pack {pack_s:.1f} s, load {load_s:.1f} s",
                    flush=True,
                )
                if stage in args.train_stages:
                    peft_model = attach_lora(model, lora)
                    set_lora_state(peft_model, start_lora)
                    before = evaluate(peft_model, tokenizer, held_out, 64).loss
                    t0 = time.perf_counter()
                    result = get_trainer("torch").train(pack, train_examples, settings, seed=0)
                    train_s = time.perf_counter() - t0
                    set_lora_state(peft_model, result.lora)
                    after = evaluate(peft_model, tokenizer, held_out, 64).loss
                    train_rows.append((stage, capacity, quant, before, after, train_s))
                    print(
                        f"  trained {args.steps} steps in {train_s:.0f} s: eval loss {before:.3f} -> {after:.3f}",
                        flush=True,
                    )
                del model
    lines = [
        "# Pack benchmark",
        "",
        f"Made {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python {' '.join(sys.argv)}` "
        "(2-core x86-64, torch 2.13 CPU). SmolLM2-135M, S=4, LoRA r=8, embeddings and head quantized too.",
        "",
        "Ratios: to the same stage's fp32 pack (`none`: weights, LoRA, tokenizer, manifest), and of the weights "
        "member alone to the fp32 weights.",
        "",
        "| stage | layers | quant | pack MiB | ratio to fp32 pack | weights ratio | pack s | verify+load s "
        "| mean rel. RMS error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp32_pack = {s: b for s, _, q, b, *_ in size_rows if q == "none"}
    lines += [
        f"| {s} | {n} | {q} | {b / 2**20:.1f} | {b / fp32_pack[s]:.3f} | {r:.3f} | {p:.1f} | {lo:.1f} | {e:.4f} |"
        for s, n, q, b, r, p, lo, e in size_rows
    ]
    if train_rows:
        lines += [
            "",
            f"Same local round on each base: {args.steps} steps of batch 4 x 64, lr 3e-4, seed 0, 112 synthetic "
            "training examples; eval loss on 48 held-out examples (answer tokens).",
            "",
            "| stage | layers | quant | eval loss before | after | train s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {s} | {n} | {q} | {b:.3f} | {a:.3f} | {t:.0f} |" for s, n, q, b, a, t in train_rows]
    text = "\n".join(lines) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
