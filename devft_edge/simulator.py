"""Federated simulation: N clients in one process, the DevFT stage schedule around a round rule.

The loop is plan -> pack -> ship -> train -> update -> merge, with the network replaced by byte
counting: every byte a real deployment would send is measured as the serialised size of what is
sent (safetensors), uplink and downlink separately. Downlink counts, per client, the shared
embeddings/head once per run, each stage's fused blocks the first time the client is selected in
that stage (devices cache packs by hash), and the LoRA state every round.

``wall_seconds`` is measured process time of the federated work (stage building, local training,
aggregation), excluding evaluation. Clients run one after another here; a fleet runs them in
parallel, so ``parallel_seconds`` also records the sum over rounds of (slowest client + server).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor
from tqdm import tqdm

from devft_edge.aggregation import RULES, ClientMemory, GlobalState
from devft_edge.calibration import calibration_ids
from devft_edge.data import Example, batches, load_jsonl, partition, partition_by_kind, train_eval_split
from devft_edge.errors import ConfigError, raise_if
from devft_edge.export import export_adapter, export_merged
from devft_edge.federation import Federation, StageBudget
from devft_edge.handover import cost_warning, early_rounds
from devft_edge.layers import num_layers
from devft_edge.lora import (
    LoraSettings,
    LoraState,
    attach_lora,
    get_lora_state,
    init_lora_state,
    lora_shapes,
    set_lora_state,
    state_bytes,
)
from devft_edge.memory import model_shape
from devft_edge.methods import METHODS, rule_of, uses_devft
from devft_edge.models import cache_dir, load_model, load_tokenizer, model_dir
from devft_edge.pack_size import DELIVERIES, pack_file_bytes, plan_file_bytes
from devft_edge.peak_memory import peak_bytes
from devft_edge.plot import plot_curves
from devft_edge.quantization import QuantSpec, dequantize_model, quantize_model
from devft_edge.schedule import DEFAULT_MIN_DELTA, Plateau, StageSchedule
from devft_edge.selection import data_seed, select_clients, training_seed
from devft_edge.stage import Stage, StageBuilder, StageRecipe
from devft_edge.step_cost import StepCostModel, step_cost_model
from devft_edge.submodel import add_weight_delta, state_applied
from devft_edge.training import EvalResult, TrainSettings, evaluate, train_local

logger = logging.getLogger(__name__)

FULL_EVALS = ("stage", "round", "off")
"""When the full model with the transferred LoRA is evaluated: after each stage's transfer, after
every round (the running hand-over), or never."""
EXACT_MATCH = ("every_eval", "stage_end")
"""When greedy exact match is measured (most of an evaluation's time): at every evaluation, or
only on each stage's last round (the eval loss is measured at every evaluation either way)."""
DATA_SPLITS = ("dirichlet", "by_profile")
"""How training examples are split over clients: Dirichlet(alpha) over task families, or first
by client profile (each profile's clients hold families no other profile has), then Dirichlet."""
STAGE_STEPS = ("fixed", "compute")
"""Local steps per round in each stage: the same everywhere, or in inverse proportion to the
stage's step cost so that a round of every stage costs what a full-depth round costs."""


@dataclass(frozen=True)
class SimulationConfig:
    """Everything one simulated federated run depends on; equal configs give equal numbers."""

    model: str = "smollm2"
    """``smollm2``, ``tiny[-family]`` or a local model directory."""
    method: str = "devft"
    """``devft`` (= devft+fedit), ``fedit``, ``fedsa``, ``flora`` or ``devft+<rule>``."""
    clients: int = 10
    """Number of simulated clients N."""
    per_round: int = 3
    """Clients sampled per round K."""
    stages: int = 4
    """DevFT stages S (ignored, i.e. 1, for methods without devft)."""
    rounds: int = 12
    """Total round budget, split over the stages per ``round_split``."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Local training of one client round."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA rank, alpha, targets."""
    recipe: StageRecipe = field(default_factory=StageRecipe)
    """How each stage is built: similarity, grouping, fusion, transfer rule, kept ends, healing."""
    seed: int = 0
    """Seeds data, client sampling, LoRA init and training."""
    data: str | None = None
    """JSONL training data (instruction/input/output); None uses the synthetic multi-task set."""
    examples_per_client: int = 48
    """Synthetic training examples per client (before the non-IID split)."""
    data_alpha: float | None = 0.5
    """Dirichlet alpha over task families for the non-IID split; None = IID."""
    eval_examples: int = 48
    """Held-out examples for eval loss and exact match."""
    eval_every: int = 1
    """Evaluate every this many rounds (and always after the last)."""
    export_merged: bool = False
    """Also save the merged full model next to the adapter."""
    adaptive_patience: int = 0
    """Adaptive schedule: leave a stage once its eval loss has not improved by ``adaptive_min_delta``
    for this many evaluations; its unused rounds carry over to the next stage. 0 = fixed rounds."""
    adaptive_min_delta: float = DEFAULT_MIN_DELTA
    """Smallest eval-loss decrease that counts as progress for the adaptive schedule."""
    round_split: str = "depth"
    """How the round budget is shared out over the stages: ``depth`` (default: in proportion to stage
    depth) or the paper's ``equal``. On SmolLM2-135M the depth split ended 0.19 +- 0.05 lower in eval
    loss over 3 seeds at the same budget (docs/results.md, issue 3)."""
    capacities: tuple[int, ...] | None = None
    """Stage depths instead of the doubling rule (e.g. ``(8, 15, 30)``); sets the number of stages."""
    stage_steps: str = "fixed"
    """``fixed`` local steps in every stage, or ``compute``: ``steps / cost(depth)`` per round."""
    quant: str = "none"
    """Pack quantization: what devices download (bytes) and the base weights they train on."""
    delivery: str = "stage_packs"
    """How weights reach devices (:data:`devft_edge.pack_size.DELIVERIES`): a pack per stage, or the
    full pack once plus a signed stage plan per stage (devices fuse the stage themselves)."""
    full_eval: str = "stage"
    """Evaluate the full model with the transferred LoRA after each ``stage``, every ``round``, or ``off``."""
    exact_match: str = "every_eval"
    """Measure exact match at ``every_eval`` or only at each stage's end (``stage_end``)."""
    client_profiles: tuple[str, ...] | None = None
    """Device profile of each client (cycled over the clients); a client is only selected for a
    stage the planner says its profile can train. None: every client can train every stage."""
    data_split: str = "dirichlet"
    """``dirichlet`` over task families, or ``by_profile`` (see :data:`DATA_SPLITS`)."""
    stop_after: int | None = None
    """End the run after this stage's transfer (screening what early stages hand over); None: all."""

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.clients < 1:
            problems.append(f"clients must be >= 1, got {self.clients}")
        if not 1 <= self.per_round <= self.clients:
            problems.append(f"per-round must be in 1..clients ({self.clients}), got {self.per_round}")
        if self.stages < 1:
            problems.append(f"stages must be >= 1, got {self.stages}")
        if self.rounds < 1:
            problems.append(f"rounds must be >= 1, got {self.rounds}")
        if self.eval_examples < 1 or self.eval_every < 1:
            problems.append("eval-examples and eval-every must be >= 1")
        if self.adaptive_patience < 0 or self.adaptive_min_delta < 0:
            problems.append("adaptive patience and min delta must be >= 0")
        if self.stop_after is not None and self.stop_after < 1:
            problems.append(f"stop_after must be a stage number >= 1, got {self.stop_after}")
        if self.data_split == "by_profile" and not self.client_profiles:
            problems.append("data_split by_profile needs client_profiles")
        for name, value, allowed in (
            ("stage_steps", self.stage_steps, STAGE_STEPS),
            ("full_eval", self.full_eval, FULL_EVALS),
            ("exact_match", self.exact_match, EXACT_MATCH),
            ("data_split", self.data_split, DATA_SPLITS),
            ("delivery", self.delivery, DELIVERIES),
        ):
            if value not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        try:
            QuantSpec(self.quant)
        except ConfigError as err:
            problems.extend(err.problems)
        raise_if(problems)

    @property
    def devft(self) -> bool:
        """Whether the DevFT stage schedule is on (else one full-depth stage)."""
        return uses_devft(self.method)

    @property
    def rule(self) -> str:
        """The in-stage aggregation rule's name."""
        return rule_of(self.method)

    def profile_of(self, client: int) -> str | None:
        """Client ``client``'s device profile (None: no fleet given)."""
        return None if not self.client_profiles else self.client_profiles[client % len(self.client_profiles)]

    def schedule(self, total_layers: int) -> StageSchedule:
        """The stage schedule of this run for a ``total_layers``-layer model."""
        if not self.devft:
            return StageSchedule(total_layers, 1, self.rounds)
        if self.capacities is not None:
            return StageSchedule(
                total_layers, len(self.capacities), self.rounds, self.capacities, round_split=self.round_split
            )
        return StageSchedule(total_layers, self.stages, self.rounds, round_split=self.round_split)


@dataclass(frozen=True)
class RoundMetrics:
    """One line of ``metrics.jsonl``."""

    round: int
    stage: int
    layers: int
    train_loss: float
    eval_loss: float | None
    """The stage submodel (with the round's aggregated LoRA) on the held-out set."""
    eval_accuracy: float | None
    eval_accuracy_by_task: dict[str, float] | None
    full_eval_loss: float | None
    """The full model with the LoRA transferred from this stage so far: what the stage hands over.
    Set on a stage's last round (``full_eval = stage``) or every round (``round``); at full depth it
    equals ``eval_loss``."""
    full_eval_accuracy: float | None
    wall_seconds: float
    parallel_seconds: float
    compute: float
    """Cumulative device compute: local steps weighted by their submodel's step cost, in
    full-model-step equivalents (:mod:`devft_edge.step_cost`)."""
    server_seconds: float
    """Cumulative server time spent healing fused submodels (not in ``wall_seconds``)."""
    bytes_up: int
    bytes_down: int
    bytes_down_pack: int
    """Part of ``bytes_down`` that is model weights (stage packs); the rest is LoRA state (and
    FLoRA's merged updates)."""
    peak_rss_bytes: int


def _load_data(cfg: SimulationConfig) -> tuple[list[list[Example]], list[Example]]:
    if cfg.data_split == "by_profile":
        train, held_out = train_eval_split(cfg.clients * cfg.examples_per_client, cfg.eval_examples, cfg.seed)
        kinds = [str(cfg.profile_of(c)) for c in range(cfg.clients)]
        return partition_by_kind(train, kinds, cfg.seed, cfg.data_alpha), held_out
    if cfg.data is None:
        train, held_out = train_eval_split(cfg.clients * cfg.examples_per_client, cfg.eval_examples, cfg.seed)
    else:
        examples = load_jsonl(Path(cfg.data))
        random.Random(cfg.seed).shuffle(examples)
        if len(examples) <= cfg.eval_examples + cfg.clients:
            raise ConfigError(
                f"{cfg.data}: {len(examples)} examples are too few for "
                f"{cfg.eval_examples} eval examples and {cfg.clients} clients"
            )
        held_out, train = examples[: cfg.eval_examples], examples[cfg.eval_examples :]
    return partition(train, cfg.clients, cfg.seed, cfg.data_alpha), held_out


@dataclass
class _Stage:
    """What the server holds while one stage runs."""

    built: Stage
    model: PeftModel
    """The stage submodel with LoRA attached: every simulated client trains this one instance."""
    server: GlobalState
    builder: StageBuilder
    pack_bytes: int
    """Size of the stage's pack, or of its plan (``full_pack`` delivery), as the aggregator writes it."""
    steps: int
    """Local steps per client round in this stage."""
    budget: StageBudget
    """Rounds of this stage and the adaptive advance's record."""
    cost: float
    """Step cost of this stage's depth, in full-model-step equivalents."""
    eligible: list[int] = field(default_factory=list)
    """Clients whose device profile can train this stage (all of them without a fleet)."""
    has_pack: set[int] = field(default_factory=set)
    """Clients that already downloaded this stage's pack."""

    @property
    def number(self) -> int:
        """1-based stage number."""
        return self.built.number

    @property
    def groups(self) -> list[list[int]]:
        """``groups[g]`` = original layers fused into submodel block g."""
        return self.built.groups

    def to_stage(self, state: LoraState) -> LoraState:
        """Full-model state -> this stage's space (the transfer rule's contraction)."""
        return self.builder.contract(state, self.groups)

    def to_full(self, state: LoraState) -> LoraState:
        """This stage's state -> full-model space (knowledge transfer)."""
        return self.builder.expand(state, self.groups)


@dataclass
class _RoundTally:
    """What one round's clients did, for the metrics line."""

    bytes_up: int = 0
    bytes_down: int = 0
    bytes_down_pack: int = 0
    losses: list[float] = field(default_factory=list)
    client_seconds: list[float] = field(default_factory=list)


class Simulation:
    """One simulated federated run: the stage loop around the rule's rounds."""

    def __init__(self, cfg: SimulationConfig, out_dir: Path, progress: bool | None = None) -> None:
        self.cfg, self.out_dir, self.progress = cfg, out_dir, progress
        self.tokenizer = load_tokenizer(cfg.model)
        self.base = load_model(cfg.model, seed=cfg.seed)
        if cfg.quant != "none":  # devices train on the pack's quantized weights: quantize, dequantize
            self.base = dequantize_model(quantize_model(self.base, QuantSpec(cfg.quant)))
            self.base.requires_grad_(False)
        self.total_layers = num_layers(self.base.config)
        self.schedule = cfg.schedule(self.total_layers)
        self.rule = RULES.get(cfg.rule)
        self.builder = StageBuilder(
            self.base,
            self.tokenizer,
            cfg.lora,
            cfg.recipe,
            calibration_ids(self.tokenizer),
            cfg.model,
            cfg.seed,
            cache_dir=cache_dir() / "heal",
        )
        self.shape = model_shape(self.base.config)
        self.step_cost: StepCostModel = step_cost_model(
            cfg.model, self.shape, cfg.train.batch_size, cfg.train.seq_len, cfg.lora.rank
        )
        adaptive = Plateau(cfg.adaptive_patience, cfg.adaptive_min_delta)
        self.federation = Federation(
            self.builder, self.schedule, self.rule, cfg.seed, cfg.train.steps, cfg.stage_steps, self.step_cost, adaptive
        )
        self.warning = self._cost_warning()
        if self.warning:
            logger.warning("%s", self.warning)
        client_data, self.held_out = _load_data(cfg)
        self.memories = [ClientMemory(num_samples=len(d)) for d in client_data]
        self.streams: dict[int, Iterator[dict[str, Tensor]]] = {
            c: batches(d, cfg.train.batch_size, data_seed(cfg.seed, c), self.tokenizer, cfg.train.seq_len)
            for c, d in enumerate(client_data)
        }
        self.full = GlobalState(lora=init_lora_state(lora_shapes(self.base, cfg.lora), cfg.lora.rank, cfg.seed))
        self.full_pack_bytes = 0
        """``full_pack`` delivery: size of the full model's pack, downloaded once per device."""
        if cfg.delivery == "full_pack":
            self.full_pack_bytes = pack_file_bytes(
                self.base,
                self.full.lora,
                [[j] for j in range(self.total_layers)],
                model_name=cfg.model,
                lora=cfg.lora,
                quant=cfg.quant,
                tokenizer_dir=model_dir(cfg.model),
            )
        self.has_full_pack: set[int] = set()
        self.wall = self.parallel = self.compute = self.server = 0.0
        self._full_by_task: dict[str, float] | None = None
        self.bytes_up = self.bytes_down = self.bytes_down_pack = 0

    def _cost_warning(self) -> str | None:
        """What the measured hand-over predicts for this schedule's cost against FedIT's."""
        caps, rounds = self.schedule.capacities, self.schedule.rounds_per_stage
        ratios = [1 / self.step_cost(c) if self.cfg.stage_steps == "compute" else 1.0 for c in caps]
        return cost_warning(self.cfg.model, early_rounds(caps, rounds, self.step_cost, ratios))

    def run(self) -> dict[str, object]:
        """Run every stage and round; write metrics, summary, adapter and plot. Returns the summary."""
        start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        initial = evaluate(self.base, self.tokenizer, self.held_out, self.cfg.train.seq_len)
        metrics: list[RoundMetrics] = []
        stages_info: list[dict[str, object]] = []
        round_index = 0
        bar = tqdm(
            total=self.cfg.rounds,
            disable=None if self.progress is None else not self.progress,
            desc=self.cfg.method,
            unit="round",
        )
        with (self.out_dir / "metrics.jsonl").open("w") as metrics_file, bar:
            carry = 0
            last_stage = len(self.schedule.capacities)
            for number, capacity in enumerate(self.schedule.capacities, start=1):
                stage = self._open_stage(number, capacity, round_index, carry)
                used, left = 0, None
                while left is None:
                    line = self._run_round(stage, round_index)
                    round_index += 1
                    used += 1
                    left = stage.budget.ends(used, line.eval_loss, last=number == last_stage)
                    if left is not None:
                        if line.eval_loss is not None and line.eval_accuracy is None:
                            line = self._with_accuracy(stage, line)
                        self._close_stage(stage)
                        line = self._with_full_eval(line, self.full, after_transfer=True)
                    elif self.cfg.full_eval == "round":
                        line = self._with_full_eval(line, self._transferred(stage), after_transfer=False)
                    metrics.append(line)
                    metrics_file.write(json.dumps(asdict(line)) + "\n")
                    metrics_file.flush()
                    bar.update(1)
                    bar.set_postfix(stage=number, eval_loss="-" if line.eval_loss is None else f"{line.eval_loss:.3f}")
                    if left:
                        logger.info("stage %d plateaued after %d of %d rounds", number, used, used + left)
                carry = left or 0
                stages_info.append(self._stage_info(stage, capacity, used, metrics[-1]))
                if number == self.cfg.stop_after:
                    break
        return self._finish(initial, metrics, stages_info, time.perf_counter() - start)

    def _stage_info(self, stage: _Stage, capacity: int, rounds: int, last: RoundMetrics) -> dict[str, object]:
        heal = stage.built.heal
        return {
            "stage": stage.number,
            "layers": capacity,
            "rounds": rounds,
            "local_steps": stage.steps,
            "step_cost": round(stage.cost, 4),
            "groups": stage.groups,
            "pack_bytes": stage.pack_bytes,
            "eval_loss": last.eval_loss,
            "full_eval_loss": last.full_eval_loss,
            "full_eval_accuracy": last.full_eval_accuracy,
            "full_eval_accuracy_by_task": self._full_by_task,
            "eligible_clients": len(stage.eligible),
            "heal": None
            if heal is None
            else {
                "seconds": round(heal.seconds, 3),
                "cached": stage.built.heal_cached,
                "kl_before": heal.kl_before,
                "kl_after": heal.kl_after,
                "peak_rss_bytes": heal.peak_rss_bytes,
                "trained_params": heal.trained_params,
            },
        }

    def _open_stage(self, number: int, capacity: int, first_round: int, carry: int) -> _Stage:
        """Plan and pack one stage: group, fuse, heal, attach LoRA started from the full state."""
        t0 = time.perf_counter()
        self._full_by_task = None
        opened = self.federation.open_stage(number, self.full, carry)
        built = opened.built
        logger.info("stage %d: %d layers, groups %s", number, capacity, built.groups)
        add_weight_delta(built.model, opened.server.delta, self.cfg.lora.scaling)
        if self.cfg.delivery == "full_pack":
            pack_bytes = plan_file_bytes(
                built, self.builder.fusion, model_name=self.cfg.model, lora=self.cfg.lora, quant=self.cfg.quant
            )
        else:
            pack_bytes = pack_file_bytes(
                built.model,
                built.start,
                built.groups,
                model_name=self.cfg.model,
                lora=self.cfg.lora,
                quant=self.cfg.quant,
                tokenizer_dir=model_dir(self.cfg.model),
            )
        stage = _Stage(
            built=built,
            model=attach_lora(built.model, self.cfg.lora),
            server=opened.server,
            builder=self.builder,
            pack_bytes=pack_bytes,
            steps=opened.steps,
            budget=opened.budget,
            cost=self.step_cost(capacity),
            eligible=self._eligible(capacity),
        )
        self.rule.start_stage(first_round)
        elapsed = time.perf_counter() - t0
        heal_seconds = built.heal.seconds if built.heal is not None and not built.heal_cached else 0.0
        self.server += built.heal.seconds if built.heal is not None else 0.0
        self.wall += elapsed - heal_seconds
        self.parallel += elapsed - heal_seconds
        return stage

    def _eligible(self, layers: int) -> list[int]:
        """Clients whose profile the planner says can train a ``layers``-deep submodel."""
        if not self.cfg.client_profiles:
            return list(range(self.cfg.clients))
        from devft_edge.memory import StepConfig
        from devft_edge.planner import fit_profile
        from devft_edge.profiles import load_profile

        t = self.cfg.train
        step = StepConfig(
            layers=layers,
            batch=t.batch_size,
            seq=t.seq_len,
            rank=self.cfg.lora.rank,
            quant=self.cfg.quant,
            merged_delta=self.rule.merges_into_base,
        )
        fits = {
            name: fit_profile(self.shape, step, load_profile(name), self.cfg.model).fits
            for name in set(self.cfg.client_profiles)
        }
        eligible = [c for c in range(self.cfg.clients) if fits[str(self.cfg.profile_of(c))]]
        if not eligible:
            raise ConfigError(f"no client's profile can train the {layers}-layer stage ({', '.join(sorted(fits))})")
        return eligible

    def _client_updates(
        self, stage: _Stage, selected: list[int], round_index: int, tally: _RoundTally
    ) -> Iterator[tuple[LoraState, float]]:
        """Ship, train and collect each selected client's update, one at a time (a stream)."""
        train = replace(self.cfg.train, steps=stage.steps)
        for c in selected:
            t0 = time.perf_counter()
            memory = self.memories[c]
            received = self.rule.downlink(stage.server, memory, round_index)
            tally.bytes_down += state_bytes(received) if received else 0
            if c in stage.has_pack:
                tally.bytes_down += self.rule.extra_downlink_bytes(stage.server, memory, round_index)
            else:  # first time in this stage: the stage's pack or plan (and, once, the full pack)
                weights = stage.pack_bytes + (0 if c in self.has_full_pack else self.full_pack_bytes)
                tally.bytes_down += weights
                tally.bytes_down_pack += weights
                stage.has_pack.add(c)
                self.has_full_pack.add(c)
                memory.synced_round = round_index - 1
            set_lora_state(stage.model, self.rule.client_start(received, stage.server, memory, stage.to_stage))
            torch.manual_seed(training_seed(self.cfg.seed, round_index, c))
            tally.losses.append(train_local(stage.model, self.streams[c], train))
            self.compute += train.steps * stage.cost
            sent = self.rule.uplink(get_lora_state(stage.model), memory, stage.to_full)
            tally.bytes_up += state_bytes(sent)
            tally.client_seconds.append(time.perf_counter() - t0)
            yield sent, float(memory.num_samples)

    def _run_round(self, stage: _Stage, round_index: int) -> RoundMetrics:
        """Select clients, train them, aggregate, evaluate when due."""
        t0 = time.perf_counter()
        selected = select_clients(stage.eligible, self.cfg.per_round, self.cfg.seed, round_index)
        tally = _RoundTally()
        before = stage.server.delta
        stage.server = self.federation.aggregate(
            stage.server, self._client_updates(stage, selected, round_index, tally), round_index
        )
        if stage.server.delta:  # FLoRA: clients merge the round's exact update into their base
            increment = {k: v - before[k] if k in before else v for k, v in stage.server.delta.items()}
            add_weight_delta(stage.model, increment, self.cfg.lora.scaling)
        elapsed = time.perf_counter() - t0
        self.wall += elapsed
        self.parallel += max(tally.client_seconds) + (elapsed - sum(tally.client_seconds))
        self.bytes_up += tally.bytes_up
        self.bytes_down += tally.bytes_down
        self.bytes_down_pack += tally.bytes_down_pack

        number = round_index + 1
        result = None
        if number == self.cfg.rounds or number % self.cfg.eval_every == 0:
            set_lora_state(stage.model, self.federation.eval_lora(stage.server, self.memories, stage.groups))
            accuracy = self.cfg.exact_match == "every_eval"
            result = evaluate(stage.model, self.tokenizer, self.held_out, self.cfg.train.seq_len, accuracy=accuracy)
        return RoundMetrics(
            round=number,
            stage=stage.number,
            layers=len(stage.groups),
            train_loss=sum(tally.losses) / len(tally.losses),
            eval_loss=None if result is None else result.loss,
            eval_accuracy=None if result is None else result.accuracy,
            eval_accuracy_by_task=None if result is None else result.accuracy_by_task,
            full_eval_loss=None,
            full_eval_accuracy=None,
            wall_seconds=round(self.wall, 3),
            parallel_seconds=round(self.parallel, 3),
            compute=round(self.compute, 4),
            server_seconds=round(self.server, 3),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            bytes_down_pack=self.bytes_down_pack,
            peak_rss_bytes=peak_bytes(),
        )

    def _with_accuracy(self, stage: _Stage, line: RoundMetrics) -> RoundMetrics:
        """``line`` with exact match measured (the stage model still holds the round's LoRA)."""
        result = evaluate(stage.model, self.tokenizer, self.held_out, self.cfg.train.seq_len)
        return replace(line, eval_accuracy=result.accuracy, eval_accuracy_by_task=result.accuracy_by_task)

    def _transferred(self, stage: _Stage) -> GlobalState:
        """The full-model state the stage would hand over if it ended now."""
        return self.federation.hand_over(stage.server, self.memories, stage.groups)

    def _close_stage(self, stage: _Stage) -> None:
        """Knowledge transfer: the representatives' LoRA (and FLoRA's update) back to every member."""
        t0 = time.perf_counter()
        self.full = self._transferred(stage)
        stage.model.unload()
        self.wall += time.perf_counter() - t0

    def _with_full_eval(self, line: RoundMetrics, state: GlobalState, after_transfer: bool) -> RoundMetrics:
        """``line`` with the full model's held-out metrics under ``state`` (when this run asks for them)."""
        if self.cfg.full_eval == "off" or (self.cfg.full_eval == "stage" and not after_transfer):
            return line
        if line.layers == self.total_layers and line.eval_loss is not None:  # the stage model is the full model
            self._full_by_task = line.eval_accuracy_by_task
            return replace(line, full_eval_loss=line.eval_loss, full_eval_accuracy=line.eval_accuracy)
        result = self._evaluate_full(state)
        self._full_by_task = result.accuracy_by_task
        return replace(line, full_eval_loss=result.loss, full_eval_accuracy=result.accuracy)

    def _evaluate_full(self, state: GlobalState) -> EvalResult:
        """The full base model with ``state`` applied, on the held-out set (the base is restored)."""
        with state_applied(self.base, self.cfg.lora, state.lora, state.delta) as model:
            return evaluate(model, self.tokenizer, self.held_out, self.cfg.train.seq_len)

    def _finish(
        self,
        initial: EvalResult,
        metrics: list[RoundMetrics],
        stages_info: list[dict[str, object]],
        total_seconds: float,
    ) -> dict[str, object]:
        """Export the adapter, write ``summary.json`` and the plot."""
        cfg = self.cfg
        # FedSA-LoRA clients upload their private B once so the server can export one model.
        final_up = sum(state_bytes(up) for up in map(self.rule.final_upload, self.memories) if up)
        self.bytes_up += final_up
        adapter_dir = export_adapter(self.base, cfg.lora, self.full.lora, self.out_dir / "adapter", self.full.delta)
        if cfg.export_merged:
            export_merged(self.base, cfg.lora, self.full.lora, self.out_dir / "merged", self.full.delta)
            self.tokenizer.save_pretrained(self.out_dir / "merged")
        final = metrics[-1]
        summary: dict[str, object] = {
            "method": cfg.method,
            "model": cfg.model,
            "rounds": cfg.rounds,
            "stages": stages_info,
            "initial_eval_loss": initial.loss,
            "initial_eval_accuracy": initial.accuracy,
            "final_eval_loss": final.eval_loss,
            "final_eval_accuracy": final.eval_accuracy,
            "final_eval_accuracy_by_task": final.eval_accuracy_by_task,
            "initial_eval_accuracy_by_task": initial.accuracy_by_task,
            "wall_seconds": round(self.wall, 3),
            "parallel_seconds": round(self.parallel, 3),
            "compute": round(self.compute, 4),
            "step_cost": {"source": self.step_cost.source, "intercept": round(self.step_cost.intercept, 4)},
            "cost_warning": self.warning,
            "server_seconds": round(self.server, 3),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_down_pack": self.bytes_down_pack,
            "final_upload_bytes": final_up,
            "peak_rss_bytes": peak_bytes(),
            "total_seconds": round(total_seconds, 3),
            "adapter_dir": str(adapter_dir),
            "config": json.loads(json.dumps(asdict(cfg), default=str)),
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves({cfg.method: [asdict(m) for m in metrics]}, self.out_dir / "curves.png", reference=initial.loss)
        return summary


def simulate(cfg: SimulationConfig, out_dir: Path, progress: bool | None = None) -> dict[str, object]:
    """Run the federated simulation; write metrics, summary, adapter and plot into ``out_dir``.

    Returns the summary dictionary (also written to ``summary.json``).
    """
    return Simulation(cfg, out_dir, progress).run()
