"""`devft-edge flash`: agent bundles, the offline install, SSH flashing, health check and rollback.

The device is played by this machine: a bundle for linux_x86_64 is installed into a temporary
prefix by its own ``install.sh`` with pip cut off from every index, its agent (the fallback
runner: no systemd here) says hello to a real mosquitto; an sshd on a loopback port with a
generated key is the SSH path. Bundles need wheels from PyPI the first time (kept in the
user's wheel cache afterwards).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from system_harness import MOSQUITTO, free_port, mosquitto, needs_mosquitto, needs_sshd, sshd

from devft_edge.cli import main
from devft_edge.errors import ConfigError
from devft_edge.identity import identity
from devft_edge.ops.bundle import PLATFORMS, TOP, BundleError, BundleSpec, build_bundle, requirements, verify_bundle
from devft_edge.ops.flash import HealthCheck, HelloWatch, load_hosts
from devft_edge.signing import generate_keypair

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_agent_pins_are_the_locks_pins():
    """The bundle installs what the tests ran against: every pin equals requirements.lock's (torch:
    the Makefile's), and the ORT extras equal requirements-ort.lock's."""
    lock = _pins(ROOT / "requirements.lock")
    lock["torch"] = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    agent = _pins(ROOT / "device_agent" / "deploy" / "requirements.txt")
    assert "torch" in agent and "paho-mqtt" in agent
    # setuptools (torch requires it) comes with every virtualenv, so pip freeze leaves it out of the lock
    assert {k: v for k, v in agent.items() if lock.get(k) != v and k != "setuptools"} == {}
    ort_lock = _pins(ROOT / "requirements-ort.lock")
    ort = _pins(ROOT / "device_agent" / "deploy" / "requirements-ort.txt")
    assert {k: v for k, v in ort.items() if ort_lock.get(k) != v} == {}
    assert "onnxruntime-training" in ort and "scikit-learn" not in agent and "amqtt" not in agent


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(platform="linux_riscv64"), "platform"),
        (dict(device_id="bad id"), "device id"),
        (dict(broker="mqtt://dev:secret@host"), "password"),
        (dict(tls_cert=Path(__file__)), "go together"),
        (dict(public_key=Path("/nonexistent.pem")), "no such file"),
        (dict(python="three"), "python"),
    ],
)
def test_bundle_spec_errors_are_clear(tmp_path, change, message):
    fields = dict(
        device_id="pi-1", broker="mqtt://127.0.0.1:1883", public_key=Path(__file__), device_key=Path(__file__)
    )
    fields |= change
    with pytest.raises(ConfigError, match=message):
        BundleSpec(**fields)


def test_hosts_file_merges_defaults_and_refuses_bad_entries(tmp_path):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("- {host: pi@a, device_id: pi-a}\n- {host: pi@b, device_id: pi-b, profile: rpi4-4gb}\n")
    entries = load_hosts(hosts, {"profile": "rpi5-8gb", "port": 22})
    assert [(e["host"], e["profile"]) for e in entries] == [("pi@a", "rpi5-8gb"), ("pi@b", "rpi4-4gb")]
    for text, message in (
        ("- {host: pi@a}\n", "device_id"),
        ("- {host: pi@a, device_id: x, colour: red}\n", "unknown keys"),
        ("- {host: pi@a, device_id: x}\n- {host: pi@b, device_id: x}\n", "twice"),
        ("{}", "non-empty YAML list"),
    ):
        hosts.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_hosts(hosts, {"profile": "x"})


def test_dry_run_prints_the_plan_and_never_a_secret(tmp_path, capsys):
    assert (
        main(["broker-config", "--fleet", "t", "--devices", "pi-1,pi-2", "--out", str(tmp_path / "bc"), "--tls"]) == 0
    )
    _, public = generate_keypair(tmp_path / "keys")
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("- {host: pi@10.0.0.5, device_id: pi-1}\n- {host: pi@10.0.0.6, device_id: pi-2, port: 2222}\n")
    capsys.readouterr()
    code = main(
        ["flash", "--hosts", str(hosts), "--broker", "mqtts://127.0.0.1:8883", "--fleet", "t"]
        + ["--public-key", str(public), "--profile", "rpi5-8gb", "--credentials", str(tmp_path / "bc"), "--dry-run"]
        + ["--device-keys", str(tmp_path / "device_keys")]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "pi-1 at pi@10.0.0.5:22" in out and "pi-2 at pi@10.0.0.6:2222" in out
    assert "login: username, password file, CA, client certificate" in out and "rollback" in out
    assert "PRIVATE KEY" not in out
    assert not (tmp_path / "device_keys").exists()  # a dry run enrols nobody
    for password in (tmp_path / "bc").rglob("password"):
        assert password.read_text().strip() not in out


def _wheel_platforms(bundle: Path) -> set[str]:
    with tarfile.open(bundle, "r:gz") as tar:
        names = [Path(m.name).name for m in tar if m.name.endswith(".whl")]
    return {name.removesuffix(".whl").split("-")[-1] for name in names}


def test_aarch64_bundle_holds_aarch64_wheels_only_and_ort_fails_early_naming_the_package(tmp_path):
    _, public = generate_keypair(tmp_path / "keys")
    device_key = identity("pi-1", tmp_path / "device_keys")
    spec = BundleSpec(
        device_id="pi-1", broker="mqtt://10.0.0.1", public_key=public, device_key=device_key, platform="linux_aarch64"
    )
    (tmp_path / "arm.tar.gz").write_bytes(b"an older bundle, world-readable")
    (tmp_path / "arm.tar.gz").chmod(0o644)
    info = build_bundle(spec, tmp_path / "arm.tar.gz")
    assert info.path.stat().st_mode & 0o777 == 0o600  # it holds the device's password and key (issue 14)
    platforms = _wheel_platforms(info.path)
    assert not any("x86_64" in p for p in platforms)
    assert any("aarch64" in p for p in platforms) and all("aarch64" in p or p == "any" for p in platforms)
    assert any(name.startswith("torch-") and "aarch64" in name for name in info.wheels)
    assert len(info.wheels) == len(requirements("torch")) + 1  # + the devft-edge wheel
    assert verify_bundle(info.path)["platform"] == "linux_aarch64"
    arm_ort = BundleSpec(**{**spec.__dict__, "backend": "ort"})
    with pytest.raises(BundleError, match="onnxruntime-training==1.19.2"):
        build_bundle(arm_ort, tmp_path / "arm-ort.tar.gz")
    assert not (tmp_path / "arm-ort.tar.gz").exists()
    assert set(PLATFORMS) == {"linux_aarch64", "linux_x86_64"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A mosquitto for the module, an aggregator key pair, and an x86_64 bundle for device pi-1."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (make test installs it)")
    root = tmp_path_factory.mktemp("fleet")
    with mosquitto(root / "broker") as url:
        _, public = generate_keypair(root / "keys")
        device_key = identity("pi-1", root / "device_keys")
        spec = BundleSpec(
            device_id="pi-1", broker=url, public_key=public, device_key=device_key, profile="x86-cpu", threads=1
        )
        info = build_bundle(spec, root / "pi-1.tar.gz")
        yield {"url": url, "public": public, "spec": spec, "bundle": info, "root": root, "device_key": device_key}


def _extract(bundle: Path, where: Path) -> Path:
    with tarfile.open(bundle, "r:gz") as tar:
        tar.extractall(where, filter="tar")
    return where / TOP


def _install(bundle_dir: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | OFFLINE
    command = ["sh", str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--service", "runner"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@needs_mosquitto
def test_x86_bundle_installs_offline_and_its_agent_says_hello(fleet, tmp_path):
    info = fleet["bundle"]
    assert verify_bundle(info.path)["version"] == info.version
    assert not any("aarch64" in p for p in _wheel_platforms(info.path))

    tampered = _extract(info.path, tmp_path / "tampered")  # refused before anything changes
    key = tampered / "config" / "public.pem"
    key.write_bytes(key.read_bytes().replace(b"A", b"B", 1))
    done = _install(tampered, tmp_path / "device")
    assert done.returncode == 3 and "verification failed" in done.stderr
    assert not (tmp_path / "device" / "current").exists()
    added = _extract(info.path, tmp_path / "added")
    (added / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    assert _install(added, tmp_path / "device").returncode == 3

    prefix = tmp_path / "device" / "opt" / "devft-edge"
    health = HealthCheck(broker=fleet["url"])
    with HelloWatch(health, "pi-1", fleet["device_key"]) as watch:
        done = _install(_extract(info.path, tmp_path / "ok"), prefix)
        try:
            assert done.returncode == 0, done.stderr[-3000:]
            assert os.readlink(prefix / "current") == f"versions/{info.version}"
            assert watch.wait(90), (prefix / "var" / "log" / "agent.log").read_text()[-3000:]
            status = subprocess.run([prefix / "bin" / "devft-edge-ctl", "status"], capture_output=True, text=True)
            assert "running" in status.stdout
            assert (prefix / "current" / "etc" / "agent.yaml").read_text().count(str(prefix)) >= 3
            if shutil.which("systemd-analyze"):  # the unit, rendered for this prefix, is a valid unit
                unit = prefix / "current" / "devft-edge-agent.service"
                verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
                assert verify.returncode == 0, verify.stderr
        finally:
            subprocess.run([prefix / "bin" / "devft-edge-ctl", "stop"], capture_output=True)


@needs_mosquitto
@needs_sshd
@pytest.mark.long  # two offline installs of the whole stack over ssh, 200 s; `make test` keeps the x86 install above
def test_flash_over_ssh_installs_checks_health_and_rolls_back_a_broken_version(fleet, tmp_path, capsys):
    spec, first = fleet["spec"], fleet["bundle"]
    prefix = tmp_path / "device-root" / "opt" / "devft-edge"
    common = ["flash", "--device-id", "pi-1", "--public-key", str(fleet["public"]), "--prefix", str(prefix)]
    common += ["--device-keys", str(fleet["root"] / "device_keys")]
    common += ["--service", "runner", "--platform", "linux_x86_64", "--health-broker", fleet["url"]]
    with sshd(tmp_path / "sshd") as server:
        ssh = server.options()
        try:
            assert main([*common, *ssh, "--broker", fleet["url"], "--bundle", str(first.path)]) == 0
            out = capsys.readouterr().out
            assert "healthy" in out and "1 of 1 devices healthy" in out
            assert os.readlink(prefix / "current") == f"versions/{first.version}"

            # a version whose agent cannot reach the broker never says hello: rolled back
            dead = BundleSpec(**{**spec.__dict__, "broker": "mqtt://127.0.0.1:9"})
            broken = build_bundle(dead, tmp_path / "broken.tar.gz")
            code = main(
                [*common, *ssh, "--broker", dead.broker, "--bundle", str(broken.path), "--health-timeout", "20"]
            )
            out = capsys.readouterr().out
            assert code == 1 and "rolled back" in out and "0 of 1 devices healthy" in out
            assert os.readlink(prefix / "current") == f"versions/{first.version}"
            assert os.readlink(prefix / "failed") == f"versions/{broken.version}"
            with HelloWatch(HealthCheck(broker=fleet["url"]), "pi-1", fleet["device_key"]) as watch:  # old agent back
                subprocess.run([prefix / "bin" / "devft-edge-ctl", "restart"], capture_output=True)
                assert watch.wait(90)

            # a bundle altered after it was built is refused before it is copied
            tampered = tmp_path / "tampered.tar.gz"
            _retar_with_one_byte_changed(first.path, tampered)
            assert main([*common, *ssh, "--broker", fleet["url"], "--bundle", str(tampered)]) == 1
            assert "sha256 mismatch" in capsys.readouterr().out
            assert os.readlink(prefix / "current") == f"versions/{first.version}"
        finally:
            if (prefix / "bin" / "devft-edge-ctl").exists():
                subprocess.run([prefix / "bin" / "devft-edge-ctl", "stop"], capture_output=True)


def _retar_with_one_byte_changed(source: Path, target: Path) -> None:
    with tarfile.open(source, "r:gz") as src, tarfile.open(target, "w:gz", compresslevel=1) as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("config/agent.yaml.in"):
                data = data.replace(b"pi-1", b"pi-9", 1)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)


def test_flash_hosts_runs_devices_in_parallel_and_reports_each(tmp_path, capsys):
    """Unreachable devices fail fast (before a bundle is built for them), each with its reason, in
    one table; the command's exit code says not every device is healthy."""
    _, public = generate_keypair(tmp_path / "keys")
    hosts = tmp_path / "hosts.yaml"
    closed = [free_port(), free_port()]
    hosts.write_text("".join(f"- {{host: pi@127.0.0.1, port: {p}, device_id: pi-{i}}}\n" for i, p in enumerate(closed)))
    code = main(
        ["flash", "--hosts", str(hosts), "--broker", "mqtt://127.0.0.1:9", "--public-key", str(public)]
        + ["--ssh-option", "StrictHostKeyChecking=no", "--health-timeout", "1", "--device-keys", str(tmp_path / "dk")]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("could not reach the device") >= 2 and "0 of 2 devices healthy" in out
    assert "building" not in out


def test_the_unit_runs_the_agent_unprivileged_and_never_gives_up():
    """Once root, and dead for good after 5 quick failures (issue 14)."""
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "device_agent" / "deploy" / "devft-edge-agent.service")
    assert unit["Service"]["User"] == unit["Service"]["Group"] == "devft-edge"
    assert unit["Service"]["Restart"] == "always" and unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert "StartLimitBurst" not in unit["Unit"]
    ctl = (ROOT / "device_agent" / "deploy" / "devft-edge-ctl").read_text()
    assert "useradd --system" in ctl and "chown -R devft-edge:devft-edge" in ctl


def test_parallel_health_checks_have_their_own_client_ids(tmp_path):
    """Two watches sharing a client id knock each other off the broker, and a good install could
    then be rolled back (issue 14): each watch connects under its own id, cleanly."""
    key = identity("pi-1", tmp_path / "device_keys")
    watches = [HelloWatch(HealthCheck(broker="mqtt://127.0.0.1:9"), "pi-1", key) for _ in range(2)]
    ids = {w.connection.client._client_id for w in watches}
    assert len(ids) == 2 and all(i.startswith(b"flash-pi-1-") for i in ids)
    assert all(w.connection.client._clean_session for w in watches)
