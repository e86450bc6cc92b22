"""The developmental stage schedule: how deep each stage's submodel is and how long it trains.

DevFT splits federated LoRA tuning of an ``L``-layer decoder into ``S`` stages whose submodels
grow in depth, ``L_1 < L_2 < ... < L_S = L``. The paper doubles the depth at every stage and ends
at the full model (4, 8, 16, 32 for a 32-layer model); for a depth that is not a multiple of
``2^(S-1)`` we round half up::

    L_s = ceil(L / 2^(S - s)),   s = 1..S          (L=30, S=4 -> 4, 8, 15, 30)

The round budget is split equally between stages (the paper publishes no other split); the
remainder goes to the last, deepest stages, one round each, because they have the most layers to
tune. A planner may replace the doubling capacities with its own (``capacities_override``), e.g.
to cap a stage at what the weakest device can train; the same rules apply to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

from devft_edge.errors import ConfigError, raise_if


def doubling_capacities(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Paper schedule ``L_s = ceil(L / 2^(S-s))`` for ``s = 1..S``, in exact integer maths."""
    return tuple(-(-num_layers // 2 ** (num_stages - s)) for s in range(1, num_stages + 1))


def _capacity_problems(caps: tuple[int, ...], num_layers: int, what: str) -> list[str]:
    """Every reason ``caps`` is not a valid stage-depth sequence for an ``num_layers`` model."""
    problems: list[str] = []
    if any(not 1 <= c <= num_layers for c in caps):
        problems.append(f"{what} {caps} must each lie between 1 and num_layers={num_layers}")
    if any(b <= a for a, b in pairwise(caps)):
        problems.append(f"{what} {caps} must be strictly increasing (each stage deeper than the last)")
    if caps and caps[-1] != num_layers:
        problems.append(f"{what} {caps} must end at num_layers={num_layers} (the last stage is full depth)")
    return problems


ROUND_SPLITS = ("equal", "depth")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StageSchedule:
    """Stage depths and round split of one DevFT run; validated on construction."""

    num_layers: int
    """Decoder layers of the full model (``L``)."""
    num_stages: int
    """Developmental stages (``S``); the paper uses 4."""
    total_rounds: int
    """Federated rounds over all stages together."""
    capacities_override: tuple[int, ...] | None = None
    """Stage depths chosen by a planner instead of the doubling rule; one per stage, strictly
    increasing, each in ``[1, L]``, the last equal to ``L``."""
    round_split: str = "equal"
    """How the rounds are shared out: ``equal`` (the paper) or ``depth`` (in proportion to each
    stage's depth, at least one each: deeper, costlier stages get more of the budget)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        for field in ("num_layers", "num_stages", "total_rounds"):
            if not _is_int(getattr(self, field)):
                problems.append(f"{field} must be an int, got {getattr(self, field)!r}")
        if self.round_split not in ROUND_SPLITS:
            problems.append(f"round_split must be one of {', '.join(ROUND_SPLITS)}, got {self.round_split!r}")
        raise_if(problems)
        if self.num_layers < 1:
            problems.append(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_stages < 1:
            problems.append(f"num_stages must be >= 1, got {self.num_stages}")
        if self.num_stages > self.num_layers:
            problems.append(
                f"num_stages={self.num_stages} exceeds num_layers={self.num_layers}: "
                "stage depths cannot strictly increase"
            )
        if self.total_rounds < self.num_stages:
            problems.append(
                f"total_rounds={self.total_rounds} is less than num_stages={self.num_stages}: "
                "every stage needs at least one round"
            )
        if self.num_layers >= 1 and self.num_stages >= 1:
            if self.capacities_override is None:
                caps = doubling_capacities(self.num_layers, self.num_stages)
                problems += _capacity_problems(caps, self.num_layers, "capacities")
            else:
                override = tuple(self.capacities_override)
                if not all(_is_int(c) for c in override):
                    problems.append(f"capacities_override {override} must hold ints")
                else:
                    if len(override) != self.num_stages:
                        problems.append(
                            f"capacities_override {override} has {len(override)} entries, "
                            f"expected num_stages={self.num_stages}"
                        )
                    problems += _capacity_problems(override, self.num_layers, "capacities_override")
                object.__setattr__(self, "capacities_override", override)
        raise_if(problems)

    @property
    def capacities(self) -> tuple[int, ...]:
        """Submodel depth ``L_s`` of each stage, shallowest first; the last is ``L``."""
        if self.capacities_override is not None:
            return self.capacities_override
        return doubling_capacities(self.num_layers, self.num_stages)

    @property
    def rounds_per_stage(self) -> tuple[int, ...]:
        """Rounds of each stage.

        ``equal``: an equal split, the remainder one each to the deepest stages. ``depth``: shares
        proportional to the stage depths, floored (at least 1), the rounds left over going to the
        largest remainders (the deeper stage on a tie).
        """
        if self.round_split == "equal":
            base, extra = divmod(self.total_rounds, self.num_stages)
            return tuple(base + (s >= self.num_stages - extra) for s in range(self.num_stages))
        caps = self.capacities
        shares = [self.total_rounds * c / sum(caps) for c in caps]
        rounds = [max(1, math.floor(x)) for x in shares]
        by_remainder = sorted(range(len(caps)), key=lambda s: (shares[s] - rounds[s], s), reverse=True)
        for s in by_remainder[: max(0, self.total_rounds - sum(rounds))]:
            rounds[s] += 1
        while sum(rounds) > self.total_rounds:  # the minimum of 1 overshot: take from the largest
            rounds[max(range(len(rounds)), key=lambda s: (rounds[s], -s))] -= 1
        return tuple(rounds)

    def stage_of_round(self, r: int) -> int:
        """0-based stage that 0-based round ``r`` belongs to."""
        if not _is_int(r) or not 0 <= r < self.total_rounds:
            raise ConfigError(f"round {r!r} outside 0..{self.total_rounds - 1}")
        end = 0
        for stage, n in enumerate(self.rounds_per_stage):
            end += n
            if r < end:
                return stage
        raise AssertionError("unreachable: rounds_per_stage sums to total_rounds")


DEFAULT_MIN_DELTA = 0.01
"""Smallest eval-loss decrease that counts as progress for the adaptive stage advance."""


@dataclass
class Plateau:
    """The adaptive stage advance: a stage ends once its eval loss has not improved by ``min_delta``
    for ``patience`` evaluations (its unused rounds go to the next stage); patience 0 = never.

    Plain data (``dataclasses.asdict``), so the aggregator checkpoints it with the run.
    """

    patience: int
    min_delta: float = DEFAULT_MIN_DELTA
    best: float = float("inf")
    stale: int = 0

    def reached(self, eval_loss: float | None) -> bool:
        """Record one round's eval loss (None = not evaluated); True once the stage should end."""
        if self.patience == 0 or eval_loss is None:
            return False
        if eval_loss < self.best - self.min_delta:
            self.best, self.stale = eval_loss, 0
        else:
            self.best, self.stale = min(self.best, eval_loss), self.stale + 1
        return self.stale >= self.patience
