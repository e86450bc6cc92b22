"""Named method presets: the project's defaults, and the paper's literal DevFT.

A preset fixes every choice that makes up "the method" beyond the federation itself: how stages
are built (:class:`~devft_edge.stage.StageRecipe`), how the round budget is split, how many local
steps each stage's rounds take and the stage depths. Options given explicitly override the
preset, so ``--preset paper --transfer inv_n`` is the paper with one change (an ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from devft_edge.errors import ConfigError
from devft_edge.healing import HealSettings
from devft_edge.stage import PAPER_RECIPE, StageRecipe

__all__ = ["PRESETS", "MethodSettings", "method_settings"]


@dataclass(frozen=True)
class MethodSettings:
    """Everything a preset decides."""

    recipe: StageRecipe
    round_split: str
    stage_steps: str
    capacities: tuple[int, ...] | None = None


def _simulation_default(name: str) -> object:
    from devft_edge.simulator import SimulationConfig

    return next(f.default for f in fields(SimulationConfig) if f.name == name)


def _presets() -> dict[str, MethodSettings]:
    return {
        "default": MethodSettings(
            recipe=StageRecipe(),
            round_split=str(_simulation_default("round_split")),
            stage_steps=str(_simulation_default("stage_steps")),
        ),
        "paper": MethodSettings(recipe=PAPER_RECIPE, round_split="equal", stage_steps="fixed"),
    }


PRESETS = ("default", "paper")


def method_settings(
    preset: str,
    *,
    similarity: str | None = None,
    grouping: str | None = None,
    fusion: str | None = None,
    beta: float | str | None = None,
    transfer: str | None = None,
    keep_ends: int | None = None,
    heal: str | None = None,
    heal_steps: int | None = None,
    heal_rank: int | None = None,
    round_split: str | None = None,
    stage_steps: str | None = None,
    capacities: str | None = None,
) -> MethodSettings:
    """The preset's settings with every option that is not None applied on top (validated)."""
    table = _presets()
    if preset not in table:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = table[preset]
    recipe_changes = {
        k: v
        for k, v in dict(
            similarity=similarity, grouping=grouping, fusion=fusion, beta=beta, transfer=transfer, keep_ends=keep_ends
        ).items()
        if v is not None
    }
    heal_settings = base.recipe.heal
    if heal == "off":
        heal_settings = None
    elif heal is not None:
        heal_settings = replace(heal_settings or HealSettings(), mode=heal)  # type: ignore[arg-type]
    if heal_settings is not None:
        tweaks = {k: v for k, v in dict(steps=heal_steps, rank=heal_rank).items() if v is not None}
        heal_settings = replace(heal_settings, **tweaks)  # type: ignore[arg-type]
    elif heal_steps is not None or heal_rank is not None:
        raise ConfigError("--heal-steps and --heal-rank need healing on (--heal bake|adapter)")
    caps = base.capacities
    if capacities is not None:
        try:
            caps = tuple(int(c) for c in capacities.split(","))
        except ValueError:
            raise ConfigError(f"capacities must be comma-separated integers, got {capacities!r}") from None
    return MethodSettings(
        recipe=replace(base.recipe, heal=heal_settings, **recipe_changes),  # type: ignore[arg-type]
        round_split=round_split or base.round_split,
        stage_steps=stage_steps or base.stage_steps,
        capacities=caps,
    )
