"""A small MQTT connection for both services: reconnects by itself, hands messages to one queue.

paho-mqtt 2.x runs the network loop in its own thread and reconnects with exponential backoff;
messages land in a :class:`queue.Queue` that the service's single worker thread drains, so
handlers never run concurrently and need no locks. Every publish is QoS 1; callers chunk large
data (paho does not refuse an oversize publish, the broker disconnects instead).

Security is the broker's job (``docs/protocol.md``, "Security"): ``mqtts://`` turns on TLS, and
:class:`BrokerLogin` is the block of config fields both services share to log in (username,
a password *file*, CA and client certificate). Credentials never appear in ``str()``/``repr()``
of an address, so nothing here can log them.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import paho.mqtt.client as paho
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from devft_edge.errors import ConfigError, raise_if

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
"""IANA ports of MQTT over TCP and over TLS."""


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS connection trusts and presents; all PEM files."""

    ca: Path | None = None
    """CA certificate(s) the broker's certificate must chain to; None: the system's trust store."""
    cert: Path | None = None
    """Client certificate, for brokers that require one (mosquitto ``require_certificate``)."""
    key: Path | None = None
    """Private key of ``cert`` (unencrypted)."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in: ``mqtt[s]://[user[:password]@]host[:port]``.

    A password in the URL is accepted (handy for a one-off ``devft-edge status``) but shows up in
    ``ps`` and shell history; services take it from :attr:`BrokerLogin.password_file` instead.
    """

    host: str
    port: int = DEFAULT_PORTS["mqtt"]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsFiles | None = None
    """None: plain TCP; else TLS with these files (``mqtts://``)."""

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; ``host:port`` without scheme is plain ``mqtt://``."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname:
            raise ConfigError(f"broker {_redacted(url)!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        try:
            port = parsed.port or DEFAULT_PORTS[parsed.scheme]
        except ValueError:
            raise ConfigError(f"broker {_redacted(url)!r}: bad port") from None
        tls = TlsFiles() if parsed.scheme == "mqtts" else None
        return cls(parsed.hostname, port, parsed.username, parsed.password, tls)

    def with_login(self, login: BrokerLogin | None, client_id: str) -> BrokerAddress:
        """This address with ``login``'s username, password (read from its file) and TLS files.

        Without an explicit username, a password file logs in as ``client_id``: the device id for
        an agent, ``aggregator-<fleet>`` for the aggregator, which is what ``devft-edge
        broker-config`` creates users for. A value given twice (URL and config) must agree.
        """
        if login is None:
            return self
        problems = []
        username = login.username or self.username or (client_id if login.password_file else None)
        if login.username and self.username and login.username != self.username:
            problems.append(f"username {login.username!r} in the config but {self.username!r} in the broker URL")
        password = self.password
        if login.password_file is not None:
            if self.password is not None:
                problems.append("a password both in the broker URL and in password_file")
            password = read_password(login.password_file)
        files = TlsFiles(login.tls_ca, login.tls_cert, login.tls_key)
        if self.tls is None and files != TlsFiles():
            problems.append(f"tls_ca/tls_cert/tls_key given but the broker {self} is not mqtts://")
        raise_if(problems)
        return replace(self, username=username, password=password, tls=files if self.tls is not None else None)

    def __str__(self) -> str:  # never print credentials
        return f"{'mqtt' if self.tls is None else 'mqtts'}://{self.host}:{self.port}"


def _redacted(url: str) -> str:
    """``url`` fit for an error message: the userinfo part dropped."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def read_password(path: Path) -> str:
    """The password in ``path``: its first line (a trailing newline from ``echo`` is no part of it)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"password file {path}: {error}") from None
    if not lines or not lines[0]:
        raise ConfigError(f"password file {path} is empty")
    return lines[0]


