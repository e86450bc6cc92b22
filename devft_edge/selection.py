"""Client selection: which clients train a round, the same rule in the simulator and the aggregator.

The draw is seeded by the run's seed and the round index only, over the eligible clients in
natural order (``dev-2`` before ``dev-10``; client indices in the simulator). It needs no random
state carried between rounds, so a restarted aggregator draws what it would have drawn, and it
does not depend on the order in which devices said hello. A fleet whose device ids sort like the
simulator's client indices (``devft-edge demo``: ``dev-<i>-<profile>``) selects the same clients
as a simulation with the same seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T", str, int)


def natural_key(client: str | int) -> tuple[object, ...]:
    """Sort key that orders the digit runs of an id by value (``dev-2`` < ``dev-10``)."""
    if isinstance(client, int):
        return (client,)
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", client))


def select_clients(eligible: Sequence[T], count: int, seed: int, round_index: int) -> list[T]:
    """``min(count, len(eligible))`` clients drawn for round ``round_index``, in natural order."""
    ordered = sorted(eligible, key=natural_key)
    rng = random.Random(f"{seed}/{round_index}")
    return sorted(rng.sample(ordered, min(count, len(ordered))), key=natural_key)


def training_seed(seed: int, round_index: int, client: int) -> int:
    """The torch seed client ``client`` trains round ``round_index`` with (dropout, any sampling)."""
    return seed * 1_000_003 + round_index * 1009 + client


def data_seed(seed: int, client: int) -> int:
    """The seed of client ``client``'s endless batch stream (:func:`devft_edge.data.batches`)."""
    return seed * 7919 + client
