"""``devft-edge broker-config``: the files it writes, their modes, the ACL, certificates and password hashes."""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import queue
import shutil
import stat
import subprocess
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from system_harness import free_port, mosquitto, needs_mosquitto

from devft_edge.blobs import DEFAULT_CHUNK_BYTES, WINDOW
from devft_edge.cli import main
from devft_edge.errors import ConfigError
from devft_edge.ops.broker_config import (
    BrokerFiles,
    BrokerSpec,
    acl_text,
    hash_password,
    largest_packet_bytes,
    mosquitto_conf,
    read_device_ids,
    write_broker_config,
)
from device_agent.config import AgentConfig


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One TLS config for fleet t with two devices."""
    out = tmp_path_factory.mktemp("broker") / "conf"
    spec = BrokerSpec(fleet="t", devices=("dev-0", "dev-1"), tls=True, hosts=("127.0.0.1", "broker.example"))
    return write_broker_config(spec, out)


def test_every_file_is_written_and_secrets_are_owner_only(written):
    out = written.conf.parent
    files = {str(p.relative_to(out)): _mode(p) for p in out.rglob("*") if p.is_file()}
    per_user = ("password", "broker.yaml", "ca.pem", "client.pem", "client.key")
    expected = {"mosquitto.conf", "acl", "passwd", "ca.pem", "ca.key", "server.pem", "server.key"}
    expected |= {f"{d}/{f}" for d in ("aggregator", "devices/dev-0", "devices/dev-1") for f in per_user}
    expected |= {f"monitor/{f}" for f in per_user if f != "broker.yaml"}
    assert set(files) == expected
    secret = {name for name in files if name.endswith(("password", ".key")) or name == "passwd"}
    assert secret and all(files[name] == 0o600 for name in secret)
    assert all(files[name] == 0o644 for name in set(files) - secret)
    assert [i.username for i in written.identities] == ["aggregator-t", "monitor-t", "dev-0", "dev-1"]


def test_acl_confines_each_device_to_its_own_username():
    lines = [line for line in acl_text("t").splitlines() if line and not line.startswith("#")]
    assert lines == [
        "user aggregator-t",
        "topic readwrite devft/t/#",
        "user monitor-t",
        "topic deny devft/t/dev/monitor-t/#",
        "topic read devft/t/agg/status",
        "topic read devft/t/dev/+/presence",
        "pattern write devft/t/dev/%u/up",
        "pattern write devft/t/dev/%u/presence",
        "pattern read devft/t/dev/%u/down",
        "pattern read devft/t/agg/status",
    ]


def test_mosquitto_conf_refuses_anonymous_and_ties_client_id_to_username(tmp_path):
    spec = BrokerSpec(
        fleet="t", devices=("d",), tls=True, bind="10.0.0.1", plain_port=1883, persistence_dir=tmp_path / "db"
    )
    lines = mosquitto_conf(spec, tmp_path).splitlines()
    out = tmp_path.resolve()
    for line in (
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "persistence true",
        f"persistence_location {(tmp_path / 'db').resolve()}/",
        "listener 8883 10.0.0.1",
        f"cafile {out / 'ca.pem'}",
        f"certfile {out / 'server.pem'}",
        f"keyfile {out / 'server.key'}",
        "require_certificate true",
        "listener 1883 127.0.0.1",
    ):
        assert line in lines, line
    assert lines.count("use_username_as_clientid true") == 2  # a listener option: every listener sets it
    plain = mosquitto_conf(BrokerSpec(fleet="t", devices=("d",), run_as="mqtt"), tmp_path).splitlines()
    assert "listener 1883" in plain and "persistence false" in plain and "user mqtt" in plain
    assert not any(line.startswith(("cafile", "certfile", "require_certificate")) for line in plain)


def test_certificates_chain_to_the_ca_with_the_right_names_and_purposes(written):
    out = written.conf.parent
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for identity in written.identities:
        client = x509.load_pem_x509_certificate((identity.directory / "client.pem").read_bytes())
        client.verify_directly_issued_by(ca)
        assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.username
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (identity.directory / "ca.pem").read_bytes() == (out / "ca.pem").read_bytes()


def test_client_keys_match_their_certificates(written):
    import ssl

    for identity in written.identities:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_cert_chain(identity.directory / "client.pem", identity.directory / "client.key")  # raises if not


def test_passwd_holds_a_pbkdf2_hash_of_each_users_password(written):
    entries = dict(line.split(":", 1) for line in written.passwd.read_text().splitlines())
    assert list(entries) == [i.username for i in written.identities]
    passwords = set()
    for identity in written.identities:
        password = identity.password_file.read_text().rstrip("\n")
        _, scheme, iterations, salt, derived = entries[identity.username].split("$")
        assert scheme == "7" and len(base64.b64decode(salt)) == 12
        expected = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
        assert base64.b64decode(derived) == expected
        assert len(password) >= 40  # 32 random bytes, url-safe base64
        passwords.add(password)
    assert len(passwords) == len(written.identities)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_hash_format_is_what_mosquitto_passwd_writes(tmp_path):
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "u", "s3cret"], check=True, capture_output=True)
    user, encoded = path.read_text().strip().split(":", 1)
    salt = base64.b64decode(encoded.split("$")[3])
    assert hash_password("s3cret", salt) == encoded


def test_login_file_of_a_device_completes_an_agent_config(written, tmp_path):
    login = yaml.safe_load((written.conf.parent / "devices" / "dev-0" / "broker.yaml").read_text())
    assert login["broker"] == "mqtts://127.0.0.1:8883" and login["username"] == "dev-0"
    identity = {"public_key": str(tmp_path / "k.pem"), "identity": str(tmp_path / "id.pem")}
    cfg = AgentConfig.model_validate({"device_id": "dev-0", **identity, **login})
    from devft_edge.mqtt import BrokerAddress

    address = BrokerAddress.parse(cfg.broker).with_login(cfg, cfg.device_id)
    assert address.username == "dev-0"
    assert address.password == Path(login["password_file"]).read_text().strip()
    assert address.tls is not None and address.tls.cert == Path(login["tls_cert"])


def test_bad_input_is_reported_all_at_once():
    with pytest.raises(ConfigError) as caught:
        BrokerSpec(
            fleet="a/b",
            devices=("dev 0", "dev-1", "dev-1", "monitor-a/b"),
            plain_port=70000,
            hosts=("not a host",),
        )
    problems = " | ".join(caught.value.problems)
    for text in (
        "fleet 'a/b'",
        "device id 'dev 0'",
        "'dev-1' given twice",
        "plain port 70000 outside",
        "plain port only makes sense next to a TLS listener",
        "host 'not a host'",
    ):
        assert text in problems, text
    with pytest.raises(ConfigError, match="name of a service user"):
        BrokerSpec(fleet="t", devices=("aggregator-t",))
    with pytest.raises(ConfigError, match="no devices"):
        BrokerSpec(fleet="t", devices=())


def test_refuses_to_overwrite_an_existing_config(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "passwd").write_text("x")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_broker_config(BrokerSpec(fleet="t", devices=("d",)), tmp_path / "old")


def test_devices_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "devices.txt"
    path.write_text("# fleet t\ndev-0\n\n  dev-1  # the lab board\n")
    assert read_device_ids(path) == ["dev-0", "dev-1"]


def test_cli_writes_a_plain_config_and_prints_no_secret(tmp_path, capsys):
    (tmp_path / "ids").write_text("dev-0\ndev-1\n")
    out = tmp_path / "conf"
    assert main(["broker-config", "--fleet", "t", "--devices-file", str(tmp_path / "ids"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mqtt on *:1883" in printed and "dev-0, dev-1" in printed
    for password in out.rglob("password"):
        assert password.read_text().strip() not in printed
    assert not (out / "ca.pem").exists()
    assert yaml.safe_load((out / "aggregator" / "broker.yaml").read_text()) == {
        "broker": "mqtt://127.0.0.1:1883",
        "username": "aggregator-t",
        "password_file": str((out / "aggregator" / "password").resolve()),
    }
    assert main(["broker-config", "--devices", "bad id", "--out", str(tmp_path / "other")]) == 2
    assert "device id 'bad id'" in capsys.readouterr().err


# ---- flood limits (issue 14, item 4) -----------------------------------------------------------


def _limits(conf: str) -> dict[str, list[str]]:
    keys = ("max_packet_size", "max_queued_messages", "max_queued_bytes", "max_inflight_messages", "max_connections")
    found: dict[str, list[str]] = {key: [] for key in keys}
    for line in conf.splitlines():
        key, _, value = line.partition(" ")
        if key in found:
            found[key].append(value)
    return found


def test_the_config_limits_packets_queues_and_inflight_messages(tmp_path):
    assert _limits(mosquitto_conf(BrokerSpec(fleet="t", devices=("d",)), tmp_path)) == {
        "max_packet_size": [str(2**20)],  # the largest legitimate packet is ~160 KiB
        "max_queued_messages": ["10000"],
        "max_queued_bytes": [str(256 * 2**20)],
        "max_inflight_messages": [str(WINDOW)],
        "max_connections": [],  # off by default: a limit near the fleet size is a lock-out
    }
    assert 160 * 1024 < largest_packet_bytes("t") < 170 * 1024
    spec = BrokerSpec(
        fleet="t",
        devices=("d",),
        tls=True,
        plain_port=1884,
        max_packet_bytes=300_000,
        max_queued_bytes=64 * 2**20,
        max_queued_messages=500,
        max_inflight_messages=20,
        max_connections=50,
    )
    assert _limits(mosquitto_conf(spec, tmp_path)) == {
        "max_packet_size": ["300000"],
        "max_queued_messages": ["500"],
        "max_queued_bytes": [str(64 * 2**20)],
        "max_inflight_messages": ["20"],
        "max_connections": ["50", "50"],  # a listener option: on both listeners
    }
    bigger_chunks = BrokerSpec(fleet="t", devices=("d",), chunk_bytes=2**20)  # the packet limit follows the chunks
    assert _limits(mosquitto_conf(bigger_chunks, tmp_path))["max_packet_size"] == [str(2 * 2**20)]


def test_limits_that_would_stop_legitimate_traffic_are_refused_all_at_once():
    with pytest.raises(ConfigError) as caught:
        BrokerSpec(
            fleet="t",
            devices=("d0", "d1"),
            max_packet_bytes=100_000,
            max_queued_bytes=2**20,
            max_queued_messages=10,
            max_inflight_messages=0,
            max_connections=3,
        )
    problems = " | ".join(caught.value.problems)
    for text in (
        f"max packet bytes 100000 outside {largest_packet_bytes('t')}..",
        "max queued bytes 1048576 below one download window",
        "max queued messages 10 below one download window (64)",
        "max inflight messages 0 must be >= 1",
        "max connections 3 below the 4 users",
    ):
        assert text in problems, text
    with pytest.raises(ConfigError, match="max packet bytes"):
        BrokerSpec(fleet="t", devices=("d",), chunk_bytes=2**20, max_packet_bytes=2**20)  # a chunk would not fit


class _Client:
    """A paho client logged in as one generated user, recording what it receives and its disconnects."""

    def __init__(self, files: BrokerFiles, user: str, clean: bool = True) -> None:
        identity = next(i for i in files.identities if i.username == user)
        self.events: queue.Queue[str] = queue.Queue()
        self.received: queue.Queue[bytes] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=user, clean_session=clean)
        self.client.username_pw_set(user, identity.password_file.read_text().strip())
        self.client.on_connect = lambda c, u, f, reason, p: self.events.put(f"connack {reason}")
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.events.put("suback")
        self.client.on_disconnect = lambda c, u, f, reason, p: self.events.put(f"disconnected {reason}")
        self.client.on_message = lambda c, u, m: self.received.put(bytes(m.payload))
        self.client.connect("127.0.0.1", files.spec.listen_port)
        self.client.loop_start()
        assert self.events.get(timeout=5) == "connack Success"

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self.events.get(timeout=5) == "suback"

    def publish(self, topic: str, payload: bytes) -> bool:
        """Whether the broker acknowledged the QoS 1 publish within 5 s."""
        info = self.client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(5)
        except RuntimeError:  # the connection went away before the PUBACK
            return False
        return info.is_published()

    def drain(self, quiet: float = 1.0) -> list[bytes]:
        """What arrives until nothing has for ``quiet`` seconds."""
        messages = []
        try:
            while True:
                messages.append(self.received.get(timeout=quiet))
        except queue.Empty:
            return messages

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@needs_mosquitto
def test_a_real_mosquitto_passes_the_largest_message_and_cuts_off_a_bigger_one(tmp_path):
    spec = BrokerSpec(
        fleet="t",
        devices=("dev-0",),
        port=free_port(),
        bind="127.0.0.1",
        run_as=pwd.getpwuid(os.geteuid()).pw_name,  # as root, mosquitto would switch to a user that can't read 0600
        max_queued_bytes=WINDOW * largest_packet_bytes("t"),  # the least allowed: ~10 MiB
        max_inflight_messages=1,
    )
    files = write_broker_config(spec, tmp_path / "conf")
    with mosquitto(tmp_path / "broker", spec.listen_port, files.conf.read_text()):
        aggregator = _Client(files, "aggregator-t", clean=False)
        aggregator.subscribe("devft/t/dev/+/up")
        device = _Client(files, "dev-0")
        # a chunk with a full header and the seal: the largest payload the protocol sends
        largest = 4 + 64 * 1024 + DEFAULT_CHUNK_BYTES + 64
        assert device.publish("devft/t/dev/dev-0/up", b"c" * largest)
        assert [len(m) for m in aggregator.drain(quiet=0.5)] == [largest]

        # a flood while the aggregator is away: the broker queues what fits and drops the rest
        aggregator.stop()
        messages = 150
        assert all(device.publish("devft/t/dev/dev-0/up", b"q" * largest) for _ in range(messages))
        aggregator = _Client(files, "aggregator-t", clean=False)
        queued = aggregator.drain()
        assert 0 < len(queued) < messages
        assert sum(map(len, queued)) <= spec.max_queued_bytes + largest

        # one packet over the limit: the sender is disconnected and nothing is forwarded
        oversize = device.client.publish("devft/t/dev/dev-0/up", b"x" * spec.packet_limit, qos=1)
        assert device.events.get(timeout=5).startswith("disconnected")
        assert not oversize.is_published()
        assert aggregator.drain(quiet=0.5) == []
        aggregator.stop()
        device.stop()
