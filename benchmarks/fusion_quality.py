"""How much does fusing layers cost before any training? Eval loss of each stage's fused submodel.

For SmolLM2-135M (30 layers, S=4: capacities 4, 8, 15) this builds the stage submodel for each
grouping and fusion variant, with the LoRA at its initial state (B = 0, so the LoRA adds nothing)
and reports its eval loss and exact match on the synthetic held-out set, next to the full model's.
It isolates the quality of grouping + fusion from training, and takes a few minutes on 2 cores.

``--table healing`` measures the same for the fused submodels healed on the server
(:mod:`devft_edge.healing`: distilled toward the full model on server-held text) and for kept
ends, with the server's healing time; heals are cached where ``simulate`` caches them, so a heal
done for a run is not repeated (its seconds are the original heal's). Issue 13's targets: 4 layers
<= 5.0 and 15 layers <= 3.5 before training.

    .venv/bin/python benchmarks/fusion_quality.py [--model smollm2] [--table fusion|healing]
        [--variants ROW...] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from devft_edge.calibration import CALIBRATION_TEXT, calibration_ids
from devft_edge.data import train_eval_split
from devft_edge.fusion import FUSIONS
from devft_edge.grouping import GROUPINGS
from devft_edge.healing import HealSettings
from devft_edge.layers import num_layers
from devft_edge.lora import LoraSettings, init_lora_state, lora_shapes
from devft_edge.models import cache_dir, load_model, load_tokenizer
from devft_edge.schedule import StageSchedule
from devft_edge.similarity import SIMILARITIES
from devft_edge.stage import StageBuilder, StageRecipe
from devft_edge.submodel import build_submodel, layer_evidence
from devft_edge.training import evaluate

FUSION_VARIANTS = [
    ("dblf", 0.1),
    ("dblf", 0.05),
    ("dblf", 0.2),
    ("dblf", "auto"),
    ("one", None),
    ("mean", None),
    ("sum", None),
]
GROUPING_VARIANTS = ["contiguous", "contiguous_ratiocut", "spectral", "even", "random"]


def main() -> None:
    """Print (and optionally write) the table of fused-submodel eval losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--table", choices=["fusion", "healing"], default="fusion")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[label for label, _ in HEAL_VARIANTS],
        default=None,
        help="rows of the healing table to measure (default: all)",
    )
    args = parser.parse_args()
    if args.table == "healing":
        healing_table(args)
        return

    tokenizer, base = load_tokenizer(args.model), load_model(args.model)
    _, held_out = train_eval_split(480, args.eval_examples, seed=0)  # the simulator's held-out set, seed 0
    settings = LoraSettings()
    lora = init_lora_state(lora_shapes(base, settings), settings.rank, seed=0)
    calibration = tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :512]
    total = num_layers(base.config)
    capacities = StageSchedule(total, args.stages, args.stages).capacities[:-1]
    full = evaluate(base, tokenizer, held_out, seq_len=64)
    similarities = {
        name: SIMILARITIES.get(name).compute(layer_evidence(base, SIMILARITIES.get(name), settings, lora, calibration))
        for name in ("cka", "weights")
    }

    rows = [
        f"full model ({total} layers): eval loss {full.loss:.3f}, exact match {full.accuracy:.1%}",
        "",
        "| similarity | grouping | fusion | " + " | ".join(f"{c} layers: loss / EM" for c in capacities) + " |",
        "|---|---|---|" + "---|" * len(capacities),
    ]
    variants = [("cka", g, "dblf", 0.1) for g in GROUPING_VARIANTS]
    variants += [("cka", "contiguous", f, b) for f, b in FUSION_VARIANTS if (f, b) != ("dblf", 0.1)]
    variants += [("weights", "contiguous", "dblf", 0.1), ("weights", "spectral", "dblf", 0.1)]
    for similarity, grouping, fusion_name, beta in variants:
        started = time.perf_counter()
        fusion = FUSIONS.get(fusion_name, **({} if beta is None else {"beta": beta}))
        cells = []
        for capacity in capacities:
            groups = GROUPINGS.get(grouping).group(similarities[similarity], capacity, seed=1)
            result = evaluate(build_submodel(base, groups, fusion).model, tokenizer, held_out, seq_len=64)
            cells.append(f"{result.loss:.2f} / {result.accuracy:.0%}")
        label = fusion_name if beta is None else f"{fusion_name} beta={beta}"
        rows.append(f"| {similarity} | {grouping} | {label} | " + " | ".join(cells) + " |")
        print(rows[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(rows) + "\n")


HEAL_VARIANTS = [
    ("no healing", StageRecipe()),
    ("heal bake", StageRecipe(heal=HealSettings())),
    ("heal adapter r64", StageRecipe(heal=HealSettings(mode="adapter"))),
    ("keep ends 1", StageRecipe(keep_ends=1)),
    ("keep ends 1 + heal bake", StageRecipe(keep_ends=1, heal=HealSettings())),
]


def healing_table(args: argparse.Namespace) -> None:
    """Eval loss of each stage's submodel with and without server-side healing (and kept ends)."""
    tokenizer, base = load_tokenizer(args.model), load_model(args.model)
    _, held_out = train_eval_split(480, args.eval_examples, seed=0)
    settings = LoraSettings()
    lora = init_lora_state(lora_shapes(base, settings), settings.rank, seed=0)
    total = num_layers(base.config)
    capacities = StageSchedule(total, args.stages, args.stages).capacities[:-1]
    full = evaluate(base, tokenizer, held_out, seq_len=64)
    rows = [
        f"full model ({total} layers): eval loss {full.loss:.3f}, exact match {full.accuracy:.1%}",
        "",
        "| variant | " + " | ".join(f"{c} layers: loss / heal s" for c in capacities) + " |",
        "|---|" + "---|" * len(capacities),
    ]
    for label, recipe in HEAL_VARIANTS:
        if args.variants and label not in args.variants:
            continue
        builder = StageBuilder(
            base, tokenizer, settings, recipe, calibration_ids(tokenizer), args.model, 0, cache_dir() / "heal"
        )
        cells = []
        for number, capacity in enumerate(capacities, start=1):
            stage = builder.open(number, capacity, lora)
            result = evaluate(stage.model, tokenizer, held_out, seq_len=64, accuracy=False)
            heal = "-" if stage.heal is None else f"{stage.heal.seconds:.0f}"
            cells.append(f"{result.loss:.2f} / {heal}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
