"""The round policy: who trains a round, when it closes, and who replaces a device that failed.

Pure decisions over device ids, the open round and two injected clocks, so they are unit-tested
in process (``tests/test_rounds.py``) and the service only acts on them: it checkpoints, sends
tasks and closes rounds. Selection is the simulator's rule (:mod:`devft_edge.selection`): seeded by
the run's seed and the round index over the eligible ids in natural order, so it does not depend on
the order in which devices said hello.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from cloud_aggregator.state import OpenRound, now
from devft_edge.selection import select_clients

logger = logging.getLogger(__name__)


class Outcome(str, Enum):
    """What an open round needs now."""

    OPEN = "open"  # waiting for updates
    CLOSE = "close"  # every selected device delivered, or the deadline came with the quorum
    RESELECT = "reselect"  # the deadline came below the quorum: replace the devices that failed


@dataclass(frozen=True)
class RoundRules:
    """The configuration the policy follows (``AggregatorConfig``'s fields of the same names)."""

    per_round: int
    quorum: int
    round_timeout_s: float
    selection_wait_s: float
    seed: int


class RoundPolicy:
    """Selection, quorum, deadline and reselection of one run's rounds."""

    def __init__(
        self, rules: RoundRules, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = now
    ) -> None:
        """``clock`` measures waiting (monotonic); ``wall`` stamps deadlines, which are checkpointed."""
        self.rules, self.clock, self.wall = rules, clock, wall
        self._waiting_since: float | None = None

    def select(self, eligible: Sequence[str], round_index: int) -> list[str] | None:
        """The devices to train round ``round_index``, or None to wait for more.

        With fewer than ``per_round`` eligible devices it waits ``selection_wait_s`` (from the
        first time it saw too few), then goes on with those it has if they reach the quorum.
        """
        rules = self.rules
        if len(eligible) < rules.per_round:
            if self._waiting_since is None:
                self._waiting_since = self.clock()
                logger.info(
                    "round %d: %d eligible devices online, waiting for %d", round_index, len(eligible), rules.per_round
                )
            waited = self.clock() - self._waiting_since
            if len(eligible) < rules.quorum or waited < rules.selection_wait_s:
                return None
            logger.warning(
                "round %d: only %d of %d devices after %.0f s; going on with them",
                round_index,
                len(eligible),
                rules.per_round,
                waited,
            )
        self._waiting_since = None
        return select_clients(eligible, rules.per_round, rules.seed, round_index)

    def deadline(self) -> float:
        """Wall-clock deadline of a round (or a reselection) starting now."""
        return self.wall() + self.rules.round_timeout_s

    def outcome(self, round_: OpenRound) -> Outcome:
        """Close when every selected device delivered (and that reaches the quorum); at the
        deadline close with the quorum or replace the devices that failed."""
        delivered, quorum = len(round_.accepted), self.rules.quorum
        if delivered >= quorum and delivered == len(round_.selected):
            return Outcome.CLOSE
        if self.wall() < round_.deadline:
            return Outcome.OPEN
        if delivered >= quorum:
            logger.warning(
                "round %d: deadline with %d of %d updates; closing at quorum",
                round_.index,
                delivered,
                len(round_.selected),
            )
            return Outcome.CLOSE
        logger.warning(
            "round %d: deadline with %d updates (< quorum %d); selecting again", round_.index, delivered, quorum
        )
        return Outcome.RESELECT

    def replacements(self, round_: OpenRound, eligible: Sequence[str]) -> list[str]:
        """Devices to add to ``round_`` in place of those selected that did not deliver (never one
        of those again, nor one that delivered), seeded by the round and how many have failed."""
        failed = frozenset(d for d in round_.selected if d not in round_.accepted)
        candidates = sorted(d for d in eligible if d not in failed and d not in round_.accepted)
        needed = self.rules.per_round - len(round_.accepted)
        rng = random.Random(f"{self.rules.seed}/{round_.index}/retry/{len(failed)}")
        return sorted(rng.sample(candidates, min(needed, len(candidates))))