def _existing_file(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


class BrokerLogin(BaseModel):
    """Config fields to log in to a secured broker; the agent's and aggregator's configs include them.

    Secrets stay out of the YAML (which gets printed, copied and committed): the password lives
    in its own file (mode 0600), as do private keys. ``devft-edge broker-config`` writes all of
    these files for a mosquitto broker.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str | None = Field(
        None, min_length=1, description="MQTT username (default with password_file: the MQTT client id)"
    )
    password_file: ExistingFile | None = Field(None, description="file whose first line is the MQTT password")
    tls_ca: ExistingFile | None = Field(
        None, description="CA certificate (PEM) of an mqtts:// broker (default: the system's trust store)"
    )
    tls_cert: ExistingFile | None = Field(None, description="client certificate (PEM), if the broker requires one")
    tls_key: ExistingFile | None = Field(None, description="private key (PEM) of tls_cert")

    @model_validator(mode="after")
    def _cert_with_key(self) -> BrokerLogin:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


@dataclass(frozen=True)
class Incoming:
    """One received message."""

    topic: str
    payload: bytes
    retained: bool = False
    """Delivered from the broker's retained store (an old state), not published just now."""


MAX_INBOX = 10_000
"""Received messages waiting for the worker; beyond it new ones are dropped (counted in
``Connection.dropped``): a flood costs at most this many payloads of memory, and what an honest
peer loses this way it sends again (chunk requests and offers repeat after a stall)."""
MAX_OUTGOING = 4_096
"""Messages paho may hold unsent; beyond it :meth:`Connection.publish` refuses (returns False)
rather than let a slow or absent broker grow the send queue without bound."""


class Connection:
    """A connected, self-reconnecting MQTT client with a message queue.

    ``login`` (a service config) adds its username, password file and TLS files to ``address``;
    see :meth:`BrokerAddress.with_login`.
    """

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        subscriptions: list[str],
        will: tuple[str, bytes] | None = None,
        on_connect: object = None,
        login: BrokerLogin | None = None,
        persistent: bool = True,
    ) -> None:
        """``persistent``: keep a broker session (subscriptions and queued QoS 1 messages) across
        disconnects, as the services need; short-lived clients (``status``, a health check) pass
        False so they leave nothing behind on the broker."""
        self.address = address.with_login(login, client_id)
        self.subscriptions = subscriptions
        self.inbox: queue.Queue[Incoming] = queue.Queue(maxsize=MAX_INBOX)
        self.dropped = 0
        """Messages dropped because the inbox was full."""
        self.connected = threading.Event()
        self.connects = 0
        """Connections made so far, subscriptions included: more than one means the broker was lost
        in between, and with it (without broker persistence) messages and retained topics."""
        self.stopping = False
        self._on_connect_hook = on_connect
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        if self.address.username:
            self.client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls is not None:
            self._set_tls(self.address.tls)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(MAX_OUTGOING)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_message = self._message

    def _set_tls(self, files: TlsFiles) -> None:
        """TLS with the broker's certificate and host name checked (paho's secure defaults, explicit)."""
        try:
            self.client.tls_set(
                ca_certs=str(files.ca) if files.ca else None,
                certfile=str(files.cert) if files.cert else None,
                keyfile=str(files.key) if files.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (OSError, ssl.SSLError, ValueError) as error:
            raise ConfigError(f"TLS files for {self.address}: {error}") from None

    def start(self, timeout: float = 30.0) -> None:
        """Connect (retrying in the background) and wait until the first connection is up."""
        self.client.connect_async(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            logger.warning("no connection to %s after %.0f s; still retrying", self.address, timeout)

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self.stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """QoS 1 publish, queued by paho while disconnected and sent on reconnect; False when the
        send queue is full (:data:`MAX_OUTGOING`) and the message was dropped."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            logger.warning("send queue full (%d messages): a message to %s dropped", MAX_OUTGOING, topic)
            return False
        return True

    def _connected(self, client: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            logger.warning("broker %s refused the connection: %s", self.address, reason)
            return
        sock = client.socket()
        if sock is not None:  # Nagle + delayed ACK stalled every chunk window by ~40 ms
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connects += 1
        self.connected.set()
        logger.info("connected to %s", self.address)
        if callable(self._on_connect_hook):
            self._on_connect_hook()

    def _disconnected(
        self, client: paho.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.connected.clear()
        if not self.stopping:
            logger.warning("disconnected from %s (%s); reconnecting", self.address, reason)

    def _message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        try:
            self.inbox.put_nowait(Incoming(message.topic, bytes(message.payload), bool(message.retain)))
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                logger.warning("inbox full (%d messages): %d received messages dropped so far", MAX_INBOX, self.dropped)
