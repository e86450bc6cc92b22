"""What the process-level system tests share: a real mosquitto on a free loopback port, run
configs for an aggregator and its agents (tiny model), and the service processes themselves.

Tests import these helpers (``from system_harness import ...``); the ``broker`` fixture in
``conftest.py`` wraps :func:`mosquitto`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devft_edge.identity import enroll
from devft_edge.signing import Ed25519PrivateKey, generate_keypair, load_private_key

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed (make test installs it)")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Until something accepts TCP connections on ``127.0.0.1:port``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def mosquitto(directory: Path, port: int | None = None, conf: str | None = None) -> Iterator[str]:
    """A mosquitto process on ``port`` (default: a free one); yields its ``mqtt://`` URL.

    ``conf`` replaces the default anonymous loopback listener config (it must listen on ``port``).
    Stopped by pid on exit, never left behind.
    """
    assert MOSQUITTO is not None
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mosquitto.conf"
    path.write_text(
        conf
        or f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest stdout\nmax_queued_messages 10000\nset_tcp_nodelay true\n"
    )
    with (directory / "mosquitto.log").open("a") as log:
        process = subprocess.Popen([MOSQUITTO, "-c", str(path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def enrolled(tmp_path: Path, device: str) -> Ed25519PrivateKey:
    """A device identity enrolled with the fleet of :func:`write_configs` (a registered insider)."""
    private, _ = enroll(device, tmp_path / "keys" / "devices", tmp_path / f"identity-{device}")
    return load_private_key(private)


def write_configs(
    tmp_path: Path, broker: str, devices: int = 2, rounds: int = 4, **aggregator_overrides: Any
) -> tuple[Path, list[Path]]:
    """Aggregator and agent YAML configs of a tiny 2-stage run; returns their paths.

    Every device is enrolled (``keys/devices/<id>.pem``, its private key in ``identity-<id>/``)."""
    private, public = generate_keypair(tmp_path / "keys")
    aggregator = {
        "run_id": "test-run",
        "fleet": "t",
        "broker": broker,
        "model": "tiny",
        "method": "devft",
        "stages": 2,
        "rounds": rounds,
        "per_round": devices,
        "quorum": 1,
        "round_timeout_s": 120,
        "quant": "int8",
        "train": {"steps": 2, "batch_size": 2, "seq_len": 48, "lr": 1e-3},
        "sign_key": str(private),
        "device_keys": str(tmp_path / "keys" / "devices"),
        "state_dir": str(tmp_path / "agg" / "state"),
        "out_dir": str(tmp_path / "agg" / "out"),
        "eval_examples": 4,
        "chunk_bytes": 65536,
        **aggregator_overrides,
    }
    agg_path = tmp_path / "aggregator.yaml"
    agg_path.write_text(yaml.safe_dump(aggregator))
    agents = []
    for i in range(devices):
        identity, _ = enroll(f"dev-{i}", tmp_path / "keys" / "devices", tmp_path / f"identity-dev-{i}")
        agent = {
            "device_id": f"dev-{i}",
            "fleet": "t",
            "broker": broker,
            "public_key": str(public),
            "identity": str(identity),
            "profile": "x86-cpu",
            "data": f"synthetic:12:{i}",
            "cache_dir": str(tmp_path / f"dev-{i}"),
        }
        path = tmp_path / f"agent-{i}.yaml"
        path.write_text(yaml.safe_dump(agent))
        agents.append(path)
    return agg_path, agents


def start(*args: str, log: Path) -> subprocess.Popen:
    """``devft-edge -v ARGS`` as a separate process, one torch thread, output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "devft_edge", "-v", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
    )


def stop(*processes: subprocess.Popen) -> None:
    """Terminate processes and reap them."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(timeout=30)


def read_state(tmp_path: Path) -> dict:
    """The aggregator's checkpoint of the run under ``tmp_path`` with its device records (empty before the first)."""
    directory = tmp_path / "agg" / "state"
    if not (directory / "state.json").exists():
        return {}
    state = json.loads((directory / "state.json").read_text())
    state["devices"] = {p.stem: json.loads(p.read_text()) for p in sorted((directory / "devices").glob("*.json"))}
    return state


SSHD = next((p for p in ("/usr/sbin/sshd",) if Path(p).exists()), shutil.which("sshd"))
needs_sshd = pytest.mark.skipif(SSHD is None, reason="openssh-server not installed (make test installs it)")


@dataclass(frozen=True)
class SshServer:
    """An sshd on a loopback port that accepts one generated key: a stand-in for a device."""

    port: int
    user: str
    identity: Path
    known_hosts: Path

    def options(self) -> list[str]:
        """``devft-edge flash`` arguments reaching this server."""
        return [
            "--host", f"{self.user}@127.0.0.1", "--port", str(self.port), "--identity", str(self.identity),
            "--ssh-option", f"UserKnownHostsFile={self.known_hosts}", "--ssh-option", "StrictHostKeyChecking=yes",
        ]  # fmt: skip


@contextlib.contextmanager
def sshd(directory: Path) -> Iterator[SshServer]:
    """Run sshd in the foreground on a free port with its own host key and authorized key."""
    import getpass

    assert SSHD is not None
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
    (directory / "authorized_keys").write_text((directory / "client_key.pub").read_text())
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPidFile {directory / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\n"  # scp speaks SFTP since OpenSSH 9
    )
    host_key = (directory / "host_key.pub").read_text().split()
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    with (directory / "sshd.log").open("w") as log:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield SshServer(port, getpass.getuser(), directory / "client_key", known_hosts)
    finally:
        process.terminate()
        process.wait(timeout=10)
