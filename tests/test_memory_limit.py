"""The planner held to a real memory limit (issue 16, item 4).

A device agent's hello declares the memory it may really use: its profile's usable memory capped
by the memory cgroup limit of its process; and before training it checks the task's predicted
peak against that capped budget read again, refusing with reason ``memory`` when it does not fit.

The in-process tests check the hello and the check on a tiny model's config. The process tests
(root and a writable cgroup v1 memory controller, else skipped; about 35 s each) run the real
thing: mosquitto, the aggregator and two agents as processes (tiny model), each agent in a cgroup
v1 memory group of its own made inside this process's group, one limited to 1.1x the planner's
predicted peak and one to 0.9x. Below: never selected (its hello declares the limit), or, with
the limit lowered after its hello, its task refused with the reason the aggregator records; the run
finishes with the other device's updates either way.

``python tests/test_memory_limit.py sweep 0.6 0.7 0.8 0.9 1.1`` measures (root; results under
``runs/memory-limit/``): the 2-stage run with the second agent ignoring its limit (what an agent
without this check does) in a group limited to each factor x the smaller stage prediction: did it
train, its peak as the cgroup charged it, its own peak RSS. ``docs/planning.md`` ("Held to a real
limit") has the numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from system_harness import mosquitto, needs_mosquitto, read_state, start, stop, write_configs

from devft_edge.blobs import BlobInfo
from devft_edge.lora import LoraSettings
from devft_edge.messages import Task
from devft_edge.methods import ClientMethod
from devft_edge.protocol import Kind, Topics
from devft_edge.quantization import QuantSpec
from devft_edge.training import TrainSettings

MIB = 2**20
V1_MEMORY = Path("/sys/fs/cgroup/memory")
ABOVE, BELOW = 1.1, 0.9
"""The limits tried, as factors of the planner's predicted peak."""


# ---- in process: the hello and the pre-task check ---------------------------------------------------


def _agent(tmp_path: Path, profile: str = "x86-cpu") -> SimpleNamespace:
    """The parts of an agent its hello and memory check use, with an outbox."""
    from devft_edge.blobs import BlobStore
    from devft_edge.profiles import load_profile
    from device_agent.agent import Agent

    agent = SimpleNamespace(
        cfg=SimpleNamespace(device_id="pi-1", backend="torch", hello_cached_max=4),
        profile=load_profile(profile),
        store=BlobStore(tmp_path / "blobs"),
        topics=Topics("devft/t"),
        sent=[],
    )
    agent._send = lambda message, topic=None, retain=False: agent.sent.append(message)
    for name in ("_announce", "_over_budget"):
        setattr(agent, name, getattr(Agent, name).__get__(agent))
    return agent


def test_the_hello_declares_the_memory_the_cgroup_allows(tmp_path, monkeypatch) -> None:
    from devft_edge.profiles import parse_profile

    agent = _agent(tmp_path)
    monkeypatch.setattr("device_agent.agent.memory_limit_bytes", lambda: 600 * MIB)
    agent._announce()
    hello = next(m for m in agent.sent if m.kind is Kind.HELLO)
    declared = parse_profile(hello.data["profile"], "pi-1")  # as the aggregator reads it
    assert 600 * MIB - 16 <= declared.budget_bytes <= 600 * MIB < agent.profile.budget_bytes
    assert declared.memory.total_gb == agent.profile.memory.total_gb and "cgroup" in declared.sources["reserved"]
    monkeypatch.setattr("device_agent.agent.memory_limit_bytes", lambda: None)
    agent.sent.clear()
    agent._announce()
    hello = next(m for m in agent.sent if m.kind is Kind.HELLO)
    assert parse_profile(hello.data["profile"], "pi-1").budget_bytes == agent.profile.budget_bytes


