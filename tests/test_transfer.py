"""Transfer rules: a linear residual toy where the hand-over can be checked exactly, and the rules' algebra."""

from __future__ import annotations

import pytest
import torch

from devft_edge.errors import ConfigError, UnknownVariantError
from devft_edge.fusion import FUSIONS
from devft_edge.lora import split_layers
from devft_edge.transfer import TRANSFERS, transfer_lora

GROUPS = [[0, 1, 2], [3], [4, 5]]
SCALE = 2.0  # LoRA alpha / r


def _stage_state(n_groups: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for g in range(n_groups):
        state[f"layers.{g}.proj.lora_A"] = torch.randn(2, 5, generator=gen)
        state[f"layers.{g}.proj.lora_B"] = torch.randn(5, 2, generator=gen)
    return state


def _lora_output_change(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A linear residual toy, ``y = x + sum_i (W_i + s B_i A_i) x``: every layer adds to the residual
    stream from the same input (the first-order regime of a residual network). Returns the part of
    ``y`` that the LoRA adds, ``sum_i s B_i A_i x``."""
    change = torch.zeros_like(x)
    for layer in split_layers(state).values():
        change += SCALE * x @ (layer["proj.lora_B"] @ layer["proj.lora_A"]).T
    return change


def test_inv_n_transfer_keeps_the_submodels_output_change():
    stage, x = _stage_state(len(GROUPS)), torch.randn(7, 5)
    submodel_change = _lora_output_change(stage, x)
    full = TRANSFERS.get("inv_n").expand(stage, GROUPS)
    torch.testing.assert_close(_lora_output_change(full, x), submodel_change)
    # the paper's copy applies each group's change once per member
    copied = TRANSFERS.get("copy").expand(stage, GROUPS)
    per_group = [
        _lora_output_change({k: v for k, v in stage.items() if k.startswith(f"layers.{g}.")}, x) for g in range(3)
    ]
    torch.testing.assert_close(
        _lora_output_change(copied, x), sum(len(m) * c for m, c in zip(GROUPS, per_group, strict=True))
    )


@pytest.mark.parametrize("rule", ["copy", "inv_n"])
def test_contract_inverts_expand_for_the_same_groups(rule):
    stage = _stage_state(len(GROUPS))
    transfer = TRANSFERS.get(rule)
    back = transfer.contract(transfer.expand(stage, GROUPS), GROUPS, FUSIONS.get("dblf", beta=0.1))
    assert back.keys() == stage.keys()
    for key in stage:
        torch.testing.assert_close(back[key], stage[key])


def test_inv_n_refusion_does_not_double_the_effect():
    """Stage 1 fuses 6 layers into 2 groups; stage 2 regroups into 3. With inv_n the next
    representatives start from exactly what the full model applies; with copy, from n times it."""
    x = torch.randn(4, 5)
    stage1 = _stage_state(2, seed=1)
    first = [[0, 1, 2], [3, 4, 5]]
    second = [[0, 1], [2, 3], [4, 5]]
    fusion = FUSIONS.get("dblf", beta=0.1)
    inv_n = TRANSFERS.get("inv_n")
    full = inv_n.expand(stage1, first)
    start2 = inv_n.contract(full, [[0, 1], [2], [3], [4, 5]], fusion)  # groups inside old groups: exact
    torch.testing.assert_close(_lora_output_change(start2, x), _lora_output_change(full, x))
    # a group straddling two old groups mixes different A's: not exact, but of the right size
    start = inv_n.contract(full, second, fusion)
    ratio = _lora_output_change(start, x).norm() / _lora_output_change(full, x).norm()
    assert 0.5 < float(ratio) < 1.5
    copy = TRANSFERS.get("copy")
    copied = copy.contract(copy.expand(stage1, first), [[0, 1], [2], [3], [4, 5]], fusion)
    torch.testing.assert_close(
        _lora_output_change(copied, x), 4 / 6 * _lora_output_change(copy.expand(stage1, first), x)
    )


def test_dense_deltas_scale_like_lora_b():
    stage = {"layers.0.proj.delta": torch.ones(3, 3), "layers.1.proj.delta": 2 * torch.ones(3, 3)}
    full = TRANSFERS.get("inv_n").expand(stage, [[0, 1, 2, 3], [4]])
    torch.testing.assert_close(full["layers.2.proj.delta"], torch.full((3, 3), 0.25))
    torch.testing.assert_close(full["layers.4.proj.delta"], torch.full((3, 3), 2.0))


def test_registry_and_errors():
    assert TRANSFERS.names() == ["copy", "inv_n"]
    with pytest.raises(UnknownVariantError, match="copy, inv_n"):
        TRANSFERS.get("scaled")
    with pytest.raises(ConfigError, match="groups"):
        transfer_lora(_stage_state(2), GROUPS, "inv_n")
    full = transfer_lora(_stage_state(3), GROUPS, "copy")
    full["layers.1.proj.lora_A"].add_(1)  # copies, not views of one tensor
    assert not torch.equal(full["layers.0.proj.lora_A"], full["layers.1.proj.lora_A"])
