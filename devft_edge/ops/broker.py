"""The embedded MQTT broker: amqtt (pure Python, MQTT 3.1.1) in its own process.

When ``serve`` is given no broker, it starts this one so that nothing else needs installing; any
MQTT 3.1.1 broker (mosquitto, EMQX, HiveMQ, managed IoT brokers) serves the same protocol. The
broker runs in a child process so its asyncio loop never competes with the aggregator's worker
thread, and it is stopped by pid when the aggregator exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import subprocess
import sys
import time
import warnings

from devft_edge.errors import DevFTError

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise DevFTError(f"no broker listening on {host}:{port} after {timeout:.0f} s")


class EmbeddedBroker:
    """``with EmbeddedBroker() as url:`` runs an amqtt broker on a free loopback port."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the broker."""
        return f"mqtt://{self.host}:{self.port}"

    def __enter__(self) -> str:
        command = [sys.executable, "-m", "devft_edge.ops.broker", "--host", self.host, "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.host, self.port)
        except DevFTError:
            self.__exit__()
            raise
        logger.info("embedded broker (amqtt) on %s, pid %d", self.url, self.process.pid)
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "auth": {"allow-anonymous": True},
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devft_edge.ops.broker", description="embedded MQTT 3.1.1 broker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # amqtt's plugin-loading notice
    try:
        import amqtt  # noqa: F401
    except ImportError:
        print("the embedded broker needs amqtt (pip install amqtt); or pass --broker mqtt://...", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
