"""Flash devices over SSH: copy a bundle, install it, check the agent comes up, roll back if not.

For each device: verify the bundle locally (its signature with the fleet's public key, then every
member), start listening on the broker for the device's hello, copy the bundle (``scp``) to a
temporary directory on the device, run its ``install.sh --key-sha256 <the fleet key>`` (which
verifies the signature against that pinned key and the bundle again, installs into a new version
directory, switches ``current`` and restarts the service), then wait for the new agent's hello.
A device that says nothing within the timeout is rolled back (``devft-edge-ctl rollback``:
``current`` back to the previous version, restarted) and reported as failed. The OpenSSH client
does the transport, so keys, agents, ``~/.ssh/config`` and known-hosts work as the operator has
them; ``BatchMode`` makes a missing key an error instead of a password prompt.

Secrets never appear in a command line, a log line or the dry-run plan: they travel inside the
bundle (mode 0600) and the health check reads its password from a file.
"""

from __future__ import annotations

import logging
import queue
import shlex
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from devft_edge.errors import ConfigError, DevFTError
from devft_edge.ops.bundle import TOP, BundleSpec, build_bundle, verify_bundle

logger = logging.getLogger(__name__)

Progress = Callable[[str, str], None]
"""Called with (device id, what is happening now)."""


@dataclass(frozen=True)
class SshTarget:
    """Where a device is reachable."""

    host: str
    """``user@host`` (or a ``~/.ssh/config`` alias)."""
    port: int = 22
    identity: Path | None = None
    options: tuple[str, ...] = ()
    """Extra ``-o`` options, e.g. ``UserKnownHostsFile=...``."""

    def ssh(self, command: str) -> list[str]:
        """The ``ssh`` argv running ``command`` on the device."""
        return ["ssh", *self._common("-p"), self.host, command]

    def scp(self, local: Path, remote: str) -> list[str]:
        """The ``scp`` argv copying ``local`` to ``remote`` on the device."""
        return ["scp", "-q", *self._common("-P"), str(local), f"{self.host}:{remote}"]

    def _common(self, port_flag: str) -> list[str]:
        args = [port_flag, str(self.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        if self.identity is not None:
            args += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        for option in self.options:
            args += ["-o", option]
        return args


@dataclass(frozen=True)
class HealthCheck:
    """How to hear a device's hello: the broker, and the operator's login to it."""

    broker: str
    fleet: str = "default"
    timeout_s: float = 180.0
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class FlashJob:
    """One device to flash: its bundle spec and where it is."""

    spec: BundleSpec
    target: SshTarget


@dataclass(frozen=True)
class FlashSettings:
    """What is the same for every device of one ``flash`` command."""

    health: HealthCheck
    prefix: str = "/opt/devft-edge"
    service: str = "auto"
    bundle: Path | None = None
    """A prebuilt bundle to install (single device) instead of building one."""
    wheel_cache: Path | None = None
    workdir: Path | None = None
    """Where bundles are built (default: a temporary directory)."""


@dataclass
class FlashResult:
    """How flashing one device ended."""

    device_id: str
    host: str
    outcome: str
    """``healthy``, ``rolled back`` (installed, not healthy, previous version restored) or ``failed``."""
    version: str = ""
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the new agent said hello."""
        return self.outcome == "healthy"


class HelloWatch:
    """Listens for a device's new agent; started before the install, so nothing is missed.

    A fresh agent publishes its presence (online) and then its hello on every connect. The watch
    subscribes to both: the hello needs a login that may read the device's uplink (the
    aggregator's), the presence only the read-only monitor login (``broker-config``'s ACL grants
    it). Presence is retained, so only a live delivery counts: the retained copy is the old agent.
    """

    def __init__(self, health: HealthCheck, device_id: str, device_key: Path) -> None:
        from devft_edge.mqtt import BrokerAddress, BrokerLogin, Connection
        from devft_edge.protocol import Topics
        from devft_edge.signing import load_private_key

        self.device_public = load_private_key(device_key).public_key()
        """Only a hello sealed by the identity just installed counts as the new agent's."""

        login = BrokerLogin(
            username=health.username,
            password_file=health.password_file,
            tls_ca=health.tls_ca,
            tls_cert=health.tls_cert,
            tls_key=health.tls_key,
        )
        client_id = f"flash-{device_id}-{uuid.uuid4().hex[:8]}"
        topics = Topics(f"devft/{health.fleet}")
        self.device_id = device_id
        self.connection = Connection(
            BrokerAddress.parse(health.broker),
            client_id,
            [topics.up(device_id), topics.presence(device_id)],
            login=login,
            persistent=False,
        )

    def __enter__(self) -> HelloWatch:
        self.connection.start(timeout=15)
        if not self.connection.connected.is_set():
            self.connection.stop()
            raise DevFTError(f"health check: no connection to {self.connection.address}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.stop()

    def wait(self, timeout: float) -> bool:
        """True once the device's agent announces itself within ``timeout`` seconds."""
        from devft_edge.protocol import Kind, ProtocolError, decode, unseal

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.connection.inbox.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                message = decode(unseal(item.payload, item.topic, self.device_public))
            except (queue.Empty, ProtocolError):
                continue
            if message.sender != self.device_id or item.retained:
                continue
            if message.kind is Kind.HELLO or (message.kind is Kind.PRESENCE and message.data.get("online")):
                return True
        return False


def flash(
    jobs: Sequence[FlashJob], settings: FlashSettings, parallel: int = 4, progress: Progress | None = None
) -> list[FlashResult]:
    """Flash every job (up to ``parallel`` at once); one result per job, in order. Never raises
    for one device's failure: that is its result."""
    report = progress or (lambda device, text: logger.info("[%s] %s", device, text))
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(lambda job: flash_device(job, settings, report), jobs))


def flash_device(job: FlashJob, settings: FlashSettings, progress: Progress) -> FlashResult:
    """Build (or take) the bundle, install it over SSH, health-check, roll back on failure."""
    device, began = job.spec.device_id, time.monotonic()
    result = FlashResult(device_id=device, host=job.target.host, outcome="failed")
    try:
        progress(device, f"connecting to {job.target.host}")
        _run(job.target.ssh("true"), "reach the device")  # before minutes of building for it
        with tempfile.TemporaryDirectory(prefix=f"flash-{device}-", dir=settings.workdir) as tmp:
            bundle = settings.bundle
            if bundle is None:
                progress(device, f"building the {job.spec.platform} bundle")
                bundle = build_bundle(job.spec, Path(tmp) / f"{device}.tar.gz", settings.wheel_cache).path
            result.version = verify_bundle(bundle, job.spec.public_key)["version"]
            _install(job, settings, bundle, result, progress)
    except (DevFTError, OSError, subprocess.SubprocessError) as error:
        result.detail = result.detail or str(error)
    result.seconds = round(time.monotonic() - began, 1)
    progress(device, f"{result.outcome}{': ' + result.detail if result.detail else ''}")
    return result


def _install(job: FlashJob, settings: FlashSettings, bundle: Path, result: FlashResult, progress: Progress) -> None:
    device, target = job.spec.device_id, job.target
    health = replace(settings.health, fleet=job.spec.fleet)
    with HelloWatch(health, device, job.spec.device_key) as watch:
        remote = _run(target.ssh("mktemp -d /tmp/devft-flash.XXXXXX"), "create a directory on the device").strip()
        progress(device, f"copying the bundle ({bundle.stat().st_size / 1e6:.0f} MB)")
        _run(target.scp(bundle, f"{remote}/bundle.tar.gz"), "copy the bundle")
        progress(device, f"installing {result.version}")
        script = f"{remote}/{TOP}/install.sh"
        install = (
            f"tar -xzf {remote}/bundle.tar.gz -C {remote} && sh {script} {_install_options(job, settings)}"
            f"; rc=$?; rm -rf {remote}; exit $rc"
        )
        done = subprocess.run(target.ssh(install), capture_output=True, text=True)
        if done.returncode != 0:
            reason = "the device refused the bundle (verification)" if done.returncode == 3 else "install failed"
            result.detail = f"{reason}: {_tail(done.stderr or done.stdout)}"
            return
        progress(device, f"waiting up to {health.timeout_s:.0f} s for the agent's hello")
        if watch.wait(health.timeout_s):
            result.outcome = "healthy"
            return
    progress(device, "no hello: rolling back")
    ctl = f"{shlex.quote(settings.prefix)}/bin/devft-edge-ctl"
    done = subprocess.run(target.ssh(f"{ctl} rollback"), capture_output=True, text=True)
    if done.returncode == 0:
        result.outcome = "rolled back"
        result.detail = f"no hello within {health.timeout_s:.0f} s; {_tail(done.stdout)}"
    else:
        subprocess.run(target.ssh(f"{ctl} stop"), capture_output=True, text=True)
        result.detail = f"no hello within {health.timeout_s:.0f} s and no previous version; agent stopped"


def plan_text(jobs: Sequence[FlashJob], settings: FlashSettings) -> str:
    """What ``flash`` would do, step by step (``--dry-run``); holds no secret."""
    lines = []
    for job in jobs:
        spec, target = job.spec, job.target
        login = ", ".join(
            name
            for name, value in (
                ("username", spec.username),
                ("password file", spec.password_file),
                ("CA", spec.tls_ca),
                ("client certificate", spec.tls_cert),
            )
            if value
        )
        source = str(settings.bundle) if settings.bundle else f"build for {spec.platform}, CPython {spec.python}"
        lines += [
            f"{spec.device_id} at {target.host}:{target.port}",
            f"  bundle: {source}; backend {spec.backend}; profile {spec.profile}; fleet {spec.fleet}",
            f"  broker: {spec.broker}{f' (login: {login})' if login else ''}",
            f"  copy:   {shlex.join(target.scp(Path('BUNDLE.tar.gz'), '/tmp/devft-flash.XXXXXX/bundle.tar.gz'))}",
            f"  run:    sh install.sh {_install_options(job, settings, dry_run=True)}",
            f"  health: hello from {spec.device_id} on {settings.health.broker} within "
            f"{settings.health.timeout_s:.0f} s; else {settings.prefix}/bin/devft-edge-ctl rollback",
        ]
    return "\n".join(lines)


def render_results(results: Sequence[FlashResult]) -> str:
    """The per-device result table."""
    width = max([len(r.device_id) for r in results] + [6])
    lines = [f"{'device':<{width}}  {'host':<24}  {'result':<11}  {'seconds':>7}  version / detail"]
    for r in results:
        lines.append(
            f"{r.device_id:<{width}}  {r.host:<24}  {r.outcome:<11}  {r.seconds:>7.1f}  {r.version} {r.detail}".rstrip()
        )
    healthy = sum(r.ok for r in results)
    lines.append(f"{healthy} of {len(results)} devices healthy")
    return "\n".join(lines)


def load_hosts(path: Path, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Device entries of a hosts file (YAML list of mappings), each merged over ``defaults``.

    Every entry needs ``host`` and ``device_id``; any bundle/SSH option (``profile``, ``platform``,
    ``port``, ``identity``, ``password_file``, ``tls_cert``, ...) may be set per device.
    """
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--hosts {path}: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--hosts {path}: expected a non-empty YAML list of devices")
    merged = []
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not {"host", "device_id"} <= set(entry):
            raise ConfigError(f"--hosts {path}: entry {index} needs host and device_id")
        unknown = set(entry) - set(defaults) - {"host", "device_id"}
        if unknown:
            raise ConfigError(f"--hosts {path}: entry {index}: unknown keys {', '.join(sorted(unknown))}")
        merged.append({**defaults, **entry})
    ids = [e["device_id"] for e in merged]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--hosts {path}: a device id appears twice")
    return merged


def _install_options(job: FlashJob, settings: FlashSettings, dry_run: bool = False) -> str:
    """``install.sh``'s options: prefix, service, and the pinned fleet key (the SSH session is the
    operator's, so the pin it carries is what the device trusts, also across a key rotation)."""
    from devft_edge.signing import key_sha256, load_public_key

    try:
        pin = key_sha256(load_public_key(job.spec.public_key))
    except ConfigError:
        if not dry_run:
            raise
        pin = f"<sha256 of {job.spec.public_key}>"
    return (
        f"--prefix {shlex.quote(settings.prefix)} --service {shlex.quote(settings.service)} "
        f"--key-sha256 {shlex.quote(pin)}"
    )


def _run(argv: list[str], what: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise DevFTError(f"could not {what}: {_tail(done.stderr or done.stdout)}")
    return done.stdout


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
