"""The round policy in process, with injected clocks: selection, waiting, quorum, deadline, reselection."""

from __future__ import annotations

from cloud_aggregator.rounds import Outcome, RoundPolicy, RoundRules
from cloud_aggregator.state import Accepted, OpenRound

RULES = RoundRules(per_round=3, quorum=2, round_timeout_s=60.0, selection_wait_s=30.0, seed=7)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _policy() -> tuple[RoundPolicy, Clock]:
    clock = Clock()
    return RoundPolicy(RULES, clock=clock, wall=clock), clock


def _accepted(*devices: str) -> dict[str, Accepted]:
    return {d: Accepted(blob="0" * 64, num_samples=8, message_id=f"m-{d}", train_loss=1.0) for d in devices}


def test_selection_is_seeded_and_independent_of_hello_order() -> None:
    policy, _ = _policy()
    fleet = [f"pi-{i}" for i in range(10)]
    first = policy.select(fleet, round_index=4)
    assert first is not None and len(first) == 3 and first == sorted(first)
    assert policy.select(list(reversed(fleet)), round_index=4) == first
    assert any(policy.select(fleet, round_index=r) != first for r in range(5, 10))  # another round, another draw


def test_too_few_devices_wait_then_go_on_at_the_quorum_never_below_it() -> None:
    policy, clock = _policy()
    assert policy.select(["a", "b"], 0) is None
    clock.t += 29.0
    assert policy.select(["a", "b"], 0) is None
    clock.t += 2.0
    assert policy.select(["b", "a"], 0) == ["a", "b"]
    lonely, clock = _policy()
    clock.t += 10_000.0
    assert lonely.select(["a"], 0) is None and lonely.select(["a"], 0) is None


def test_a_round_closes_when_all_delivered_or_at_the_deadline_with_the_quorum() -> None:
    policy, clock = _policy()
    round_ = OpenRound(index=0, selected=["a", "b", "c"], tasks={}, deadline=policy.deadline())
    assert policy.outcome(round_) is Outcome.OPEN
    round_.accepted = _accepted("a")
    clock.t = round_.deadline
    assert policy.outcome(round_) is Outcome.RESELECT  # below the quorum at the deadline
    round_.accepted = _accepted("a", "b")
    clock.t = round_.deadline - 1
    assert policy.outcome(round_) is Outcome.OPEN
    clock.t = round_.deadline
    assert policy.outcome(round_) is Outcome.CLOSE
    round_.accepted = _accepted("a", "b", "c")
    clock.t = round_.deadline - 50
    assert policy.outcome(round_) is Outcome.CLOSE


def test_replacements_never_pick_a_device_that_failed_or_delivered() -> None:
    policy, _ = _policy()
    round_ = OpenRound(index=2, selected=["a", "b", "c"], tasks={}, deadline=0.0, accepted=_accepted("a"))
    extra = policy.replacements(round_, ["a", "b", "c", "d", "e", "f"])
    assert len(extra) == 2 and not set(extra) & {"a", "b", "c"}
    assert policy.replacements(round_, ["f", "e", "d", "c"]) == extra  # seeded, order-free
    assert policy.replacements(round_, ["b", "c"]) == []
