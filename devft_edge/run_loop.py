"""The round loop of a federated run: select -> ship -> train -> aggregate -> evaluate -> advance
or close the stage -> export.

The server's side is written here once; how clients are reached is a :class:`ClientPool`. The
simulator's pool trains its clients one after another in this process
(:class:`devft_edge.simulator.InProcessPool`). The loop's record of where the run is
(:class:`RunProgress`) is plain data and its tensors are named slots, so a service can checkpoint
both between steps.

Cost accounting follows the simulator's definitions: ``wall_seconds`` is the time of the
federated work (stage building without healing, clients, aggregation, transfer), not of
evaluation; ``parallel_seconds`` counts each round's slowest client instead of the sum (a fleet
trains in parallel); ``server_seconds`` is the healing time; ``compute`` is local steps weighted
by their submodel's step cost (:mod:`devft_edge.step_cost`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from peft import PeftModel

from devft_edge.aggregation import ClientMemory, GlobalState
from devft_edge.export import export_adapter, export_merged
from devft_edge.federation import Federation, OpenStage, StageBudget
from devft_edge.lora import LoraSettings, LoraState, attach_lora, init_lora_state, lora_shapes, set_lora_state
from devft_edge.run_report import METRICS_FILE, RoundMetrics, write_metrics
from devft_edge.stage import StageBuilder
from devft_edge.submodel import add_weight_delta, state_applied
from devft_edge.training import EvalResult, evaluate, exact_match_accuracy

logger = logging.getLogger(__name__)

FullEval = Literal["stage", "round", "off"]
"""When the full model with the transferred LoRA is evaluated: after each stage's transfer, after
every round (the running hand-over), or never."""
ExactMatch = Literal["every_eval", "stage_end"]
"""When greedy exact match is measured (most of an evaluation's time): at every evaluation, or
only on each stage's last round (the eval loss is measured at every evaluation either way)."""


@dataclass(frozen=True)
class EvalPolicy:
    """When the loop evaluates on the held-out set."""

    every: int = 1
    """Evaluate the stage submodel every this many rounds (and always after the last)."""
    exact_match: ExactMatch = "stage_end"
    """Greedy exact match at every evaluation, or at stage ends only. Generation is most of an
    evaluation's time (SmolLM2, 48 examples: 15 s of greedy decoding against 7 s of loss), and
    the eval loss already traces every round; the final exact match is measured either way."""
    full_eval: FullEval = "stage"
    """The full model with the transferred LoRA: after each stage's transfer, every round, or never."""


@dataclass
class RunProgress:
    """Where a run is, as plain data: the loop's checkpointable record."""

    stage: int = 0
    """1-based stage in progress (0: not started)."""
    stage_rounds_done: int = 0
    rounds_done: int = 0
    carry: int = 0
    """Rounds a stage left unused (adaptive advance), added to the next stage's budget."""
    initial_eval: dict[str, Any] = field(default_factory=dict)
    """The untuned base model on the held-out set."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    """One record per closed stage."""
    history: list[RoundMetrics] = field(default_factory=list)
    finished: bool = False


@dataclass
class StageView:
    """The open stage as clients see it: what they train and how its state maps to the full model."""

    opened: OpenStage
    model: PeftModel
    """The stage submodel with LoRA attached: in-process clients train this instance, and the
    loop evaluates it with the global LoRA."""
    builder: StageBuilder
    server: GlobalState
    """The global state in the stage's space."""
    cost: float
    """Step cost of this stage's depth, in full-model-step equivalents."""
    shipped: dict[str, Any] = field(default_factory=dict)
    """What the pool recorded shipping the stage (pack bytes, eligible clients)."""

    @property
    def number(self) -> int:
        """1-based stage number."""
        return self.opened.built.number

    @property
    def groups(self) -> list[list[int]]:
        """``groups[g]`` = original layers fused into submodel block g."""
        return self.opened.built.groups

    @property
    def steps(self) -> int:
        """Local steps per client round in this stage."""
        return self.opened.steps

    def to_stage(self, state: LoraState) -> LoraState:
        """Full-model state -> this stage's space (the transfer rule's contraction)."""
        return self.builder.contract(state, self.groups)

    def to_full(self, state: LoraState) -> LoraState:
        """This stage's state -> full-model space (knowledge transfer)."""
        return self.builder.expand(state, self.groups)


@dataclass
class ClientRound:
    """What one round's clients did, as the pool measured it (filled while its updates stream)."""

    devices: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    client_seconds: list[float] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_down_pack: int = 0
    peak_rss_bytes: int = 0
    """The largest peak memory of a process that trained the round."""
    wall_seconds: float | None = None
    """The run's wall time so far by the pool's own clock (a fleet: since the run started, across
    restarts); None: the loop measures its work (the simulator's definition)."""


class ClientPool(Protocol):
    """How the loop reaches its clients."""

    def ship(self, opened: OpenStage, builder: StageBuilder) -> dict[str, Any]:
        """Make the stage's weights available to the clients (its pack, or its plan with
        ``builder``'s fusion); what the stage record should keep of it (``pack_bytes``, ...)."""
        ...

    def train(self, round_index: int, stage: StageView, tally: ClientRound) -> Iterator[tuple[LoraState, float]]:
        """Select the round's clients, ship them the global state, train them and stream their
        (update, aggregation weight) pairs, recording what they did in ``tally``."""
        ...

    def memories(self) -> Iterable[ClientMemory]:
        """What the clients keep between rounds (FedSA-LoRA's B), as the server may read it."""
        ...

    def final_upload_bytes(self) -> int:
        """Bytes clients upload once at the end so the server can export one model (FedSA's B)."""
        ...

    def aggregated(self, stage: StageView) -> None:
        """The round's global state is in ``stage.server`` (a service checkpoints it)."""
        ...

    def handed_over(self, full: GlobalState) -> None:
        """The closed stage's state is in the full model's space (a service checkpoints it)."""
        ...


@dataclass
class Costs:
    """The run's cumulative costs (see the module docstring)."""

    wall: float = 0.0
    parallel: float = 0.0
    compute: float = 0.0
    server: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_down_pack: int = 0

    @classmethod
    def of(cls, row: RoundMetrics | None) -> Costs:
        """The costs as ``row`` recorded them (a resumed run goes on from its last row)."""
        if row is None:
            return cls()
        return cls(
            row.wall_seconds,
            row.parallel_seconds,
            row.compute,
            row.server_seconds,
            row.bytes_up,
            row.bytes_down,
            row.bytes_down_pack,
        )


class RoundLoop:
    """One federated run's server side over a :class:`ClientPool` (see the module docstring)."""

    def __init__(
        self,
        federation: Federation,
        pool: ClientPool,
        base: Any,
        tokenizer: Any,
        lora: LoraSettings,
        held_out: list[Any],
        seq_len: int,
        policy: EvalPolicy,
        rounds: int,
        seed: int,
        out_dir: Path,
    ) -> None:
        self.federation, self.pool, self.base, self.tokenizer, self.lora = federation, pool, base, tokenizer, lora
        self.held_out, self.seq_len, self.policy, self.rounds = held_out, seq_len, policy, rounds
        self.out_dir = out_dir
        self.progress = RunProgress()
        self.costs = Costs()
        self.full = GlobalState(lora=init_lora_state(lora_shapes(base, lora), lora.rank, seed))
        self.stage: StageView | None = None
        self._full_by_task: dict[str, float] | None = None

    def run(self, stop_after: int | None = None, on_round: Any = None) -> RunProgress:
        """Every stage and round (or the stages up to ``stop_after``); ``on_round(row)`` after each
        round. Writes ``metrics.jsonl`` as it goes."""
        self.start()
        for number in range(1, self.federation.stages + 1):
            self.open_stage(number)
            while self.stage is not None:
                row = self.run_round()
                if on_round is not None:
                    on_round(row)
            if number == stop_after:
                break
        self.progress.finished = True
        return self.progress

    def start(self) -> None:
        """Evaluate the untuned base model: the reference every curve starts from."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.held_out:
            initial = self._evaluate(self.base, accuracy=True)
            self.progress.initial_eval = {
                "eval_loss": initial.loss,
                "eval_accuracy": initial.accuracy,
                "eval_accuracy_by_task": initial.accuracy_by_task,
            }

    def resume(
        self,
        progress: RunProgress,
        full: GlobalState,
        stage: tuple[list[list[int]], GlobalState, StageBudget] | None,
        shipped: dict[str, Any] | None = None,
    ) -> None:
        """Take up a checkpointed run: its progress, the full model's state and, when a stage is
        open, its groups, global state and budget (the stage is rebuilt, not shipped again: what
        shipping it recorded, ``shipped``, goes into its record as if it had been)."""
        self.progress, self.full = progress, full
        self.costs = Costs.of(progress.history[-1] if progress.history else None)
        self.stage = None
        if stage is None:
            return
        groups, server, budget = stage
        opened = self.federation.open_stage(progress.stage, full, groups=groups)
        opened.budget = budget
        add_weight_delta(opened.built.model, server.delta, self.lora.scaling)
        self.stage = StageView(
            opened=opened,
            model=attach_lora(opened.built.model, self.lora),
            builder=self.federation.builder,
            server=server,
            cost=self.federation.step_cost(len(groups)),
            shipped=dict(shipped or {}),
        )

    def open_stage(self, number: int) -> StageView:
        """Group, fuse (and heal) stage ``number`` from the full state; ship it to the pool."""
        t0 = time.perf_counter()
        self._full_by_task = None
        opened = self.federation.open_stage(number, self.full, self.progress.carry)
        built = opened.built
        logger.info("stage %d: %d layers, groups %s", number, len(built.groups), built.groups)
        shipped = self.pool.ship(opened, self.federation.builder)  # the weights as signed, before LoRA is attached
        add_weight_delta(built.model, opened.server.delta, self.lora.scaling)
        stage = StageView(
            opened=opened,
            model=attach_lora(built.model, self.lora),
            builder=self.federation.builder,
            server=opened.server,
            cost=self.federation.step_cost(len(built.groups)),
            shipped=shipped,
        )
        self.federation.rule.start_stage(self.progress.rounds_done)
        self.progress.stage, self.progress.stage_rounds_done, self.progress.carry = number, 0, 0
        elapsed = time.perf_counter() - t0
        heal = built.heal
        self.costs.server += heal.seconds if heal is not None else 0.0
        uncached_heal = heal.seconds if heal is not None and not built.heal_cached else 0.0
        self.costs.wall += elapsed - uncached_heal
        self.costs.parallel += elapsed - uncached_heal
        self.stage = stage
        return stage

    def run_round(self) -> RoundMetrics:
        """One round of the open stage: train, aggregate, evaluate when due, and close the stage
        when its budget is spent (or the adaptive advance says so)."""
        stage, p = self.stage, self.progress
        assert stage is not None  # only called with a stage open
        t0 = time.perf_counter()
        tally = ClientRound()
        before = stage.server.delta
        updates = self.pool.train(p.rounds_done, stage, tally)
        stage.server = self.federation.aggregate(stage.server, updates, p.rounds_done)
        self.pool.aggregated(stage)
        if stage.server.delta:  # FLoRA: clients merge the round's exact update into their base
            increment = {k: v - before[k] if k in before else v for k, v in stage.server.delta.items()}
            add_weight_delta(stage.model, increment, self.lora.scaling)
        elapsed = time.perf_counter() - t0
        c = self.costs
        if tally.wall_seconds is None:
            c.wall += elapsed
            c.parallel += max(tally.client_seconds, default=0.0) + (elapsed - sum(tally.client_seconds))
        else:
            c.wall = c.parallel = tally.wall_seconds
        c.compute += len(tally.losses) * stage.steps * stage.cost
        c.bytes_up += tally.bytes_up
        c.bytes_down += tally.bytes_down
        c.bytes_down_pack += tally.bytes_down_pack
        p.rounds_done += 1
        p.stage_rounds_done += 1
        row = self._row(stage, tally, self._evaluate_stage(stage))
        last = stage.number == self.federation.stages
        left = stage.opened.budget.ends(p.stage_rounds_done, row.eval_loss, last)
        if left is not None:
            if left:
                logger.info(
                    "stage %d plateaued after %d rounds; %d carry over", stage.number, p.stage_rounds_done, left
                )
            if row.eval_loss is not None and row.eval_accuracy is None:  # exact match at the stage's end
                accuracy, by_task = exact_match_accuracy(stage.model, self.tokenizer, self.held_out)
                row = replace(row, eval_accuracy=accuracy, eval_accuracy_by_task=by_task)
            self.close_stage(left)
            row = self._with_full_eval(row, self.full, after_transfer=True)
            p.stages.append(self._stage_record(stage, row))
        elif self.policy.full_eval == "round":
            row = self._with_full_eval(row, self._handed_over(stage), after_transfer=False)
        p.history.append(row)
        write_metrics(self.out_dir / METRICS_FILE, p.history)
        return row

    def close_stage(self, left: int) -> None:
        """Knowledge transfer: the stage's state (LoRA and FLoRA's update) to every member layer."""
        stage = self.stage
        assert stage is not None  # only called with a stage open
        t0 = time.perf_counter()
        self.full = self._handed_over(stage)
        self.pool.handed_over(self.full)
        stage.model.unload()
        self.progress.carry = left
        self.stage = None
        self.costs.wall += time.perf_counter() - t0

    def export(self, merged: bool) -> Path:
        """The full model's LoRA as a peft adapter (and, when asked, the merged model)."""
        adapter = export_adapter(self.base, self.lora, self.full.lora, self.out_dir / "adapter", self.full.delta)
        if merged:
            export_merged(self.base, self.lora, self.full.lora, self.out_dir / "merged", self.full.delta)
            self.tokenizer.save_pretrained(self.out_dir / "merged")
        return adapter

    def _handed_over(self, stage: StageView) -> GlobalState:
        """The full-model state the stage hands over (if it ended now)."""
        return self.federation.hand_over(stage.server, self.pool.memories(), stage.groups)

    def _evaluate_stage(self, stage: StageView) -> EvalResult | None:
        """The stage submodel with the federation's LoRA, when this round is due an evaluation."""
        done = self.progress.rounds_done
        if not self.held_out or (done != self.rounds and done % self.policy.every):
            return None
        set_lora_state(stage.model, self.federation.eval_lora(stage.server, self.pool.memories(), stage.groups))
        return self._evaluate(stage.model, accuracy=self.policy.exact_match == "every_eval")

    def _evaluate(self, model: Any, accuracy: bool = True) -> EvalResult:
        return evaluate(model, self.tokenizer, self.held_out, self.seq_len, accuracy=accuracy)

    def _row(self, stage: StageView, tally: ClientRound, result: EvalResult | None) -> RoundMetrics:
        c = self.costs
        return RoundMetrics(
            round=self.progress.rounds_done,
            stage=stage.number,
            layers=len(stage.groups),
            train_loss=sum(tally.losses) / len(tally.losses) if tally.losses else None,
            eval_loss=None if result is None else result.loss,
            eval_accuracy=None if result is None else result.accuracy,
            eval_accuracy_by_task=None if result is None else result.accuracy_by_task,
            full_eval_loss=None,
            full_eval_accuracy=None,
            wall_seconds=round(c.wall, 3),
            parallel_seconds=round(c.parallel, 3),
            compute=round(c.compute, 4),
            server_seconds=round(c.server, 3),
            bytes_up=c.bytes_up,
            bytes_down=c.bytes_down,
            bytes_down_pack=c.bytes_down_pack,
            peak_rss_bytes=tally.peak_rss_bytes,
            devices=tally.devices,
        )

    def _with_full_eval(self, row: RoundMetrics, state: GlobalState, after_transfer: bool) -> RoundMetrics:
        """``row`` with the full model's held-out metrics under ``state`` (when the policy asks)."""
        if not self.held_out or self.policy.full_eval == "off":
            return row
        if self.policy.full_eval == "stage" and not after_transfer:
            return row
        if row.layers == self.federation.builder.total and row.eval_loss is not None:  # the stage is the full model
            self._full_by_task = row.eval_accuracy_by_task
            return replace(row, full_eval_loss=row.eval_loss, full_eval_accuracy=row.eval_accuracy)
        with state_applied(self.base, self.lora, state.lora, state.delta) as model:
            result = self._evaluate(model)
        self._full_by_task = result.accuracy_by_task
        return replace(row, full_eval_loss=result.loss, full_eval_accuracy=result.accuracy)

    def _stage_record(self, stage: StageView, last: RoundMetrics) -> dict[str, Any]:
        """The summary's record of a closed stage."""
        built = stage.opened.built
        heal = built.heal
        return {
            "stage": stage.number,
            "layers": len(stage.groups),
            "rounds": self.progress.stage_rounds_done,
            "local_steps": stage.steps,
            "step_cost": round(stage.cost, 4),
            "groups": stage.groups,
            **stage.shipped,
            "eval_loss": last.eval_loss,
            "full_eval_loss": last.full_eval_loss,
            "full_eval_accuracy": last.full_eval_accuracy,
            "full_eval_accuracy_by_task": self._full_by_task,
            "heal": None
            if heal is None
            else {
                "seconds": round(heal.seconds, 3),
                "cached": built.heal_cached,
                "kl_before": heal.kl_before,
                "kl_after": heal.kl_after,
                "peak_rss_bytes": heal.peak_rss_bytes,
                "trained_params": heal.trained_params,
            },
        }
