"""The demo: a whole fleet on this machine — broker, aggregator and device agents as processes.

It is the real system, not the simulator: an MQTT broker (the embedded one unless ``broker`` is
given), ``devft-edge serve`` and one ``devft-edge agent`` per device, each a separate process
talking only through the broker. The demo plays the operator: it writes a signing key, gives
every device its own private slice of the synthetic non-IID data (a JSONL file in the device's
directory — the aggregator never sees it), writes the configs, starts the processes, follows the
run on the aggregator's retained status, and collects what the aggregator wrote (``metrics.jsonl``,
``summary.json``, ``curves.png``, the adapter) into ``out``.

Devices are declared with edge profiles (Raspberry Pi, Jetson); the aggregator plans every stage
against them. They all run on this machine, so only the plan, not the speed, is theirs.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator

from devft_edge.errors import DevFTError
from devft_edge.run_config import RunConfig

logger = logging.getLogger(__name__)

DEMO_PROFILES = ("rpi5-8gb", "jetson-orin-nano-8gb", "rpi5-4gb", "rpi4-4gb")
"""Profiles the demo devices declare, in turn."""
RUN_ID = "demo"
FLEET = "demo"


class DemoConfig(RunConfig):
    """A demo fleet and the run it does: the run configuration plus the devices and the broker."""

    devices: int = Field(4, ge=1)
    """Device agents to start."""
    profiles: tuple[str, ...] = Field(DEMO_PROFILES, min_length=1)
    """Profiles the devices declare, in turn."""
    broker: str | None = None
    """``mqtt://host:port`` of a running broker; None starts the embedded one."""
    round_timeout_s: float = Field(600.0, gt=0)
    """A round closes at this deadline with the updates it has (at least one)."""

    @model_validator(mode="after")
    def _fleet(self) -> Self:
        if self.per_round > self.devices:
            raise ValueError(f"per_round {self.per_round} exceeds devices {self.devices}")
        return self

    def device_ids(self) -> list[str]:
        """The demo devices' ids, named after the profile each declares."""
        return [f"dev-{i}-{self.profiles[i % len(self.profiles)]}" for i in range(self.devices)]


