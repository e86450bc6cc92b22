"""Tests of the layer-similarity variants and of collecting layer outputs from a HF model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from devft_edge import similarity as sim_mod
from devft_edge.errors import ConfigError, UnknownVariantError
from devft_edge.similarity import SIMILARITIES, LayerEvidence, collect_layer_outputs


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_registry_names_and_defaults() -> None:
    assert SIMILARITIES.names() == ["cka", "weights"]
    assert SIMILARITIES.get("weights").needs == "params"
    assert SIMILARITIES.get("cka").needs == "outputs"
    with pytest.raises(UnknownVariantError, match="known: cka, weights"):
        SIMILARITIES.get("euclid")


def test_weight_cosine_hand_computed() -> None:
    # flattened (names sorted a, b): [1, 0, 2], [0, 1, 2], [1, 1, 0]
    params = [
        {"b": _t(2.0), "a": _t(1.0, 0.0)},
        {"a": _t(0.0, 1.0), "b": _t(2.0)},
        {"a": _t(1.0, 1.0), "b": _t(0.0)},
    ]
    w = SIMILARITIES.get("weights").compute(LayerEvidence(params=params))
    c = 1 / math.sqrt(10)
    expected = torch.tensor([[1.0, 0.8, c], [0.8, 1.0, c], [c, c, 1.0]], dtype=torch.float64)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)


def test_weight_cosine_clips_negatives_and_zero_norm() -> None:
    params = [{"a": _t(1.0, 0.0)}, {"a": _t(-1.0, 0.5)}, {"a": _t(0.0, 0.0)}]
    w = SIMILARITIES.get("weights").compute(LayerEvidence(params=params))
    expected = torch.eye(3, dtype=torch.float64)  # cos01 = -0.894 -> 0; zero layer -> 0
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


def test_weight_cosine_chunked_matches_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [{"w": torch.randn(7, 5, generator=gen) + i, "n": torch.randn(5, generator=gen)} for i in range(4)]
    monkeypatch.setattr(sim_mod, "_CHUNK_ELEMENTS", 12)  # 3 elements per chunk
    w = SIMILARITIES.get("weights").compute(LayerEvidence(params=params))
    flat = torch.stack([torch.cat([p["n"], p["w"].reshape(-1)]).double() for p in params])
    unit = flat / flat.norm(dim=1, keepdim=True)
    expected = (unit @ unit.T).clamp_min(0)
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    assert torch.equal(w, w.T)


def test_weight_cosine_rejects_mismatched_layers() -> None:
    params = [{"a": _t(1.0, 0.0)}, {"a": _t(1.0, 0.0, 3.0)}, {"b": _t(1.0, 0.0)}]
    with pytest.raises(ConfigError) as info:
        SIMILARITIES.get("weights").compute(LayerEvidence(params=params))
    assert len(info.value.problems) == 2


@pytest.mark.parametrize(("name", "field"), [("weights", "params"), ("cka", "outputs")])
def test_missing_evidence_names_the_field(name: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"needs layer {field}"):
        SIMILARITIES.get(name).compute(LayerEvidence())


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@pytest.mark.parametrize(("tokens", "hidden", "budget"), [(12, 16, 0), (64, 6, 1 << 26), (64, 6, 0)])
def test_cka_invariances_and_reference(tokens: int, hidden: int, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim_mod, "_GRAM_ELEMENTS", budget)  # budget 0 with tokens > hidden: pairwise path
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64))
    rotated = (2 * x.double() @ q + 3.0).float()  # scale, rotation, shift
    other = torch.randn(tokens, hidden, generator=gen) + 0.3 * x
    w = SIMILARITIES.get("cka").compute(LayerEvidence(outputs=[x, x.clone(), rotated, other]))
    assert w.shape == (4, 4) and w.dtype == torch.float64
    torch.testing.assert_close(w[0, 1], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(w[0, 2], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-6)
    ref = _reference_cka(x.double().numpy(), other.double().numpy())
    assert w[0, 3].item() == pytest.approx(ref, abs=1e-12)
    assert 0.0 < ref < 0.99
    assert torch.equal(w, w.T)
    assert torch.equal(w.diagonal(), torch.ones(4, dtype=torch.float64))


def test_cka_near_zero_for_independent_outputs() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(2000, 4, generator=gen), torch.randn(2000, 4, generator=gen)
    w = SIMILARITIES.get("cka").compute(LayerEvidence(outputs=[x, y]))
    assert 0.0 <= w[0, 1].item() < 0.02


def test_cka_rejects_token_mismatch() -> None:
    with pytest.raises(ConfigError, match="layer 1 output has 5 tokens"):
        SIMILARITIES.get("cka").compute(LayerEvidence(outputs=[torch.zeros(6, 3), torch.zeros(5, 3)]))


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def test_collect_layer_outputs_tiny_llama() -> None:
    model = _tiny_llama()
    model.train()
    captured: list[torch.Tensor] = []
    handle = model.model.layers[1].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    input_ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    outputs = collect_layer_outputs(model, input_ids)
    handle.remove()
    assert len(outputs) == 4
    assert all(o.shape == (10, 16) and o.dtype == torch.float32 for o in outputs)
    torch.testing.assert_close(outputs[1], captured[0].reshape(10, 16))
    assert model.training  # mode restored
    single = collect_layer_outputs(model, input_ids[0])
    assert [o.shape for o in single] == [(5, 16)] * 4
    skipped = collect_layer_outputs(model, input_ids, skip_tokens=1)
    assert [o.shape for o in skipped] == [(8, 16)] * 4
    expected = outputs[2].reshape(2, 5, 16)[:, 1:].reshape(8, 16)
    torch.testing.assert_close(skipped[2], expected)
    for bad in (-1, 5):
        with pytest.raises(ConfigError, match="skip_tokens"):
            collect_layer_outputs(model, input_ids, skip_tokens=bad)
    w = SIMILARITIES.get("cka").compute(LayerEvidence(outputs=outputs))
    assert w.shape == (4, 4) and bool(((w >= 0) & (w <= 1)).all())
