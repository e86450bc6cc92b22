"""The MQTT fleet as the round loop's client pool (:class:`devft_edge.run_loop.ClientPool`).

The loop opens a stage, closes a round and hands a stage over; the fleet does what that means
with devices on the other side of a broker and a checkpoint under everything:

- :meth:`FleetPool.ship` writes the stage's signed pack (or, with ``full_pack`` delivery, the full
  pack once and the stage's signed plan) into the blob store devices pull from, and checkpoints
  the opened stage;
- :meth:`FleetPool.train` is the open round's accepted updates (the service's intake pulled and
  validated them), streamed from the store one at a time: their shared factors clipped to the
  others' median change and weighted by robust sample counts (:mod:`devft_edge.robust`); each
  device's private factors (FedSA-LoRA's B) are kept, in full-model space, for evaluation and export;
- :meth:`FleetPool.aggregated` and :meth:`FleetPool.handed_over` store the global states the
  next checkpoint names.

Selection, tasks and the round's deadline stay with the service (:mod:`cloud_aggregator.rounds`):
the loop asks for a round's updates only once the round policy has closed it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_save

from cloud_aggregator.config import AggregatorConfig
from cloud_aggregator.state import RunState, now, save_state
from devft_edge.aggregation import AggregationRule, ClientMemory, GlobalState
from devft_edge.blobs import BlobStore
from devft_edge.federation import OpenStage
from devft_edge.lora import LoraSettings, LoraState
from devft_edge.memory import ModelShape, StepConfig, estimate_memory
from devft_edge.robust import clip_scales, clipped, robust_weights
from devft_edge.run_loop import ClientRound, Costs, StageView
from devft_edge.stage import Stage, StageBuilder

logger = logging.getLogger(__name__)


class RunBlobs:
    """The run's tensor states in the content-addressed blob store, by id."""

    def __init__(self, store: BlobStore, chunk_bytes: int) -> None:
        self.store, self.chunk_bytes = store, chunk_bytes

    def put(self, state: LoraState) -> str:
        """Store a tensor state; its blob id."""
        return self.store.add_bytes(safetensors_save(state), self.chunk_bytes).sha256

    def read(self, sha: str) -> LoraState:
        """The tensor state stored as ``sha`` (empty for no blob)."""
        from devft_edge.weights import read_safetensors

        return read_safetensors(self.store.path(sha)) if sha else {}


