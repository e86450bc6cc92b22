"""Offline install bundles of the device agent: everything one device needs, in one verified file.

A bundle is a ``.tar.gz`` an operator builds on a workstation (x86 or not) for a device of another
platform. It holds the agent's wheel and the wheels of its pinned dependencies for the target
platform and Python (``pip download --platform ... --only-binary=:all: --no-deps``: the pins in
``device_agent/deploy/requirements.txt`` are the whole closure, so pip never resolves — and never
evaluates environment markers — against the workstation; ``requirements-<platform>.txt`` changes
a pin for one platform), the agent config with the device's
identity (its enrolled ed25519 key), its broker credentials and certificates, the aggregator's public key, the
device profile, a systemd unit, the control script and ``install.sh``. ``MANIFEST.sha256`` lists
the sha256 of every other member in ``sha256sum -c`` format, and ``MANIFEST.sha256.sig`` is the
fleet key's ed25519 signature of it (the key that signs packs: a device trusts one key).
``install.sh`` checks the signature first (``openssl pkeyutl -verify -rawin``, OpenSSL >= 3.0:
Raspberry Pi OS bookworm, JetPack 6), then every hash (and that nothing was added), before it
changes anything. The bundle's version is the package version plus a hash of its content, so two
different bundles never share a version directory on the device.

Which key the device checks the signature with: the one ``install.sh --key-sha256`` pins (``flash``
always pins the fleet key over its SSH session), else the key the installed agent already trusts
(``PREFIX/current/etc/public.pem``), else, on a first install by hand with no pin, the bundle's own
``config/public.pem`` (trust on first use, said on stderr). A bundle re-signed with another key
and carrying that key is therefore refused whenever the device has a pin or an installed agent.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from devft_edge.archive import PLAIN_FILE, member_kind
from devft_edge.errors import ConfigError, DevFTError, raise_if
from devft_edge.mqtt import BrokerAddress
from devft_edge.protocol import DEVICE_ID

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

logger = logging.getLogger(__name__)

PLATFORMS: dict[str, tuple[str, ...]] = {
    "linux_x86_64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"),
    "linux_aarch64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"),
}
"""Target platforms and the wheel platform tags accepted for each (glibc 2.28+: Raspberry Pi OS
bookworm, Jetson Linux 36, Debian 12, Ubuntu 20.04 and later)."""
BACKENDS = ("torch", "ort")
MANIFEST = "MANIFEST.sha256"
SIGNATURE = "MANIFEST.sha256.sig"
"""The raw 64-byte ed25519 signature of ``MANIFEST.sha256`` (``openssl pkeyutl -rawin`` reads it)."""
PUBLIC_KEY = "config/public.pem"
"""The fleet's public key in the bundle: packs, messages and the bundle itself are checked with it."""
TOP = "devft-edge-agent"
"""The bundle's single top-level directory."""
SECRETS = ("password", "client.key", "identity.pem")
"""Config members readable by the agent's user only (mode 0600 in the bundle and on the device)."""
MAX_BUNDLE_TEXT_BYTES = 2**20
"""Largest ``MANIFEST.sha256`` or ``bundle.env`` :func:`verify_bundle` reads into memory (real ones
are a few KB: one 80-byte line per wheel and file)."""
_MANIFEST_LINE = re.compile(r"([0-9a-f]{64})  (\./.+)")
"""A ``sha256sum`` line as :func:`_digest_lines` writes it."""


class BundleError(DevFTError):
    """A bundle cannot be built, or a built one fails verification."""


def deploy_dir() -> Path:
    """The device-side scripts and pinned requirements (``device_agent/deploy``)."""
    import device_agent

    return Path(device_agent.__file__).resolve().parent / "deploy"


def default_wheel_cache() -> Path:
    """Where downloaded wheels are kept between bundle builds (per platform and Python)."""
    return Path(os.environ.get("DEVFT_EDGE_CACHE", Path.home() / ".cache" / "devft-edge")) / "wheels"


