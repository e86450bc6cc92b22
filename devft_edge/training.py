"""Local LoRA training and evaluation: the code path every client runs, simulated or on a device.

A client's round is: load the LoRA it starts from, take ``steps`` AdamW steps on its own data with
a fresh optimizer (optimizer state is not shared in federated LoRA, and DevFT restarts it at every
stage anyway), and hand back the trained LoRA. Loss is over answer tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from devft_edge.data import Example, encode_batch, encode_prompts, normalize_answer
from devft_edge.errors import raise_if


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyper-parameters of one client round."""

    steps: int = 8
    """Optimizer steps per round (the paper's 'local steps')."""
    batch_size: int = 4
    """Examples per step."""
    seq_len: int = 64
    """Tokens per example (prompt truncated from the left to fit)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA factors."""
    max_grad_norm: float = 1.0
    """Gradient clipping: keeps an early high-loss step from throwing a small LoRA far off."""
    checkpointing: bool = False
    """Gradient checkpointing: keep only each block's input and recompute the block in backward,
    for much less activation memory at about a third more compute (the planner counts both)."""

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"local steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch must be >= 1, got {self.batch_size}")
        if self.seq_len < 8:
            problems.append(f"seq must be >= 8, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        raise_if(problems)


def causal_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` without its attention mask when the mask only marks right padding.

    Under causal attention a token attends to earlier positions only, and right padding puts every
    pad after the row's last real token, so no real token's output depends on a pad; the labels
    (-100 there) already keep pads out of the loss. The mask changes nothing that is learned, but
    it changes memory: with a padding mask torch's CPU ``scaled_dot_product_attention`` falls back
    to its math kernel, which keeps the ``[batch, heads, seq, seq]`` attention probabilities of
    every layer for the backward pass; without one it takes the causal kernel, which never
    materialises them (``benchmarks/agent_memory.py``, ``docs/system_benchmarks.md``). Any other
    mask (left padding, holes) is kept.
    """
    mask = batch.get("attention_mask")
    if mask is None or not bool((mask[:, 0] == 1).all() and (mask[:, 1:] <= mask[:, :-1]).all()):
        return batch
    return {name: value for name, value in batch.items() if name != "attention_mask"}


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Switch gradient checkpointing of ``model`` (a transformers model, or peft's wrapper of one).

    Non-reentrant checkpointing: it needs no gradient on the (frozen) block inputs, so LoRA on a
    frozen base trains as it does without checkpointing.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enabled:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif inner.is_gradient_checkpointing:
        inner.gradient_checkpointing_disable()


def train_local(model: nn.Module, batches: Iterator[dict[str, Tensor]], settings: TrainSettings) -> float:
    """Train the model's trainable (LoRA) parameters in place; returns the mean training loss."""
    set_checkpointing(model, settings.checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    total = 0.0
    for _ in range(settings.steps):
        batch = causal_batch(next(batches))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        total += float(loss.detach())
    model.eval()
    return total / settings.steps


@dataclass(frozen=True)
class EvalResult:
    """Held-out metrics of one model."""

    loss: float
    """Mean cross-entropy per answer token."""
    accuracy: float | None
    """Fraction of examples whose greedy answer equals the reference after normalisation (None:
    not measured; greedy generation is most of an evaluation's time)."""
    accuracy_by_task: dict[str, float] | None = None
    """The same per task family of the examples."""


def evaluate(
    model: nn.Module,
    tokenizer: object,
    examples: Sequence[Example],
    seq_len: int,
    batch_size: int = 16,
    accuracy: bool = True,
) -> EvalResult:
    """Teacher-forced answer loss and (unless ``accuracy`` is False) greedy exact-match accuracy."""
    loss = answer_loss(model, tokenizer, examples, seq_len, batch_size)
    if not accuracy:
        return EvalResult(loss=loss, accuracy=None)
    return EvalResult(loss, *exact_match_accuracy(model, tokenizer, examples, batch_size))


@torch.no_grad()
def answer_loss(
    model: nn.Module, tokenizer: object, examples: Sequence[Example], seq_len: int, batch_size: int = 16
) -> float:
    """Mean teacher-forced cross-entropy per answer token.

    The model is asked for logits only at the positions that predict an answer token in some row
    (``logits_to_keep``): the LM head and its softmax over the whole vocabulary are a large share of
    a small model's evaluation (SmolLM2's 49152 x 576 head is 28M of the full model's 135M
    parameters and most of a 4-layer stage's), and the prompt's positions are two thirds of a row.
    The right-padding mask is dropped as in training (:func:`causal_batch`); neither changes the
    loss beyond float rounding.
    """
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = causal_batch(encode_batch(tokenizer, examples[start : start + batch_size], seq_len))
        shifted = batch.pop("labels")[:, 1:]  # position p predicts token p + 1
        keep = (shifted != -100).any(dim=0).nonzero().flatten()
        logits = model(**batch, logits_to_keep=keep).logits
        labels = shifted[:, keep]
        mask = labels != -100
        loss_sum += float(torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum"))
        tokens += int(mask.sum())
    return loss_sum / max(tokens, 1)


@torch.no_grad()
def exact_match_accuracy(
    model: nn.Module, tokenizer: object, examples: Sequence[Example], batch_size: int = 16
) -> tuple[float, dict[str, float]]:
    """Greedy exact-match accuracy, overall and per task family.

    Generation stops at EOS or two tokens past the longest reference answer: a longer output
    cannot match exactly, so generating further would only cost time.
    """
    model.eval()
    hits: dict[str, list[bool]] = {}
    longest = max(len(tokenizer(ex.output, add_special_tokens=False).input_ids) for ex in examples)  # type: ignore[operator]
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = encode_prompts(tokenizer, chunk)
        out = model.generate(
            **prompts,
            max_new_tokens=longest + 2,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        )
        answers = tokenizer.batch_decode(out[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]
        for answer, ex in zip(answers, chunk, strict=True):
            hits.setdefault(ex.task, []).append(normalize_answer(answer) == normalize_answer(ex.output))
    overall = sum(sum(h) for h in hits.values()) / max(len(examples), 1)
    return overall, {task: sum(h) / len(h) for task, h in sorted(hits.items())}
