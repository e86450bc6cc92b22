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
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from devft_edge.aggregation import RULES, ClientMemory, GlobalState
from devft_edge.calibration import calibration_ids
from devft_edge.data import Example, batches, load_jsonl, partition, train_eval_split
from devft_edge.errors import ConfigError, raise_if
from devft_edge.export import export_adapter, export_merged
from devft_edge.fusion import FUSIONS, Fusion
from devft_edge.grouping import GROUPINGS
from devft_edge.layers import layer_prefix, num_layers
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
from devft_edge.models import load_model, load_tokenizer
from devft_edge.peak_memory import peak_bytes
from devft_edge.plot import plot_curves
from devft_edge.schedule import StageSchedule
from devft_edge.similarity import SIMILARITIES
from devft_edge.submodel import add_weight_delta, build_submodel, stage_groups, stage_lora
from devft_edge.training import EvalResult, TrainSettings, evaluate, train_local
from devft_edge.transfer import transfer_lora

logger = logging.getLogger(__name__)

METHODS = ("devft", "fedit", "fedsa", "flora", "devft+fedit", "devft+fedsa", "devft+flora")


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
    similarity: str = "cka"
    """Layer similarity for grouping (``cka`` or ``weights``)."""
    grouping: str = "contiguous"
    """Grouping algorithm (``contiguous``, ``spectral``, ``random``, ``even``)."""
    fusion: str = "dblf"
    """Layer fusion (``dblf``, ``one``, ``sum``, ``mean``)."""
    beta: float | str = 0.1
    """DBLF beta in (0, 1], or ``auto`` = min(0.1, 1/n)."""
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
    adaptive_min_delta: float = 0.01
    """Smallest eval-loss decrease that counts as progress for the adaptive schedule."""
    round_split: str = "depth"
    """How the round budget is shared out over the stages: ``depth`` (default: in proportion to stage
    depth) or the paper's ``equal``. On SmolLM2-135M the depth split ended 0.19 +- 0.05 lower in eval
    loss over 3 seeds at the same budget (docs/results.md, issue 3)."""

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
        for registry, name in ((SIMILARITIES, self.similarity), (GROUPINGS, self.grouping), (FUSIONS, self.fusion)):
            if name not in registry:
                problems.append(f"unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")
        if self.fusion in FUSIONS:
            try:  # the variant validates its own parameters
                FUSIONS.get(self.fusion, **self.fusion_params)
            except ConfigError as err:
                problems.extend(err.problems)
        raise_if(problems)

    @property
    def fusion_params(self) -> dict[str, object]:
        """Parameters of the fusion variant (``beta`` applies to DBLF only)."""
        return {"beta": self.beta} if self.fusion == "dblf" else {}

    @property
    def devft(self) -> bool:
        """Whether the DevFT stage schedule is on (else one full-depth stage)."""
        return self.method.startswith("devft")

    @property
    def rule(self) -> str:
        """The in-stage aggregation rule's name."""
        return self.method.partition("+")[2] or "fedit" if self.devft else self.method


@dataclass(frozen=True)
class RoundMetrics:
    """One line of ``metrics.jsonl``."""

    round: int
    stage: int
    layers: int
    train_loss: float
    eval_loss: float | None
    eval_accuracy: float | None
    wall_seconds: float
    parallel_seconds: float
    bytes_up: int
    bytes_down: int
    bytes_down_pack: int
    """Part of ``bytes_down`` that is model weights (stage packs, shared embeddings/head); the rest
    is LoRA state (and FLoRA's merged updates)."""
    peak_rss_bytes: int


def serialized_bytes(tensors: dict[str, Tensor]) -> int:
    """Exact safetensors size of ``tensors``, written to a temporary file (no in-memory copy).

    Tied tensors (e.g. embeddings shared with the LM head) are stored and counted once.
    """
    unique: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            unique[key] = value.contiguous()
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        save_file(unique, handle.name)
        return Path(handle.name).stat().st_size


