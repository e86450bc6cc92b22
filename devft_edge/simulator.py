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
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from devft_edge.aggregation import RULES, ClientMemory, GlobalState
from devft_edge.calibration import CALIBRATION_TEXT
from devft_edge.data import Example, batches, load_jsonl, partition, train_eval_split
from devft_edge.errors import raise_if
from devft_edge.export import export_adapter, export_merged
from devft_edge.fusion import FUSIONS
from devft_edge.grouping import GROUPINGS
from devft_edge.layers import layer_prefix, num_layers
from devft_edge.lora import (
    LoraSettings,
    attach_lora,
    get_lora_state,
    init_lora_state,
    lora_shapes,
    set_lora_state,
    state_bytes,
)
from devft_edge.models import load_model, load_tokenizer
from devft_edge.plot import plot_curves
from devft_edge.schedule import StageSchedule
from devft_edge.similarity import SIMILARITIES
from devft_edge.submodel import add_weight_delta, build_submodel, layer_evidence, stage_lora
from devft_edge.training import TrainSettings, evaluate, train_local
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
    """Total round budget, split equally over the stages."""
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
        for registry, name in ((SIMILARITIES, self.similarity), (GROUPINGS, self.grouping), (FUSIONS, self.fusion)):
            if name not in registry:
                problems.append(f"unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")
        if self.fusion == "dblf" and self.beta != "auto":
            try:
                beta = float(self.beta)
                if not 0 < beta <= 1:
                    problems.append(f"beta must be in (0, 1] or 'auto', got {self.beta}")
            except ValueError:
                problems.append(f"beta must be a number in (0, 1] or 'auto', got {self.beta!r}")
        raise_if(problems)

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
    peak_rss_bytes: int


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        raise_if([] if len(examples) > cfg.eval_examples + cfg.clients else
                 [f"{cfg.data}: {len(examples)} examples is too few for {cfg.eval_examples} eval + {cfg.clients} clients"])
        held_out, train = examples[: cfg.eval_examples], examples[cfg.eval_examples :]
    return partition(train, cfg.clients, cfg.seed, cfg.data_alpha), held_out


