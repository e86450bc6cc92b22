"""The system behind a locked-down mosquitto made by ``devft-edge broker-config --tls``.

A real mosquitto runs the generated config (TLS with client certificates, a password per user,
the generated ACL). A tiny run finishes over it, and the broker, not our code, stops what the
ACL forbids: a device writing another device's topics or reading its downlink, a wrong
password, a client without certificate, an anonymous client.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import ssl
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from system_harness import free_port, mosquitto, needs_mosquitto, read_state, start, stop, write_configs

from devft_edge.mqtt import BrokerAddress, BrokerLogin, Connection
from devft_edge.ops.broker_config import BrokerFiles, BrokerSpec, write_broker_config
from devft_edge.ops.certificates import new_ca

pytestmark = needs_mosquitto


def _secure_broker(directory: Path) -> tuple[BrokerFiles, str, Path]:
    """Generated files under ``directory/conf``, the config text to run, and its log file (which
    mosquitto flushes line by line, unlike its stdout)."""
    spec = BrokerSpec(
        fleet="t",
        devices=("dev-0", "dev-1"),
        tls=True,
        port=free_port(),
        bind="127.0.0.1",
        run_as=pwd.getpwuid(os.geteuid()).pw_name,  # as root, mosquitto would switch to a user that can't read 0600
    )
    files = write_broker_config(spec, directory / "conf")
    log = directory / "broker.log"
    return files, files.conf.read_text() + f"log_dest file {log}\nconnection_messages true\n", log


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """One generated TLS broker shared by the quick ACL and login tests; yields its files and log."""
    directory = tmp_path_factory.mktemp("secure")
    files, conf, log = _secure_broker(directory)
    with mosquitto(directory / "broker", files.spec.listen_port, conf):
        yield files, log


class Client:
    """A paho client logged in as one generated user, recording what it receives."""

    def __init__(
        self,
        files: BrokerFiles,
        user: str,
        password: str | None = None,
        cert: bool = True,
        anonymous: bool = False,
        client_id: str | None = None,
    ) -> None:
        identity = next(i for i in files.identities if i.username == user)
        self.connack: queue.Queue[str] = queue.Queue()
        """CONNACK reasons and disconnects, in order."""
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnects = 0
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or user)
        certificate = (str(identity.directory / "client.pem"), str(identity.directory / "client.key"))
        self.client.tls_set(str(identity.directory / "ca.pem"), *(certificate if cert else (None, None)))
        if not anonymous:
            self.client.username_pw_set(user, password or identity.password_file.read_text().strip())
        self.client.on_connect = lambda c, u, f, reason, p: self.connack.put(str(reason))
        self.client.on_message = lambda c, u, m: self.received.put((m.topic, bytes(m.payload)))
        self.client.on_disconnect = self._disconnected
        self.port = files.spec.listen_port

    def _disconnected(
        self, client: paho.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.disconnects += 1
        self.connack.put(f"disconnected ({reason})")

    def login(self, timeout: float = 5.0) -> str:
        """The CONNACK's reason, or what came instead: a refused TLS handshake, a disconnect."""
        try:
            self.client.connect("127.0.0.1", self.port)
        except OSError as error:  # a TLS handshake the broker refused
            return f"error: {error}"
        self.client.loop_start()
        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            return "no connack"

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes) -> bool:
        """Whether the broker acknowledged the QoS 1 publish (PUBACK) within 5 s."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        return info.is_published()

    def drain(self, seconds: float = 1.0) -> list[tuple[str, bytes]]:
        """Everything received within ``seconds``."""
        time.sleep(seconds)
        items = []
        while not self.received.empty():
            items.append(self.received.get())
        return items

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_acl_keeps_each_device_on_its_own_topics(secure_broker):
    files, _ = secure_broker
    aggregator, dev0, monitor = (Client(files, u) for u in ("aggregator-t", "dev-0", "monitor-t"))
    dev1 = Client(files, "dev-1", client_id="dev-0")  # claims dev-0's client id: the broker uses its username
    try:
        assert [c.login() for c in (aggregator, dev0, dev1, monitor)] == ["Success"] * 4
        aggregator.subscribe("devft/t/dev/+/up")
        monitor.subscribe("devft/t/dev/+/presence")  # what flash health checks watch
        monitor.subscribe("devft/t/dev/+/up")  # not granted: delivers nothing
        dev1.subscribe("devft/t/dev/dev-0/down")  # mosquitto grants the subscription but delivers nothing
        dev1.subscribe("devft/t/dev/dev-1/down")
        dev1.subscribe("devft/t/#")
        time.sleep(0.3)
        assert dev1.publish("devft/t/dev/dev-0/up", b"forged by dev-1")  # acknowledged, then dropped
        assert dev1.publish("devft/t/dev/dev-1/up", b"dev-1's own")
        assert monitor.publish("devft/t/dev/monitor-t/up", b"monitor posing as a device")
        assert monitor.publish("devft/t/dev/dev-0/presence", b"monitor posing as dev-0")
        assert dev0.publish("devft/t/dev/dev-0/presence", b"dev-0 online")
        aggregator.publish("devft/t/dev/dev-0/down", b"for dev-0")
        aggregator.publish("devft/t/dev/dev-1/down", b"for dev-1")
        assert aggregator.drain() == [("devft/t/dev/dev-1/up", b"dev-1's own")]
        assert set(dev1.drain(0.2)) == {("devft/t/dev/dev-1/down", b"for dev-1")}
        assert monitor.drain(0.2) == [("devft/t/dev/dev-0/presence", b"dev-0 online")]
        assert dev0.disconnects == 0  # dev-1's claim on the client id "dev-0" did not kick dev-0 off
    finally:
        for client in (aggregator, dev0, dev1, monitor):
            client.close()


def test_broker_refuses_wrong_password_missing_certificate_and_anonymous(secure_broker):
    files, log = secure_broker
    attempts = {
        "wrong password": Client(files, "dev-0", password="not-the-password"),
        "no client certificate": Client(files, "dev-0", cert=False),
        "anonymous": Client(files, "dev-0", anonymous=True),
    }
    try:
        outcomes = {name: client.login() for name, client in attempts.items()}
    finally:
        for client in attempts.values():
            client.close()
    assert outcomes["wrong password"] == "Not authorized"
    assert outcomes["anonymous"] == "Not authorized"
    # with TLS 1.3 the client's side of the handshake is done before the broker asks for its
    # certificate, so the refusal arrives as a disconnect; the broker's log says why
    assert outcomes["no client certificate"].startswith(("disconnected", "error")), outcomes
    assert "peer did not return a certificate" in log.read_text()


def test_connection_checks_the_brokers_certificate_and_name(secure_broker, tmp_path):
    """Our :class:`Connection` refuses a broker whose certificate does not chain to ``tls_ca`` or
    does not name the host it dialled (the certificate names 127.0.0.1, not localhost)."""
    files, _ = secure_broker
    port = files.spec.listen_port
    device = files.conf.parent / "devices" / "dev-0"
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(new_ca("someone else's CA", 1).certificate_pem)
    outcomes = {}
    for case, host, ca in [
        ("right", "127.0.0.1", device / "ca.pem"),
        ("other CA", "127.0.0.1", other_ca),
        ("other name", "localhost", device / "ca.pem"),
    ]:
        login = BrokerLogin(
            password_file=device / "password", tls_ca=ca, tls_cert=device / "client.pem", tls_key=device / "client.key"
        )
        connection = Connection(BrokerAddress.parse(f"mqtts://{host}:{port}"), "dev-0", [], login=login)
        try:
            connection.client.connect(host, port)
            outcomes[case] = "connected"
        except ssl.SSLCertVerificationError as error:
            outcomes[case] = f"refused: {error.verify_message}"
        finally:
            connection.client.disconnect()
    assert outcomes["right"] == "connected"
    assert outcomes["other CA"].startswith("refused") and "Hostname" not in outcomes["other CA"], outcomes
    assert outcomes["other name"].startswith("refused: Hostname mismatch"), outcomes


def test_run_finishes_over_tls_with_passwords_and_acl(tmp_path):
    """The tiny 2-stage run with each service logged in by the generated broker.yaml; then
    ``devft-edge status`` reads the retained status as the read-only monitor user."""
    files, conf, broker_log = _secure_broker(tmp_path)
    out = files.conf.parent
    agg_config, agent_configs = write_configs(tmp_path, files.spec.url, devices=2, rounds=2)
    for path, login in [
        (agg_config, out / "aggregator"),
        *((p, out / "devices" / f"dev-{i}") for i, p in enumerate(agent_configs)),
    ]:
        data = yaml.safe_load(path.read_text())
        data.update(yaml.safe_load((login / "broker.yaml").read_text()))
        path.write_text(yaml.safe_dump(data))
    with mosquitto(tmp_path / "broker", files.spec.listen_port, conf):
        agents = [start("agent", "--config", str(c), log=tmp_path / f"{c.stem}.log") for c in agent_configs]
        server = start("serve", "--config", str(agg_config), log=tmp_path / "serve.log")
        try:
            assert server.wait(timeout=300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
            monitor = out / "monitor"
            login = ["--password-file", "password", "--ca", "ca.pem", "--cert", "client.pem", "--key", "client.key"]
            login[1::2] = [str(monitor / name) for name in login[1::2]]
            status = subprocess.run(
                [sys.executable, "-m", "devft_edge", "status", "--broker", files.spec.url, "--fleet", "t", "--json"]
                + login,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            stop(server, *agents)
    final = read_state(tmp_path)
    assert final["finished"] and final["rounds_done"] == 2 and final["stage"] == 2
    assert all(h["devices"] == ["dev-0", "dev-1"] for h in final["history"])
    assert (tmp_path / "agg" / "out" / "adapter" / "adapter_config.json").exists()
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["finished"]
    log = broker_log.read_text()
    for user in ("aggregator-t", "dev-0", "dev-1", "monitor-t"):
        assert f"u'{user}'" in log, user  # "New client connected from ... as <id> (..., u'<user>')"
    passwords = [p.read_text().strip() for p in out.rglob("password")]
    logs = [p.read_text() for p in tmp_path.glob("*.log")] + [log]
    assert not any(pw in text for pw in passwords for text in logs)
