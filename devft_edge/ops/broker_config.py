"""A locked-down mosquitto for one fleet: config, ACL, hashed passwords, certificates, credentials.

``devft-edge broker-config`` calls :func:`write_broker_config`. The broker refuses anonymous
clients; every identity (each device, the aggregator, a read-only monitor for ``devft-edge
status``) gets a random password, and with ``tls`` a client certificate from a CA made here
(:mod:`devft_edge.ops.certificates`).

The ACL confines each device to its own topics with ``pattern`` lines on ``%u``, the
*username*, because the username is what the password authenticates; the client id (``%c``) is
whatever the client sends, so an ACL on ``%c`` alone lets any logged-in client claim another
device's id. Every listener also sets ``use_username_as_clientid``, which makes the broker use
the username as client id: ``%c`` == ``%u`` == device id, the protocol's assumption (client id ==
device id), and no client can take over (disconnect) another's session by reusing its id.

Passwords are stored in mosquitto 2's ``$7$`` format, PBKDF2-HMAC-SHA512 (checked against
``mosquitto_passwd`` 2.0.11 by the tests), computed here so that an operator can build the files
on a machine without mosquitto.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from devft_edge.blobs import DEFAULT_CHUNK_BYTES, WINDOW
from devft_edge.errors import ConfigError, raise_if
from devft_edge.ops.certificates import issue_client, issue_server, new_ca
from devft_edge.protocol import DEVICE_ID, MAX_HEADER_BYTES

PBKDF2_ITERATIONS = 101
"""What ``mosquitto_passwd`` 2.0 writes. Low, but the passwords made here are 256 random bits, so
no iteration count changes how hard they are to guess; the broker pays it on every connect."""
FLEET = re.compile(r"^[A-Za-z0-9_.-]+$")
"""Fleet names, as in the service configs: safe as a topic level."""
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
CA_DAYS = 3650
CERT_DAYS = 825
"""Validity of server and client certificates; renewing them means new files (broker-config
never overwrites), so they outlive a typical deployment without being open-ended."""
MAX_QUEUED_MESSAGES = 10000
"""Default ``max_queued_messages``, as the test broker (``tests/system_harness.py``): mosquitto
silently drops QoS 1 messages queued for a client beyond this (its default is 1000), and messages
pile up for an offline device."""
MIB = 1 << 20
DEFAULT_MAX_PACKET_BYTES = MIB
"""Default ``max_packet_size``: the largest packet of the protocol with default chunks is about
160 KiB (:func:`largest_packet_bytes`), so 1 MiB leaves room and still stops a flood of 256 MiB
packets (the MQTT maximum, mosquitto's default) at the first byte of its length."""
DEFAULT_MAX_QUEUED_BYTES = 256 * MIB
"""Default ``max_queued_bytes`` per client (mosquitto's default: no limit). A device's queue holds
about one download window (:data:`devft_edge.blobs.WINDOW` chunks, ~10 MiB at the default chunk
size: the receiver pulls, so nothing sends more); the aggregator's holds every uploading device's
window while it is slow or reconnecting: 256 MiB is some 25 windows. A flood beyond it is dropped
by the broker instead of growing its memory; a dropped chunk is asked for again after the
receiver's stall timeout."""
MQTT_MAX_PACKET_BYTES = 268_435_455
"""The largest value ``max_packet_size`` takes (MQTT's largest remaining length)."""
PACKET_FRAMING_BYTES = 5 + 2 + 2 + 64
"""Bytes of an MQTT publish besides topic and payload: the fixed header (type, up to 4 length
bytes), the topic's length, the packet id, and room for MQTT 5 properties."""
SEAL_BYTES = 64
"""The ed25519 seal after every payload (:func:`devft_edge.protocol.seal`)."""


def largest_packet_bytes(fleet: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """The largest MQTT packet a fleet's protocol sends legitimately: a publish on the longest topic
    (a device's presence topic, with a 64-character device id) whose payload is the 4-byte header
    length, a header of ``protocol.MAX_HEADER_BYTES``, a body of one chunk and the seal. About
    160 KiB with the default 96 KiB chunks."""
    topic = len(f"devft/{fleet}/dev/{'x' * 64}/presence".encode())
    return PACKET_FRAMING_BYTES + topic + 4 + MAX_HEADER_BYTES + chunk_bytes + SEAL_BYTES


def aggregator_username(fleet: str) -> str:
    """The aggregator's username: its MQTT client id, which a password file logs in as by default."""
    return f"aggregator-{fleet}"


def monitor_username(fleet: str) -> str:
    """The read-only user for ``devft-edge status``."""
    return f"monitor-{fleet}"


@dataclass(frozen=True)
class BrokerSpec:
    """What to generate; checked on construction, every problem reported at once."""

    fleet: str
    devices: tuple[str, ...]
    tls: bool = False
    port: int | None = None
    """Main listener; default 8883 with TLS, else 1883."""
    hosts: tuple[str, ...] = ("127.0.0.1",)
    """Names clients use for the broker: the server certificate's subject alternative names
    (IP addresses or DNS names); the first goes into the generated client configs."""
    bind: str | None = None
    """Address the main listener binds to; None: every interface."""
    plain_port: int | None = None
    """With TLS: also a plain listener on this port, bound to 127.0.0.1 only (local tools)."""
    client_certs: bool = True
    """With TLS: issue client certificates and make the broker require one."""
    persistence_dir: Path | None = None
    """Keep sessions and queued messages across broker restarts here; None: in memory only."""
    run_as: str | None = None
    """mosquitto's ``user``: the account a broker started as root switches to (it must be able to
    read the password, ACL and key files); None: mosquitto's default (``mosquitto``)."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """The aggregator's ``chunk_bytes``: the limits below must let a chunk of this size through
    (checked here), and ``max_packet_bytes`` grows with it by default."""
    max_packet_bytes: int | None = None
    """mosquitto's ``max_packet_size``: a client that sends a bigger packet is disconnected, for
    MQTT 3.1.1 clients as well (they are not told the limit beforehand). None: 1 MiB, or the
    largest packet of ``chunk_bytes`` rounded up to whole MiB if that is more. (Preferred over
    ``message_size_limit``, which drops the message but acknowledges it: the sender would never
    learn.)"""
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    """mosquitto's ``max_queued_bytes``: QoS 1 bytes queued per client beyond those in flight; more
    are dropped. At least one download window of the largest packets."""
    max_queued_messages: int = MAX_QUEUED_MESSAGES
    """mosquitto's ``max_queued_messages``: the same as a count (whichever limit comes first)."""
    max_inflight_messages: int = WINDOW
    """mosquitto's ``max_inflight_messages``: unacknowledged QoS 1 messages per client in flight
    at once; the download window, so the broker never holds back part of a window a receiver asked
    for (mosquitto's default is 20; ``benchmarks/transport.py`` measures with the window)."""
    max_connections: int | None = None
    """mosquitto's ``max_connections`` on every listener; None: no limit (the system's file
    limits apply). A limit near the fleet's size lets anyone who can open TCP connections, even
    without a password, lock the devices out, so it is off unless asked for; if given, it must
    leave room for every device, the aggregator and the monitor."""

    def __post_init__(self) -> None:
        problems = []
        if not FLEET.fullmatch(self.fleet):
            problems.append(f"fleet {self.fleet!r} must match {FLEET.pattern}")
        if not self.devices:
            problems.append("no devices given")
        services = {aggregator_username(self.fleet), monitor_username(self.fleet)}
        seen: set[str] = set()
        for device in self.devices:
            if not DEVICE_ID.fullmatch(device):
                problems.append(f"device id {device!r} must match {DEVICE_ID.pattern}")
            elif device in services:
                problems.append(f"device id {device!r} is the name of a service user")
            elif device in seen:
                problems.append(f"device id {device!r} given twice")
            seen.add(device)
        for name, port in (("port", self.port), ("plain port", self.plain_port)):
            if port is not None and not 1 <= port <= 65535:
                problems.append(f"{name} {port} outside 1..65535")
        if self.plain_port is not None and not self.tls:
            problems.append("a plain port only makes sense next to a TLS listener (--tls)")
        if self.plain_port is not None and self.plain_port == self.listen_port:
            problems.append(f"plain port {self.plain_port} is the main port too")
        if not self.hosts:
            problems.append("no host name given")
        problems += [f"host {h!r} is neither an IP address nor a DNS name" for h in self.hosts if not _host_ok(h)]
        if self.bind is not None and not _host_ok(self.bind):
            problems.append(f"bind address {self.bind!r} is neither an IP address nor a DNS name")
        if self.run_as is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.run_as):
            problems.append(f"run-as user {self.run_as!r} is not a user name")
        problems += self._limit_problems()
        raise_if(problems)

    def _limit_problems(self) -> list[str]:
        if self.chunk_bytes < 1:
            return [f"chunk bytes {self.chunk_bytes} must be >= 1"]
        problems = []
        largest = largest_packet_bytes(self.fleet, self.chunk_bytes)
        if not largest <= self.packet_limit <= MQTT_MAX_PACKET_BYTES:
            problems.append(
                f"max packet bytes {self.packet_limit} outside {largest}..{MQTT_MAX_PACKET_BYTES} (the lower bound "
                f"is the largest legitimate packet: a {self.chunk_bytes}-byte chunk with a full header)"
            )
        if self.max_queued_bytes < WINDOW * largest:
            problems.append(
                f"max queued bytes {self.max_queued_bytes} below one download window ({WINDOW} packets of "
                f"{largest} bytes = {WINDOW * largest}): every transfer would stall"
            )
        if self.max_queued_messages < WINDOW:
            problems.append(f"max queued messages {self.max_queued_messages} below one download window ({WINDOW})")
        if self.max_inflight_messages < 1:
            problems.append(f"max inflight messages {self.max_inflight_messages} must be >= 1 (0: no limit)")
        users = len(self.devices) + 2
        if self.max_connections is not None and self.max_connections < users:
            problems.append(
                f"max connections {self.max_connections} below the {users} users (devices, aggregator, monitor)"
            )
        return problems

    @property
    def packet_limit(self) -> int:
        """``max_packet_size``: ``max_packet_bytes``, or its default for ``chunk_bytes``."""
        if self.max_packet_bytes is not None:
            return self.max_packet_bytes
        return max(DEFAULT_MAX_PACKET_BYTES, -(-largest_packet_bytes(self.fleet, self.chunk_bytes) // MIB) * MIB)

    @property
    def listen_port(self) -> int:
        """The main listener's port."""
        return self.port or (8883 if self.tls else 1883)

    @property
    def url(self) -> str:
        """What clients put in ``broker:``."""
        host = self.hosts[0]
        host = f"[{host}]" if ":" in host else host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.listen_port}"


@dataclass(frozen=True)
class Identity:
    """One user's credential files, in a directory of its own (copy it to the machine that uses it)."""

    username: str
    directory: Path
    role: Literal["aggregator", "monitor", "device"]

    @property
    def password_file(self) -> Path:
        """The password in plain text (mode 0600)."""
        return self.directory / "password"


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`write_broker_config` wrote."""

    spec: BrokerSpec
    conf: Path
    acl: Path
    passwd: Path
    identities: tuple[Identity, ...]


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto ``password_file`` hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``.

    The salt is 12 random bytes and the derived key 64 bytes, as ``mosquitto_passwd`` 2.0 writes.
    """
    salt = secrets.token_bytes(12) if salt is None else salt
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(derived).decode()}"


def acl_text(fleet: str) -> str:
    """The ACL: the aggregator reads and writes the fleet, the monitor reads its status and the
    devices' presence (``flash`` health checks), each
    device writes its own ``up``/``presence`` and reads its own ``down`` and the status."""
    prefix = f"devft/{fleet}"
    return (
        f"# devft-edge ACL of fleet {fleet!r}, written by devft-edge broker-config.\n"
        "# %u is the authenticated username; every listener sets use_username_as_clientid, so the\n"
        "# client id (%c) is the same string. Anything not granted here is denied.\n\n"
        f"user {aggregator_username(fleet)}\n"
        f"topic readwrite {prefix}/#\n\n"
        "# devft-edge status and flash: the retained status and every device's presence, read only\n"
        "# (the deny keeps the device patterns below off the monitor's own name)\n"
        f"user {monitor_username(fleet)}\n"
        f"topic deny {prefix}/dev/{monitor_username(fleet)}/#\n"
        f"topic read {prefix}/agg/status\n"
        f"topic read {prefix}/dev/+/presence\n\n"
        "# every other user is a device whose username is its device id (mosquitto warns that the\n"
        "# last pattern has no %u or %c: it is meant for every user)\n"
        f"pattern write {prefix}/dev/%u/up\n"
        f"pattern write {prefix}/dev/%u/presence\n"
        f"pattern read {prefix}/dev/%u/down\n"
        f"pattern read {prefix}/agg/status\n"
    )


def mosquitto_conf(spec: BrokerSpec, out: Path) -> str:
    """``mosquitto.conf`` for files under ``out`` (absolute paths: mosquitto resolves relative ones
    against its working directory, not the config's)."""
    out = out.resolve()
    lines = [
        f"# mosquitto 2.x config of devft-edge fleet {spec.fleet!r}, written by devft-edge broker-config.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "# flood limits: a client that sends a bigger packet is disconnected; QoS 1 messages beyond",
        "# a client's queue limits (besides those in flight) are dropped",
        f"max_packet_size {spec.packet_limit}",
        f"max_queued_messages {spec.max_queued_messages}",
        f"max_queued_bytes {spec.max_queued_bytes}",
        f"max_inflight_messages {spec.max_inflight_messages}",
        "# chunk requests and chunks are small back-and-forth messages: no Nagle delay",
        "set_tcp_nodelay true",
    ]
    if spec.persistence_dir is None:
        lines.append("persistence false")
    else:
        lines += ["persistence true", f"persistence_location {spec.persistence_dir.resolve()}/"]
    if spec.run_as is not None:
        lines.append(f"user {spec.run_as}")
    per_listener = ["use_username_as_clientid true"]
    if spec.max_connections is not None:
        per_listener.append(f"max_connections {spec.max_connections}")
    lines += ["", f"listener {spec.listen_port}{f' {spec.bind}' if spec.bind else ''}", *per_listener]
    if spec.tls:
        lines += [f"cafile {out / 'ca.pem'}", f"certfile {out / 'server.pem'}", f"keyfile {out / 'server.key'}"]
        lines.append(f"require_certificate {'true' if spec.client_certs else 'false'}")
    if spec.plain_port is not None:
        lines += ["", "# plain MQTT for tools on this machine only", f"listener {spec.plain_port} 127.0.0.1"]
        lines += per_listener
    return "\n".join(lines) + "\n"


def read_device_ids(path: Path) -> list[str]:
    """Device ids from a file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"devices file {path}: {error}") from None
    ids = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [device for device in ids if device]


def write_broker_config(spec: BrokerSpec, out: Path) -> BrokerFiles:
    """Write every file into ``out`` (which must be empty or absent); secrets get mode 0600."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; refusing to overwrite credentials")
    out.mkdir(parents=True, exist_ok=True)
    identities = [
        Identity(aggregator_username(spec.fleet), out / "aggregator", "aggregator"),
        Identity(monitor_username(spec.fleet), out / "monitor", "monitor"),
        *(Identity(device, out / "devices" / device, "device") for device in spec.devices),
    ]
    entries = []
    for identity in identities:
        identity.directory.mkdir(parents=True)
        password = secrets.token_urlsafe(32)
        _write(identity.password_file, password + "\n", 0o600)
        entries.append(f"{identity.username}:{hash_password(password)}\n")
    _write(out / "passwd", "".join(entries), 0o600)
    _write(out / "acl", acl_text(spec.fleet), 0o644)
    if spec.tls:
        _write_certificates(spec, out, identities)
    for identity in identities:
        if identity.role != "monitor":  # status takes flags, not a config file
            _write(identity.directory / "broker.yaml", _login_yaml(spec, identity), 0o644)
    conf = out / "mosquitto.conf"
    _write(conf, mosquitto_conf(spec, out), 0o644)
    return BrokerFiles(spec, conf, out / "acl", out / "passwd", tuple(identities))


