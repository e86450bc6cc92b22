"""Evaluate an exported adapter on the fp32 base model and on the base as the packs quantize it.

The devices train their LoRA against the pack's quantized base weights, while the aggregator
evaluates (and exports the adapter for) the fp32 base. This measures what that difference is
worth on the run's held-out examples, e.g. for ``make demo``:

    python benchmarks/adapter_on_base.py runs/demo/adapter --model smollm2 --quant none int4

Examples and sequence length default to the demo's (48 held-out examples of seed 0, 64 tokens).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """Print eval loss and exact match of the adapter on each base."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path, help="an exported PEFT adapter directory")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quant", nargs="+", default=["none", "int4"], help="base weights: pack quantizations")
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel

    from devft_edge.models import load_model, load_tokenizer
    from devft_edge.quantization import QuantSpec, quantize_model
    from devft_edge.tasks import train_eval_split
    from devft_edge.training import evaluate

    held_out = train_eval_split(0, args.eval_examples, seed=args.seed)[1]
    tokenizer = load_tokenizer(args.model)
    print("| base weights | eval loss | exact match |\n|---|---|---|")
    for scheme in args.quant:
        base = load_model(args.model, seed=args.seed)
        if scheme != "none":
            quantize_model(base, QuantSpec(scheme))  # as write_pack does, before the LoRA goes on
        model = PeftModel.from_pretrained(base, str(args.adapter))
        with torch.no_grad():
            result = evaluate(model, tokenizer, held_out, args.seq_len)
        print(f"| {scheme} | {result.loss:.3f} | {result.accuracy:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
