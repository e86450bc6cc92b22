"""The server half of a federated run, written once for the simulator and the aggregator.

Both engines drive the same decisions; only how clients are reached differs (in process, or
tasks and updates over MQTT):

- :meth:`Federation.open_stage`: the stage builder opens the stage from the full model's state;
  FLoRA's merged update is fused like the LoRA; the stage gets its round budget (its share plus
  what earlier stages left) and its local steps (``stage_steps``);
- :meth:`Federation.aggregate`: the rule's streaming aggregation, seeded per round;
- :meth:`Federation.eval_lora`: the one LoRA that stands for the federation (FedSA: the global A
  with the clients' mean B);
- :meth:`StageBudget.ends`: whether a closed round ends the stage (budget spent, or the adaptive
  advance's plateau below the last stage);
- :meth:`Federation.hand_over`: knowledge transfer of the stage's state to the full model.

Everything here is plain data in and out, so the aggregator checkpoints what it needs
(:class:`StageBudget` is a dataclass of numbers) and a restart resumes the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from devft_edge.aggregation import AggregationRule, ClientMemory, GlobalState
from devft_edge.lora import LoraState
from devft_edge.schedule import Plateau, StageSchedule
from devft_edge.stage import Stage, StageBuilder
from devft_edge.step_cost import StepCostModel


@dataclass
class StageBudget:
    """How long a stage runs: ``rounds`` (cut to the rounds it ran once the adaptive advance ends
    it early) and the advance's record."""

    rounds: int
    plateau: Plateau

    def ends(self, done: int, eval_loss: float | None, last: bool) -> int | None:
        """Record the round that made ``done`` rounds of this stage; None while the stage goes on,
        else the rounds it leaves unused (carried over to the next stage)."""
        if done < self.rounds and (last or not self.plateau.reached(eval_loss)):
            return None
        left, self.rounds = self.rounds - done, done
        return left


@dataclass
class OpenStage:
    """A stage as the server starts it."""

    built: Stage
    server: GlobalState
    """The global state in the stage's space: the starting LoRA and FLoRA's merged update so far."""
    budget: StageBudget
    steps: int
    """Local steps per client round in this stage."""


class Federation:
    """The server's decisions of one run (see the module docstring)."""

    def __init__(
        self,
        builder: StageBuilder,
        schedule: StageSchedule,
        rule: AggregationRule,
        seed: int,
        steps: int,
        stage_steps: str,
        step_cost: StepCostModel,
        adaptive: Plateau,
    ) -> None:
        self.builder, self.schedule, self.rule, self.seed = builder, schedule, rule, seed
        self.base_steps, self.stage_steps, self.step_cost, self.adaptive = steps, stage_steps, step_cost, adaptive

    @property
    def stages(self) -> int:
        return len(self.schedule.capacities)

    def steps(self, layers: int) -> int:
        """Local steps per round at ``layers`` depth: fixed, or scaled so a round of every stage
        costs what a full-depth round costs (``stage_steps: compute``)."""
        if self.stage_steps == "compute":
            return max(1, round(self.base_steps / self.step_cost(layers)))
        return self.base_steps

    def budget(self, number: int, carry: int) -> StageBudget:
        """Stage ``number``'s rounds: its share of the schedule plus ``carry`` left by earlier stages."""
        plateau = Plateau(self.adaptive.patience, self.adaptive.min_delta)
        return StageBudget(self.schedule.rounds_per_stage[number - 1] + carry, plateau)

    def open_stage(
        self, number: int, full: GlobalState, carry: int = 0, groups: list[list[int]] | None = None
    ) -> OpenStage:
        """Group, fuse (and heal) stage ``number`` from ``full``; its starting global state.
        ``groups``: the stage's groups as already chosen (a service resuming the stage)."""
        capacity = self.schedule.capacities[number - 1]
        built = self.builder.open(number, capacity, full.lora, groups)
        delta = self.builder.contract(full.delta, built.groups) if full.delta else {}
        return OpenStage(
            built, GlobalState(lora=built.start, delta=delta), self.budget(number, carry), self.steps(capacity)
        )

    def aggregate(
        self, server: GlobalState, updates: Iterable[tuple[LoraState, float]], round_index: int
    ) -> GlobalState:
        """The rule's aggregation of the round's (update, weight) stream."""
        return self.rule.aggregate(server, updates, round_index, self.seed * 31 + round_index)

    def eval_lora(self, server: GlobalState, memories: Iterable[ClientMemory], groups: list[list[int]]) -> LoraState:
        """The one LoRA that stands for the federation in the stage's space."""
        return self.rule.eval_lora(server, memories, lambda full: self.builder.contract(full, groups))

    def hand_over(self, server: GlobalState, memories: Iterable[ClientMemory], groups: list[list[int]]) -> GlobalState:
        """Knowledge transfer: the stage's state (LoRA and FLoRA's update) in full-model space."""
        lora = self.builder.expand(self.eval_lora(server, memories, groups), groups)
        return GlobalState(lora=lora, delta=self.builder.expand(server.delta, groups) if server.delta else {})