def _login_yaml(spec: BrokerSpec, identity: Identity) -> str:
    """The :class:`~devft_edge.mqtt.BrokerLogin` fields (plus ``broker``) to paste into a service config."""
    fields: dict[str, str] = {
        "broker": spec.url,
        "username": identity.username,
        "password_file": str(identity.password_file.resolve()),
    }
    if spec.tls:
        fields["tls_ca"] = str((identity.directory / "ca.pem").resolve())
        if spec.client_certs:
            fields["tls_cert"] = str((identity.directory / "client.pem").resolve())
            fields["tls_key"] = str((identity.directory / "client.key").resolve())
    header = f"# broker login of {identity.username}; paths are where broker-config wrote the files\n"
    return header + yaml.safe_dump(fields, sort_keys=False)


def _write(path: Path, data: str | bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start, so a secret is never readable by others."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(raw)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(HOSTNAME.fullmatch(host))


def _write_certificates(spec: BrokerSpec, out: Path, identities: Iterable[Identity]) -> None:
    """The fleet's CA, the broker's certificate for ``spec.hosts`` and (``client_certs``) one per user."""
    ca = new_ca(f"devft-edge {spec.fleet} CA", CA_DAYS)
    _write(out / "ca.pem", ca.certificate_pem, 0o644)
    _write(out / "ca.key", ca.key_pem, 0o600)
    server = issue_server(ca, spec.hosts, CERT_DAYS)
    _write(out / "server.pem", server.certificate_pem, 0o644)
    _write(out / "server.key", server.key_pem, 0o600)
    for identity in identities:
        _write(identity.directory / "ca.pem", ca.certificate_pem, 0o644)
        if spec.client_certs:
            client = issue_client(ca, identity.username, CERT_DAYS)
            _write(identity.directory / "client.pem", client.certificate_pem, 0o644)
            _write(identity.directory / "client.key", client.key_pem, 0o600)
