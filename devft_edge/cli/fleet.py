"""``keygen``, ``enroll``, ``broker-config`` and ``flash``: setting up a fleet and installing its devices."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devft_edge.errors import DevFTError

if TYPE_CHECKING:
    from devft_edge.cli.options import Subparsers


def _run_keygen(args: argparse.Namespace) -> int:
    from devft_edge.signing import fingerprint, generate_keypair, load_public_key

    private, public = generate_keypair(args.out)
    print(
        f"wrote {private} (keep it on the aggregator) and {public} (provision it to devices); "
        f"key id {fingerprint(load_public_key(public))}"
    )
    return 0


def _run_enroll(args: argparse.Namespace) -> int:
    from devft_edge.identity import describe, enroll

    for device in args.device_id:
        private, enrolled = enroll(device, args.device_keys)
        print(
            f"{device}: enrolled {describe(enrolled)}; its private key {private} goes to the device (agent `identity`)"
        )
    return 0


def _run_broker_config(args: argparse.Namespace) -> int:
    from devft_edge.ops.broker_config import BrokerSpec, read_device_ids, write_broker_config

    devices = read_device_ids(args.devices_file) if args.devices_file else [d for d in args.devices.split(",") if d]
    spec = BrokerSpec(
        fleet=args.fleet,
        devices=tuple(devices),
        tls=args.tls,
        port=args.port,
        hosts=tuple(args.host or ["127.0.0.1"]),
        bind=args.bind,
        plain_port=args.plain_port,
        client_certs=not args.no_client_certs,
        persistence_dir=args.persistence_dir,
        run_as=args.run_as,
    )
    files = write_broker_config(spec, args.out)
    out = args.out
    listeners = f"{'mqtts' if spec.tls else 'mqtt'} on {spec.bind or '*'}:{spec.listen_port}"
    if spec.tls:
        listeners += " (client certificate " + ("required)" if spec.client_certs else "not required)")
    if spec.plain_port is not None:
        listeners += f", mqtt on 127.0.0.1:{spec.plain_port}"
    per_identity = "password, broker.yaml" + (", ca.pem" if spec.tls else "")
    per_identity += ", client.pem, client.key" if spec.tls and spec.client_certs else ""
    users = [i for i in files.identities if i.role == "device"]
    print(
        f"wrote a mosquitto config for fleet {spec.fleet} to {out}: run mosquitto -c {files.conf}\n"
        f"  listeners: {listeners}; anonymous clients refused\n"
        f"  users: {files.identities[0].username} (aggregator), {files.identities[1].username} (status, read-only), "
        f"{len(users)} devices ({', '.join(i.username for i in users[:5])}{', ...' if len(users) > 5 else ''})\n"
        f"  per user, in {out}/aggregator/, {out}/monitor/ and {out}/devices/<id>/: {per_identity}\n"
        f"  secret files are mode 0600; the broker needs to read passwd{', server.key' if spec.tls else ''}"
        f"{'; ca.key signs certificates: keep it offline' if spec.tls else ''}"
    )
    return 0


_BUNDLE_KEYS = (
    "profile",
    "platform",
    "python",
    "backend",
    "data",
    "threads",
    "fleet",
    "broker",
    "public_key",
    "signing_key",
    "device_key",
    "username",
    "password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
)
_PATH_KEYS = ("public_key", "signing_key", "device_key", "password_file", "tls_ca", "tls_cert", "tls_key", "identity")


def _bundle_spec(values: dict[str, Any], wheel_sources: list[str], profiles_dirs: list[str]) -> Any:
    from devft_edge.ops.bundle import BundleSpec

    missing = [f"--{k.replace('_', '-')}" for k in ("device_id", "broker", "public_key") if not values.get(k)]
    if not values.get("device_key"):
        missing.append("--device-keys")
    if missing:
        raise DevFTError(f"devft-edge flash needs {', '.join(missing)}")
    fields = {k: values[k] for k in _BUNDLE_KEYS if values.get(k) is not None}
    fields.update({k: Path(v) for k, v in fields.items() if k in _PATH_KEYS})
    return BundleSpec(
        device_id=values["device_id"],
        profiles_dirs=tuple(Path(d) for d in profiles_dirs),
        wheel_sources=tuple(wheel_sources),
        **fields,
    )


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _identity(directory: Path, keys: Sequence[str]) -> dict[str, Any]:
    """A login written by ``broker-config`` (one user's directory): its files, and its username."""
    import yaml

    if not directory.is_dir():
        raise DevFTError(f"--credentials: no {directory} (was the device in broker-config's --devices?)")
    files = {"password_file": "password", "tls_ca": "ca.pem", "tls_cert": "client.pem", "tls_key": "client.key"}
    found: dict[str, Any] = {k: str(directory / f) for k, f in files.items() if (directory / f).is_file()}
    meta = directory / "broker.yaml"
    if meta.is_file():
        found["username"] = yaml.safe_load(meta.read_text()).get("username")
    return {k: v for k, v in found.items() if k in keys and v is not None}


def _with_device_key(entry: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``entry`` with the device's enrolled private key (enrolled now if the device is new; a dry
    run only names where it would be)."""
    from devft_edge.identity import identity
    from devft_edge.signing import PRIVATE_FILE

    device, keys = entry.get("device_id"), args.device_keys
    if not device or keys is None:
        return entry
    key = keys / "private" / device / PRIVATE_FILE if args.dry_run else identity(device, keys)
    return {**entry, "device_key": key}


def _run_flash(args: argparse.Namespace) -> int:
    from devft_edge.ops.bundle import TOP, build_bundle
    from devft_edge.ops.flash import (
        FlashJob,
        FlashSettings,
        HealthCheck,
        SshTarget,
        flash,
        load_hosts,
        plan_text,
        render_results,
    )

    given = {k: getattr(args, k) for k in (*_BUNDLE_KEYS, "device_id", "port", "identity") if k != "device_key"}
    login_keys = ("username", "password_file", "tls_ca", "tls_cert", "tls_key")
    if args.bundle_only:
        spec = _bundle_spec(_with_device_key(given, args), args.wheel_source, args.profiles_dir)
        if args.dry_run:
            print(f"would build {args.bundle_only}: {spec.platform}, CPython {spec.python}, backend {spec.backend}")
            return 0
        info = build_bundle(spec, args.bundle_only)
        print(
            f"wrote {info.path}: version {info.version}, {len(info.wheels)} wheels, {info.size / 1e6:.1f} MB, "
            f"signed by key sha256 {info.key_sha256}\n"
            f"install on the device: tar -xzf {info.path.name} && sh {TOP}/install.sh --key-sha256 {info.key_sha256}"
        )
        return 0
    if bool(args.host) == bool(args.hosts):
        raise DevFTError("devft-edge flash needs --bundle-only FILE, --host USER@HOST or --hosts FILE")
    entries = load_hosts(args.hosts, given) if args.hosts else [{**given, "host": args.host}]
    if args.credentials:  # a broker-config output: each device's login, the monitor's for the health check
        entries = [
            {**_identity(args.credentials / "devices" / e["device_id"], login_keys), **_given(e)} for e in entries
        ]
    options = tuple(args.ssh_option)
    jobs = [
        FlashJob(
            spec=_bundle_spec(_with_device_key(e, args), args.wheel_source, args.profiles_dir),
            target=SshTarget(
                host=e["host"],
                port=int(e.get("port") or 22),
                identity=Path(e["identity"]) if e.get("identity") else None,
                options=options,
            ),
        )
        for e in entries
    ]
    monitor: dict[str, Any] = {}
    if args.credentials:  # broker-config's read-only user, allowed to read every device's presence
        monitor = {**_identity(args.credentials / "monitor", login_keys), "username": f"monitor-{args.fleet}"}
    if args.health_username or args.health_password_file:
        monitor.update(username=args.health_username, password_file=args.health_password_file)
    if "tls_ca" not in monitor and jobs[0].spec.tls_ca:
        monitor["tls_ca"] = jobs[0].spec.tls_ca
    health = HealthCheck(
        broker=args.health_broker or jobs[0].spec.broker,
        timeout_s=args.health_timeout,
        **{k: Path(v) if k != "username" else v for k, v in monitor.items() if v is not None},
    )
    settings = FlashSettings(health=health, prefix=args.prefix, service=args.service, bundle=args.bundle)
    if args.bundle is not None and len(jobs) > 1:
        raise DevFTError("--bundle holds one device's identity: use it with --host, not --hosts")
    if args.dry_run:
        print(plan_text(jobs, settings))
        return 0
    results = flash(jobs, settings, parallel=args.parallel, progress=lambda d, text: print(f"[{d}] {text}", flush=True))
    print(render_results(results))
    return 0 if all(r.ok for r in results) else 1


def add_keygen(sub: Subparsers) -> None:
    """``keygen``: the aggregator's signing key pair."""
    kg = sub.add_parser("keygen", help="write an ed25519 key pair for signing packs")
    kg.add_argument("--out", type=Path, required=True, help="directory for private.pem and public.pem")
    kg.set_defaults(func=_run_keygen)


def add_enroll(sub: Subparsers) -> None:
    """``enroll``: device identities, enrolled with the fleet."""
    en = sub.add_parser("enroll", help="give devices an ed25519 identity and enrol it with the fleet")
    en.add_argument("--device-id", action="append", required=True, help="device id (repeat for several)")
    en.add_argument(
        "--device-keys", type=Path, required=True, help="the aggregator's device_keys directory (<id>.pem per device)"
    )
    en.set_defaults(func=_run_enroll)


def add_broker_config(sub: Subparsers) -> None:
    """``broker-config``: a mosquitto config for the fleet."""
    bc = sub.add_parser("broker-config", help="write a mosquitto config with TLS, per-device passwords and an ACL")
    bc.add_argument("--fleet", default="default", help="fleet name (topic prefix devft/<fleet>)")
    devices = bc.add_mutually_exclusive_group(required=True)
    devices.add_argument("--devices", help="comma-separated device ids")
    devices.add_argument("--devices-file", type=Path, help="file of device ids, one per line (# comments)")
    bc.add_argument("--out", type=Path, required=True, help="directory to write (must be empty or absent)")
    bc.add_argument("--tls", action="store_true", help="TLS listener with a new CA and server certificate")
    bc.add_argument("--no-client-certs", action="store_true", help="with --tls: passwords only, no client certs")
    bc.add_argument("--port", type=int, default=None, help="listener port (default: 8883 with --tls, else 1883)")
    bc.add_argument(
        "--host", action="append", default=None, help="broker name or IP clients use, repeatable (default: 127.0.0.1)"
    )
    bc.add_argument("--bind", default=None, help="address the listener binds to (default: every interface)")
    bc.add_argument("--plain-port", type=int, default=None, help="with --tls: plain MQTT on 127.0.0.1 on this port")
    bc.add_argument("--persistence-dir", type=Path, default=None, help="keep sessions across restarts here")
    bc.add_argument("--run-as", default=None, help="user a broker started as root switches to (mosquitto 'user')")
    bc.set_defaults(func=_run_broker_config)


def add_flash(sub: Subparsers) -> None:
    """``flash``: build agent bundles and install them over SSH."""
    fl = sub.add_parser("flash", help="build an agent bundle, install it on devices over SSH, health-check")
    where = fl.add_mutually_exclusive_group()
    where.add_argument("--bundle-only", type=Path, metavar="OUT.tar.gz", help="only build the bundle")
    where.add_argument("--host", help="USER@HOST of the device to flash")
    where.add_argument("--hosts", type=Path, help="YAML list of devices (host, device_id, any option below)")
    fl.add_argument("--device-id", help="the device's id (its MQTT client id and username)")
    fl.add_argument("--profile", default="measure", help="device profile name or YAML, or 'measure'")
    fl.add_argument("--profiles-dir", action="append", default=[], help="extra directory of profile YAML files")
    fl.add_argument("--broker", help="mqtt[s]://host:port the agent connects to")
    fl.add_argument("--fleet", default="default", help="fleet name (topic prefix devft/<fleet>)")
    fl.add_argument("--public-key", help="the aggregator's public key (PEM)")
    fl.add_argument(
        "--signing-key",
        default=None,
        help="the fleet's private key (PEM) that signs the bundle; its public half is --public-key "
        "(default: private.pem beside --public-key, where keygen writes it)",
    )
    fl.add_argument(
        "--device-keys",
        type=Path,
        default=None,
        help="the aggregator's device_keys directory: each device is enrolled there (a new one gets a key pair)",
    )
    fl.add_argument("--platform", choices=["linux_aarch64", "linux_x86_64"], default="linux_aarch64")
    fl.add_argument("--python", default="3.11", help="the device's Python version")
    fl.add_argument("--backend", choices=["torch", "ort"], default="torch", help="trainer backend")
    fl.add_argument(
        "--data", default="synthetic:48:0", help="local data on the device (JSONL path) or synthetic:N:SEED"
    )
    fl.add_argument("--threads", type=int, default=None, help="torch threads on the device (default: all cores)")
    fl.add_argument("--username", default=None, help="MQTT username (default with a password file: the device id)")
    fl.add_argument("--password-file", default=None, help="file holding the device's MQTT password")
    fl.add_argument("--tls-ca", default=None, help="CA certificate of an mqtts:// broker")
    fl.add_argument("--tls-cert", default=None, help="the device's client certificate")
    fl.add_argument("--tls-key", default=None, help="the device's client key")
    fl.add_argument("--wheel-source", action="append", default=[], help="extra pip find-links dir or index URL")
    fl.add_argument("--bundle", type=Path, default=None, help="install this prebuilt bundle instead of building one")
    fl.add_argument("--port", type=int, default=22, help="SSH port")
    fl.add_argument("--identity", default=None, help="SSH private key")
    fl.add_argument("--ssh-option", action="append", default=[], help="extra ssh -o option, repeatable")
    fl.add_argument("--prefix", default="/opt/devft-edge", help="install prefix on the device")
    fl.add_argument("--service", choices=["auto", "systemd", "runner", "none"], default="auto")
    fl.add_argument("--health-timeout", type=float, default=180.0, help="seconds to wait for the agent's hello")
    fl.add_argument("--health-broker", default=None, help="broker to watch for the hello (default: --broker)")
    fl.add_argument("--health-username", default=None, help="your login to that broker (e.g. the aggregator's)")
    fl.add_argument("--health-password-file", type=Path, default=None, help="file with that login's password")
    fl.add_argument(
        "--credentials",
        type=Path,
        default=None,
        help="a broker-config output directory: each device's login, and the monitor's for the health check",
    )
    fl.add_argument("--parallel", type=int, default=4, help="devices flashed at once with --hosts")
    fl.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    fl.set_defaults(func=_run_flash)