def _tiny_task(tmp_path: Path, layers: int) -> tuple[Task, SimpleNamespace, int]:
    """A task for a ``layers``-deep tiny stage, its (unsigned, unread) pack, and the planner's prediction."""
    from devft_edge.memory import StepConfig, estimate_memory, model_shape
    from devft_edge.models import load_config

    config = load_config("tiny")
    config.save_pretrained(tmp_path / "pack")
    manifest = SimpleNamespace(quant=QuantSpec("int8"), lora=LoraSettings(rank=8))  # what the check reads
    pack = SimpleNamespace(directory=tmp_path / "pack", manifest=manifest)
    method = ClientMethod("fedit", tuple((i,) for i in range(layers)), "dblf", 0.1, "copy")
    blob = BlobInfo("0" * 64, 1, 1)
    task = Task(blob, blob, method, TrainSettings(steps=2, batch_size=2, seq_len=48, lr=1e-3), seed=0, data_seed=0)
    step = StepConfig(layers=layers, batch=2, seq=48, rank=8, quant="int8")
    return task, pack, estimate_memory(model_shape(config), step).peak_bytes


def test_a_task_over_the_capped_budget_is_refused_for_memory(tmp_path, monkeypatch) -> None:
    """The check predicts as the planner does; the budget is the profile's capped by the limit read now."""
    agent = _agent(tmp_path)
    task, pack, predicted = _tiny_task(tmp_path, 4)
    monkeypatch.setattr("device_agent.agent.memory_limit_bytes", lambda: None)
    assert agent._over_budget(task, pack) is None
    monkeypatch.setattr("device_agent.agent.memory_limit_bytes", lambda: int(predicted * ABOVE))
    assert agent._over_budget(task, pack) is None
    monkeypatch.setattr("device_agent.agent.memory_limit_bytes", lambda: int(predicted * BELOW))
    why = agent._over_budget(task, pack)
    assert why is not None and f"predicted peak {predicted / MIB:.0f} MiB" in why
    assert f"memory cgroup limit {predicted * BELOW / MIB:.0f} MiB" in why


def test_a_profile_that_claims_too_little_refuses_without_any_cgroup(tmp_path, monkeypatch) -> None:
    from devft_edge.profiles import load_profile

    agent = _agent(tmp_path)
    task, pack, predicted = _tiny_task(tmp_path, 8)
    small = load_profile("x86-cpu")
    total = small.memory.total_gb
    agent.profile = small.model_copy(
        update={"memory": small.memory.model_copy(update={"reserved_gb": total - predicted * 0.5 / 2**30})}
    )
    monkeypatch.setattr("device_agent.agent.memory_limit_bytes", lambda: None)
    why = agent._over_budget(task, pack)
    assert why is not None and "memory cgroup limit none" in why


