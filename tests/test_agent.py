"""The device agent's reading of a task (:class:`devft_edge.messages.Task`): a malformed task is
refused naming every bad field; and its chunk server."""

from __future__ import annotations

import pytest

from devft_edge.messages import Task
from devft_edge.protocol import Envelope, Kind, ProtocolError, Reason

GOOD = {"steps": 8, "batch": 4, "seq": 64, "lr": 3e-4}
METHOD = {"rule": "fedit", "groups": [[0, 1], [2]], "fusion": "dblf", "beta": 0.1, "transfer": "copy"}
BLOB = {"blob": "a" * 64, "size": 10, "chunk_bytes": 10}
TASK = {"pack": BLOB, "lora": BLOB, "method": METHOD, "train": GOOD, "seed": 1, "data_seed": 2, "deadline": 5.0}


def test_a_well_formed_task_gives_its_settings_and_round_trips() -> None:
    task = Task.from_data({**TASK, "train": {**GOOD, "checkpointing": True, "weight_decay": 0.01}})
    settings = task.train
    assert (settings.steps, settings.batch_size, settings.seq_len, settings.lr) == (8, 4, 64, 3e-4)
    assert settings.checkpointing is True and settings.weight_decay == 0.01
    assert Task.from_data(TASK).train.checkpointing is False  # optional fields take their defaults
    assert (task.seed, task.data_seed, task.plan, task.delta) == (1, 2, None, None) and len(task.blobs) == 2
    assert Task.from_data(task.to_data()) == task


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"train": None}, "train must be an object"),
        ({"train": {**GOOD, "steps": "8"}}, "train.steps"),
        ({"train": {k: v for k, v in GOOD.items() if k != "seq"}}, "train.seq is missing"),
        ({"train": {**GOOD, "batch": True}}, "train.batch"),
        ({"train": {**GOOD, "checkpointing": "yes"}}, "train.checkpointing"),
        ({"train": {**GOOD, "steps": 0}}, "train.steps"),
        ({"train": {**GOOD, "lr": float("nan")}}, "train.lr must be a number"),
        ({"train": {**GOOD, "lr": -1.0}}, "lr must be a positive number"),
        ({"method": {**METHOD, "rule": "fedavg"}}, "method.rule"),
        ({"method": None}, "'method' must be an object"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"data_seed": True}, "data_seed must be an integer"),
        ({"pack": None}, "pack is missing"),
        ({"lora": {"blob": "x", "size": 1, "chunk_bytes": 1}}, "lora: "),
        ({"plan": [1]}, "plan must be a blob object"),
    ],
)
def test_a_malformed_task_is_refused_naming_the_field(changes: dict, named: str) -> None:
    data = {k: v for k, v in {**TASK, **changes}.items() if v is not None}
    with pytest.raises(ProtocolError) as error:
        Task.from_data(data)
    assert error.value.reason is Reason.MALFORMED and named in str(error.value)


def test_every_problem_of_a_task_is_named_at_once() -> None:
    with pytest.raises(ProtocolError) as error:
        Task.from_data({**TASK, "seed": "x", "train": {**GOOD, "batch": 0}, "method": {**METHOD, "fusion": 3}})
    assert all(word in str(error.value) for word in ("seed", "train.batch", "method.fusion"))