def _load_data(cfg: SimulationConfig) -> tuple[list[list[Example]], list[Example]]:
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

    number: int
    """1-based stage number."""
    groups: list[list[int]]
    """``groups[g]`` = original layers fused into submodel block g."""
    fusion: Fusion
    model: PeftModel
    """The fused submodel with LoRA attached: every simulated client trains this one instance."""
    server: GlobalState
    block_bytes: int
    """Serialised size of the stage's fused blocks (the per-stage part of the pack)."""
    has_pack: set[int] = field(default_factory=set)
    """Clients that already downloaded this stage's pack."""

    def to_stage(self, state: LoraState) -> LoraState:
        """Full-model state -> this stage's space (fusion of each group)."""
        return stage_lora(state, self.groups, self.fusion)

    def to_full(self, state: LoraState) -> LoraState:
        """This stage's state -> full-model space (knowledge transfer)."""
        return transfer_lora(state, self.groups)


@dataclass
class _Plateau:
    """Detects a plateau of the eval loss inside a stage (the adaptive schedule); patience 0 = never."""

    patience: int
    min_delta: float
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
        self.total_layers = num_layers(self.base.config)
        self.schedule = StageSchedule(
            self.total_layers, cfg.stages if cfg.devft else 1, cfg.rounds, round_split=cfg.round_split
        )
        self.rule = RULES.get(cfg.rule)
        self.fusion = FUSIONS.get(cfg.fusion, **cfg.fusion_params)
        self.similarity = SIMILARITIES.get(cfg.similarity)
        self.grouping = GROUPINGS.get(cfg.grouping)
        client_data, self.held_out = _load_data(cfg)
        self.memories = [ClientMemory(num_samples=len(d)) for d in client_data]
        self.streams: dict[int, Iterator[dict[str, Tensor]]] = {
            c: batches(d, cfg.train.batch_size, cfg.seed * 7919 + c, self.tokenizer, cfg.train.seq_len)
            for c, d in enumerate(client_data)
        }
        self.calibration = calibration_ids(self.tokenizer)
        self.sampler = random.Random(cfg.seed)
        self.full = GlobalState(lora=init_lora_state(lora_shapes(self.base, cfg.lora), cfg.lora.rank, cfg.seed))
        self.prefix = layer_prefix(self.base, 0)[: -len("0.")]
        self.shared_bytes = serialized_bytes(
            {k: v for k, v in self.base.state_dict().items() if not k.startswith(self.prefix)}
        )
        self.has_shared: set[int] = set()
        self.wall = self.parallel = 0.0
        self.bytes_up = self.bytes_down = self.bytes_down_pack = 0

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
            for number, (capacity, n_rounds) in enumerate(
                zip(self.schedule.capacities, self.schedule.rounds_per_stage, strict=True), start=1
            ):
                budget = self.cfg.rounds - round_index if number == last_stage else n_rounds + carry
                stage = self._open_stage(number, capacity, round_index)
                plateau = _Plateau(self.cfg.adaptive_patience, self.cfg.adaptive_min_delta)
                used = 0
                while used < budget:
                    line = self._run_round(stage, round_index)
                    round_index += 1
                    used += 1
                    metrics.append(line)
                    metrics_file.write(json.dumps(asdict(line)) + "\n")
                    metrics_file.flush()
                    bar.update(1)
                    bar.set_postfix(stage=number, eval_loss="-" if line.eval_loss is None else f"{line.eval_loss:.3f}")
                    if number < last_stage and plateau.reached(line.eval_loss):
                        logger.info("stage %d plateaued after %d of %d rounds", number, used, budget)
                        break
                carry = budget - used
                stages_info.append(
                    {
                        "stage": number,
                        "layers": capacity,
                        "rounds": used,
                        "groups": stage.groups,
                        "pack_block_bytes": stage.block_bytes,
                    }
                )
                self._close_stage(stage)
        return self._finish(initial, metrics, stages_info, time.perf_counter() - start)

    def _open_stage(self, number: int, capacity: int, first_round: int) -> _Stage:
        """Plan and pack one stage: group, fuse, attach LoRA initialised from the full state."""
        t0 = time.perf_counter()
        groups = stage_groups(
            self.base,
            capacity,
            self.similarity,
            self.grouping,
            self.cfg.lora,
            self.full.lora,
            self.calibration,
            self.cfg.seed + number,
        )
        logger.info("stage %d: %d layers, groups %s", number, capacity, groups)
        sub = build_submodel(self.base, groups, self.fusion)
        fused_delta = stage_lora(self.full.delta, groups, self.fusion) if self.full.delta else {}
        add_weight_delta(sub.model, fused_delta, self.cfg.lora.scaling)
        block_bytes = serialized_bytes({k: v for k, v in sub.model.state_dict().items() if k.startswith(self.prefix)})
        stage = _Stage(
            number=number,
            groups=groups,
            fusion=self.fusion,
            model=attach_lora(sub.model, self.cfg.lora),
            server=GlobalState(lora={}, delta=fused_delta),
            block_bytes=block_bytes,
        )
        stage.server.lora = stage.to_stage(self.full.lora)
        self.rule.start_stage(first_round)
        elapsed = time.perf_counter() - t0
        self.wall += elapsed
        self.parallel += elapsed
        return stage

    def _client_updates(
        self, stage: _Stage, selected: list[int], round_index: int, tally: _RoundTally
    ) -> Iterator[tuple[LoraState, float]]:
        """Ship, train and collect each selected client's update, one at a time (a stream)."""
        for c in selected:
            t0 = time.perf_counter()
            memory = self.memories[c]
            received = self.rule.downlink(stage.server, memory, round_index)
            tally.bytes_down += state_bytes(received) if received else 0
            if c in stage.has_pack:
                tally.bytes_down += self.rule.extra_downlink_bytes(stage.server, memory, round_index)
            else:  # first time in this stage: the pack (and, once per run, the shared embeddings/head)
                pack = stage.block_bytes + (0 if c in self.has_shared else self.shared_bytes)
                tally.bytes_down += pack
                tally.bytes_down_pack += pack
                stage.has_pack.add(c)
                self.has_shared.add(c)
                memory.synced_round = round_index - 1
            set_lora_state(stage.model, self.rule.client_start(received, stage.server, memory, stage.to_stage))
            torch.manual_seed(self.cfg.seed * 1_000_003 + round_index * 1009 + c)
            tally.losses.append(train_local(stage.model, self.streams[c], self.cfg.train))
            sent = self.rule.uplink(get_lora_state(stage.model), memory, stage.to_full)
            tally.bytes_up += state_bytes(sent)
            tally.client_seconds.append(time.perf_counter() - t0)
            yield sent, float(memory.num_samples)

    def _run_round(self, stage: _Stage, round_index: int) -> RoundMetrics:
        """Select clients, train them, aggregate, evaluate when due."""
        t0 = time.perf_counter()
        selected = sorted(self.sampler.sample(range(self.cfg.clients), self.cfg.per_round))
        tally = _RoundTally()
        before = stage.server.delta
        stage.server = self.rule.aggregate(
            stage.server,
            self._client_updates(stage, selected, round_index, tally),
            round_index,
            self.cfg.seed * 31 + round_index,
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
            set_lora_state(stage.model, self.rule.eval_lora(stage.server, self.memories, stage.to_stage))
            result = evaluate(stage.model, self.tokenizer, self.held_out, self.cfg.train.seq_len)
        return RoundMetrics(
            round=number,
            stage=stage.number,
            layers=len(stage.groups),
            train_loss=sum(tally.losses) / len(tally.losses),
            eval_loss=None if result is None else result.loss,
            eval_accuracy=None if result is None else result.accuracy,
            wall_seconds=round(self.wall, 3),
            parallel_seconds=round(self.parallel, 3),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            bytes_down_pack=self.bytes_down_pack,
            peak_rss_bytes=peak_bytes(),
        )

    def _close_stage(self, stage: _Stage) -> None:
        """Knowledge transfer: the representatives' LoRA (and FLoRA's update) back to every member."""
        t0 = time.perf_counter()
        self.full = GlobalState(
            lora=stage.to_full(self.rule.eval_lora(stage.server, self.memories, stage.to_stage)),
            delta=stage.to_full(stage.server.delta) if stage.server.delta else {},
        )
        stage.model.unload()
        self.wall += time.perf_counter() - t0

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
            "wall_seconds": round(self.wall, 3),
            "parallel_seconds": round(self.parallel, 3),
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
