"""Canonical LoRA state: init, get/set, split/join, byte counting, transfer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from devft_edge.errors import ConfigError
from devft_edge.lora import (
    LoraSettings,
    attach_lora,
    get_lora_state,
    init_lora_state,
    join_layers,
    lora_applied,
    lora_shapes,
    set_lora_state,
    split_layers,
    state_bytes,
)
from devft_edge.transfer import transfer_lora


def test_shapes_and_init(tiny):
    settings = LoraSettings(rank=4)
    shapes = lora_shapes(tiny, settings)
    assert len(shapes) == 8 * 7
    assert shapes["layers.0.self_attn.k_proj"] == (64, 32)  # 2 kv heads x 16
    state = init_lora_state(shapes, 4, seed=3)
    a = state["layers.0.self_attn.k_proj.lora_A"]
    assert a.shape == (4, 64) and a.abs().max() <= 1 / 8
    assert state["layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)
    assert not state["layers.0.self_attn.k_proj.lora_B"].any()
    assert torch.equal(a, init_lora_state(shapes, 4, seed=3)["layers.0.self_attn.k_proj.lora_A"])


def test_get_set_roundtrip_and_errors(tiny):
    settings = LoraSettings(rank=4)
    model = attach_lora(tiny, settings)
    state = init_lora_state(lora_shapes(tiny, settings), 4, seed=1)
    state = {k: v + 0.5 for k, v in state.items()}
    set_lora_state(model, state)
    got = get_lora_state(model)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    bad = dict(state)
    bad["layers.0.self_attn.q_proj.lora_A"] = torch.zeros(3, 64)
    del bad["layers.1.mlp.up_proj.lora_B"]
    with pytest.raises(ConfigError) as err:
        set_lora_state(model, bad)
    assert "missing LoRA entry layers.1.mlp.up_proj.lora_B" in str(err.value)
    assert "layers.0.self_attn.q_proj.lora_A: shape (3, 64)" in str(err.value)


def test_lora_applied_is_undone(tiny):
    settings = LoraSettings(rank=2)
    ids = torch.tensor([[5, 6, 7]])
    before = tiny(ids).logits
    state = {k: torch.full_like(v, 0.1) for k, v in init_lora_state(lora_shapes(tiny, settings), 2, 0).items()}
    with lora_applied(tiny, settings, state) as adapted:
        assert not torch.allclose(adapted(ids).logits, before)
    torch.testing.assert_close(tiny(ids).logits, before, rtol=0, atol=0)


def test_split_join_and_bytes():
    state = {"layers.0.a.lora_A": torch.ones(2, 3), "layers.2.a.lora_A": torch.zeros(2, 3)}
    layers = split_layers(state)
    assert sorted(layers) == [0, 2] and torch.equal(layers[0]["a.lora_A"], torch.ones(2, 3))
    joined = join_layers(layers)
    assert joined.keys() == state.keys() and all(torch.equal(joined[k], state[k]) for k in state)
    assert state_bytes(state) == len(save(state))
    with pytest.raises(ConfigError, match="canonical"):
        split_layers({"bad": torch.ones(1)})


def test_transfer_copies_representative_into_members():
    stage = {
        "layers.0.q.lora_A": torch.tensor([[1.0, 2.0]]),
        "layers.0.q.lora_B": torch.tensor([[3.0]]),
        "layers.1.q.lora_A": torch.tensor([[4.0, 5.0]]),
        "layers.1.q.lora_B": torch.tensor([[6.0]]),
    }
    full = transfer_lora(stage, [[0, 1, 2], [3, 4]])
    assert sorted({k.split(".")[1] for k in full}) == ["0", "1", "2", "3", "4"]
    for j in (0, 1, 2):
        assert torch.equal(full[f"layers.{j}.q.lora_A"], stage["layers.0.q.lora_A"])
        assert torch.equal(full[f"layers.{j}.q.lora_B"], stage["layers.0.q.lora_B"])
    for j in (3, 4):
        assert torch.equal(full[f"layers.{j}.q.lora_A"], stage["layers.1.q.lora_A"])
    full["layers.1.q.lora_A"].add_(1)  # copies, not views of one tensor
    assert torch.equal(full["layers.0.q.lora_A"], stage["layers.0.q.lora_A"])
    with pytest.raises(ConfigError, match="groups"):
        transfer_lora(stage, [[0], [1], [2]])


def test_fresh_lora_depends_on_the_seed_and_shapes_not_their_order():
    """A state read back from safetensors lists its modules sorted, a model in layer order: FLoRA's
    fresh LoRA must be the same either way, or a fleet and a simulation train from different A."""
    from devft_edge.lora import init_lora_state

    shapes = {f"layers.{i}.self_attn.{m}": (8 + i, 4) for i in (0, 2, 10) for m in ("q_proj", "v_proj")}
    forward = init_lora_state(shapes, 4, seed=3)
    backward = init_lora_state(dict(reversed(shapes.items())), 4, seed=3)
    assert list(forward) != list(backward) and all(torch.equal(forward[k], backward[k]) for k in forward)
    assert not torch.equal(
        forward["layers.0.self_attn.q_proj.lora_A"], init_lora_state(shapes, 4, 4)["layers.0.self_attn.q_proj.lora_A"]
    )