@dataclass(frozen=True)
class BundleSpec:
    """One device's bundle: identity, broker login, trust anchor, platform."""

    device_id: str
    broker: str
    public_key: Path
    """The aggregator's public key (PEM): the device checks its packs and messages with it."""
    device_key: Path
    """The device's own ed25519 private key (PEM), enrolled with the fleet (:mod:`devft_edge.identity`);
    needed when the bundle is built (a dry run names a device not enrolled yet)."""
    signing_key: Path | None = None
    """The fleet's ed25519 private key (PEM) that signs the bundle's manifest; its public half must
    be ``public_key``. Default: ``private.pem`` beside ``public_key`` (where ``keygen`` writes
    both); needed when the bundle is built."""
    fleet: str = "default"
    profile: str = "measure"
    """A profile name or YAML path (bundled into the config), or ``measure`` (the agent measures)."""
    profiles_dirs: tuple[Path, ...] = ()
    platform: str = "linux_x86_64"
    python: str = "3.11"
    backend: str = "torch"
    data: str = "synthetic:48:0"
    """The device's local data (a JSONL file or directory on the device), or ``synthetic:N:SEED``."""
    threads: int | None = None
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    wheel_sources: tuple[str, ...] = field(default_factory=tuple)
    """Extra ``--find-links`` directories or index URLs for pip (e.g. PyTorch's CPU wheel index
    for x86_64 devices, whose PyPI torch is the CUDA build)."""

    def __post_init__(self) -> None:
        problems = []
        if not DEVICE_ID.fullmatch(self.device_id):
            problems.append(f"device id {self.device_id!r} must match {DEVICE_ID.pattern}")
        if self.platform not in PLATFORMS:
            problems.append(f"platform {self.platform!r}: one of {', '.join(PLATFORMS)}")
        if not re.fullmatch(r"3\.\d{1,2}", self.python):
            problems.append(f"python {self.python!r}: expected a version like 3.11")
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r}: one of {', '.join(BACKENDS)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("--tls-cert and --tls-key go together")
        for name in ("public_key", "password_file", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"{name.replace('_', '-')} {path}: no such file")
        try:
            address = BrokerAddress.parse(self.broker)
            if address.password:
                problems.append("broker URL carries a password: pass it with --password-file instead")
        except ConfigError as error:
            problems.append(str(error))
        raise_if(problems)


@dataclass(frozen=True)
class BundleInfo:
    """What was built."""

    path: Path
    version: str
    wheels: tuple[str, ...]
    size: int
    key_sha256: str
    """sha256 of the raw public key that signed it: ``install.sh --key-sha256`` pins it."""


def signing_key_path(spec: BundleSpec) -> Path:
    """The private key that signs ``spec``'s bundle (:attr:`BundleSpec.signing_key`)."""
    from devft_edge.signing import PRIVATE_FILE

    return Path(spec.signing_key) if spec.signing_key else Path(spec.public_key).with_name(PRIVATE_FILE)


def requirements(backend: str, platform: str | None = None) -> list[str]:
    """The pinned requirement lines a bundle installs for ``backend`` on ``platform``.

    ``requirements-<platform>.txt``, where there is one, replaces pins of the same name: PyPI's
    torch for aarch64 is a CUDA build from 2.11 on (its metadata requires cuda-toolkit and the
    nvidia-* wheels, which a Raspberry Pi cannot install), so aarch64 devices keep the last
    CPU-only aarch64 torch. Raises :class:`BundleError` when an override names no pinned package.
    """
    from packaging.utils import canonicalize_name

    files = ["requirements.txt"] + (["requirements-ort.txt"] if backend == "ort" else [])
    lines = [line for name in files for line in _pin_lines(deploy_dir() / name)]
    override = deploy_dir() / f"requirements-{platform}.txt"
    if platform is None or not override.is_file():
        return lines
    replaced = {canonicalize_name(line.partition("==")[0]): line for line in _pin_lines(override)}
    unknown = set(replaced) - {canonicalize_name(line.partition("==")[0]) for line in lines}
    if unknown:
        raise BundleError(f"{override.name} overrides pins that {', '.join(files)} do not have: {sorted(unknown)}")
    return [replaced.get(canonicalize_name(line.partition("==")[0]), line) for line in lines]


def _pin_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def build_bundle(spec: BundleSpec, out: Path, wheel_cache: Path | None = None) -> BundleInfo:
    """Build ``out`` (a ``.tar.gz``) for ``spec``, signed; raises :class:`BundleError` naming what is missing."""
    if not Path(spec.device_key).is_file():
        raise BundleError(f"device key {spec.device_key}: no such file (enrol the device: devft-edge enroll)")
    signer, key_sha256 = _signer(spec)
    cache = (wheel_cache or default_wheel_cache()) / f"{spec.platform}-cp{spec.python.replace('.', '')}"
    pins = requirements(spec.backend, spec.platform)
    wheels = fetch_wheels(pins, spec.platform, spec.python, cache, spec.wheel_sources)
    with tempfile.TemporaryDirectory(prefix="devft-bundle-") as tmp:
        root = Path(tmp) / TOP
        (root / "wheels").mkdir(parents=True)
        for wheel in wheels:
            _link_or_copy(wheel, root / "wheels" / wheel.name)
        agent_wheel = build_agent_wheel(root / "wheels")
        (root / "requirements.txt").write_text("\n".join(pins) + "\n")
        _write_config(spec, root / "config")
        deploy = deploy_dir()
        for name in ("install.sh", "devft-edge-ctl", "devft-edge-agent.service"):
            shutil.copy2(deploy / name, root / name)
        (root / "install.sh").chmod(0o755)
        (root / "devft-edge-ctl").chmod(0o755)
        content = _digest_lines(root)
        version = f"{importlib.metadata.version('devft-edge')}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"
        (root / "bundle.env").write_text(
            f"version={version}\npython={spec.python}\nplatform={spec.platform}\n"
            f"device_id={spec.device_id}\nfleet={spec.fleet}\nbackend={spec.backend}\n"
        )
        (root / MANIFEST).write_text(_digest_lines(root))
        (root / SIGNATURE).write_bytes(signer.sign((root / MANIFEST).read_bytes()))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        # 0600 from the first byte: the bundle holds the device's broker password and client key
        fd = os.open(tmp_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
            tar.add(root, arcname=TOP)  # wheels are zip files already: level 1
        tmp_out.replace(out)
    names = tuple(sorted(w.name for w in wheels) + [agent_wheel.name])
    logger.info("bundle %s: version %s, %d wheels, %.1f MB", out, version, len(names), out.stat().st_size / 1e6)
    return BundleInfo(path=out, version=version, wheels=names, size=out.stat().st_size, key_sha256=key_sha256)


def fetch_wheels(
    pins: Sequence[str], platform: str, python: str, cache: Path, sources: Sequence[str] = ()
) -> list[Path]:
    """The wheel file of every pin for the target, downloaded into ``cache`` when not there yet.

    Raises :class:`BundleError` naming each pin that has no wheel for the target.
    """
    cache.mkdir(parents=True, exist_ok=True)
    missing = [pin for pin in pins if _cached_wheel(cache, pin, platform) is None]
    if missing:
        done = _pip_download(missing, platform, python, cache, sources)
        if done.returncode != 0:  # which pins? ask pip one at a time, so the error names them
            absent = [pin for pin in missing if _pip_download([pin], platform, python, cache, sources).returncode]
            hint = (
                " (onnxruntime-training is published for x86_64 only)"
                if any("onnxruntime" in p for p in absent)
                else ""
            )
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
            raise BundleError(
                f"no wheel for {platform} / CPython {python} of: {', '.join(absent) or '(see pip)'}{hint}\n{last}"
            )
    wheels = []
    for pin in pins:
        wheel = _cached_wheel(cache, pin, platform)
        if wheel is None:
            raise BundleError(f"pip reported success but no wheel of {pin} for {platform} is in {cache}")
        wheels.append(wheel)
    return wheels


def build_agent_wheel(directory: Path) -> Path:
    """Build the devft-edge wheel (agent, core and aggregator are one distribution) into ``directory``."""
    import devft_edge

    source = Path(devft_edge.__file__).resolve().parent.parent
    if not (source / "pyproject.toml").is_file():
        raise BundleError(f"bundles are built from a devft-edge source checkout; none at {source}")
    with tempfile.TemporaryDirectory(prefix="devft-wheel-") as build:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", build, str(source)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise BundleError(f"building the devft-edge wheel failed:\n{done.stderr[-2000:]}")
        (wheel,) = Path(build).glob("devft_edge-*.whl")
        return Path(shutil.move(str(wheel), directory / wheel.name))


def verify_bundle(path: Path, public_key: Path | None = None) -> dict[str, str]:
    """Check a built bundle's signature and every member against its manifest; returns ``bundle.env``'s fields.

    The manifest's signature is checked with ``public_key`` (the fleet key the device trusts), or
    with the bundle's own ``config/public.pem`` when none is given (what a device with no pin and no
    installed agent does). Raises :class:`BundleError` listing the problems: no signature, a
    signature that does not verify, a member that is not a regular file or a
    directory (``install.sh`` extracts with tar, so a link or device could place anything anywhere,
    and a few KB of sparse file expand to gigabytes), a name outside the single directory ``TOP``
    (absolute, or through ``..``), a manifest, signature, key or ``bundle.env`` larger than
    :data:`MAX_BUNDLE_TEXT_BYTES` (they are read into memory), a malformed manifest line, a missing
    or unlisted member or a hash mismatch (the same checks ``install.sh`` makes on the device
    before it changes anything).
    """
    digests: dict[str, str] = {}
    texts: dict[str, bytes] = {}
    problems: list[str] = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                top, _, name = member.name.partition("/")
                kind = member_kind(member)
                if top != TOP or ".." in name.split("/") or not (name or member.isdir()):
                    problems.append(f"{member.name}: not under {TOP}/")
                elif kind not in (PLAIN_FILE, "directory"):
                    problems.append(f"{member.name}: a {kind}, not a regular file or directory")
                elif name in _TEXTS and member.size > MAX_BUNDLE_TEXT_BYTES:
                    problems.append(f"{member.name}: {member.size} bytes (at most {MAX_BUNDLE_TEXT_BYTES})")
                elif member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None  # regular files always have data
                    sha, data = hashlib.sha256(), bytearray()
                    while block := handle.read(1 << 20):
                        sha.update(block)
                        if name in _TEXTS:
                            data += block
                    if name in _TEXTS:
                        texts[name] = bytes(data)
                    if name not in (MANIFEST, SIGNATURE):
                        digests[f"./{name}"] = sha.hexdigest()
    except (OSError, tarfile.TarError, EOFError, ValueError) as error:  # tarfile lets a bad pax header's ValueError out
        raise BundleError(f"{path}: not a readable bundle: {str(error)[:200]}") from None
    if problems or MANIFEST not in texts:
        raise BundleError(f"{path}: bundle verification failed: {'; '.join(problems[:5]) or f'no {MANIFEST}'}")
    _check_signature(path, texts, public_key)
    try:
        lines, env = texts[MANIFEST].decode().splitlines(), texts.get("bundle.env", b"").decode()
    except UnicodeDecodeError:
        raise BundleError(f"{path}: {MANIFEST} or bundle.env is not UTF-8") from None
    listed = {}
    for number, line in enumerate(lines, 1):
        entry = _MANIFEST_LINE.fullmatch(line)
        if entry:
            listed[entry[2]] = entry[1]
        elif line:
            problems.append(f"{MANIFEST} line {number}: not '<sha256>  ./<path>'")
    problems += [f"{name}: not in the manifest" for name in sorted(set(digests) - set(listed))]
    problems += [f"{name}: missing" for name in sorted(set(listed) - set(digests))]
    problems += [
        f"{name}: sha256 mismatch" for name in sorted(set(listed) & set(digests)) if listed[name] != digests[name]
    ]
    if problems:
        raise BundleError(f"{path}: bundle verification failed: {'; '.join(problems[:5])}")
    return dict(line.split("=", 1) for line in env.splitlines() if "=" in line)


# ---- helpers ----------------------------------------------------------------------------------

_TEXTS = (MANIFEST, SIGNATURE, PUBLIC_KEY, "bundle.env")
"""Members :func:`verify_bundle` reads into memory (each at most :data:`MAX_BUNDLE_TEXT_BYTES`)."""


def _signer(spec: BundleSpec) -> tuple[Ed25519PrivateKey, str]:
    """The fleet's private key for ``spec``, checked to be the half of the key the device gets."""
    from devft_edge.signing import key_sha256, load_private_key, load_public_key, same_key

    path = signing_key_path(spec)
    if not path.is_file():
        raise BundleError(
            f"signing key {path}: no such file (flash signs every bundle with the fleet's private key, "
            "the one that signs packs: pass --signing-key)"
        )
    try:
        private, public = load_private_key(path), load_public_key(spec.public_key)
    except ConfigError as error:
        raise BundleError(str(error)) from None
    if not same_key(private, public):
        raise BundleError(
            f"signing key {path} is not the private half of --public-key {spec.public_key}: "
            "the device would refuse the bundle"
        )
    return private, key_sha256(public)


def _check_signature(path: Path, texts: dict[str, bytes], public_key: Path | None) -> None:
    from devft_edge.signing import fingerprint, load_public_key, public_key_from_pem, verifies

    if SIGNATURE not in texts:
        raise BundleError(f"{path}: bundle verification failed: not signed (no {SIGNATURE})")
    if public_key is None and PUBLIC_KEY not in texts:
        raise BundleError(f"{path}: bundle verification failed: no {PUBLIC_KEY} to check its signature with")
    try:
        key = load_public_key(public_key) if public_key else public_key_from_pem(texts[PUBLIC_KEY], PUBLIC_KEY)
    except ConfigError as error:
        raise BundleError(f"{path}: bundle verification failed: {error}") from None
    if not verifies(key, texts[MANIFEST], texts[SIGNATURE]):
        raise BundleError(
            f"{path}: bundle verification failed: {MANIFEST} is not signed by key {fingerprint(key)}"
            f"{'' if public_key is None else f' ({public_key})'}"
        )


def _pip_download(
    pins: Sequence[str], platform: str, python: str, cache: Path, sources: Sequence[str]
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    command += ["--disable-pip-version-check", "--dest", str(cache), "--python-version", python]
    abi = f"cp{python.replace('.', '')}"
    command += ["--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in PLATFORMS[platform]:
        command += ["--platform", tag]
    for source in sources:
        command += [
            "--extra-index-url" if "://" in source and not source.startswith("file:") else "--find-links",
            source,
        ]
    return subprocess.run([*command, *pins], capture_output=True, text=True)


def _cached_wheel(cache: Path, pin: str, platform: str) -> Path | None:
    """The cached wheel satisfying ``name==version`` for ``platform``, if any."""
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    name, _, version = pin.partition("==")
    wanted = canonicalize_name(name)
    arch = platform.removeprefix("linux_")
    for wheel in sorted(cache.glob("*.whl")):
        try:
            wheel_name, wheel_version, _, tags = parse_wheel_filename(wheel.name)
        except ValueError:
            continue
        if wheel_name != wanted or Version(wheel_version.base_version) != Version(version):
            continue
        if all(t.platform == "any" or t.platform.endswith(arch) for t in tags):
            return wheel
    return None


def _write_config(spec: BundleSpec, config: Path) -> None:
    """The agent config template (``@ETC@``/``@PREFIX@`` filled in by install.sh) and its files."""
    from devft_edge.profiles import dump_profile, load_profile

    config.mkdir(parents=True)
    shutil.copyfile(spec.public_key, config / "public.pem")
    shutil.copyfile(spec.device_key, config / "identity.pem")
    agent: dict[str, object] = {
        "device_id": spec.device_id,
        "fleet": spec.fleet,
        "broker": spec.broker,
        "public_key": "@ETC@/public.pem",
        "identity": "@ETC@/identity.pem",
        "profile": "measure",
        "data": spec.data,
        "cache_dir": "@PREFIX@/var/cache",
        "backend": spec.backend,
    }
    if spec.profile != "measure":
        profile = load_profile(spec.profile, spec.profiles_dirs)
        (config / f"{profile.name}.yaml").write_text(dump_profile(profile))
        agent["profile"] = f"@ETC@/{profile.name}.yaml"
    if spec.threads:
        agent["threads"] = spec.threads
    if spec.username:
        agent["username"] = spec.username
    for key, path, name in (
        ("password_file", spec.password_file, "password"),
        ("tls_ca", spec.tls_ca, "ca.pem"),
        ("tls_cert", spec.tls_cert, "client.pem"),
        ("tls_key", spec.tls_key, "client.key"),
    ):
        if path is not None:
            shutil.copyfile(path, config / name)
            agent[key] = f"@ETC@/{name}"
    for secret in SECRETS:
        if (config / secret).exists():
            (config / secret).chmod(0o600)
    (config / "agent.yaml.in").write_text(yaml.safe_dump(agent, sort_keys=False))


def _digest_lines(root: Path) -> str:
    """``sha256  ./path`` for every file under ``root`` except the manifest and its signature, sorted by path."""
    lines = []
    skip = {root / MANIFEST, root / SIGNATURE}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in skip):
        lines.append(f"{_sha256(path)}  ./{path.relative_to(root).as_posix()}")
    return "\n".join(lines) + "\n"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
