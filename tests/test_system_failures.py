"""Failures of the distributed system end to end: a real mosquitto, the aggregator and agents as
processes, and test-side MQTT clients that abuse the protocol or fall silent.

- A thousand hostile messages of 43 kinds during a run (``benchmarks/adversarial.py``, the
  attacks in ``benchmarks/hostile.py`` and ``benchmarks/attacker.py``): each kind is counted under
  the reasons it deserves, the honest devices' updates are merged at their robust weights as in a
  clean run, memory and state stay bounded, the run finishes.
- An agent killed with SIGKILL while it trains and restarted with its cache: it says hello, gets
  its task again, and the round completes with its update, counted once.
- The broker restarted while a pack is being pulled, and again while a device trains: both
  services reconnect and resubscribe, the transfer resumes, the update is offered again.
- A partial pack download in an agent's cache (what a crash mid-transfer leaves behind): only the
  missing chunks are requested; a corrupt partial fails the hash check and is fetched afresh.
- A selected device that never answers, with quorum 2: at the deadline the round selects the
  third device and closes with the honest two.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from system_harness import enrolled, free_port, mosquitto, needs_mosquitto, read_state, start, write_configs

from devft_edge.blobs import BlobInfo, BlobStore
from devft_edge.protocol import Envelope, Kind
from devft_edge.signing import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import adversarial  # noqa: E402
import hostile  # noqa: E402
from attacker import Client  # noqa: E402
from hostile import down, up, valid_profile  # noqa: E402

pytestmark = needs_mosquitto

PREFIX = hostile.PREFIX
HONEST = list(hostile.HONEST)


class Services:
    """The processes of one run; whatever is still running at the end is killed."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen] = []
        self.clients: list[Client] = []

    def serve(self, config: Path, log: str = "serve.log") -> subprocess.Popen:
        return self._add(start("serve", "--config", str(config), log=self.tmp_path / log))

    def agent(self, config: Path, log: str | None = None) -> subprocess.Popen:
        return self._add(start("agent", "--config", str(config), log=self.tmp_path / (log or f"{config.stem}.log")))

    def client(
        self, broker: str, client_id: str, subscriptions: list[str], key: Ed25519PrivateKey | None = None
    ) -> Client:
        self.clients.append(Client(broker, client_id, subscriptions, self.tmp_path, key))
        return self.clients[-1]

    def log(self, name: str = "serve.log") -> str:
        return (self.tmp_path / name).read_text()

    def _add(self, process: subprocess.Popen) -> subprocess.Popen:
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def services(tmp_path) -> Iterator[Services]:
    running = Services(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, server: subprocess.Popen | None = None) -> Any:
    """Poll ``condition`` until it is truthy (its value), the server exits, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if server is not None and server.poll() is not None:
            raise AssertionError(f"the aggregator exited ({server.returncode}) while waiting for {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished_history(tmp_path: Path) -> list[list[str]]:
    """Per round of the finished run: the devices whose updates were aggregated."""
    state = read_state(tmp_path)
    assert state["finished"]
    return [h["devices"] for h in state["history"]]


# ---- 1. hostile messages -------------------------------------------------------------------------


def test_a_thousand_hostile_messages_are_rejected_with_their_reasons(tmp_path):
    """The adversarial benchmark at 1,000 messages on plain mosquitto: mallory says hello, is selected
    with the two honest devices in each of 4 rounds and sends every kind of hostile message (malformed,
    past the parser's bounds, forged, misdirected, stale, replayed, retained, floods against the
    serving rate and the upload quota) and tries every trick on an update transfer, a few kinds per
    round while the honest devices train. Each kind is counted under exactly the reasons it must be;
    the honest devices' updates are the only ones merged, at their robust weights; memory and state
    stay bounded."""
    result = adversarial.run(tmp_path, "mosquitto", messages=1000)

    assert result.finished and result.history == [list(HONEST)] * 4  # as in a clean run: mallory never counted
    assert result.messages >= 1000 and result.kinds >= 40
    wrong = [f"{p.kind}: expected {p.expected}, counted {p.counted}" for p in result.phases if not p.ok]
    assert not wrong, wrong
    assert result.merged_correctly, result.rounds
    assert result.honest_rejected == 0 and result.inbox_dropped == 0
    for phase in result.phases:  # the counters moved by the kind's messages alone
        assert sum(phase.counted.values()) + phase.answered <= phase.sent, phase
    # across the run, at like points (honest devices idle): seen +1.1..1.7 MB in 5 runs beside a
    # competing process; 1-97 MiB before the aggregator bounded its heap (devft_edge/allocator.py)
    assert result.after.rss_bytes - result.before.rss_bytes < 16 * 2**20
    for index in range(4):  # within a round (between rounds the run's own work comes and goes)
        rss = [p.rss_max_bytes for p in result.phases if p.round == index and p.rss_max_bytes]
        # no growth under the flood; a fall is the stage build's memory being given back (seen: 643 -> 568 MB)
        assert max(rss) - rss[0] < 32 * 2**20, (index, rss)
    small = {k: v for k, v in result.after.state_dir.items() if k not in ("blobs", "total")}
    assert sum(small.values()) < 2**20, small  # state.json, seen.log, device records, partial uploads
    assert result.kept_uploads["blobs"] == 0  # mallory's rejected uploads are deleted (issue 14)
    assert result.after.latency["median_s"] < 10 * result.before.latency["median_s"] + 0.05


# ---- 2. agent restart -----------------------------------------------------------------------------


def test_an_agent_killed_while_training_is_restarted_and_its_round_completes(tmp_path, broker, services):
    """SIGKILL dev-1 after it unpacked the stage pack and before it finished training; restarted
    with the same config and cache, it says hello, gets the task again and delivers, once."""
    agg_config, agent_configs = write_configs(tmp_path, broker, devices=2, rounds=2, round_timeout_s=120)
    server = services.serve(agg_config)
    services.agent(agent_configs[0])
    victim = services.agent(agent_configs[1], log="agent-1-killed.log")
    cache = tmp_path / "dev-1"

    def training() -> dict[str, Any] | None:
        state = read_state(tmp_path)
        round_ = state.get("open_round")
        if not round_ or not (cache / "packs" / state["pack"]).is_dir():
            return None
        task = round_["tasks"].get("dev-1")
        return state if task and task not in tasks_done(cache) else None

    state = wait_for(training, 120, "dev-1 training in round 0", server)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    task = state["open_round"]["tasks"]["dev-1"]
    assert task not in tasks_done(cache)
    assert "dev-1" not in read_state(tmp_path)["open_round"]["accepted"]
    services.agent(agent_configs[1], log="agent-1-restarted.log")
    assert server.wait(timeout=300) == 0, services.log()[-3000:]

    assert finished_history(tmp_path) == [HONEST, HONEST]
    assert f"task {task} trained" not in services.log("agent-1-killed.log")
    assert services.log("agent-1-restarted.log").count(f"task {task} trained") == 1
    assert task in tasks_done(cache)


def tasks_done(cache: Path) -> dict[str, Any]:
    """The tasks an agent has finished (its on-disk record)."""
    path = cache / "tasks.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ---- 3. broker restart ----------------------------------------------------------------------------


def test_broker_restarts_mid_transfer_and_mid_training_are_survived(tmp_path, services):
    """Mosquitto (no persistence) is stopped and started again on the same port twice: while the
    agents pull the stage-1 pack, and while a device trains in round 1, so that its update is
    published while the broker is gone or before the aggregator is back. Sessions, in-flight
    messages and the retained status are lost each time; the services reconnect and resubscribe,
    the pulls resume, the aggregator's fresh status makes the devices announce themselves again so
    the lost update is offered again, and the run finishes with both devices in every round."""
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    agg_config, agent_configs = write_configs(
        tmp_path, url, devices=2, rounds=2, round_timeout_s=120, chunk_bytes=16384
    )

    def pulling() -> list[Path]:
        return [p for d in HONEST for p in (tmp_path / d / "blobs" / "partial").glob("*.have")]

    def training_in_round_1() -> str | None:
        state = read_state(tmp_path)
        round_ = state.get("open_round") or {}
        for device in HONEST if round_.get("index") == 1 else []:
            task = round_["tasks"].get(device)
            unpacked = (tmp_path / device / "packs" / state["pack"]).is_dir()
            if task and unpacked and task not in tasks_done(tmp_path / device):
                return device
        return None

    with contextlib.ExitStack() as broker:
        broker.enter_context(mosquitto(tmp_path / "broker", port=port))
        server = services.serve(agg_config)
        for config in agent_configs:
            services.agent(config)
        assert wait_for(pulling, 120, "a pack transfer", server)
    time.sleep(1.0)
    with contextlib.ExitStack() as broker:
        broker.enter_context(mosquitto(tmp_path / "broker", port=port))
        assert wait_for(training_in_round_1, 120, "training in round 1", server)
    time.sleep(1.0)
    with mosquitto(tmp_path / "broker", port=port):
        assert server.wait(timeout=300) == 0, services.log()[-3000:]
    assert finished_history(tmp_path) == [HONEST, HONEST]
    for device in HONEST:
        log = services.log(f"agent-{device[-1]}.log")
        assert log.count("connected to") >= 3, log[-2000:]
    assert services.log().count("reconnected to the broker") == 2


# ---- 4. partial downloads -------------------------------------------------------------------------


def test_a_partial_pack_in_the_cache_resumes_with_only_the_missing_chunks(tmp_path, broker, services):
    """Before the agents start, their caches hold the partial pack download a crash would leave:
    dev-0 the even chunks, dev-1 all but the last with chunk 0 corrupted. dev-0 asks for exactly
    the odd chunks; dev-1 for the last one, then the hash check fails and it fetches the whole
    pack afresh. Both train on the verified pack."""
    agg_config, agent_configs = write_configs(tmp_path, broker, devices=2, rounds=1, stages=1, method="fedit")
    sniffer = services.client(broker, "sniffer", [f"{PREFIX}/dev/+/up"])
    server = services.serve(agg_config)
    pack_sha = wait_for(lambda: read_state(tmp_path).get("pack"), 120, "the stage pack", server)
    blob = (tmp_path / "agg" / "state" / "blobs" / pack_sha).read_bytes()
    info = BlobInfo(pack_sha, len(blob), 65536)
    assert info.count > 2
    even = list(range(0, info.count, 2))
    for device, have in (("dev-0", even), ("dev-1", list(range(info.count - 1)))):
        receiver = BlobStore(tmp_path / device / "blobs").receiver(info)
        for index in have:
            piece = blob[index * info.chunk_bytes : (index + 1) * info.chunk_bytes]
            if device == "dev-1" and index == 0:
                piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
            assert receiver.add(index, piece) is False
    for config in agent_configs:
        services.agent(config)
    assert server.wait(timeout=300) == 0, services.log()[-3000:]

    assert finished_history(tmp_path) == [HONEST]
    asked: dict[str, list[list[int]]] = {d: [] for d in HONEST}
    for _, message, _ in sniffer.drain():
        if message.kind is Kind.CHUNK_REQUEST and message.data["blob"] == pack_sha:
            asked[message.sender].append(message.data["missing"])
    odd = [i for i in range(info.count) if i % 2]
    assert asked["dev-0"][0] == odd[:64] and sorted(i for r in asked["dev-0"] for i in r) == odd
    assert asked["dev-1"][0] == [info.count - 1]
    assert asked["dev-1"][1] == list(range(min(64, info.count)))  # a fresh transfer after the hash failure
    assert sorted({i for r in asked["dev-1"] for i in r}) == list(range(info.count))
    assert "hash" in services.log("agent-1.log")
    for device in HONEST:
        assert (tmp_path / device / "blobs" / pack_sha).is_file()
        assert not list((tmp_path / device / "blobs" / "partial").iterdir())


# ---- 5. reselection -------------------------------------------------------------------------------


def test_a_silent_device_below_quorum_is_replaced_at_the_deadline(tmp_path, broker, services):
    """per_round 2, quorum 2: the silent device says hello first, so round 0 is opened with it
    (seed 0 also picks it among all three); at the deadline one update is below quorum, the round
    selects the remaining honest device and closes with the two honest updates."""
    agg_config, agent_configs = write_configs(
        tmp_path, broker, devices=2, rounds=1, stages=1, method="fedit", quorum=2, round_timeout_s=5.0, seed=0
    )
    silent = services.client(broker, "silent", [down("silent")], enrolled(tmp_path, "silent"))
    server = services.serve(agg_config)
    wait_for(lambda: read_state(tmp_path).get("stage"), 120, "stage 1", server)
    hello = Envelope(kind=Kind.HELLO, sender="silent", data={"profile": valid_profile(), "backends": ["torch"]})
    silent.publish(up("silent"), hello)
    silent.flush()
    wait_for(lambda: "silent" in read_state(tmp_path).get("devices", {}), 30, "the silent device's hello", server)
    for config in agent_configs:
        services.agent(config)
    assert server.wait(timeout=300) == 0, services.log()[-3000:]

    assert finished_history(tmp_path) == [HONEST]
    log = services.log()
    assert "silent" in next(line for line in log.splitlines() if "tasks to" in line)
    assert "selecting again" in log
    assert silent.next(Kind.TASK, timeout=1).round == 0


# ---- 6. a crash at the stage boundary ---------------------------------------------------------------


def test_a_kill_between_closing_a_stage_and_opening_the_next_resumes_with_the_next_stage(tmp_path, broker, services):
    """SIGKILL the aggregator after it checkpointed the close of stage 1 and while it builds stage 2
    (server-side healing makes that take seconds); restarted, it opens stage 2, never a further
    round of stage 1 (it once re-opened one: history 1, 1, 2 and more rounds than configured)."""
    heal = {"mode": "bake", "steps": 400, "prompts": 8, "new_tokens": 8, "batch": 2}
    agg_config, agent_configs = write_configs(
        tmp_path, broker, devices=1, rounds=3, stages=3, per_round=1, recipe={"heal": heal}
    )
    server = services.serve(agg_config, log="serve-killed.log")
    for config in agent_configs:
        services.agent(config)

    def between_stages() -> bool:
        with contextlib.suppress(ValueError):  # a checkpoint being replaced
            state = read_state(tmp_path)
            return state.get("stage") == 1 and state.get("rounds_done") == 1 and state.get("open_round") is None
        return False

    wait_for(between_stages, 300, "the close of stage 1", server)
    server.send_signal(signal.SIGKILL)
    server.wait()
    assert read_state(tmp_path)["stage"] == 1, "the kill came too late to test the boundary"
    restarted = services.serve(agg_config)
    assert restarted.wait(timeout=600) == 0, services.log()[-3000:]
    history = read_state(tmp_path)["history"]
    assert [h["stage"] for h in history] == [1, 2, 3]
    assert "stage 1 was closed before a restart; opening stage 2" in services.log()
