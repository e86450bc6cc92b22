"""Option parsers and helpers that several command groups share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
    """What ``build_parser`` hands each group's ``add_*`` function."""


def beta(text: str) -> float | str:
    """``--beta``: a DBLF beta, or ``auto``."""
    return text if text == "auto" else float(text)


def add_delivery_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--delivery`` (``simulate`` and ``demo``)."""
    p.add_argument(
        "--delivery",
        choices=["stage_packs", "full_pack"],  # devft_edge.pack_size.DELIVERIES, without importing torch here
        default=default,
        help="a pack per stage, or the full pack once and a signed stage plan per stage (devices fuse)",
    )


RECIPE_OPTIONS = ("similarity", "grouping", "fusion", "beta", "transfer", "keep_ends")
"""The stage-recipe options (``StageRecipe`` fields) that ``simulate`` and ``pack`` both take."""


def recipe_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stage-recipe options among ``args``, by ``StageRecipe`` field name."""
    return {name: getattr(args, name) for name in RECIPE_OPTIONS}