def test_the_check_predicts_with_the_devices_own_runtime(tmp_path, monkeypatch) -> None:
    """A profile that measured its device's runtime memory (``memory.runtime_mb``) moves the
    prediction by its difference from the calibration machine's, as the planner does: a limit the
    reference runtime fits under refuses a device whose libraries take 200 MiB more."""
    from devft_edge.memory import RUNTIME_REFERENCE_BYTES

    agent = _agent(tmp_path)
    task, pack, predicted = _tiny_task(tmp_path, 4)
    monkeypatch.setattr("device_agent.agent.memory_limit_bytes", lambda: predicted + 100 * MIB)
    assert agent._over_budget(task, pack) is None
    memory = agent.profile.memory.model_copy(update={"runtime_mb": RUNTIME_REFERENCE_BYTES // MIB + 200})
    agent.profile = agent.profile.model_copy(update={"memory": memory})
    why = agent._over_budget(task, pack)
    assert why is not None and f"predicted peak {(predicted + 200 * MIB) / MIB:.0f} MiB" in why


# ---- real processes in real memory cgroups ---------------------------------------------------------------


def _v1_parent() -> Path:
    """This process's own cgroup v1 memory group (the test's groups are made inside it), or skip."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test makes cgroup v1 memory groups")
    own = next(
        (
            line.split(":", 2)[2].strip("/")
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":")[1].split(",")
        ),
        None,
    )
    parent = V1_MEMORY / own if own is not None else None
    if parent is None or not (parent / "memory.limit_in_bytes").exists() or not os.access(parent, os.W_OK):
        pytest.skip("the cgroup v1 memory controller is not mounted writable at /sys/fs/cgroup/memory")
    return parent


class MemoryGroup:
    """One cgroup v1 memory group with a limit; removed (after its processes are gone) on exit."""

    def __init__(self, parent: Path, name: str, limit: int) -> None:
        self.path = parent / f"devft-{name}-{os.getpid()}"
        self.path.mkdir()
        self.set_limit(limit)
        self.peaks = {"rss": 0, "mapped_file": 0, "cache": 0}

    def set_limit(self, limit: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())  # rounded down to a page

    def sample(self) -> None:
        """Keep the largest anonymous, mapped-file and page-cache charge seen (``memory.stat``)."""
        with contextlib.suppress(OSError):
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, value = line.split()
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], int(value))

    def measured(self) -> dict[str, int]:
        """The group's limit, peak charge, how often it hit the limit, and OOM kills in it."""
        read = lambda name: (self.path / name).read_text()  # noqa: E731
        oom = dict(line.split() for line in read("memory.oom_control").splitlines())
        return {
            "limit_bytes": self.limit,
            "max_usage_bytes": int(read("memory.max_usage_in_bytes")),
            "failcnt": int(read("memory.failcnt")),
            "oom_kills": int(oom.get("oom_kill", 0)),
            **{f"peak_{key}_bytes": value for key, value in self.peaks.items()},
        }

    def remove(self) -> None:
        for _ in range(40):
            if not (self.path / "cgroup.procs").read_text().strip():
                break
            time.sleep(0.25)
        with contextlib.suppress(OSError):
            self.path.rmdir()


@contextlib.contextmanager
def memory_groups(parent: Path) -> Iterator[list[MemoryGroup]]:
    """Groups made with ``MemoryGroup(parent, ...)`` and appended to the yielded list are removed on exit."""
    groups: list[MemoryGroup] = []
    try:
        yield groups
    finally:
        for group in groups:
            group.remove()


IGNORE_LIMIT = (
    "import sys, device_agent.agent as a; a.memory_limit_bytes = lambda: None; "
    "from devft_edge.cli import main; sys.exit(main(sys.argv[1:]))"
)
"""An agent that does not know its cgroup limit: neither its hello nor its check sees it."""


def start_in(group: MemoryGroup, config: Path, log: Path, ignore_limit: bool = False) -> subprocess.Popen:
    """``devft-edge -v agent --config CONFIG`` started inside ``group`` (so is everything it loads)."""
    python = f'"{sys.executable}" ' + (f"-c '{IGNORE_LIMIT}'" if ignore_limit else "-m devft_edge")
    script = f"echo $$ > {group.path}/cgroup.procs && exec {python} -v agent --config {config}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["sh", "-c", script], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def predicted_peaks(agg_config: Path) -> list[int]:
    """The planner's peak for every stage of the run, as the aggregator admits devices by
    (``AggregatorService._step``; the run's record holds what it used, and the tests compare)."""
    from cloud_aggregator.config import AggregatorConfig
    from devft_edge.aggregation import RULES
    from devft_edge.memory import StepConfig, estimate_memory, model_shape
    from devft_edge.models import load_config

    cfg = AggregatorConfig.from_file(agg_config)
    shape, train = model_shape(load_config(cfg.model)), cfg.train
    return [
        estimate_memory(
            shape,
            StepConfig(
                layers=layers,
                batch=train.batch_size,
                seq=train.seq_len,
                rank=cfg.lora.rank,
                quant=cfg.quant,
                checkpointing=train.checkpointing,
                merged_delta=RULES.get(cfg.rule).merges_into_base,
            ),
        ).peak_bytes
        for layers in cfg.schedule(shape.num_layers).capacities
    ]


def _configs(tmp_path: Path, broker: str, rounds: int = 2, **overrides: object) -> tuple[Path, list[Path], list[int]]:
    """Aggregator and two agents' configs of a tiny run, and the planner's peak for each of its stages."""
    agg_config, agents = write_configs(tmp_path, broker, devices=2, rounds=rounds, **overrides)
    return agg_config, agents, predicted_peaks(agg_config)


def _serve_until_done(server: subprocess.Popen, groups: list[MemoryGroup], timeout: float) -> int | None:
    """The aggregator's exit code (None if it still runs after ``timeout``), sampling the groups meanwhile."""
    deadline = time.time() + timeout
    while server.poll() is None and time.time() < deadline:
        for group in groups:
            group.sample()
        time.sleep(0.2)
    return server.poll()


def _budget(state: dict, device: str) -> int:
    from devft_edge.profiles import parse_profile

    return parse_profile(state["devices"][device]["profile"], device).budget_bytes


def _outcome(tmp_path: Path, state: dict, predicted: list[int], groups: list[MemoryGroup]) -> dict:
    """What the run measured, also written to ``tmp_path/memory_limit.json``."""
    result = {
        "predicted_peak_bytes": predicted,
        "recorded_prediction_bytes": [s.get("predicted_peak_bytes") for s in state.get("stages", [])],
        "rounds": [
            {"devices": h["devices"], "peak_rss_bytes": {d: c["peak_rss_bytes"] for d, c in h["clients"].items()}}
            for h in state.get("history", [])
        ],
        "groups": {group.path.name: group.measured() for group in groups},
    }
    (tmp_path / "memory_limit.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.long  # the hello's cap is checked in process above; the refusal test below runs in make test
@needs_mosquitto
def test_a_device_limited_below_the_prediction_is_never_selected(tmp_path, broker) -> None:
    """1.1x the prediction trains every round; 0.9x declares its limit in the hello and gets no task."""
    parent = _v1_parent()
    agg_config, (above_cfg, below_cfg), predicted = _configs(tmp_path, broker, selection_wait_s=2.0)
    with memory_groups(parent) as groups:
        above = MemoryGroup(parent, "above", int(max(predicted) * ABOVE))
        groups.append(above)
        below = MemoryGroup(parent, "below", int(min(predicted) * BELOW))
        groups.append(below)
        agents = [
            start_in(above, above_cfg, tmp_path / "above.log"),
            start_in(below, below_cfg, tmp_path / "below.log"),
        ]
        server = start("serve", "--config", str(agg_config), log=tmp_path / "serve.log")
        try:
            code = _serve_until_done(server, groups, timeout=400)
            alive = [agent.poll() is None for agent in agents]
        finally:
            stop(*agents, server)
        state = read_state(tmp_path)
        result = _outcome(tmp_path, state, predicted, groups)
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log[-3000:]
    assert state["finished"] and len(state["history"]) == 2
    assert result["recorded_prediction_bytes"] == predicted  # the test predicts as the aggregator does
    assert all(h["devices"] == ["dev-0"] for h in state["history"])  # the device at 1.1x trained every round
    assert not re.search(r"tasks to .*dev-1", log)  # the one at 0.9x was never selected
    assert _budget(state, "dev-1") <= below.limit < min(predicted) <= max(predicted) < _budget(state, "dev-0")
    assert alive == [True, True]  # neither agent was killed by its limit
    assert "trained" in (tmp_path / "above.log").read_text() and "trained" not in (tmp_path / "below.log").read_text()


@needs_mosquitto
def test_a_limit_lowered_after_the_hello_refuses_the_task_and_the_run_goes_on(tmp_path, broker) -> None:
    """The below device said hello at 1.1x, then its limit drops to 0.9x: the task forced on it is
    refused with reason memory (the aggregator records it and drops the device from the round), its
    next hello declares the lower limit, and the round closes with the other device's update.

    One full-depth stage of one round, and the other device starts only after the limit is lowered:
    the round waits for both devices, so the task certainly comes after the lowering."""
    parent = _v1_parent()
    agg_config, (above_cfg, below_cfg), predicted = _configs(
        tmp_path, broker, stages=1, rounds=1, selection_wait_s=300.0, round_timeout_s=120.0
    )
    hello = tmp_path / "agg" / "state" / "devices" / "dev-1.json"  # the aggregator's record of its hello
    with memory_groups(parent) as groups:
        above = MemoryGroup(parent, "above", int(max(predicted) * ABOVE))
        groups.append(above)
        lowered = MemoryGroup(parent, "lowered", int(max(predicted) * ABOVE))
        groups.append(lowered)
        agents = [start_in(lowered, below_cfg, tmp_path / "below.log")]
        server = start("serve", "--config", str(agg_config), log=tmp_path / "serve.log")
        try:
            deadline = time.time() + 180
            while not hello.exists() and time.time() < deadline:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.1)
            hello_budget = _budget({"devices": {"dev-1": json.loads(hello.read_text())}}, "dev-1")
            lowered.set_limit(int(min(predicted) * BELOW))
            agents.append(start_in(above, above_cfg, tmp_path / "above.log"))
            code = _serve_until_done(server, groups, timeout=400)
        finally:
            stop(*agents, server)
        state = read_state(tmp_path)
        result = _outcome(tmp_path, state, predicted, groups)
    log, below_log = (tmp_path / "serve.log").read_text(), (tmp_path / "below.log").read_text()
    assert code == 0, log[-3000:]
    assert max(predicted) < hello_budget  # its first hello fitted the stage
    assert "tasks to dev-0, dev-1" in log  # so the aggregator sent it the task
    assert re.search(r"device dev-1 refused its task: \S*memory", log, re.IGNORECASE), log[-3000:]
    assert re.search(r"refused: stage of \d+ layers .*predicted peak \d+ MiB > budget \d+ MiB", below_log)
    assert "trained" not in below_log
    assert state["finished"] and [h["devices"] for h in state["history"]] == [["dev-0"]]  # nothing lost
    assert state["history"][0]["refused"]["dev-1"]["reason"] == "memory"  # the aggregator records why
    assert state["refusals"] == {"memory": 1}
    assert _budget(state, "dev-1") <= lowered.limit  # it said hello again, with the lower limit
    assert result["groups"][lowered.path.name]["oom_kills"] == 0


# ---- the sweep: how far below the prediction does the real process still train? -------------------


def sweep(factors: list[float], work: Path) -> list[dict]:
    """Per factor: one run with dev-0 at 1.1x and dev-1 ignoring its limit at ``factor`` x the prediction."""
    results = []
    parent = _v1_parent()
    for factor in factors:
        tmp = work / f"x{factor}"
        tmp.mkdir(parents=True)
        with mosquitto(tmp / "broker") as broker:
            agg_config, (above_cfg, below_cfg), predicted = _configs(
                tmp, broker, selection_wait_s=2.0, round_timeout_s=45.0
            )
            with memory_groups(parent) as groups:
                above = MemoryGroup(parent, "above", int(max(predicted) * ABOVE))
                groups.append(above)
                tried = MemoryGroup(parent, f"x{factor}", int(min(predicted) * factor))
                groups.append(tried)
                agents = [
                    start_in(above, above_cfg, tmp / "above.log"),
                    start_in(tried, below_cfg, tmp / "tried.log", ignore_limit=True),
                ]
                server = start("serve", "--config", str(agg_config), log=tmp / "serve.log")
                try:
                    began = time.monotonic()
                    code = _serve_until_done(server, groups, timeout=600)
                    exits = [agent.poll() for agent in agents]
                finally:
                    stop(*agents, server)
                state = read_state(tmp)
                outcome = _outcome(tmp, state, predicted, groups)
        trained = [h for h in state.get("history", []) if "dev-1" in h["devices"]]
        results.append(
            {
                "factor": factor,
                "limit_bytes": tried.limit,
                "aggregator_exit": code,
                "finished": state.get("finished", False),
                "seconds": round(time.monotonic() - began, 1),
                "dev1_rounds_accepted": len(trained),
                "dev1_exit": exits[1],
                "dev1_peak_rss_bytes": max((h["clients"]["dev-1"]["peak_rss_bytes"] for h in trained), default=None),
                "predicted_peak_bytes": predicted,
                "cgroup": outcome["groups"][tried.path.name],
                "above_cgroup": outcome["groups"][above.path.name],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "sweep":
        sys.exit("usage: python tests/test_memory_limit.py sweep FACTOR... (root; writes under runs/memory-limit/)")
    out = Path("runs/memory-limit") / time.strftime("%Y%m%dT%H%M%S")
    found = sweep([float(f) for f in sys.argv[2:]], out)
    (out / "sweep.json").write_text(json.dumps(found, indent=1))
    print(f"wrote {out / 'sweep.json'}")
