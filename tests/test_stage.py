"""The stage pipeline shared by the simulator and the aggregator: groups with kept ends, the
transfer rule both ways, and healing with its on-disk cache."""

from __future__ import annotations

import pytest
import torch

from devft_edge.calibration import calibration_ids
from devft_edge.errors import ConfigError
from devft_edge.healing import HealSettings
from devft_edge.lora import LoraSettings, init_lora_state, lora_shapes
from devft_edge.stage import StageBuilder, StageRecipe

LORA = LoraSettings(rank=4)
HEAL = HealSettings(steps=5, prompts=8, new_tokens=4, batch=2)


def _builder(tiny, tokenizer, recipe, cache_dir=None, seed=0):
    return StageBuilder(tiny, tokenizer, LORA, recipe, calibration_ids(tokenizer), "tiny", seed, cache_dir=cache_dir)


def _full(tiny):
    return init_lora_state(lora_shapes(tiny, LORA), LORA.rank, seed=0)


def test_keep_ends_keeps_first_and_last_layers_unfused(tiny, tokenizer):
    builder = _builder(tiny, tokenizer, StageRecipe(keep_ends=1))
    groups = builder.groups(1, 4, _full(tiny))
    assert groups[0] == [0] and groups[-1] == [7] and len(groups) == 4
    assert sorted(j for g in groups for j in g) == list(range(8))
    assert builder.groups(2, 8, _full(tiny)) == [[j] for j in range(8)]  # full depth: singletons
    two = _builder(tiny, tokenizer, StageRecipe(keep_ends=2)).groups(1, 5, _full(tiny))
    assert two[:2] == [[0], [1]] and two[-2:] == [[6], [7]] and two[2] == [2, 3, 4, 5]
    with pytest.raises(ConfigError, match="cannot keep 2 layers at each end"):
        _builder(tiny, tokenizer, StageRecipe(keep_ends=2)).groups(1, 4, _full(tiny))


def test_open_contracts_and_close_expands_with_the_recipes_rule(tiny, tokenizer):
    builder = _builder(tiny, tokenizer, StageRecipe(transfer="inv_n"))
    full = _full(tiny)
    stage = builder.open(1, 4, full)
    assert len(stage.groups) == 4 and stage.heal is None
    trained = {k: v + 0.5 if k.endswith("lora_B") else v for k, v in stage.start.items()}
    back = builder.expand(trained, stage.groups)
    for g, members in enumerate(stage.groups):
        for j in members:
            torch.testing.assert_close(
                back[f"layers.{j}.self_attn.q_proj.lora_B"],
                trained[f"layers.{g}.self_attn.q_proj.lora_B"] / len(members),
            )


def test_heal_runs_once_then_comes_from_the_cache(tiny, tokenizer, tmp_path):
    recipe = StageRecipe(heal=HEAL)
    first = _builder(tiny, tokenizer, recipe, tmp_path).open(1, 4, _full(tiny))
    assert first.heal is not None and not first.heal_cached and first.heal.seconds > 0
    again = _builder(tiny, tokenizer, recipe, tmp_path).open(1, 4, _full(tiny))
    assert again.heal_cached and again.heal.seconds == first.heal.seconds
    assert not list(tmp_path.rglob("heal-*.json"))  # figures live in the tensor file: one atomic rename, never torn
    for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    unhealed = _builder(tiny, tokenizer, StageRecipe()).open(1, 4, _full(tiny)).model
    assert not all(torch.equal(a, b) for a, b in zip(first.model.parameters(), unhealed.parameters(), strict=True))
    other_base = _builder(_tiny(1), tokenizer, recipe, tmp_path)
    assert other_base.fingerprint != _builder(tiny, tokenizer, recipe, tmp_path).fingerprint  # a new base heals anew
    full_depth = _builder(tiny, tokenizer, recipe, tmp_path).open(2, 8, _full(tiny))
    assert full_depth.heal is None  # nothing is fused at full depth


def _tiny(seed):
    from devft_edge.models import load_model

    return load_model("tiny", seed=seed)


def test_recipe_validation_collects_problems():
    with pytest.raises(ConfigError) as err:
        StageRecipe(similarity="x", transfer="y", keep_ends=-1, beta=3.0)
    assert len(err.value.problems) == 4
