"""Tests of the stage schedule: capacities, round split, stage lookup, validation."""

from __future__ import annotations

import pytest

from devft_edge.errors import ConfigError
from devft_edge.schedule import StageSchedule


@pytest.mark.parametrize(
    ("layers", "stages", "expected"),
    [
        (30, 4, (4, 8, 15, 30)),
        (32, 4, (4, 8, 16, 32)),
        (24, 3, (6, 12, 24)),
        (5, 1, (5,)),
        (40, 4, (5, 10, 20, 40)),
    ],
)
def test_capacities_known_answers(layers: int, stages: int, expected: tuple[int, ...]) -> None:
    assert StageSchedule(layers, stages, 100).capacities == expected


def test_rounds_split_remainder_goes_to_deepest_stages() -> None:
    assert StageSchedule(32, 4, 10).rounds_per_stage == (2, 2, 3, 3)
    assert StageSchedule(32, 4, 12).rounds_per_stage == (3, 3, 3, 3)
    assert StageSchedule(32, 4, 7).rounds_per_stage == (1, 2, 2, 2)


def test_stage_of_round() -> None:
    schedule = StageSchedule(32, 4, 10)  # rounds 2, 2, 3, 3
    assert [schedule.stage_of_round(r) for r in range(10)] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    for bad in (-1, 10):
        with pytest.raises(ConfigError):
            schedule.stage_of_round(bad)


def test_stages_exceeding_layers_rejected() -> None:
    with pytest.raises(ConfigError, match="num_stages=5 exceeds num_layers=4"):
        StageSchedule(4, 5, 10)


def test_non_increasing_capacities_named() -> None:
    with pytest.raises(ConfigError, match=r"\(1, 1, 2, 4\).*strictly increasing"):
        StageSchedule(4, 4, 10)


def test_rounds_fewer_than_stages_rejected() -> None:
    with pytest.raises(ConfigError, match="total_rounds=3"):
        StageSchedule(32, 4, 3)


def test_all_problems_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        StageSchedule(4, 5, 2)
    text = str(info.value)
    assert len(info.value.problems) >= 3
    assert "exceeds num_layers" in text
    assert "total_rounds=2" in text
    assert "strictly increasing" in text


def test_non_positive_values_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        StageSchedule(0, 0, 0)
    assert "num_layers must be >= 1" in str(info.value)
    assert "num_stages must be >= 1" in str(info.value)


def test_capacities_override_used_and_validated() -> None:
    schedule = StageSchedule(30, 3, 9, capacities_override=(6, 20, 30))
    assert schedule.capacities == (6, 20, 30)
    with pytest.raises(ConfigError) as info:
        StageSchedule(30, 3, 9, capacities_override=(6, 6, 29))
    text = str(info.value)
    assert "strictly increasing" in text and "must end at num_layers=30" in text
    with pytest.raises(ConfigError, match="between 1 and num_layers"):
        StageSchedule(30, 3, 9, capacities_override=(0, 10, 30))
    with pytest.raises(ConfigError, match="expected num_stages=3"):
        StageSchedule(30, 3, 9, capacities_override=(10, 30))


def test_schedule_is_frozen() -> None:
    schedule = StageSchedule(32, 4, 10)
    with pytest.raises(AttributeError):
        schedule.num_layers = 8  # type: ignore[misc]


def test_depth_round_split_follows_stage_depth():
    assert StageSchedule(30, 4, 12, round_split="depth").rounds_per_stage == (1, 2, 3, 6)
    assert StageSchedule(30, 2, 12, round_split="depth").rounds_per_stage == (4, 8)
    for layers, stages, rounds in [(30, 4, 4), (30, 4, 5), (8, 3, 7), (30, 3, 100), (12, 5, 9)]:
        split = StageSchedule(layers, stages, rounds, round_split="depth").rounds_per_stage
        assert sum(split) == rounds and min(split) >= 1
        assert list(split) == sorted(split), split  # deeper stages never get fewer rounds


def test_unknown_round_split_is_refused():
    with pytest.raises(ConfigError, match="round_split"):
        StageSchedule(30, 4, 12, round_split="random")
