"""The server half both engines share (``devft_edge.federation``): the stage budget's decisions."""

from __future__ import annotations

from dataclasses import asdict

from devft_edge.federation import StageBudget
from devft_edge.schedule import Plateau


def test_a_stage_ends_when_its_budget_is_spent_and_leaves_nothing():
    budget = StageBudget(3, Plateau(0))
    assert [budget.ends(done, 1.0, last=False) for done in (1, 2, 3)] == [None, None, 0]


def test_a_plateau_ends_a_stage_early_and_its_rounds_carry_over():
    budget = StageBudget(5, Plateau(1, min_delta=0.01))
    assert budget.ends(1, 2.0, last=False) is None  # progress
    assert budget.ends(2, 1.995, last=False) == 3  # no progress by 0.01: 3 rounds left over
    assert budget.rounds == 2  # cut to what it ran (a restart sees the stage as closed)


def test_the_last_stage_runs_its_whole_budget_and_a_skipped_eval_is_no_evidence():
    last = StageBudget(3, Plateau(1))
    assert [last.ends(done, 5.0, last=True) for done in (1, 2, 3)] == [None, None, 0]
    waiting = StageBudget(4, Plateau(1))
    assert waiting.ends(1, None, last=False) is None and waiting.ends(2, None, last=False) is None


def test_a_budget_survives_a_checkpoint():
    """The aggregator keeps ``rounds`` and the plateau as plain JSON and rebuilds the budget."""
    budget = StageBudget(4, Plateau(2))
    budget.ends(1, 3.0, last=False)
    restored = StageBudget(budget.rounds, Plateau(**asdict(budget.plateau)))
    assert restored.ends(2, 3.0, last=False) is None and restored.ends(3, 3.0, last=False) == 1
