"""A small MQTT connection for both services: reconnects by itself, hands messages to one queue.

paho-mqtt 2.x runs the network loop in its own thread and reconnects with exponential backoff;
messages land in a :class:`queue.Queue` that the service's single worker thread drains, so
handlers never run concurrently and need no locks. Every publish is QoS 1; callers chunk large
data (paho does not refuse an oversize publish, the broker disconnects instead).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as paho

from devft_edge.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: ``mqtt://[user[:password]@]host[:port]``."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; ``host:port`` without scheme is accepted too."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme != "mqtt" or not parsed.hostname:
            raise ConfigError(f"broker {url!r}: expected mqtt://host[:port]")
        return cls(parsed.hostname, parsed.port or 1883, parsed.username, parsed.password)

    def __str__(self) -> str:  # never print credentials
        return f"mqtt://{self.host}:{self.port}"


@dataclass(frozen=True)
class Incoming:
    """One received message."""

    topic: str
    payload: bytes


class Connection:
    """A connected, self-reconnecting MQTT client with a message queue."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        subscriptions: list[str],
        will: tuple[str, bytes] | None = None,
        on_connect: object = None,
    ) -> None:
        self.address = address
        self.subscriptions = subscriptions
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.connected = threading.Event()
        self._on_connect_hook = on_connect
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_message = self._message

    def start(self, timeout: float = 30.0) -> None:
        """Connect (retrying in the background) and wait until the first connection is up."""
        self.client.connect_async(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            logger.warning("no connection to %s after %.0f s; still retrying", self.address, timeout)

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """QoS 1 publish; queued by paho while disconnected and sent on reconnect."""
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _connected(self, client: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            logger.warning("broker %s refused the connection: %s", self.address, reason)
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        logger.info("connected to %s", self.address)
        if callable(self._on_connect_hook):
            self._on_connect_hook()

    def _disconnected(
        self, client: paho.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.connected.clear()
        logger.warning("disconnected from %s (%s); reconnecting", self.address, reason)

    def _message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self.inbox.put(Incoming(message.topic, bytes(message.payload)))