def run_demo(cfg: DemoConfig, out: Path, progress: bool | None = None) -> dict[str, Any]:
    """Run the fleet until the aggregator finishes; returns its ``summary.json`` (plus the fleet).

    Raises:
        DevFTError: when the aggregator fails or stops without finishing (its log is named).
    """
    import contextlib

    from devft_edge.ops.broker import EmbeddedBroker

    began = time.monotonic()
    _fresh(out)
    aggregator_yaml, agent_yamls = write_fleet(cfg, out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        broker = cfg.broker or stack.enter_context(EmbeddedBroker())
        logger.info("broker %s", broker)
        server = _spawn(["serve", "--config", str(aggregator_yaml), "--broker", broker], logs / "aggregator.log")
        stack.callback(_stop, server)
        threads = max(1, (os.cpu_count() or 1) // cfg.per_round)
        for path in agent_yamls:
            agent = _spawn(["agent", "--config", str(path), "--broker", broker], logs / f"{path.stem}.log", threads)
            stack.callback(_stop, agent)
        _follow(cfg, out, broker, server, progress)
        code = server.wait()
    if code != 0 or not (out / "summary.json").exists():
        raise DevFTError(f"the aggregator stopped (exit {code}) before the run finished; see {logs / 'aggregator.log'}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["demo"] = {
        "total_seconds": round(time.monotonic() - began, 3),
        "broker": "embedded (amqtt)" if cfg.broker is None else "external",
        "device_profiles": dict(zip(cfg.device_ids(), _profiles(cfg), strict=True)),
        "agent_threads": threads,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_fleet(cfg: DemoConfig, out: Path) -> tuple[Path, list[Path]]:
    """Key pair, every device's identity (enrolled), private data and config, the aggregator's config; their paths."""
    import yaml

    from devft_edge.data import partition, train_eval_split
    from devft_edge.identity import enroll
    from devft_edge.signing import generate_keypair

    private, public = generate_keypair(out / "keys")
    train, _ = train_eval_split(cfg.devices * cfg.examples_per_client, cfg.eval_examples, cfg.seed)
    shares = partition(train, cfg.devices, cfg.seed, cfg.data_alpha)
    agents = []
    for device, profile, share in zip(cfg.device_ids(), _profiles(cfg), shares, strict=True):
        home = out / "devices" / device
        data = home / "data" / "train.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(asdict(example)) + "\n" for example in share))
        identity, _ = enroll(device, out / "keys" / "devices", home / "identity")
        agent = {
            "device_id": device,
            "fleet": FLEET,
            "public_key": str(public),
            "identity": str(identity),
            "profile": profile,
            "data": str(data),
            "cache_dir": str(home / "cache"),
        }
        path = out / "config" / f"{device}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(agent, sort_keys=False))
        agents.append(path)
    aggregator = {
        **cfg.run_fields(),
        "run_id": RUN_ID,
        "fleet": FLEET,
        "quorum": 1,
        "round_timeout_s": cfg.round_timeout_s,
        "selection_wait_s": 60.0,
        "sign_key": str(private),
        "device_keys": str(out / "keys" / "devices"),
        "state_dir": str(out / "aggregator-state"),
        "out_dir": str(out),
    }
    path = out / "config" / "aggregator.yaml"
    path.write_text(yaml.safe_dump(aggregator, sort_keys=False))
    _validate(path, agents)
    return path, agents


def render_summary(summary: dict[str, Any]) -> str:
    """The table printed at the end: per stage, per device, and the totals."""
    lines = [f"{'stage':>5}  {'layers':>6}  {'rounds':>6}  {'pack':>9}  {'planned peak':>12}  {'device peak':>11}"]
    for s in summary["stages"]:
        planned, measured = s["predicted_peak_bytes"], s["device_peak_bytes"]
        error = f" ({(planned - measured) / measured:+.0%})" if planned and measured else ""
        lines.append(
            f"{s['stage']:>5}  {s['layers']:>6}  {s['rounds']:>6}  {s['pack_bytes'] / 1e6:>6.1f} MB  "
            f"{planned / 2**30:>8.2f} GiB  {measured / 2**30:>7.2f} GiB{error}"
        )
    lines += ["", f"{'device':<28}  {'updates':>7}  {'train s':>8}  {'peak RSS':>9}"]
    for device, d in summary["devices"].items():
        lines.append(
            f"{device:<28}  {d['updates']:>7}  {d['train_seconds']:>8.1f}  {d['peak_rss_bytes'] / 2**30:>5.2f} GiB"
        )
    init, final = summary["initial_eval_loss"], summary["final_eval_loss"]
    lines += [
        "",
        f"{summary['method']} on {summary['model']}: eval loss {_num(init)} -> {_num(final)}, exact match "
        f"{_pct(summary['initial_eval_accuracy'])} -> {_pct(summary['final_eval_accuracy'])}",
        f"{summary['rounds']} rounds in {summary['wall_seconds']:.0f} s; up {summary['bytes_up'] / 1e6:.1f} MB, "
        f"down {summary['bytes_down'] / 1e6:.1f} MB (packs {summary['bytes_down_pack'] / 1e6:.1f} MB); "
        f"rejected messages: {sum(summary['rejected'].values())}",
    ]
    return "\n".join(lines)


def _follow(cfg: DemoConfig, out: Path, broker: str, server: subprocess.Popen[bytes], progress: bool | None) -> None:
    """Show the run's progress from the aggregator's retained status until the aggregator exits."""
    from tqdm import tqdm

    from devft_edge.messages import Status
    from devft_edge.mqtt import BrokerAddress, Connection
    from devft_edge.protocol import Kind, ProtocolError, Topics, decode, unseal
    from devft_edge.signing import load_public_key

    key = load_public_key(out / "keys" / "public.pem")
    topic = Topics(f"devft/{FLEET}").status
    connection = Connection(BrokerAddress.parse(broker), f"demo-monitor-{os.getpid()}", [topic], persistent=False)
    connection.start()
    bar = tqdm(total=cfg.rounds, unit="round", desc=cfg.method, disable=None if progress is None else not progress)
    try:
        while server.poll() is None:
            try:
                item = connection.inbox.get(timeout=0.5)
                status = decode(unseal(item.payload, item.topic, key))
            except (queue.Empty, ProtocolError):
                continue
            if status.kind is not Kind.STATUS:
                continue
            try:
                data = Status.from_data(status.data)
            except ProtocolError:
                continue
            bar.update(data.round - bar.n)
            r, loss = data.round_open, data.eval_loss
            bar.set_postfix(
                stage=f"{data.stage}/{data.stages}",
                online=data.devices_online_count,
                updates="-" if r is None else f"{len(r.accepted)}/{len(r.selected)}",
                eval_loss="-" if loss is None else f"{loss:.3f}",
            )
    finally:
        bar.close()
        connection.stop()


def _spawn(args: list[str], log: Path, threads: int | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "devft_edge", "-v", *args], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _fresh(out: Path) -> None:
    """Remove what an earlier demo left in ``out`` (only the demo's own entries)."""
    for name in ("aggregator-state", "devices", "config", "logs", "keys", "adapter", "merged"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json", "history.json", "curves.png"):
        (out / name).unlink(missing_ok=True)


def _profiles(cfg: DemoConfig) -> list[str]:
    return [cfg.profiles[i % len(cfg.profiles)] for i in range(cfg.devices)]


def _validate(aggregator: Path, agents: list[Path]) -> None:
    """Fail here, with the file named, rather than in a child process's log."""
    from cloud_aggregator.config import AggregatorConfig
    from device_agent.config import AgentConfig

    AggregatorConfig.from_file(aggregator)
    for path in agents:
        AgentConfig.from_file(path)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
