"""Trainer backends: how a device turns a verified pack and its local data into a LoRA update.

Every backend returns the same :class:`TrainResult` (canonical LoRA state, sample count, mean
training loss), so the aggregator cannot tell which one a device ran. ``torch`` trains with
:func:`devft_edge.training.train_local`, the simulator's own code path, on the pack's quantized
base; ``ort`` (``devft_edge.ort_backend``, optional extra) runs ONNX Runtime training artifacts
built from the same pack.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devft_edge.data import Example
from devft_edge.lora import LoraState
from devft_edge.pack import VerifiedPack
from devft_edge.registry import Registry
from devft_edge.training import TrainSettings


@dataclass(frozen=True)
class Stream:
    """A position in a device's endless batch stream (:func:`devft_edge.data.batches`): its seed
    and the batches already taken. Rounds continue the stream, epoch after epoch, as the
    simulator's clients do, instead of reshuffling from the start every round."""

    seed: int
    taken: int = 0

    def batches(self, examples: Sequence[Example], settings: TrainSettings, tokenizer: Any) -> Iterator[Any]:
        """The stream from this position on."""
        import itertools

        from devft_edge.data import batches

        stream = batches(examples, settings.batch_size, self.seed, tokenizer, settings.seq_len)
        return itertools.islice(stream, self.taken, None)


@dataclass(frozen=True)
class TrainResult:
    """What a device sends back after a round (besides its metrics)."""

    lora: LoraState
    """Trained LoRA of the stage submodel, canonical keys, fp32."""
    num_samples: int
    """Local training examples (the aggregation weight)."""
    train_loss: float
    """Mean training loss over the round's steps."""


class Trainer:
    """A backend: one method, train a round from a pack."""

    name = "base"

    def train(
        self,
        pack: VerifiedPack,
        examples: Sequence[Example],
        settings: TrainSettings,
        seed: int,
        start: LoraState | None = None,
        delta: LoraState | None = None,
        stream: Stream | None = None,
    ) -> TrainResult:
        """Train ``settings.steps`` steps from ``start`` (default: the pack's LoRA) on ``examples``,
        on the pack's base plus ``delta`` (FLoRA's merged global update, stage space; None: none),
        taking the batches at ``stream``'s position (default: a stream seeded by ``seed``)."""
        raise NotImplementedError


TRAINERS: Registry[Trainer] = Registry("trainer backend")


@TRAINERS.register("torch")
class TorchTrainer(Trainer):
    """PyTorch + peft on the pack's (quantized) base: the same ``train_local`` as the simulator.

    The loaded pack stays resident between tasks: a stage has several rounds, and reloading
    (dequantizing the embedding, building the skeleton) would cost seconds per round on a Pi.
    A new pack replaces it, the old model freed first so the two never coexist in memory.
    """

    name = "torch"

    def __init__(self) -> None:
        self._loaded: tuple[Path, Any, Any, LoraState] | None = None
        """(pack directory, peft model, tokenizer, the pack's LoRA) of the last pack trained on."""
        self._merged: LoraState = {}
        """The delta merged into the loaded pack's base now (FLoRA), to take out before the next."""

    def train(
        self,
        pack: VerifiedPack,
        examples: Sequence[Example],
        settings: TrainSettings,
        seed: int,
        start: LoraState | None = None,
        delta: LoraState | None = None,
        stream: Stream | None = None,
    ) -> TrainResult:
        import torch

        from devft_edge.lora import get_lora_state, set_lora_state
        from devft_edge.submodel import add_weight_delta
        from devft_edge.training import train_local

        peft_model, tokenizer, pack_lora = self._load(pack)
        if self._merged or delta:  # FLoRA: the resident base carries this round's global update, not the last
            scaling = pack.manifest.lora.scaling
            add_weight_delta(peft_model, self._merged, -scaling)
            self._merged = {}
            add_weight_delta(peft_model, delta or {}, scaling)
            self._merged = dict(delta or {})
        set_lora_state(peft_model, start if start is not None else pack_lora)
        torch.manual_seed(seed)
        position = stream or Stream(seed)
        loss = train_local(peft_model, position.batches(examples, settings, tokenizer), settings)
        return TrainResult(lora=get_lora_state(peft_model), num_samples=len(examples), train_loss=loss)

    def _load(self, pack: VerifiedPack) -> tuple[Any, Any, LoraState]:
        """The pack's model with LoRA attached, its tokenizer and its LoRA; loads only a new pack."""
        import gc

        from transformers import AutoTokenizer

        from devft_edge.lora import attach_lora
        from devft_edge.pack import load_pack

        if self._loaded is not None and self._loaded[0] == pack.directory:
            return self._loaded[1:]
        self._loaded, self._merged = None, {}
        gc.collect()
        model, pack_lora = load_pack(pack)
        tokenizer = AutoTokenizer.from_pretrained(pack.directory)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        peft_model = attach_lora(model, pack.manifest.lora)
        self._loaded = (pack.directory, peft_model, tokenizer, pack_lora)
        return peft_model, tokenizer, pack_lora


def get_trainer(name: str) -> Trainer:
    """The backend called ``name`` (``ort`` registers itself when its module is importable)."""
    if name == "ort" and "ort" not in TRAINERS:
        import devft_edge.ort_backend  # noqa: F401  (registers "ort"; raises a clear error without the extra)
    return TRAINERS.get(name)