def test_chunks_are_served_as_the_update_was_offered(tmp_path) -> None:
    """A requester may not pick the chunk size: one huge chunk could exceed the broker's message
    limit (issue 14). The agent's chunk server, with a store and an outbox beside it."""
    from types import SimpleNamespace

    from devft_edge.blobs import BlobInfo, BlobStore
    from device_agent.agent import Agent

    store = BlobStore(tmp_path)
    offered = store.add_bytes(bytes(range(256)) * 100, chunk_bytes=4096)
    sent: list[Envelope] = []
    agent = SimpleNamespace(
        done={"task-1": {**offered.to_json(), "num_samples": 8}},
        store=store,
        cfg=SimpleNamespace(device_id="pi-1"),
        _send=sent.append,
    )

    def ask(info: BlobInfo) -> None:
        request = Envelope(kind=Kind.CHUNK_REQUEST, sender="aggregator", data={**info.to_json(), "missing": [0, 1]})
        Agent._on_chunk_request(agent, request)  # type: ignore[arg-type]

    ask(offered)
    assert [len(m.body) for m in sent] == [4096, 4096]
    with pytest.raises(ProtocolError) as error:
        ask(BlobInfo(offered.sha256, offered.size, 64 * 2**20))
    assert error.value.reason is Reason.MALFORMED and len(sent) == 2
    with pytest.raises(ProtocolError) as error:
        ask(BlobInfo("0" * 64, 10, 4096))
    assert error.value.reason is Reason.STALE


def _cache_agent(tmp_path, quota: int, reserve: int = 0):
    """The agent's task intake with a real blob store beside it and an outbox (no model, no broker)."""
    from types import SimpleNamespace

    from devft_edge.blobs import BlobStore
    from device_agent.agent import Agent

    agent = SimpleNamespace(
        store=BlobStore(tmp_path / "blobs"),
        packs=tmp_path / "packs",
        cfg=SimpleNamespace(device_id="pi-1", cache_quota_bytes=quota, disk_reserve_bytes=reserve),
        done={},
        task=None,
        downloads={},
        sent=[],
    )
    agent._send = agent.sent.append
    agent._run_task = lambda: agent.sent.append("trained")
    for name in ("_make_room", "_refuse", "_request", "_on_chunk"):
        setattr(agent, name, getattr(Agent, name).__get__(agent))
    return agent, Agent._on_task.__get__(agent)


def _blob_task(store, fresh: bytes, old: list[str]) -> Envelope:
    import hashlib

    from devft_edge.blobs import BlobInfo

    lora = store.info(old[-1])  # a blob the device holds: used again, not fetched
    pack = BlobInfo(hashlib.sha256(fresh).hexdigest(), len(fresh), 2**16)
    data = {"pack": pack.to_json(), "lora": lora.to_json(), "train": GOOD, "method": METHOD, "seed": 1, "data_seed": 2}
    return Envelope(kind=Kind.TASK, sender="aggregator", run="r", stage=1, round=3, data=data)


def test_a_task_evicts_least_recently_used_blobs_and_their_unpacked_packs(tmp_path) -> None:
    """The cache was unbounded (issue 14): before a task's downloads, blobs of earlier tasks are
    evicted oldest use first until the cache fits its quota; the task's own blobs stay."""
    import os

    agent, on_task = _cache_agent(tmp_path, quota=2 * 2**20 + 10)
    old = []
    for age, byte in enumerate(b"abc"):
        info = agent.store.add_bytes(bytes([byte]) * 2**20)
        os.utime(agent.store.path(info.sha256), (1000 + age, 1000 + age))
        (agent.packs / info.sha256).mkdir(parents=True)
        old.append(info.sha256)
    on_task(_blob_task(agent.store, b"n" * 2**20, old))
    assert [agent.store.has(sha) for sha in old] == [False, True, True]  # the oldest went, the task's lora stayed
    assert not (agent.packs / old[0]).exists() and (agent.packs / old[1]).exists()
    (request,) = agent.sent
    assert request.kind is Kind.CHUNK_REQUEST and request.data["missing"][0] == 0


def test_a_task_that_cannot_fit_the_disk_is_given_back_with_a_storage_reason(tmp_path) -> None:
    agent, on_task = _cache_agent(tmp_path, quota=2**30, reserve=2**62)  # no disk keeps 4 EiB free
    held = agent.store.add_bytes(b"x" * 1000).sha256
    on_task(_blob_task(agent.store, b"n" * 2**20, [held]))
    (refusal,) = agent.sent
    assert refusal.kind is Kind.REFUSAL and refusal.reason is Reason.STORAGE
    assert agent.task is None and agent.downloads == {}
