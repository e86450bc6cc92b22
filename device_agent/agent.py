"""The on-device training agent: a thin service over the core.

It connects (reconnecting with backoff), announces itself with its profile, and for each task
pulls the stage pack and the starting LoRA (only the chunks it lacks: blobs are cached by
sha256, so a pack is never downloaded twice), verifies the pack's signature against the
provisioned public key (an unverified pack is never trained on: the task is refused with the
pack's reason), checks that the stage fits its memory budget (the profile's, capped by the memory
cgroup limit the process really has, which its hello declares too), trains with the configured backend
on its local data, and offers the update for the aggregator to pull. Finished tasks are remembered
on disk, so a redelivered task (after an aggregator or agent restart) re-offers the same update
instead of training again.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devft_edge.blob_transfer import Download, send_chunks, wanted
from devft_edge.blobs import BlobStore, StorageFull
from devft_edge.device_probe import capped_profile, memory_limit_bytes
from devft_edge.messages import Chunk, ChunkRequest, Hello, Presence, Refusal, Status, Task, UpdateOffer, Verdict
from devft_edge.mqtt import BrokerAddress, Connection, Incoming
from devft_edge.peak_memory import RssSampler, peak_bytes, reset_peak
from devft_edge.protocol import AGGREGATOR, Envelope, Kind, ProtocolError, Reason, Topics, decode, seal, unseal
from device_agent.config import AgentConfig

if TYPE_CHECKING:
    from devft_edge.backends import Stream
    from devft_edge.pack import Verified, VerifiedPack
    from devft_edge.pack_manifest import M

logger = logging.getLogger(__name__)

TASKS_FILE = "tasks.json"
RUNS_DIR = "runs"
"""Per run (hashed id): ``private.safetensors`` (what the rule keeps on the device) and ``stream.json``."""
PRIVATE_FILE = "private.safetensors"
STREAM_FILE = "stream.json"
MAX_TASKS_REMEMBERED = 256
"""Finished tasks kept for re-offering their updates (oldest forgotten first): enough for any run's
redeliveries, bounded across many runs."""


class Agent:
    """One device's agent; ``run()`` serves until stopped."""

    def __init__(self, cfg: AgentConfig) -> None:
        from devft_edge.allocator import bound_heap
        from devft_edge.backends import get_trainer
        from devft_edge.signing import load_private_key, load_public_key
        from devft_edge.threads import configure_threads

        bound_heap()  # before any model is loaded: the memory plan assumes it
        # sleeping OpenMP threads (the CLI set the environment before torch loaded) and the
        # config's thread count: the cores are shared with the device's other work
        configure_threads(cfg.threads)
        self.cfg = cfg
        self.cache = cfg.cache_dir.expanduser()
        self.store = BlobStore(self.cache / "blobs")
        self.packs = self.cache / "packs"
        self.public_key = load_public_key(cfg.public_key)
        self.identity = load_private_key(cfg.identity)
        self.profile = _load_profile(cfg)
        self.examples = _load_data(cfg.data)
        self.trainer = get_trainer(cfg.backend)
        self.topics = Topics(cfg.prefix)
        self.done: dict[str, dict[str, Any]] = _read_json(self.cache / TASKS_FILE)
        self.task: Envelope | None = None
        self.order: Task | None = None
        """The payload of :attr:`task`, parsed."""
        self.downloads: dict[str, Download] = {}
        self.aggregator_boot = ""
        presence = self.topics.presence(cfg.device_id)
        offline = Envelope(kind=Kind.PRESENCE, sender=cfg.device_id, data=Presence(online=False).to_data()).encode()
        self.connection = Connection(
            BrokerAddress.parse(cfg.broker),
            cfg.device_id,
            [self.topics.down(cfg.device_id), self.topics.status],
            will=(presence, seal(offline, presence, self.identity)),
            on_connect=self._announce,
            login=cfg,
        )

    def run(self, max_seconds: float | None = None) -> None:
        """Serve tasks; returns after ``max_seconds`` if given (tests), otherwise runs until killed."""
        start = time.monotonic()
        logger.info(
            "agent %s (fleet %s, backend %s, profile %s, %d local examples) connecting to %s",
            self.cfg.device_id,
            self.cfg.fleet,
            self.cfg.backend,
            self.profile.description,
            len(self.examples),
            self.connection.address,
        )
        self.connection.start()
        while max_seconds is None or time.monotonic() - start < max_seconds:
            try:
                item = self.connection.inbox.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is not None:
                self._dispatch(item)
            for download in self.downloads.values():
                if download.stalled(time.monotonic()):
                    self._request(download)
        self.connection.stop()

    def _announce(self) -> None:
        """On every (re)connect: presence and hello (the aggregator may have restarted)."""
        me = self.cfg.device_id
        online = Envelope(kind=Kind.PRESENCE, sender=me, data=Presence(online=True).to_data())
        self._send(online, self.topics.presence(me), retain=True)
        declared = capped_profile(self.profile, memory_limit_bytes())  # the limit may have changed since start
        hello = Hello(
            profile=declared.model_dump(mode="json", exclude={"name"}),
            backends=(self.cfg.backend,),
            cached=tuple(self.store.recent(self.cfg.hello_cached_max)),
        )
        self._send(Envelope(kind=Kind.HELLO, sender=me, data=hello.to_data()))

    def _dispatch(self, item: Incoming) -> None:
        try:
            if item.retained and item.topic != self.topics.status:  # an old task replayed by the broker
                raise ProtocolError(Reason.RETAINED, f"retained message on {item.topic} ignored")
            message = decode(unseal(item.payload, item.topic, self.public_key))  # the seal before any parsing
            if message.sender != AGGREGATOR:
                raise ProtocolError(Reason.WRONG_SENDER, f"message from {message.sender!r} on my downlink")
            handler = {
                Kind.TASK: self._on_task,
                Kind.CHUNK: self._on_chunk,
                Kind.CHUNK_REQUEST: self._on_chunk_request,
                Kind.VERDICT: self._on_verdict,
                Kind.STATUS: self._on_status,
            }.get(message.kind)
            if handler is None:
                raise ProtocolError(Reason.MALFORMED, f"unexpected {message.kind.value} on my downlink")
            handler(message)
        except ProtocolError as error:
            logger.warning("message rejected: %s", error)
        except Exception:  # the error boundary: whatever a message raises, the agent goes on
            logger.exception("message on %s failed; ignored", item.topic)

    def _on_task(self, task: Envelope) -> None:
        if task.id in self.done:
            logger.info("task %s already done; offering its update again", task.id)
            self._send(task.reply(Kind.UPDATE, self.cfg.device_id, data=self.done[task.id]))
            return
        if self.task is not None and self.task.id == task.id:
            return
        try:
            order = Task.from_data(task.data)
        except ProtocolError as error:  # refuse at once: the round need not wait for its deadline
            logger.error("task %s refused: %s", task.id, error)
            refusal = Refusal(str(error)).to_data()
            self._send(task.reply(Kind.REFUSAL, self.cfg.device_id, reason=error.reason, data=refusal))
            return
        self.task, self.order, self.downloads = task, order, {}
        needed = order.blobs
        keep = {info.sha256 for info in needed}
        self._make_room(keep)
        for info in needed:
            if self.store.has(info.sha256):
                self.store.touch(info.sha256)
                continue
            try:
                self.store.admit(info, self.cfg.cache_quota_bytes, self.cfg.disk_reserve_bytes)
            except StorageFull as error:
                self._refuse(Reason.STORAGE, str(error))
                return
            self.downloads[info.sha256] = Download(self.store.receiver(info))
        if not self.downloads:
            self._run_task()
        for download in self.downloads.values():
            self._request(download)

    def _on_chunk(self, message: Envelope) -> None:
        chunk = Chunk.from_data(message.data)
        info = chunk.blob
        download = self.downloads.get(info.sha256)
        if download is None:
            return  # a late chunk of a finished or abandoned transfer
        try:
            complete = download.add(chunk.index, message.body, time.monotonic())
        except ProtocolError:
            self._request(download)  # ask again: the missing chunks, or all of them after a hash failure
            raise
        except StorageFull as error:  # asking again would fail again: give the task back
            self._refuse(Reason.STORAGE, str(error))
            return
        if complete:
            del self.downloads[info.sha256]
            if not self.downloads:
                self._run_task()
        else:
            self._request(download)

    def _on_chunk_request(self, message: Envelope) -> None:
        """Serve chunks of an update we offered. Only the aggregator can ask (its seal is checked),
        and it asks a window at a time, so no rate limit is needed here."""
        offers = {offer.blob.sha256: offer.blob for offer in map(UpdateOffer.from_data, self.done.values())}
        info, indices = wanted(ChunkRequest.from_data(message.data), offers.get)  # the updates we offered, as offered

        def send(chunk: Chunk, body: bytes) -> bool:
            self._send(message.reply(Kind.CHUNK, self.cfg.device_id, data=chunk.to_data(), body=body))
            return True  # a chunk the broker client drops is asked for again when the aggregator's pull stalls

        send_chunks(self.store, info, indices, send)

    def _on_status(self, message: Envelope) -> None:
        """A (re)started aggregator may have missed our hello: announce again once per aggregator boot."""
        boot = Status.from_data(message.data).boot
        if boot and boot != self.aggregator_boot:
            self.aggregator_boot = boot
            self._announce()

    def _on_verdict(self, message: Envelope) -> None:
        verdict = Verdict.from_data(message.data)
        if verdict.accepted:
            logger.info("update for round %d accepted", message.round)
        else:
            logger.warning("update for round %d rejected: %s %s", message.round, message.reason, verdict.note)

    def _make_room(self, keep: set[str]) -> None:
        """Bound the cache before a task's downloads: partial blobs of earlier tasks are dropped, and
        complete blobs (with their unpacked copies) are evicted least recently used first until
        they fit ``cache_quota_bytes``; the task's own blobs (``keep``) are never touched."""
        self.store.reap_partials(0.0, self.cfg.cache_quota_bytes, keep=keep)
        for sha in self.store.evict_lru(self.cfg.cache_quota_bytes, keep=keep):
            for directory in (self.packs / sha, self.packs / f"{sha}-stage"):
                shutil.rmtree(directory, ignore_errors=True)
            logger.info("evicted blob %s... from the cache", sha[:12])

    def _refuse(self, reason: Reason, detail: str) -> None:
        """Give the current task back to the aggregator (it selects another device) and drop it."""
        task = self.task
        assert task is not None  # only called while a task is held
        logger.error("task %s refused: %s", task.id, detail)
        self._send(task.reply(Kind.REFUSAL, self.cfg.device_id, reason=reason, data=Refusal(detail).to_data()))
        self.task, self.order, self.downloads = None, None, {}

    def _request(self, download: Download) -> None:
        request = download.next_request(time.monotonic())
        if request is not None and self.task is not None:
            self._send(self.task.reply(Kind.CHUNK_REQUEST, self.cfg.device_id, data=request.to_data()))

    def _run_task(self) -> None:
        from safetensors.torch import save as safetensors_save

        from devft_edge.aggregation import RULES, ClientMemory, GlobalState
        from devft_edge.pack import PackError
        from devft_edge.pack_manifest import PackManifest
        from devft_edge.weights import read_safetensors

        task, order = self.task, self.order
        assert task is not None and order is not None  # only called once a task's blobs are in
        lora_sha = order.lora.sha256
        reset_peak()  # the update reports this task's peak (unpacking, loading, training), not the process's
        start = {k: v.clone() for k, v in read_safetensors(self.store.path(lora_sha)).items()}
        try:
            pack = self._verified(order.pack.sha256, PackManifest)
            over = self._over_budget(order, pack)  # before a full pack is fused, which takes memory too
            if over:
                self._refuse(Reason.MEMORY, over)
                self._announce()  # the aggregator plans with the budget this process has now
                return
            if order.plan is not None:  # full_pack delivery: fuse this stage from the full pack ourselves
                pack = self._derived(pack, order.plan.sha256, start)
        except PackError as error:
            logger.error("task %s refused: %s", task.id, error)
            self._send(
                task.reply(
                    Kind.REFUSAL, self.cfg.device_id, reason=Reason.PACK, data=Refusal(error.reason.value).to_data()
                )
            )
            self.task, self.order = None, None
            return
        settings, method = order.train, order.method
        rule = RULES.get(method.rule)
        memory = ClientMemory(num_samples=len(self.examples), private=self._private(task.run))
        delta = read_safetensors(self.store.path(order.delta.sha256)) if order.delta is not None else None
        stream = self._stream(task.run, order.data_seed)
        began = time.monotonic()
        try:
            start = rule.client_start(start, GlobalState(lora=start), memory, method.to_stage)
            with RssSampler() as rss:
                result = self.trainer.train(
                    pack, self.examples, settings, seed=order.seed, start=start, delta=delta, stream=stream
                )
            rule.uplink(result.lora, memory, method.to_full)  # keeps what the rule keeps private (FedSA's B)
            self._keep_run_state(task.run, memory.private, replace(stream, taken=stream.taken + settings.steps))
        except Exception as error:  # the error boundary of training: the aggregator is told, not left waiting
            logger.exception("training failed")
            detail = Refusal(str(error)[:500]).to_data()
            self._send(task.reply(Kind.REFUSAL, self.cfg.device_id, reason=Reason.INTERNAL, data=detail))
            self.task, self.order = None, None
            return
        info = self.store.add_bytes(
            safetensors_save({k: v.contiguous() for k, v in result.lora.items()}), order.lora.chunk_bytes
        )
        offer = UpdateOffer(
            info, result.num_samples, result.train_loss, round(time.monotonic() - began, 3), peak_bytes()
        )
        data = offer.to_data()
        self.done[task.id] = data
        for forgotten in list(self.done)[:-MAX_TASKS_REMEMBERED]:
            del self.done[forgotten]
        _write_json(self.cache / TASKS_FILE, self.done)
        logger.info(
            "task %s trained: loss %.4f in %.1f s, peak %.0f MiB (sampled: anon %.0f, file %.0f MiB)%s",
            task.id,
            result.train_loss,
            offer.seconds,
            offer.peak_rss_bytes / 2**20,
            rss.anon / 2**20,
            rss.file / 2**20,
            ", gradient checkpointing" if settings.checkpointing else "",
        )
        self._send(task.reply(Kind.UPDATE, self.cfg.device_id, data=data))
        self.task, self.order = None, None

    def _over_budget(self, order: Task, pack: VerifiedPack) -> str | None:
        """Why task ``order`` does not fit this process's memory (None when it fits): the planner's
        predicted peak of its training step against the profile's budget capped by the memory
        cgroup limit read now (lowered since the hello, or a profile claiming more than it)."""
        from transformers import AutoConfig

        from devft_edge.aggregation import RULES
        from devft_edge.memory import StepConfig, estimate_memory, model_shape, on_device

        settings, method, quant = order.train, order.method, pack.manifest.quant
        step = StepConfig(
            layers=len(method.groups),
            batch=settings.batch_size,
            seq=settings.seq_len,
            rank=pack.manifest.lora.rank,
            quant=quant.scheme,
            quant_embeddings=quant.embeddings,
            checkpointing=settings.checkpointing,
            merged_delta=RULES.get(method.rule).merges_into_base,
        )
        step = on_device(step, self.profile)
        peak = estimate_memory(model_shape(AutoConfig.from_pretrained(pack.directory)), step).peak_bytes
        limit = memory_limit_bytes()
        budget = capped_profile(self.profile, limit).budget_bytes
        if peak <= budget:
            return None
        mib = 2**20
        return (
            f"stage of {step.layers} layers (batch {step.batch} x {step.seq}): predicted peak {peak / mib:.0f} MiB "
            f"> budget {budget / mib:.0f} MiB (profile {self.profile.budget_bytes / mib:.0f} MiB, memory cgroup "
            f"limit {'none' if limit is None else f'{limit / mib:.0f} MiB'})"
        )

    def _run_dir(self, run: str) -> Path:
        """Where this device keeps what it carries between the rounds of ``run`` (one run at a time)."""
        import hashlib

        return self.cache / RUNS_DIR / hashlib.sha256(run.encode()).hexdigest()[:16]

    def _private(self, run: str) -> dict[str, Any]:
        """What the rule kept on this device in ``run`` (FedSA-LoRA's B, full-model space); empty if nothing."""
        from devft_edge.weights import read_safetensors

        path = self._run_dir(run) / PRIVATE_FILE
        return read_safetensors(path) if path.exists() else {}

    def _stream(self, run: str, seed: int) -> Stream:
        """Where this device's batch stream of ``run`` stands (a new seed starts it over)."""
        from devft_edge.backends import Stream

        kept = _read_json(self._run_dir(run) / STREAM_FILE)
        return Stream(seed, kept.get("taken", 0) if kept.get("seed") == seed else 0)

    def _keep_run_state(self, run: str, private: dict[str, Any], stream: Stream) -> None:
        """Write what the device carries to its next round of ``run`` (each file atomically);
        other runs' state is removed."""
        from safetensors.torch import save_file

        directory = self._run_dir(run)
        for other in (self.cache / RUNS_DIR).glob("*"):
            if other != directory:
                shutil.rmtree(other, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        if private:
            tmp = directory / f"{PRIVATE_FILE}.tmp"
            save_file({k: v.contiguous() for k, v in private.items()}, str(tmp))
            tmp.replace(directory / PRIVATE_FILE)
        _write_json(directory / STREAM_FILE, asdict(stream))

    def _verified(self, sha: str, kind: type[M]) -> Verified[M]:
        """The signed archive ``sha`` (a pack or a plan: ``kind`` is its manifest's type), verified
        and unpacked once; a refused one is deleted.

        Raises:
            PackError: with the reason it was refused.
        """
        from devft_edge.pack import PackError, Verified, read_archive

        directory = self.packs / sha
        try:
            if not directory.exists():
                return read_archive(self.store.path(sha), directory, self.public_key, kind)
        except PackError:
            self.store.path(sha).unlink(missing_ok=True)  # never keep or reuse a refused archive
            raise
        return Verified(directory=directory, manifest=kind.read(directory), signed=True)

    def _derived(self, full: VerifiedPack, plan_sha: str, start: dict[str, Any]) -> VerifiedPack:
        """The stage pack that the signed plan ``plan_sha`` makes of ``full``, built once."""
        from devft_edge.pack import PackError, Refusal, VerifiedPack
        from devft_edge.pack_manifest import PackManifest
        from devft_edge.stage_plan import StagePlanManifest, derive_stage_pack, plan_matches

        plan = self._verified(plan_sha, StagePlanManifest)
        problems = plan_matches(plan, full.directory.name)
        if problems:
            raise PackError(Refusal.MANIFEST, "; ".join(problems))
        stage = self.packs / f"{plan_sha}-stage"
        if stage.exists():
            try:
                return VerifiedPack(directory=stage, manifest=PackManifest.read(stage), signed=True)
            except PackError:  # built by an agent whose stage manifests lacked fields: built again
                logger.info("stage %s is fused again: its cached manifest is outdated", plan.manifest.stage)
        began = time.monotonic()
        derived = derive_stage_pack(full, plan, start, stage)
        logger.info("stage %s fused from the full pack in %.1f s", plan.manifest.stage, time.monotonic() - began)
        return derived

    def _send(self, message: Envelope, topic: str | None = None, retain: bool = False) -> None:
        """Seal ``message`` with this device's key and publish it (on the uplink by default)."""
        topic = topic or self.topics.up(self.cfg.device_id)
        self.connection.publish(topic, seal(message.encode(), topic, self.identity), retain=retain)


def _load_profile(cfg: AgentConfig) -> Any:
    from devft_edge.device_probe import measure_profile
    from devft_edge.profiles import load_profile

    if cfg.profile == "measure":
        return measure_profile(cfg.device_id, probe_seconds=1.0)
    return load_profile(cfg.profile, cfg.profiles_dir)


def _load_data(spec: str) -> list[Any]:
    from devft_edge.data import load_jsonl
    from devft_edge.tasks import generate_synthetic

    if spec.startswith("synthetic:"):
        _, n, seed = spec.split(":")
        return generate_synthetic(int(n), seed=int(seed))
    path = Path(spec)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    return [example for f in files for example in load_jsonl(f)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