class FleetPool:
    """The devices of one run, as the round loop sees them (see the module docstring)."""

    def __init__(
        self,
        cfg: AggregatorConfig,
        state: RunState,
        blobs: RunBlobs,
        rule: AggregationRule,
        base: Any,
        lora: LoraSettings,
        shape: ModelShape,
        sign_key: Any,
        stages: int,
        step: Callable[[], StepConfig],
        round_start: Callable[[], LoraState],
        costs: Callable[[], Costs],
        full: Callable[[], GlobalState],
    ) -> None:
        self.cfg, self.state, self.blobs, self.rule = cfg, state, blobs, rule
        self.base, self.lora, self.shape, self.sign_key, self.stages = base, lora, shape, sign_key, stages
        self.step, self.round_start, self.costs, self.full = step, round_start, costs, full
        """Callables into the service and its loop: the planner's step of the open stage, the LoRA
        the open round started from, the loop's costs so far, the full model's state."""

    def ship(self, opened: OpenStage, builder: StageBuilder) -> dict[str, Any]:
        """Write the stage's signed pack (or plan) and checkpoint the opened stage; what the loop's
        stage record takes from shipping it (sizes, and the planner's peak for the report)."""
        stage, groups, s = opened.built, opened.built.groups, self.state
        self._write_weights(stage, builder)
        s.stage_lora = self.blobs.put(opened.server.lora)
        s.stage_delta = self.blobs.put(opened.server.delta) if opened.server.delta else ""
        s.groups, s.stage, s.stage_rounds_done = groups, stage.number, 0
        s.stage_budget, s.plateau = opened.budget.rounds, asdict(opened.budget.plateau)
        s.carry = 0
        save_state(self.cfg.state_dir, s)
        shipped = self.shipped()
        logger.info(
            "stage %d of %d: %d layers, pack %s (%.1f MB)",
            stage.number,
            self.stages,
            len(groups),
            s.pack[:12],
            shipped["pack_bytes"] / 1e6,
        )
        return shipped

    def shipped(self) -> dict[str, Any]:
        """What the open stage's record takes from its shipping, read from the checkpointed blobs
        (so a stage rebuilt after a restart gets the same record)."""
        s, store = self.state, self.blobs.store
        return {
            # what this stage adds to a device's downloads: its pack, or its plan (full_pack delivery)
            "pack_bytes": store.path(s.plan or s.pack).stat().st_size,
            "full_pack_bytes": store.path(s.full_pack).stat().st_size if s.full_pack else 0,
            # what the planner admits devices by (CPU), for the report to set beside what they measured
            "predicted_peak_bytes": estimate_memory(self.shape, self.step()).peak_bytes,
        }

    def train(self, round_index: int, stage: StageView, tally: ClientRound) -> Iterator[tuple[LoraState, float]]:
        """The open round's accepted updates, streamed (see the module docstring)."""
        s, round_ = self.state, self.state.open_round
        assert round_ is not None and round_.index == round_index  # the loop closes the open round
        accepted = list(round_.accepted.items())
        weights = robust_weights([a.num_samples for _, a in accepted], self.cfg.max_weight_ratio)
        scales = clip_scales([a.norm for _, a in accepted], self.cfg.max_norm_ratio)
        c = self.costs()
        tally.devices = sorted(round_.accepted)
        tally.losses = [a.train_loss for _, a in accepted]
        tally.client_seconds = [a.seconds for _, a in accepted]
        tally.peak_rss_bytes = max((a.peak_rss_bytes for _, a in accepted), default=0)
        tally.bytes_up, tally.bytes_down = s.bytes_up - c.bytes_up, s.bytes_down - c.bytes_down
        tally.bytes_down_pack = s.bytes_down_pack - c.bytes_down_pack
        tally.wall_seconds = now() - s.started  # devices train in parallel: the run's wall time
        start = self.round_start()
        for (device, a), weight, scale in zip(accepted, weights, scales, strict=True):
            update = self.blobs.read(a.blob)
            private = self.private(update)
            if private:
                s.private[device] = {"blob": self.blobs.put(stage.to_full(private)), "num_samples": a.num_samples}
            yield clipped(self.shared(update), start, scale), weight

    def aggregated(self, stage: StageView) -> None:
        """Store the round's global state (the checkpoint that closes the round names it)."""
        self.state.stage_lora = self.blobs.put(stage.server.lora)
        if stage.server.delta:
            self.state.stage_delta = self.blobs.put(stage.server.delta)

    def handed_over(self, full: GlobalState) -> None:
        """Store the full model's state the closed stage handed over."""
        self.state.full_lora = self.blobs.put(full.lora)
        self.state.full_delta = self.blobs.put(full.delta) if full.delta else ""

    def memories(self) -> Iterator[ClientMemory]:
        """What the devices keep, as far as the server holds it (FedSA: each device's last B), read
        one at a time; weighted by their robust sample counts."""
        kept = sorted(self.state.private.items())
        weights = robust_weights([p["num_samples"] for _, p in kept], self.cfg.max_weight_ratio)
        for (_, private), weight in zip(kept, weights, strict=True):
            yield ClientMemory(num_samples=weight, private=self.blobs.read(private["blob"]))

    def final_upload_bytes(self) -> int:
        """Nothing: devices send their private factors with every update (the server evaluates
        every round)."""
        return 0

    def shared(self, state: LoraState) -> LoraState:
        """The factors of ``state`` the rule aggregates (FedSA: A only)."""
        return {k: v for k, v in state.items() if k.endswith(self.rule.shared)}

    def private(self, state: LoraState) -> LoraState:
        """The factors of ``state`` the rule leaves with the device (FedSA: B; the others: none)."""
        return {k: v for k, v in state.items() if not k.endswith(self.rule.shared)}

    def _write_weights(self, stage: Stage, builder: StageBuilder) -> None:
        """What devices need for ``stage``'s weights: its own signed pack (``stage_packs``), or the
        full pack once and the stage's signed plan (``full_pack``: devices fuse the stage)."""
        from devft_edge.models import model_dir
        from devft_edge.pack import write_pack
        from devft_edge.quantization import QuantSpec
        from devft_edge.stage_plan import write_stage_plan

        cfg, s, store = self.cfg, self.state, self.blobs.store
        common: dict[str, Any] = {
            "model_name": cfg.model,
            "stages": self.stages,
            "lora": self.lora,
            "quant": QuantSpec(cfg.quant),
            "training": cfg.train,
            "created": _iso(time.time()),
            "sign_key": self.sign_key,
        }
        packs = {"tokenizer_dir": model_dir(cfg.model), **common}
        with tempfile.TemporaryDirectory(dir=cfg.state_dir) as tmp:
            if cfg.delivery == "stage_packs":
                path = Path(tmp) / "stage.devpack"
                model = copy.deepcopy(stage.model)  # write_pack quantizes in place; the loop evaluates the fp32 stage
                write_pack(path, model, stage.start, stage=stage.number, groups=stage.groups, **packs)
                s.pack, s.plan = store.add_file(path, cfg.chunk_bytes).sha256, ""
                return
            if not s.full_pack:
                path = Path(tmp) / "full.devpack"
                singletons = [[j] for j in range(builder.total)]
                write_pack(path, copy.deepcopy(self.base), self.full().lora, stage=0, groups=singletons, **packs)
                s.full_pack = store.add_file(path, cfg.chunk_bytes).sha256
            path = Path(tmp) / "stage.plan"
            write_stage_plan(path, stage, builder.fusion, base_pack=s.full_pack, **common)
            s.pack, s.plan = s.full_pack, store.add_file(path, cfg.chunk_bytes).sha256


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
