"""Broker addresses and logins: URL schemes, credentials kept out of text, config fields merged and checked."""

from __future__ import annotations

import pytest
import yaml

from devft_edge.errors import ConfigError
from devft_edge.mqtt import BrokerAddress, BrokerLogin, Connection, TlsFiles
from device_agent.config import AgentConfig


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "password"
    path.write_text("hunter2\n")
    return path


def test_schemes_pick_tls_and_default_ports():
    assert BrokerAddress.parse("mqtt://h") == BrokerAddress("h", 1883)
    assert BrokerAddress.parse("h:1999") == BrokerAddress("h", 1999)
    assert BrokerAddress.parse("mqtts://h") == BrokerAddress("h", 8883, tls=TlsFiles())
    assert str(BrokerAddress.parse("mqtts://h:9000")) == "mqtts://h:9000"
    for bad in ("http://h", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ConfigError):
            BrokerAddress.parse(bad)


def test_credentials_never_show_in_text():
    address = BrokerAddress.parse("mqtts://user:hunter2@h")
    assert (address.username, address.password) == ("user", "hunter2")
    assert "hunter2" not in str(address) and "hunter2" not in repr(address) and "user" not in str(address)
    with pytest.raises(ConfigError) as caught:
        BrokerAddress.parse("ftp://user:hunter2@h")
    assert "hunter2" not in str(caught.value)


def test_a_password_file_logs_in_as_the_client_id(secret):
    address = BrokerAddress.parse("mqtt://h").with_login(BrokerLogin(password_file=secret), "dev-0")
    assert (address.username, address.password) == ("dev-0", "hunter2")  # the newline is no part of it
    named = BrokerAddress.parse("mqtt://h").with_login(BrokerLogin(username="u", password_file=secret), "dev-0")
    assert named.username == "u"
    assert BrokerAddress.parse("mqtt://h").with_login(BrokerLogin(), "dev-0").username is None


def test_tls_files_need_mqtts_and_conflicts_are_listed(secret, tmp_path):
    login = BrokerLogin(username="a", password_file=secret, tls_ca=secret)
    tls = BrokerAddress.parse("mqtts://h").with_login(login, "c").tls
    assert tls == TlsFiles(ca=secret)
    with pytest.raises(ConfigError) as caught:
        BrokerAddress.parse("mqtt://b:pw@h").with_login(login, "c")
    assert len(caught.value.problems) == 3  # username twice, password twice, TLS files on mqtt://
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        BrokerAddress.parse("mqtt://h").with_login(BrokerLogin(password_file=empty), "c")


def test_config_login_fields_are_validated_with_the_field_named(tmp_path, secret):
    data = {
        "device_id": "dev-0",
        "public_key": "k.pem",
        "identity": "id.pem",
        "password_file": str(tmp_path / "missing"),
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="password_file: no such file"):
        AgentConfig.from_file(path)
    path.write_text(yaml.safe_dump({**data, "password_file": str(secret), "tls_cert": str(secret)}))
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        AgentConfig.from_file(path)


def test_connection_reports_unreadable_tls_files_as_config_errors(secret):
    login = BrokerLogin(tls_ca=secret)  # exists, but is no certificate
    with pytest.raises(ConfigError, match="TLS files for mqtts://h:8883"):
        Connection(BrokerAddress.parse("mqtts://h"), "c", [], login=login)


@pytest.mark.parametrize("persistent", [True, False])
def test_short_lived_clients_leave_no_session_on_the_broker(broker, persistent):
    """``status`` and health checks connect once; a persistent session would stay on the broker
    and queue messages for them forever (issue 14). The services keep theirs."""
    import threading

    import paho.mqtt.client as paho

    client_id = f"probe-{persistent}"
    connection = Connection(BrokerAddress.parse(broker), client_id, ["devft/t/agg/status"], persistent=persistent)
    connection.start(timeout=15)
    assert connection.connected.is_set()
    connection.stop()

    present: list[bool] = []
    answered = threading.Event()

    def on_connect(client, userdata, flags, reason, props):  # noqa: ANN001
        present.append(bool(flags.session_present))
        answered.set()

    again = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    again.on_connect = on_connect
    address = BrokerAddress.parse(broker)
    again.connect(address.host, address.port)
    again.loop_start()
    try:
        assert answered.wait(15)
    finally:
        again.disconnect()
        again.loop_stop()
    assert present == [persistent]


def test_the_inbox_and_the_send_queue_are_bounded(monkeypatch):
    """A flood costs at most the inbox's bound in memory (the rest is dropped and counted), and a
    broker that is gone cannot grow the send queue without bound (publish says it dropped)."""
    import types

    from devft_edge import mqtt

    monkeypatch.setattr(mqtt, "MAX_INBOX", 3)
    monkeypatch.setattr(mqtt, "MAX_OUTGOING", 2)
    connection = mqtt.Connection(mqtt.BrokerAddress.parse("mqtt://127.0.0.1:9"), "bounded", ["t"])
    for i in range(5):
        message = types.SimpleNamespace(topic="t", payload=bytes([i]), retain=False)
        connection._message(connection.client, None, message)  # type: ignore[arg-type]
    assert connection.inbox.qsize() == 3 and connection.dropped == 2
    assert [connection.publish("t", b"x") for _ in range(4)] == [True, True, False, False]  # never connected
