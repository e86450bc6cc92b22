"""Export the federation's final LoRA as a stock PEFT adapter (and optionally a merged model).

The adapter directory is what ``PeftModel.from_pretrained(base, dir)`` loads with no devft-edge
code. FLoRA's dense merged update is turned back into LoRA form exactly: a truncated SVD at the
update's numerical rank (B = U S, A = V^T, alpha = rank so the scaling is 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from devft_edge.lora import LoraSettings, LoraState, attach_lora, set_lora_state, split_layers


def dense_to_lora(
    delta: Mapping[str, Tensor], lora: Mapping[str, Tensor], settings: LoraSettings
) -> tuple[LoraState, LoraSettings]:
    """Fold ``scaling * (delta + B @ A)`` per module into one exact LoRA of a common rank."""
    dense: dict[str, Tensor] = {}
    for i, entries in split_layers(lora).items():
        for key, a in entries.items():
            if key.endswith(".lora_A"):
                module = key[: -len(".lora_A")]
                full = f"layers.{i}.{module}"
                total = entries[f"{module}.lora_B"].double() @ a.double()
                total += delta.get(f"{full}.delta", torch.zeros_like(total)).double()
                dense[full] = total * settings.scaling
    svds = {k: torch.linalg.svd(v, full_matrices=False) for k, v in dense.items()}
    ranks = []
    for u, s, _ in svds.values():
        tol = s.max().item() * max(u.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
        ranks.append(int((s > tol).sum()))
    rank = max(1, max(ranks, default=1))
    state: LoraState = {}
    for key, (u, s, vh) in svds.items():
        r = min(rank, s.numel())
        a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
        b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
        a[:r] = vh[:r]
        b[:, :r] = u[:, :r] * s[:r]
        state[f"{key}.lora_A"], state[f"{key}.lora_B"] = a.float(), b.float()
    return state, replace(settings, rank=rank, alpha=float(rank))


def export_adapter(
    base: PreTrainedModel, settings: LoraSettings, lora: LoraState, out_dir: Path, delta: LoraState | None = None
) -> Path:
    """Write a PEFT adapter directory for the full-depth state; the base is left unchanged."""
    if delta:
        lora, settings = dense_to_lora(delta, lora, settings)
    peft_model = attach_lora(base, settings)
    try:
        set_lora_state(peft_model, lora)
        peft_model.save_pretrained(str(out_dir))
    finally:
        peft_model.unload()
    return Path(out_dir)


def export_merged(
    base: PreTrainedModel, settings: LoraSettings, lora: LoraState, out_dir: Path, delta: LoraState | None = None
) -> Path:
    """Merge the LoRA into ``base`` and save it with ``save_pretrained``.

    This consumes ``base``: its weights are changed in place (no second copy of the model in memory).
    """
    if delta:
        lora, settings = dense_to_lora(delta, lora, settings)
    peft_model = attach_lora(base, settings)
    set_lora_state(peft_model, lora)
    peft_model.merge_and_unload().save_pretrained(out_dir)
    return Path(out_dir)
