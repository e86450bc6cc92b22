"""Robust aggregation: no single update can dominate a round.

A device declares its sample count and uploads its update; the server can check neither the count
nor whether the update is honest. FedAvg weights by the declared count, so one device claiming
2**53 samples replaces the global model with its own. Two rules bound what one device can do:

- **weights**: each device's count is capped at ``weight_ratio`` times the median count of the
  *other* devices in the round, so no device weighs more than ``weight_ratio`` honest devices;
- **norms**: each update's change (update - round start) is scaled down to at most ``norm_ratio``
  times the median change norm of the other devices.

Leave-one-out medians, so a device cannot raise its own cap; with two devices each is capped by
the other. Honest rounds are unchanged while counts and norms stay within those ratios.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports the defaults; torch only where updates are clipped
    from torch import Tensor

__all__ = ["DEFAULT_NORM_RATIO", "DEFAULT_WEIGHT_RATIO", "clip_scales", "clipped", "robust_weights"]

DEFAULT_WEIGHT_RATIO = 2.0
"""A device weighs at most twice the median of the others' sample counts."""
DEFAULT_NORM_RATIO = 3.0
"""A device's change is at most three times the median of the others' change norms."""


def _others(values: Sequence[float], i: int) -> float | None:
    rest = [v for j, v in enumerate(values) if j != i]
    return statistics.median(rest) if rest else None


def robust_weights(counts: Sequence[int], ratio: float = DEFAULT_WEIGHT_RATIO) -> list[float]:
    """Aggregation weights: each declared count capped at ``ratio`` x the others' median count."""
    out = []
    for i, count in enumerate(counts):
        median = _others(counts, i)
        out.append(float(count if median is None else min(count, ratio * median)))
    return out


def clip_scales(norms: Sequence[float], ratio: float = DEFAULT_NORM_RATIO) -> list[float]:
    """Factor (<= 1) for each update's change so its norm is at most ``ratio`` x the others' median."""
    out = []
    for i, norm in enumerate(norms):
        median = _others(norms, i)
        bound = None if median is None or median <= 0 else ratio * median
        out.append(1.0 if bound is None or norm <= bound else bound / norm)
    return out


def clipped(update: Mapping[str, Tensor], start: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``start + scale * (update - start)``: the update with its change scaled."""
    if scale >= 1.0:
        return dict(update)
    return {k: start[k] + scale * (v - start[k]) for k, v in update.items()}