def simulate(cfg: SimulationConfig, out_dir: Path, progress: bool | None = None) -> dict[str, object]:
    """Run the federated simulation; write metrics, summary, adapter and plot into ``out_dir``.

    Returns the summary dictionary (also written to ``summary.json``).
    """
    start_all = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, seed=cfg.seed)
    total_layers = num_layers(base.config)
    schedule = StageSchedule(total_layers, cfg.stages if cfg.devft else 1, cfg.rounds)
    rule = RULES.get(cfg.rule)
    fusion = FUSIONS.get(cfg.fusion, **({"beta": cfg.beta} if cfg.fusion == "dblf" else {}))
    similarity = SIMILARITIES.get(cfg.similarity)
    grouping = GROUPINGS.get(cfg.grouping)
    client_data, held_out = _load_data(cfg)
    memories = [ClientMemory(num_samples=len(d)) for d in client_data]
    streams: dict[int, Iterator[dict[str, Tensor]]] = {
        c: batches(d, cfg.train.batch_size, cfg.seed * 7919 + c, tokenizer, cfg.train.seq_len)
        for c, d in enumerate(client_data)
    }
    calibration = tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :512]
    sampler = random.Random(cfg.seed)

    full = GlobalState(lora=init_lora_state(lora_shapes(base, cfg.lora), cfg.lora.rank, cfg.seed))
    prefix = layer_prefix(base, 0)[: -len("0.")]
    shared_bytes = serialized_bytes({k: v for k, v in base.state_dict().items() if not k.startswith(prefix)})
    has_shared: set[int] = set()

    initial = evaluate(base, tokenizer, held_out, cfg.train.seq_len)
    metrics: list[RoundMetrics] = []
    stages_info: list[dict[str, object]] = []
    wall = parallel = 0.0
    bytes_up = bytes_down = 0
    round_index = 0
    bar = tqdm(total=cfg.rounds, disable=None if progress is None else not progress, desc=cfg.method, unit="round")
    metrics_file = (out_dir / "metrics.jsonl").open("w")
    try:
        for stage, (capacity, n_rounds) in enumerate(zip(schedule.capacities, schedule.rounds_per_stage)):
            t0 = time.perf_counter()
            if capacity == total_layers:
                groups = [[j] for j in range(total_layers)]
            else:
                evidence = layer_evidence(base, similarity, cfg.lora, full.lora, calibration)
                groups = grouping.group(similarity.compute(evidence), capacity, cfg.seed + stage)
            logger.info("stage %d: %d layers, groups %s", stage + 1, capacity, groups)
            sub = build_submodel(base, groups, fusion)

            def to_stage(state: dict[str, Tensor], groups: list[list[int]] = groups) -> dict[str, Tensor]:
                return stage_lora(state, groups, fusion)

            def to_full(state: dict[str, Tensor], groups: list[list[int]] = groups) -> dict[str, Tensor]:
                return transfer_lora(state, groups)

            server = GlobalState(lora=to_stage(full.lora), delta=to_stage(full.delta) if full.delta else {})
            add_weight_delta(sub.model, server.delta, cfg.lora.scaling)
            block_bytes = serialized_bytes(
                {k: v for k, v in sub.model.state_dict().items() if k.startswith(prefix)}
            )
            model = attach_lora(sub.model, cfg.lora)
            rule.start_stage(round_index)
            has_pack: set[int] = set()
            stages_info.append({"stage": stage + 1, "layers": capacity, "rounds": n_rounds, "groups": groups,
                                "pack_block_bytes": block_bytes})
            wall += time.perf_counter() - t0
            parallel += time.perf_counter() - t0

            for _ in range(n_rounds):
                t_round = time.perf_counter()
                selected = sorted(sampler.sample(range(cfg.clients), cfg.per_round))
                losses: list[float] = []
                client_times: list[float] = []
                round_up = round_down = 0

                def updates() -> Iterator[tuple[dict[str, Tensor], float]]:
                    nonlocal round_up, round_down
                    for c in selected:
                        t_client = time.perf_counter()
                        memory = memories[c]
                        received = rule.downlink(server, memory, round_index)
                        round_down += state_bytes(received) if received else 0
                        round_down += rule.extra_downlink_bytes(server, memory, round_index) if c in has_pack else 0
                        if c not in has_pack:
                            round_down += block_bytes + (0 if c in has_shared else shared_bytes)
                            has_pack.add(c)
                            has_shared.add(c)
                            memory.synced_round = round_index - 1
                        set_lora_state(model, rule.client_start(received, server, memory, to_stage))
                        torch.manual_seed(cfg.seed * 1_000_003 + round_index * 1009 + c)
                        losses.append(train_local(model, streams[c], cfg.train))
                        sent = rule.uplink(get_lora_state(model), memory, to_full)
                        round_up += state_bytes(sent)
                        client_times.append(time.perf_counter() - t_client)
                        yield sent, float(memory.num_samples)

                before = server.delta
                server = rule.aggregate(server, updates(), round_index, cfg.seed * 31 + round_index)
                if server.delta:
                    increment = {k: v - before[k] if k in before else v for k, v in server.delta.items()}
                    add_weight_delta(model, increment, cfg.lora.scaling)
                elapsed = time.perf_counter() - t_round
                wall += elapsed
                parallel += max(client_times) + (elapsed - sum(client_times))
                bytes_up += round_up
                bytes_down += round_down
                round_index += 1

                last = round_index == cfg.rounds
                result = None
                if last or round_index % cfg.eval_every == 0:
                    set_lora_state(model, rule.eval_lora(server, memories, to_stage))
                    result = evaluate(model, tokenizer, held_out, cfg.train.seq_len)
                line = RoundMetrics(
                    round=round_index, stage=stage + 1, layers=capacity,
                    train_loss=sum(losses) / len(losses),
                    eval_loss=None if result is None else result.loss,
                    eval_accuracy=None if result is None else result.accuracy,
                    wall_seconds=round(wall, 3), parallel_seconds=round(parallel, 3),
                    bytes_up=bytes_up, bytes_down=bytes_down, peak_rss_bytes=peak_rss_bytes(),
                )
                metrics.append(line)
                metrics_file.write(json.dumps(asdict(line)) + "\n")
                metrics_file.flush()
                bar.update(1)
                bar.set_postfix(stage=stage + 1, eval_loss=f"{line.eval_loss:.3f}" if result else "-")

            t0 = time.perf_counter()
            full = GlobalState(
                lora=to_full(rule.eval_lora(server, memories, to_stage)),
                delta=to_full(server.delta) if server.delta else {},
            )
            model.unload()
            del model, sub
            wall += time.perf_counter() - t0
    finally:
        bar.close()
        metrics_file.close()

    # FedSA-LoRA clients upload their private B once so the server can export one model.
    final_up = sum(state_bytes(rule.final_upload(m)) for m in memories if rule.final_upload(m))
    bytes_up += final_up
    adapter_dir = export_adapter(base, cfg.lora, full.lora, out_dir / "adapter", full.delta)
    if cfg.export_merged:
        export_merged(base, cfg.lora, full.lora, out_dir / "merged", full.delta)
        tokenizer.save_pretrained(out_dir / "merged")
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
        "wall_seconds": round(wall, 3),
        "parallel_seconds": round(parallel, 3),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "final_upload_bytes": final_up,
        "peak_rss_bytes": peak_rss_bytes(),
        "total_seconds": round(time.perf_counter() - start_all, 3),
        "adapter_dir": str(adapter_dir),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves({cfg.method: [asdict(m) for m in metrics]}, out_dir / "curves.png")
    return summary
