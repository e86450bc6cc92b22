"""The cloud aggregator: a thin service over the core that runs DevFT across real devices.

One worker thread drains the MQTT inbox and drives the run; every state change that matters is
checkpointed (:mod:`cloud_aggregator.state`) before it is acted on, so ``kill -9`` at any moment
and a restart resume the run. The stages and rounds are the simulator's round loop
(:class:`devft_edge.run_loop.RoundLoop`) over this run's devices (:class:`cloud_aggregator.fleet.FleetPool`);
the service adds what a network needs around it: the message handlers behind one error boundary,
the round policy (:mod:`cloud_aggregator.rounds`: selection, quorum, deadline, reselection), tasks
out, updates in (:mod:`cloud_aggregator.intake`), chunks served under a rate limit, and the
retained status.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from dataclasses import asdict, replace
from typing import Any

from cloud_aggregator.config import AggregatorConfig
from cloud_aggregator.fleet import FleetPool, RunBlobs
from cloud_aggregator.intake import IntakeLimits, UpdateIntake
from cloud_aggregator.report import metrics_row, write_summary
from cloud_aggregator.rounds import Outcome, RoundPolicy, RoundRules
from cloud_aggregator.state import (
    Device,
    OpenRound,
    RunState,
    lock_state_dir,
    now,
    open_state,
    save_device,
    save_state,
)
from cloud_aggregator.status import status_document
from devft_edge.aggregation import GlobalState
from devft_edge.blob_transfer import Download, send_chunks, wanted
from devft_edge.blobs import WINDOW, BlobInfo, BlobReceiver, BlobStore
from devft_edge.errors import ConfigError
from devft_edge.federation import Federation, StageBudget
from devft_edge.identity import Enrolment
from devft_edge.memory import StepConfig
from devft_edge.messages import ChunkRequest, Hello, Payload, Presence, Refusal, Task, UpdateOffer
from devft_edge.methods import ClientMethod
from devft_edge.mqtt import BrokerAddress, Connection, Incoming
from devft_edge.protocol import AGGREGATOR, Envelope, Kind, ProtocolError, Reason, Topics, decode, seal, unseal
from devft_edge.ratelimit import RateLimiter
from devft_edge.run_loop import RoundLoop, RunProgress
from devft_edge.schedule import Plateau
from devft_edge.selection import data_seed, training_seed
from devft_edge.stage import StageBuilder

logger = logging.getLogger(__name__)


class Aggregator:
    """The service; ``run()`` until the run is finished."""

    def __init__(self, cfg: AggregatorConfig, broker: str) -> None:
        import torch

        from devft_edge.aggregation import RULES
        from devft_edge.allocator import bound_heap
        from devft_edge.calibration import calibration_ids
        from devft_edge.layers import num_layers
        from devft_edge.memory import model_shape
        from devft_edge.models import load_model, load_tokenizer
        from devft_edge.signing import load_private_key
        from devft_edge.step_cost import step_cost_model
        from devft_edge.tasks import train_eval_split

        # a long-running service: its resident memory should be what it holds, not the stage builds'
        # freed heap (which otherwise stays resident, by chance of allocation order, tens of MB)
        bound_heap()
        self.cfg = cfg
        self.topics = Topics(cfg.prefix)
        self.key = load_private_key(cfg.sign_key)
        self.enrolment = Enrolment(cfg.device_keys)
        self.lock = lock_state_dir(cfg.state_dir)
        self.store = BlobStore(cfg.state_dir / "blobs")
        self.state = open_state(cfg.state_dir, cfg.run_id, cfg.seen_ids)
        torch.manual_seed(cfg.seed)
        self.base = load_model(cfg.model, seed=cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        self.shape = model_shape(self.base.config)
        self.lora = cfg.lora
        self.schedule = cfg.schedule(num_layers(self.base.config))
        t = cfg.train
        self.step_cost = step_cost_model(cfg.model, self.shape, t.batch_size, t.seq_len, cfg.lora.rank)
        # healed blocks are cached in the state directory: a restart rebuilds a stage without healing again
        self.builder = StageBuilder(
            self.base,
            self.tokenizer,
            self.lora,
            cfg.recipe,
            calibration_ids(self.tokenizer),
            cfg.model,
            cfg.seed,
            cache_dir=cfg.state_dir / "heal",
        )
        self.rule = RULES.get(cfg.rule)
        self.federation = Federation(
            self.builder, self.schedule, self.rule, cfg.seed, t.steps, cfg.stage_steps, self.step_cost, cfg.plateau()
        )
        if self.state.stage and not self.state.stage_budget:  # a state written before budgets were kept
            budget = self.federation.budget(self.state.stage, 0)
            self.state.stage_budget, self.state.plateau = budget.rounds, asdict(budget.plateau)
        self.held_out = train_eval_split(0, cfg.eval_examples, seed=cfg.seed)[1] if cfg.eval_examples else []
        self.blobs = RunBlobs(self.store, cfg.chunk_bytes)
        self.pool = FleetPool(
            cfg,
            self.state,
            self.blobs,
            self.rule,
            self.base,
            self.lora,
            self.shape,
            self.key,
            self.federation.stages,
            step=self._step,
            round_start=self._round_start,
            costs=lambda: self.loop.costs,
            full=lambda: self.loop.full,
        )
        self.loop = RoundLoop(
            self.federation,
            self.pool,
            self.base,
            self.tokenizer,
            self.lora,
            self.held_out,
            t.seq_len,
            cfg.eval_policy(),
            cfg.rounds,
            cfg.seed,
            cfg.out_dir,
        )
        """The round loop, over this run's devices."""
        if self.state.stage:
            self._resume_loop()
        self.serving = RateLimiter(cfg.serve_rate_bytes_per_s, burst=2 * WINDOW * cfg.chunk_bytes)
        """Chunk bytes each device may draw: one request is a small message, its answer up to a window."""
        self._waiting: dict[str, tuple[BlobInfo, tuple[int, ...]]] = {}
        """device -> the one chunk request it made that its bucket could not pay for yet: served by
        :meth:`_serve_waiting` once it can (shaping an honest pull faster than the limit; at most one
        per known device, and a second ask meanwhile is refused)."""
        self._next_reap = 0.0
        self.intake = UpdateIntake(
            self.store,
            self.state,
            IntakeLimits(cfg.upload_quota_bytes, cfg.disk_reserve_bytes, cfg.max_update_norm),
            lora_bytes=lambda: 4 * self.shape.lora_params(len(self.state.groups), cfg.lora.rank),
            start=self._round_start,
            shared=self.pool.shared,
            discard=self._discard,
            checkpoint=lambda: save_state(cfg.state_dir, self.state),
            send=self._send_payload,
        )
        """Update offers: their pulls, validation and verdicts."""
        self._start_cache: tuple[str, dict[str, Any]] = ("", {})
        """(blob id, tensors) of the stage LoRA updates are checked against: read once per round."""
        self.policy = RoundPolicy(
            RoundRules(cfg.per_round, cfg.quorum, cfg.round_timeout_s, cfg.selection_wait_s, cfg.seed)
        )
        self._next_selection = 0.0
        self.boot = uuid.uuid4().hex
        """Changes on every start and reconnect: agents re-announce themselves when they see a new one."""
        self._connects_seen = 1
        """Broker connections handled (``run`` makes the first); see :meth:`_reconnected`."""
        self.connection = Connection(
            BrokerAddress.parse(broker),
            f"aggregator-{cfg.fleet}",
            [self.topics.all_up, self.topics.all_presence],
            login=cfg,
        )

    @property
    def uploads(self) -> dict[str, Download]:
        """device -> the pull of its update blob (the intake's)."""
        return self.intake.uploads

    # ---- run loop -------------------------------------------------------------------------------

    def run(self, idle_exit_seconds: float | None = None) -> RunState:
        """Serve until the run is finished (or nothing happened for ``idle_exit_seconds``)."""
        self.connection.start()
        self._publish_status()
        if self.state.open_round is not None:  # resumed mid-round: tell the devices again
            for device in self.state.open_round.selected:
                if device not in self.state.open_round.accepted:
                    self._send_task(device)
        last_event = time.monotonic()
        while not self.state.finished:
            try:
                item = self.connection.inbox.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is not None:
                last_event = time.monotonic()
                self._dispatch(item)
            self._tick()
            if idle_exit_seconds and time.monotonic() - last_event > idle_exit_seconds:
                logger.warning("no message for %.0f s; stopping (the run can be resumed)", idle_exit_seconds)
                break
        self._publish_status()
        self.connection.stop()
        return self.state

    def _dispatch(self, item: Incoming) -> None:
        try:
            device = self.topics.device_of(item.topic)
            if not item.payload:  # a retained message being cleared (by us, below): nothing was sent
                return
            if item.retained and item.topic != self.topics.presence(device):  # replayed at every (re)start
                self.connection.publish(item.topic, b"", retain=True)  # cleared where the broker lets us
                raise ProtocolError(Reason.RETAINED, f"retained message on {item.topic} ignored and cleared")
            key = self.enrolment.key(device)
            if key is None:
                raise ProtocolError(Reason.UNKNOWN_DEVICE, f"{device} is not enrolled in {self.cfg.device_keys}")
            message = decode(unseal(item.payload, item.topic, key))  # the seal is checked before any parsing
            if message.sender != device:
                raise ProtocolError(Reason.WRONG_SENDER, f"header says {message.sender!r} on {device!r}'s topic")
            if not self.state.remember(message.id):
                raise ProtocolError(Reason.DUPLICATE, f"message {message.id} from {device} seen before")
            handler = {
                Kind.HELLO: self._on_hello,
                Kind.PRESENCE: self._on_presence,
                Kind.CHUNK_REQUEST: self._on_chunk_request,
                Kind.UPDATE: self._on_update,
                Kind.CHUNK: self._on_chunk,
                Kind.REFUSAL: self._on_refusal,
            }.get(message.kind)
            if handler is None:
                raise ProtocolError(Reason.MALFORMED, f"a device may not send {message.kind.value}")
            handler(device, message)
        except ProtocolError as error:
            self.state.count_rejection(error.reason.value)
            logger.warning("message on %s rejected: %s", item.topic, error)
        except Exception:  # the error boundary: whatever a message raises, the service goes on
            self.state.count_rejection(Reason.INTERNAL.value)
            logger.exception("message on %s failed; counted as %s", item.topic, Reason.INTERNAL.value)

    # ---- handlers -------------------------------------------------------------------------------

    def _on_hello(self, device: str, message: Envelope) -> None:
        from devft_edge.profiles import parse_profile

        hello = Hello.from_data(message.data)
        try:
            profile = parse_profile(hello.profile, device, f"<hello from {device}>")
        except ConfigError as error:
            raise ProtocolError(Reason.MALFORMED, f"hello with an invalid profile: {error}") from None
        self.state.devices[device] = Device(
            profile=profile.model_dump(mode="json", exclude={"name"}),
            last_seen=now(),
            backends=list(hello.backends),
            cached=list(hello.cached),
        )
        save_device(self.cfg.state_dir, device, self.state.devices[device])
        logger.info("device %s joined (%s, budget %.2f GiB)", device, profile.description, profile.budget_bytes / 2**30)
        round_ = self.state.open_round
        if round_ is not None and device in round_.selected and device not in round_.accepted:
            self._send_task(device)
        self._publish_status()

    def _on_presence(self, device: str, message: Envelope) -> None:
        presence = Presence.from_data(message.data)
        known = self.state.devices.get(device)
        if known is not None:
            known.online = presence.online
            known.last_seen = now()
            save_device(self.cfg.state_dir, device, known)
            self._publish_status()

    def _on_chunk_request(self, device: str, message: Envelope) -> None:
        self._require_known(device)
        info, indices = wanted(ChunkRequest.from_data(message.data), self._served)
        if not self.serving.allow(device, len(indices) * info.chunk_bytes):
            if device in self._waiting:
                raise ProtocolError(
                    Reason.RATE, f"{device} asks for chunks faster than {self.cfg.serve_rate_bytes_per_s} B/s"
                )
            self._waiting[device] = (info, indices)  # served when its bucket has refilled
            return
        self._serve(device, info, indices)

    def _serve_waiting(self) -> None:
        """Serve each waiting chunk request whose device's bucket can now pay for it (a request for
        a blob the open stage no longer serves is dropped: the device asks for the new one)."""
        for device, (info, indices) in list(self._waiting.items()):
            if self._served(info.sha256) is None:
                del self._waiting[device]
            elif self.serving.allow(device, len(indices) * info.chunk_bytes):
                del self._waiting[device]
                self._serve(device, info, indices)

    def _serve(self, device: str, info: BlobInfo, indices: tuple[int, ...]) -> None:
        """Send ``device`` the chunks ``indices`` of ``info``, counting the bytes."""
        sent = send_chunks(self.store, info, indices, lambda chunk, body: self._send_payload(device, chunk, body=body))
        self.state.bytes_down += sent.bytes
        if info.sha256 in (self.state.pack, self.state.plan):
            self.state.bytes_down_pack += sent.bytes
        if sent.chunks < len(indices):
            raise ProtocolError(Reason.RATE, f"send queue full; chunks for {device} dropped (it asks again)")

    def _served(self, sha: str) -> BlobInfo | None:
        """How a blob of the open stage is served (None for any other blob)."""
        served = (self.state.pack, self.state.plan, self.state.stage_lora, self.state.stage_delta)
        if sha not in served or not self.store.has(sha):
            return None
        return self.store.info(sha, self.cfg.chunk_bytes)

    def _on_update(self, device: str, message: Envelope) -> None:
        round_ = self._check_current(device, message)
        if self.intake.offer(device, message.id, round_, UpdateOffer.from_data(message.data)):
            self._publish_status()

    def _on_chunk(self, device: str, message: Envelope) -> None:
        if self.intake.chunk(device, message.data, message.body):
            self._publish_status()

    def _on_refusal(self, device: str, message: Envelope) -> None:
        round_ = self._check_current(device, message)  # a late refusal must not drop the device from a later round
        refusal = Refusal.from_data(message.data)
        reason = message.reason.value if message.reason else "unknown"
        logger.warning("device %s refused its task: %s (%s)", device, reason, refusal.detail)
        if device not in round_.accepted:
            round_.selected.remove(device)
            round_.tasks.pop(device, None)
            round_.refused[device] = {"reason": reason, "detail": refusal.detail}
            self.state.refusals[reason] = self.state.refusals.get(reason, 0) + 1
            save_state(self.cfg.state_dir, self.state)

    # ---- updates --------------------------------------------------------------------------------

    def _discard(self, sha: str, receiver: BlobReceiver | None = None) -> None:
        """Remove a rejected or abandoned upload (partial or complete), or a large state the run has
        moved past (FLoRA's last update, a device's old B), from the store, unless the run
        references the same blob (an unchanged LoRA equals the stage's own, an update equal to an
        accepted one): a device must not grow the state directory by retrying bad uploads, nor a
        FLoRA run by its rounds (its dense update of SmolLM2 at full depth is 425 MB). The rounds'
        global LoRA states and accepted updates stay (LoRA-sized): they are the audit trail that
        ``benchmarks/merge_check.py`` re-merges."""
        s, round_ = self.state, self.state.open_round
        referenced = {s.pack, s.plan, s.full_pack, s.stage_lora, s.full_lora, s.stage_delta, s.full_delta}
        referenced |= {p["blob"] for p in s.private.values()}
        if round_ is not None:
            referenced |= {a.blob for a in round_.accepted.values()}
        if sha in referenced:
            return
        if receiver is not None:
            receiver.discard()
        self.store.path(sha).unlink(missing_ok=True)

    def _round_start(self) -> dict[str, Any]:
        """The global stage LoRA the open round started from (cached by blob id)."""
        from devft_edge.weights import read_safetensors

        if self._start_cache[0] != self.state.stage_lora:
            self._start_cache = (self.state.stage_lora, read_safetensors(self.store.path(self.state.stage_lora)))
        return self._start_cache[1]

    def _request_chunks(self, device: str, download: Download) -> None:
        self.intake.request_chunks(device, download)

    def _check_current(self, device: str, message: Envelope) -> OpenRound:
        self._require_known(device)
        if message.run != self.state.run_id:
            raise ProtocolError(Reason.WRONG_RUN, f"{device} sent run {message.run!r}")
        round_ = self.state.open_round
        if round_ is None or message.round != round_.index or message.stage != self.state.stage:
            raise ProtocolError(Reason.STALE, f"{device}: stage {message.stage} round {message.round} is not open")
        if device not in round_.selected:
            raise ProtocolError(Reason.WRONG_SENDER, f"round {round_.index} has no task for {device}")
        return round_

    def _require_known(self, device: str) -> None:
        if device not in self.state.devices:
            raise ProtocolError(Reason.UNKNOWN_DEVICE, f"{device} has not said hello")

    # ---- stages and rounds ----------------------------------------------------------------------

    def _tick(self) -> None:
        if self.connection.connects > self._connects_seen:
            self._reconnected()
        if self._waiting:
            try:
                self._serve_waiting()
            except ProtocolError as error:  # the send queue was full: the device asks again
                self.state.count_rejection(error.reason.value)
                logger.warning("waiting chunk request not served: %s", error)
            except Exception:  # the error boundary, as for a message: the service goes on
                self._waiting.clear()
                self.state.count_rejection(Reason.INTERNAL.value)
                logger.exception("waiting chunk requests failed; counted as %s", Reason.INTERNAL.value)
        if self.state.finished:
            return
        if self.state.stage == 0:
            self._start_run()
        round_ = self.state.open_round
        if round_ is None:
            if self.loop.stage is None:
                # the stage was closed (its hand-over checkpointed) and a crash came before the next
                # one was opened: open it now, never another round of the closed stage
                logger.info(
                    "stage %d was closed before a restart; opening stage %d", self.state.stage, self.state.stage + 1
                )
                self._open_stage(self.state.stage + 1)
                return
            self._open_round()
            return
        for device, download in list(self.uploads.items()):
            if download.stalled(time.monotonic()):
                self._request_chunks(device, download)
        if time.monotonic() >= self._next_reap:  # partial uploads abandoned by their devices
            self._next_reap = time.monotonic() + 60.0
            keep = {d.receiver.info.sha256 for d in self.uploads.values()}
            for sha in self.store.reap_partials(self.cfg.partial_max_age_s, self.cfg.upload_quota_bytes, keep):
                logger.info("removed the abandoned partial upload %s...", sha[:12])
        outcome = self.policy.outcome(round_)
        if outcome is Outcome.CLOSE:
            self._close_round()
        elif outcome is Outcome.RESELECT:
            self._reselect(round_)

    def _reconnected(self) -> None:
        """Back on the broker after losing it: what devices sent meanwhile (a hello, an update) may be
        lost, also after they reconnected, if that was before this service resubscribed; and the
        retained status is gone if the broker restarted. A new boot id in a fresh status makes every
        agent announce itself again, which re-sends its open task, which re-offers a finished update."""
        self._connects_seen = self.connection.connects
        self.boot = uuid.uuid4().hex
        logger.info("reconnected to the broker; asking the devices to announce themselves again")
        self._publish_status()

    def _start_run(self) -> None:
        """Evaluate the untuned base (the reference every curve starts from), then open stage 1."""
        self.state.started = now()
        self.loop.start()
        self.state.initial_eval = self.loop.progress.initial_eval
        self.state.full_lora = self.blobs.put(self.loop.full.lora)
        logger.info("run %s started; base model %s", self.state.run_id, _metrics_text(self.state.initial_eval))
        self._open_stage(1)

    def _open_stage(self, number: int) -> None:
        """The loop opens the stage (group, fuse, heal); :meth:`ship` writes and checkpoints it."""
        self.loop.open_stage(number)
        self._publish_status()

    def _resume_loop(self) -> None:
        """Give the loop the checkpointed run: progress, the full state and the open stage."""
        s = self.state
        progress = RunProgress(
            stage=s.stage,
            stage_rounds_done=s.stage_rounds_done,
            rounds_done=s.rounds_done,
            carry=s.carry,
            initial_eval=s.initial_eval,
            history=[metrics_row(e) for e in s.history],
            finished=s.finished,
        )
        full = GlobalState(lora=self.blobs.read(s.full_lora), delta=self.blobs.read(s.full_delta))
        if s.finished or s.stage_rounds_done >= s.stage_budget:
            self.loop.resume(progress, full, None)
            return
        server = GlobalState(lora=self.blobs.read(s.stage_lora), delta=self.blobs.read(s.stage_delta))
        stage = (s.groups, server, StageBudget(s.stage_budget, Plateau(**s.plateau)))
        self.loop.resume(progress, full, stage, self.pool.shipped())

    def _step(self) -> StepConfig:
        """One local training step of the current stage, as the planner models it."""
        t = self.cfg.train
        return StepConfig(
            layers=len(self.state.groups),
            batch=t.batch_size,
            seq=t.seq_len,
            rank=self.cfg.lora.rank,
            quant=self.cfg.quant,
            checkpointing=t.checkpointing,
            merged_delta=self.rule.merges_into_base,
        )

    def _eligible(self) -> list[str]:
        from devft_edge.planner import fit_profile
        from devft_edge.profiles import parse_profile

        step = self._step()
        eligible = []
        for device, known in sorted(self.state.devices.items()):
            if not known.online:
                continue
            profile = parse_profile(known.profile, device)
            if fit_profile(self.shape, step, profile, self.cfg.model).fits:
                eligible.append(device)
            else:
                logger.debug("device %s cannot train stage %d (memory or quantization)", device, self.state.stage)
        return eligible

    def _open_round(self) -> None:
        """Select devices (:meth:`RoundPolicy.select`, at most once a second) and send their tasks."""
        if time.monotonic() < self._next_selection:
            return
        self._next_selection = time.monotonic() + 1.0
        selected = self.policy.select(self._eligible(), self.state.rounds_done)
        if selected is None:
            return
        self.state.open_round = OpenRound(
            index=self.state.rounds_done,
            selected=selected,
            tasks={d: _task_id(self.state, d) for d in selected},
            deadline=self.policy.deadline(),
        )
        save_state(self.cfg.state_dir, self.state)
        logger.info("round %d (stage %d): tasks to %s", self.state.rounds_done, self.state.stage, ", ".join(selected))
        for device in selected:
            self._send_task(device)
        self._publish_status()

    def _reselect(self, round_: OpenRound) -> None:
        extra = self.policy.replacements(round_, self._eligible())
        round_.selected = sorted(round_.accepted) + extra
        round_.tasks = {d: round_.tasks.get(d) or _task_id(self.state, d) for d in round_.selected}
        round_.deadline = self.policy.deadline()
        save_state(self.cfg.state_dir, self.state)
        for device in extra:
            self._send_task(device)

    def _send_task(self, device: str) -> None:
        round_ = self.state.open_round
        assert round_ is not None and device in round_.tasks  # callers only send tasks of the open round
        s, client = self.state, self.enrolment.index(device)

        def optional(sha: str) -> BlobInfo | None:  # a stage plan, FLoRA's delta: if the run has one
            return self.store.info(sha, self.cfg.chunk_bytes) if sha else None

        task = Task(
            pack=self.store.info(s.pack, self.cfg.chunk_bytes),
            lora=self.store.info(s.stage_lora, self.cfg.chunk_bytes),
            plan=optional(s.plan),
            delta=optional(s.stage_delta),
            method=ClientMethod(
                rule=self.rule.name,
                groups=tuple(tuple(g) for g in self.state.groups),
                fusion=self.cfg.recipe.fusion,
                beta=self.cfg.recipe.beta,
                transfer=self.cfg.recipe.transfer,
            ),
            train=replace(self.cfg.train, steps=self._steps()),
            deadline=round_.deadline,
            # the simulator's seeds for client c: its training RNG per round, and its data stream
            seed=training_seed(self.cfg.seed, round_.index, client),
            data_seed=data_seed(self.cfg.seed, client),
        )
        self._send(device, self._message(Kind.TASK, round=round_.index, data=task.to_data(), id=round_.tasks[device]))

    def _close_round(self) -> None:
        """The loop closes the open round (aggregate, evaluate, maybe close the stage); record it,
        open the next stage or finish, checkpoint."""
        round_ = self.state.open_round
        assert round_ is not None  # only called with a round open
        state = self.state  # superseded by this round: FLoRA's dense update, the devices' old B
        superseded = {state.stage_delta, state.full_delta}
        superseded |= {state.private[d]["blob"] for d in round_.accepted if d in state.private}
        row = self.loop.run_round()
        entry: dict[str, Any] = {
            **asdict(row),
            "round": round_.index,  # 0-based over the run (metrics.jsonl's rows count from 1)
            "clients": {
                d: {
                    "num_samples": a.num_samples,
                    "train_loss": a.train_loss,
                    "seconds": a.seconds,
                    "peak_rss_bytes": a.peak_rss_bytes,
                }
                for d, a in sorted(round_.accepted.items())
            },
            "refused": dict(sorted(round_.refused.items())),
            "time": now(),
        }
        state.history.append(entry)
        progress = self.loop.progress
        state.rounds_done, state.stage_rounds_done = progress.rounds_done, progress.stage_rounds_done
        state.open_round = None
        logger.info(
            "round %d/%d closed (stage %d, %s): %s",
            state.rounds_done,
            self.cfg.rounds,
            state.stage,
            ", ".join(entry["devices"]),
            _metrics_text(entry),
        )
        if self.loop.stage is not None:
            budget = self.loop.stage.opened.budget
            state.stage_budget, state.plateau = budget.rounds, asdict(budget.plateau)
        else:  # the stage ended: its unused rounds carry over
            state.stage_budget, state.carry = state.stage_rounds_done, progress.carry
            state.stages.append(progress.stages[-1])
            if entry.get("full_eval_loss") is not None:
                logger.info("stage %d hands over: full model eval loss %.4f", state.stage, entry["full_eval_loss"])
            if state.stage < self.federation.stages and state.stage != self.cfg.stop_after:
                save_state(self.cfg.state_dir, state)
                self._open_stage(state.stage + 1)
            else:
                self._finish()
        save_state(self.cfg.state_dir, state)
        for sha in superseded - {""}:  # once the checkpoint no longer names them: the store does not grow per round
            self._discard(sha)
        self._publish_status()

    def _finish(self) -> None:
        """Export the adapter (and the merged model), the history and the summary."""
        out = self.loop.export(self.cfg.export_merged)
        (self.cfg.out_dir / "history.json").write_text(json.dumps(self.state.history, indent=1))
        self.state.finished = True
        summary = write_summary(self.cfg, self.state, out)
        logger.info(
            "run %s finished in %.0f s: eval loss %s -> %s; adapter in %s",
            self.state.run_id,
            summary["wall_seconds"],
            _fmt(summary["initial_eval_loss"]),
            _fmt(summary["final_eval_loss"]),
            out,
        )

    def _steps(self) -> int:
        """Local steps per round in the open stage."""
        return self.federation.steps(len(self.state.groups))

    def _message(self, kind: Kind, **fields: Any) -> Envelope:
        """A message from the aggregator about the current run, stage and round."""
        fields.setdefault("round", self.state.rounds_done)
        return Envelope(kind=kind, sender=AGGREGATOR, run=self.state.run_id, stage=self.state.stage, **fields)

    def _send(self, device: str, message: Envelope) -> bool:
        """Seal and publish ``message`` to ``device``; False when the send queue is full (dropped)."""
        topic = self.topics.down(device)
        return self.connection.publish(topic, seal(message.encode(), topic, self.key))

    def _send_payload(self, device: str, payload: Payload, reason: Reason | None = None, body: bytes = b"") -> bool:
        """:meth:`_send` a message of ``payload``'s kind, with ``reason`` and ``body`` if any."""
        return self._send(device, self._message(payload.KIND, data=payload.to_data(), reason=reason, body=body))

    def _publish_status(self) -> None:
        data = status_document(self.state, self.boot, len(self.schedule.capacities), self.cfg.rounds).to_data()
        status = self._message(Kind.STATUS, data=data)
        self.connection.publish(self.topics.status, seal(status.encode(), self.topics.status, self.key), retain=True)


def _task_id(state: RunState, device: str) -> str:
    """Deterministic task id: a resent task after a restart is recognised as the same task."""
    return f"task-{state.run_id}-{state.stage}-{state.rounds_done}-{device}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _metrics_text(metrics: dict[str, Any]) -> str:
    """A closed round's held-out metrics for the log (exact match only where it was measured)."""
    loss, accuracy = metrics.get("eval_loss"), metrics.get("eval_accuracy")
    if loss is None:
        return "no eval"
    return f"eval loss {loss:.4f}" + ("" if accuracy is None else f", exact match {accuracy:.1%}")
