"""Local training: dropping a right-padding mask changes no loss or gradient, only memory; the
held-out loss from answer-position logits is the model's own answer loss."""

from __future__ import annotations

import pytest
import torch

from devft_edge.data import encode_batch, train_eval_split
from devft_edge.lora import LoraSettings, attach_lora
from devft_edge.models import load_model
from devft_edge.training import causal_batch, evaluate


def _right_padded(vocab: int) -> dict[str, torch.Tensor]:
    """Three rows of 12, 7 and 3 real tokens, right-padded to 16, labels -100 on the pads."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 16), generator=generator)
    mask = torch.zeros_like(input_ids)
    for row, n in enumerate((12, 7, 3)):
        mask[row, :n] = 1
    labels = torch.where(mask == 1, input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def test_only_a_right_padding_mask_is_dropped() -> None:
    batch = _right_padded(100)
    assert set(causal_batch(batch)) == {"input_ids", "labels"}
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    assert causal_batch(left) is left
    holes = batch["attention_mask"].clone()
    holes[0, 3] = 0
    assert "attention_mask" in causal_batch({**batch, "attention_mask": holes})
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert causal_batch(unmasked) is unmasked


def test_dropping_the_mask_keeps_loss_and_gradients(tiny) -> None:
    model = attach_lora(tiny, LoraSettings(rank=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the LoRA path a gradient through A as well
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(1))
    model.train()
    batch = _right_padded(model.config.vocab_size)
    results = []
    for inputs in (batch, causal_batch(batch)):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (masked_loss, masked), (causal_loss, causal) = results
    assert torch.allclose(masked_loss, causal_loss, rtol=1e-5, atol=1e-6)
    assert masked.keys() == causal.keys() and masked
    for name, grad in masked.items():
        assert torch.allclose(grad, causal[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_evaluate_keeps_only_answer_logits_and_the_same_loss(family: str, tokenizer) -> None:
    """The loss from the kept positions (``logits_to_keep``) equals the model's full-logits loss over
    the answer tokens, in one batch or in several (token-weighted), through peft's wrapper, for two
    families whose forward takes ``logits_to_keep`` by different code."""
    model = attach_lora(load_model(f"tiny-{family}"), LoraSettings(rank=4))
    _, held_out = train_eval_split(8, 7, seed=3)
    with torch.no_grad():
        reference = float(model(**encode_batch(tokenizer, held_out, 64)).loss)
    for batch_size in (7, 3):
        result = evaluate(model, tokenizer, held_out, 64, batch_size=batch_size, accuracy=False)
        assert result.loss == pytest.approx(reference, rel=1e-5)
        assert result.accuracy is None
