"""Federated simulation: N clients in one process, around the round loop of :mod:`devft_edge.run_loop`.

The simulator's :class:`InProcessPool` is the loop's client pool with the network replaced by
byte counting: every byte a real deployment would send is measured as the serialised size of
what is sent (safetensors), uplink and downlink separately. Downlink counts, per client, the
shared embeddings/head once per run, each stage's fused blocks the first time the client is
selected in that stage (devices cache packs by hash), and the LoRA state every round.

Clients run one after another here; a fleet runs them in parallel, so ``parallel_seconds``
records the sum over rounds of (slowest client + server) beside ``wall_seconds``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal, Self

import torch
from pydantic import Field, model_validator
from torch import Tensor
from tqdm import tqdm

from devft_edge.aggregation import RULES, ClientMemory, GlobalState
from devft_edge.calibration import calibration_ids
from devft_edge.data import Example, batches, load_jsonl, partition, partition_by_kind, train_eval_split
from devft_edge.errors import ConfigError
from devft_edge.federation import Federation, OpenStage
from devft_edge.handover import cost_warning, early_rounds
from devft_edge.layers import num_layers
from devft_edge.lora import (
    LoraState,
    get_lora_state,
    init_lora_state,
    lora_shapes,
    set_lora_state,
    state_bytes,
)
from devft_edge.memory import model_shape
from devft_edge.models import cache_dir, load_model, load_tokenizer, model_dir
from devft_edge.pack_size import pack_file_bytes, plan_file_bytes
from devft_edge.peak_memory import peak_bytes
from devft_edge.quantization import QuantSpec, dequantize_model, quantize_model
from devft_edge.run_config import RunConfig
from devft_edge.run_loop import ClientRound, RoundLoop, StageView
from devft_edge.run_report import RoundMetrics, summarise, write_report
from devft_edge.selection import data_seed, select_clients, training_seed
from devft_edge.stage import StageBuilder
from devft_edge.step_cost import StepCostModel, step_cost_model
from devft_edge.training import train_local

logger = logging.getLogger(__name__)


class SimulationConfig(RunConfig):
    """A run in one process: the run configuration plus the simulated clients and their data."""

    clients: int = Field(10, ge=1)
    """Number of simulated clients N."""
    data: str | None = None
    """JSONL training data (instruction/input/output); None uses the synthetic multi-task set."""
    client_profiles: tuple[str, ...] | None = None
    """Device profile of each client (cycled over the clients); a client is only selected for a
    stage the planner says its profile can train. None: every client can train every stage."""
    data_split: Literal["dirichlet", "by_profile"] = "dirichlet"
    """How training examples are split over clients: Dirichlet(alpha) over task families, or first
    by client profile (each profile's clients hold families no other profile has), then Dirichlet."""

    @model_validator(mode="after")
    def _clients(self) -> Self:
        problems = []
        if self.per_round > self.clients:
            problems.append(f"per_round must be in 1..clients ({self.clients}), got {self.per_round}")
        if self.eval_examples < 1:
            problems.append("eval_examples must be >= 1")
        if self.data_split == "by_profile" and not self.client_profiles:
            problems.append("data_split by_profile needs client_profiles")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def profile_of(self, client: int) -> str | None:
        """Client ``client``'s device profile (None: no fleet given)."""
        return None if not self.client_profiles else self.client_profiles[client % len(self.client_profiles)]


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


class InProcessPool:
    """The simulator's clients: trained one after another in this process, on the stage model the
    loop holds, with every byte a deployment would send counted (see the module docstring)."""

    def __init__(self, cfg: SimulationConfig, sim: Simulation, client_data: list[list[Example]]) -> None:
        self.cfg, self.rule, self.shape = cfg, sim.rule, sim.shape
        self.memories_ = [ClientMemory(num_samples=len(d)) for d in client_data]
        self.streams: dict[int, Iterator[dict[str, Tensor]]] = {
            c: batches(d, cfg.train.batch_size, data_seed(cfg.seed, c), sim.tokenizer, cfg.train.seq_len)
            for c, d in enumerate(client_data)
        }
        self.full_pack_bytes = 0
        """``full_pack`` delivery: size of the full model's pack, downloaded once per device."""
        if cfg.delivery == "full_pack":
            self.full_pack_bytes = pack_file_bytes(
                sim.base,
                init_lora_state(lora_shapes(sim.base, cfg.lora), cfg.lora.rank, cfg.seed),
                [[j] for j in range(sim.total_layers)],
                model_name=cfg.model,
                lora=cfg.lora,
                quant=cfg.quant,
                tokenizer_dir=model_dir(cfg.model),
            )
        self.has_full_pack: set[int] = set()
        self.has_pack: set[int] = set()
        """Clients that already downloaded the open stage's pack."""
        self.eligible: list[int] = []
        self.pack_bytes = 0

    def ship(self, opened: OpenStage, builder: StageBuilder) -> dict[str, object]:
        """Size the stage's pack (or plan) as the aggregator writes it; which clients can train it."""
        cfg, built = self.cfg, opened.built
        if cfg.delivery == "full_pack":
            self.pack_bytes = plan_file_bytes(
                built, builder.fusion, model_name=cfg.model, lora=cfg.lora, quant=cfg.quant
            )
        else:
            self.pack_bytes = pack_file_bytes(
                built.model,
                built.start,
                built.groups,
                model_name=cfg.model,
                lora=cfg.lora,
                quant=cfg.quant,
                tokenizer_dir=model_dir(cfg.model),
            )
        self.has_pack, self.eligible = set(), self._eligible(len(built.groups))
        return {"pack_bytes": self.pack_bytes, "eligible_clients": len(self.eligible)}

    def train(self, round_index: int, stage: StageView, tally: ClientRound) -> Iterator[tuple[LoraState, float]]:
        """Select, ship, train and collect each client's update, one at a time (a stream)."""
        selected = select_clients(self.eligible, self.cfg.per_round, self.cfg.seed, round_index)
        tally.devices = [str(c) for c in selected]
        train = replace(self.cfg.train, steps=stage.steps)
        for c in selected:
            t0 = time.perf_counter()
            memory = self.memories_[c]
            received = self.rule.downlink(stage.server, memory, round_index)
            tally.bytes_down += state_bytes(received) if received else 0
            if c in self.has_pack:
                tally.bytes_down += self.rule.extra_downlink_bytes(stage.server, memory, round_index)
            else:  # first time in this stage: the stage's pack or plan (and, once, the full pack)
                weights = self.pack_bytes + (0 if c in self.has_full_pack else self.full_pack_bytes)
                tally.bytes_down += weights
                tally.bytes_down_pack += weights
                self.has_pack.add(c)
                self.has_full_pack.add(c)
                memory.synced_round = round_index - 1
            set_lora_state(stage.model, self.rule.client_start(received, stage.server, memory, stage.to_stage))
            torch.manual_seed(training_seed(self.cfg.seed, round_index, c))
            tally.losses.append(train_local(stage.model, self.streams[c], train))
            sent = self.rule.uplink(get_lora_state(stage.model), memory, stage.to_full)
            tally.bytes_up += state_bytes(sent)
            tally.client_seconds.append(time.perf_counter() - t0)
            tally.peak_rss_bytes = peak_bytes()
            yield sent, float(memory.num_samples)

    def memories(self) -> list[ClientMemory]:
        """Each client's kept state (FedSA-LoRA's B) and sample count."""
        return self.memories_

    def aggregated(self, stage: StageView) -> None:
        """Nothing to keep: the simulation is not resumed."""

    def handed_over(self, full: GlobalState) -> None:
        """Nothing to keep: the simulation is not resumed."""

    def final_upload_bytes(self) -> int:
        """FedSA-LoRA clients upload their private B once so the server can export one model."""
        return sum(state_bytes(up) for up in map(self.rule.final_upload, self.memories_) if up)

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


class Simulation:
    """One simulated federated run: the round loop over in-process clients."""

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
        builder = StageBuilder(
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
        federation = Federation(
            builder, self.schedule, self.rule, cfg.seed, cfg.train.steps, cfg.stage_steps, self.step_cost, cfg.plateau()
        )
        self.warning = self._cost_warning()
        if self.warning:
            logger.warning("%s", self.warning)
        client_data, held_out = _load_data(cfg)
        self.pool = InProcessPool(cfg, self, client_data)
        self.loop = RoundLoop(
            federation,
            self.pool,
            self.base,
            self.tokenizer,
            cfg.lora,
            held_out,
            cfg.train.seq_len,
            cfg.eval_policy(),
            cfg.rounds,
            cfg.seed,
            out_dir,
        )

    def _cost_warning(self) -> str | None:
        """What the measured hand-over predicts for this schedule's cost against FedIT's."""
        caps, rounds = self.schedule.capacities, self.schedule.rounds_per_stage
        ratios = [1 / self.step_cost(c) if self.cfg.stage_steps == "compute" else 1.0 for c in caps]
        return cost_warning(self.cfg.model, early_rounds(caps, rounds, self.step_cost, ratios))

    def run(self) -> dict[str, object]:
        """Run every stage and round; write metrics, summary, adapter and plot. Returns the summary."""
        start = time.perf_counter()
        cfg = self.cfg
        bar = tqdm(
            total=cfg.rounds,
            disable=None if self.progress is None else not self.progress,
            desc=cfg.method,
            unit="round",
        )

        def on_round(row: RoundMetrics) -> None:
            bar.update(1)
            bar.set_postfix(stage=row.stage, eval_loss="-" if row.eval_loss is None else f"{row.eval_loss:.3f}")

        with bar:
            progress = self.loop.run(cfg.stop_after, on_round)
        final_up = self.pool.final_upload_bytes()
        adapter_dir = self.loop.export(cfg.export_merged)
        rows = progress.history
        summary = summarise(
            cfg.method,
            cfg.model,
            rows,
            progress.initial_eval,
            progress.stages,
            adapter_dir,
            cfg.model_dump(mode="json"),
        )
        summary |= {
            "step_cost": {"source": self.step_cost.source, "intercept": round(self.step_cost.intercept, 4)},
            "cost_warning": self.warning,
            "bytes_up": self.loop.costs.bytes_up + final_up,
            "final_upload_bytes": final_up,
            "peak_rss_bytes": peak_bytes(),
            "total_seconds": round(time.perf_counter() - start, 3),
        }
        write_report(self.out_dir, summary, rows)
        return summary


def simulate(cfg: SimulationConfig, out_dir: Path, progress: bool | None = None) -> dict[str, object]:
    """Run the federated simulation; write metrics, summary, adapter and plot into ``out_dir``.

    Returns the summary dictionary (also written to ``summary.json``).
    """
    return Simulation(cfg, out_dir, progress).run()
