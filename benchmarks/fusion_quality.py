"""How much does fusing layers cost before any training? Eval loss of each stage's fused submodel.

For SmolLM2-135M (30 layers, S=4: capacities 4, 8, 15) this builds the stage submodel for each
grouping and fusion variant, with the LoRA at its initial state (B = 0, so the LoRA adds nothing)
and reports its eval loss and exact match on the synthetic held-out set, next to the full model's.
It isolates the quality of grouping + fusion from training, and takes a few minutes on 2 cores.

    .venv/bin/python benchmarks/fusion_quality.py [--model smollm2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from devft_edge.calibration import CALIBRATION_TEXT
from devft_edge.data import train_eval_split
from devft_edge.fusion import FUSIONS
from devft_edge.grouping import GROUPINGS
from devft_edge.layers import num_layers
from devft_edge.lora import LoraSettings, init_lora_state, lora_shapes
from devft_edge.models import load_model, load_tokenizer
from devft_edge.schedule import StageSchedule
from devft_edge.similarity import SIMILARITIES
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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
