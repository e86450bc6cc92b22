"""The exported adapter loads with stock peft and reproduces the federation's model."""

from __future__ import annotations

import torch
from peft import PeftModel

from devft_edge.export import dense_to_lora, export_adapter, export_merged
from devft_edge.lora import LoraSettings, init_lora_state, lora_applied, lora_shapes
from devft_edge.models import load_model


def test_adapter_loads_with_stock_peft(tiny, tmp_path):
    settings = LoraSettings(rank=4)
    state = {k: torch.randn_like(v) * 0.05 for k, v in init_lora_state(lora_shapes(tiny, settings), 4, 0).items()}
    ids = torch.tensor([[3, 4, 5, 6]])
    with lora_applied(tiny, settings, state) as adapted, torch.no_grad():
        want = adapted(ids).logits
    export_adapter(tiny, settings, state, tmp_path / "adapter")
    fresh = load_model("tiny", seed=0)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    export_merged(tiny, settings, state, tmp_path / "merged")
    merged = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_dense_update_becomes_exact_lora():
    settings = LoraSettings(rank=2, alpha=4.0)
    delta = {"layers.0.q.delta": torch.randn(6, 3) @ torch.randn(3, 5)}  # rank 3 > LoRA rank
    lora = {"layers.0.q.lora_A": torch.zeros(2, 5), "layers.0.q.lora_B": torch.zeros(6, 2)}
    state, new_settings = dense_to_lora(delta, lora, settings)
    assert new_settings.rank == 3 and new_settings.scaling == 1.0
    product = state["layers.0.q.lora_B"] @ state["layers.0.q.lora_A"]
    torch.testing.assert_close(product, 2.0 * delta["layers.0.q.delta"], rtol=1e-4, atol=1e-4)
