"""Named method presets: the project's defaults, and the paper's literal DevFT.

A preset fixes every choice that makes up "the method" beyond the federation itself: how stages
are built (:class:`~devft_edge.stage.StageRecipe`), how the round budget is split, how many local
steps each stage's rounds take and the stage depths. It is a partial run configuration (field
name -> value, nested like the YAML), applied over the defaults and under the options given
explicitly, so ``--preset paper --transfer inv_n`` is the paper with one change (an ablation).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from devft_edge.errors import ConfigError
from devft_edge.stage import PAPER_RECIPE

__all__ = ["PRESETS", "preset_data"]

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"round_split": "equal", "stage_steps": "fixed", "capacities": None, "recipe": asdict(PAPER_RECIPE)},
}
"""Preset name -> the run-configuration values it sets (``default``: none, the fields' defaults)."""


def preset_data(name: str) -> dict[str, Any]:
    """The run-configuration values preset ``name`` sets.

    Raises:
        ConfigError: ``name`` is not a preset.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
