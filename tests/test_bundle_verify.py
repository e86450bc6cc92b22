"""Bundle verification, in Python and on the device.

verify_bundle on hand-made bundles: links, devices, sparse files, paths outside the top directory,
oversized text members and a missing or foreign signature are refused; a clean bundle verifies.
The real ``install.sh`` on real bundles built by build_bundle (no wheels: the pins are stubbed, so
no pip and no network; the wheels' own checks are test_flash's): a signed bundle verifies; an
unsigned one, one signed by another key, one re-signed with another key and carrying it (against a
pinned or installed key), one whose manifest or one of whose members changed are refused with exit
code 3 before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devft_edge.identity import identity
from devft_edge.ops import bundle as bundle_module
from devft_edge.ops.bundle import (
    MANIFEST,
    MAX_BUNDLE_TEXT_BYTES,
    PUBLIC_KEY,
    SIGNATURE,
    TOP,
    BundleError,
    BundleSpec,
    build_bundle,
    verify_bundle,
)
from devft_edge.signing import generate_keypair, key_sha256, load_public_key

KEY = Ed25519PrivateKey.generate()
KEY_PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
ENV = b"version=0.1.0-abc\nplatform=linux_aarch64\n"
FILES = {
    "bundle.env": ENV,
    "install.sh": b"#!/bin/sh\n",
    "wheels/a-1.0-py3-none-any.whl": b"PK",
    PUBLIC_KEY: KEY_PEM,
}
NOT_FILES = {
    "symbolic link": tarfile.SYMTYPE,
    "hard link": tarfile.LNKTYPE,
    "character device": tarfile.CHRTYPE,
    "block device": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "contiguous file": tarfile.CONTTYPE,
}
"""Member types a bundle refuses, by the words its message uses (tarfile counts contiguous files as regular)."""


def _entry(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """One member as it stands in a tar: header block(s), then its data padded to whole blocks."""
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _manifest(files: dict[str, bytes]) -> bytes:
    """MANIFEST.sha256 as ``sha256sum -c`` reads it and build_bundle writes it: ``sha256  ./path``."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  ./{name}\n" for name, data in sorted(files.items())).encode()


def _bundle(
    path: Path,
    files: dict[str, bytes],
    extra: tuple[bytes, ...] = (),
    manifest: bytes | None = None,
    signer: Ed25519PrivateKey | None = KEY,
) -> Path:
    """A bundle laid out as build_bundle lays it out: ``TOP/`` holding ``files``, the ``extra`` raw
    members, a MANIFEST.sha256 (by default, the one listing ``files``) and its signature by
    ``signer`` (none if None)."""
    manifest = _manifest(files) if manifest is None else manifest
    entries = [_entry(_member(TOP, tarfile.DIRTYPE)), _entry(_member(f"{TOP}/wheels", tarfile.DIRTYPE))]
    entries += [_entry(_member(f"{TOP}/{name}"), data) for name, data in files.items()]
    entries += [*extra, _entry(_member(f"{TOP}/{MANIFEST}"), manifest)]
    if signer is not None:
        entries.append(_entry(_member(f"{TOP}/{SIGNATURE}"), signer.sign(manifest)))
    path.write_bytes(gzip.compress(b"".join(entries) + bytes(2 * tarfile.BLOCKSIZE)))
    return path


def test_a_clean_bundle_verifies(tmp_path):
    assert verify_bundle(_bundle(tmp_path / "b.tar.gz", FILES)) == {"version": "0.1.0-abc", "platform": "linux_aarch64"}
    pem = tmp_path / "public.pem"
    pem.write_bytes(KEY_PEM)
    assert verify_bundle(_bundle(tmp_path / "b.tar.gz", FILES), pem)["version"] == "0.1.0-abc"


def test_an_unsigned_or_foreign_signed_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="not signed"):
        verify_bundle(_bundle(tmp_path / "u.tar.gz", FILES, signer=None))
    other = Ed25519PrivateKey.generate()
    with pytest.raises(BundleError, match=f"{MANIFEST} is not signed by key"):
        verify_bundle(_bundle(tmp_path / "o.tar.gz", FILES, signer=other))
    # re-signed with another key and carrying that key: consistent in itself, refused by the fleet key
    pem = tmp_path / "fleet.pem"
    pem.write_bytes(KEY_PEM)
    theirs = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    resigned = _bundle(tmp_path / "r.tar.gz", {**FILES, PUBLIC_KEY: theirs}, signer=other)
    assert verify_bundle(resigned)["version"] == "0.1.0-abc"
    with pytest.raises(BundleError, match=f"not signed by key .*{pem}"):
        verify_bundle(resigned, pem)


@pytest.mark.parametrize("words", NOT_FILES)
def test_a_member_that_is_neither_a_file_nor_a_directory_is_refused(tmp_path, words):
    kind = NOT_FILES[words]
    """install.sh extracts with tar: a link in a bundle could point an installed file anywhere."""
    evil = _entry(_member(f"{TOP}/wheels/evil.whl", kind, "/etc/shadow" if kind == tarfile.SYMTYPE else "x"))
    with pytest.raises(BundleError, match=f"evil.whl: a {words}"):
        verify_bundle(_bundle(tmp_path / "b.tar.gz", FILES, (evil,)))


def test_a_sparse_member_is_refused(tmp_path):
    """A pax GNU sparse 1.0 member, listed with the hash of its expanded content: only its type can refuse it."""
    info = _member(f"{TOP}/wheels/evil.whl")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1024"}
    sparse = _entry(info, b"1\n512\n512\n".ljust(tarfile.BLOCKSIZE, b"\0") + b"x" * 512)
    listed = _manifest({**FILES, "wheels/evil.whl": bytes(512) + b"x" * 512})
    with pytest.raises(BundleError, match="evil.whl: a sparse file"):
        verify_bundle(_bundle(tmp_path / "b.tar.gz", FILES, (sparse,), listed))


@pytest.mark.parametrize("name", [f"{TOP}/../evil", "../evil", "/etc/evil", "elsewhere/evil", "evil"])
def test_a_member_outside_the_top_directory_is_refused(tmp_path, name):
    """Listed in the manifest under the name the old check derived, so only the path check refuses it."""
    evil = _entry(_member(name), b"x")
    listed = _manifest({**FILES, name.removeprefix(f"{TOP}/"): b"x"})
    with pytest.raises(BundleError, match=f"{name}: not under {TOP}/"):
        verify_bundle(_bundle(tmp_path / "b.tar.gz", FILES, (evil,), listed))


def test_an_oversized_manifest_or_env_is_refused(tmp_path):
    """Padded with blank lines, which the manifest parser skips, so only the size bound refuses them."""
    padding = b"\n" * (MAX_BUNDLE_TEXT_BYTES + 1)
    with pytest.raises(BundleError, match=f"{MANIFEST}: .* bytes"):
        verify_bundle(_bundle(tmp_path / "m.tar.gz", FILES, manifest=_manifest(FILES) + padding))
    with pytest.raises(BundleError, match="bundle.env: .* bytes"):
        verify_bundle(_bundle(tmp_path / "e.tar.gz", {**FILES, "bundle.env": ENV + padding}))


@pytest.mark.parametrize("manifest", [b"no two spaces here\n", b"\xff\xfe\n"], ids=["line", "utf8"])
def test_a_malformed_manifest_is_a_bundle_error(tmp_path, manifest):
    with pytest.raises(BundleError):
        verify_bundle(_bundle(tmp_path / "b.tar.gz", FILES, manifest=manifest))


# ---- install.sh on real bundles ---------------------------------------------------------------


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A real bundle from build_bundle with no pinned wheels (``requirements`` stubbed to none, a
    stand-in devft-edge wheel): everything else, config, scripts, manifest and signature, is real."""
    root = tmp_path_factory.mktemp("signed")
    private, public = generate_keypair(root / "keys")
    device_key = identity("pi-1", root / "device_keys")

    def stub_wheel(directory: Path) -> Path:
        wheel = directory / "devft_edge-0.0.0-py3-none-any.whl"
        wheel.write_bytes(b"PK not installed by these tests")
        return wheel

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bundle_module, "requirements", lambda backend, platform=None: [])
        patch.setattr(bundle_module, "build_agent_wheel", stub_wheel)
        spec = BundleSpec(device_id="pi-1", broker="mqtt://10.0.0.1", public_key=public, device_key=device_key)
        info = build_bundle(spec, root / "pi-1.tar.gz", wheel_cache=root / "wheels")
    return {"info": info, "private": private, "public": public, "spec": spec, "root": root}


def _extract(bundle: Path, where: Path) -> Path:
    with tarfile.open(bundle, "r:gz") as tar:
        tar.extractall(where, filter="tar")
    return where / TOP


def _install_sh(top: Path, prefix: Path, *options: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """install.sh as a device runs it (a full install unless ``--verify-only``; never gets past the
    checks here: the stand-in wheel would fail pip)."""
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    command = ["sh", str(top / "install.sh"), "--prefix", str(prefix), "--service", "none", *options]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def _resign(top: Path, key: Ed25519PrivateKey, carry_key: bool) -> None:
    """Rewrite the manifest of an extracted bundle and sign it with ``key`` (and ship ``key``'s
    public half as the bundle's key when ``carry_key``): what someone holding another key can do."""
    if carry_key:
        (top / PUBLIC_KEY).write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    (top / MANIFEST).write_text(bundle_module._digest_lines(top))
    (top / SIGNATURE).write_bytes(key.sign((top / MANIFEST).read_bytes()))


def _refused(done: subprocess.CompletedProcess[str], prefix: Path, words: str) -> None:
    assert done.returncode == 3, done.stderr
    assert "bundle verification failed" in done.stderr and words in done.stderr, done.stderr
    assert not prefix.exists()  # nothing was written


def test_a_signed_bundle_passes_install_sh_verification(signed, tmp_path):
    info = signed["info"]
    assert info.key_sha256 == key_sha256(load_public_key(signed["public"]))
    assert verify_bundle(info.path, signed["public"])["device_id"] == "pi-1"
    top = _extract(info.path, tmp_path)
    assert (top / SIGNATURE).stat().st_size == 64 and SIGNATURE not in (top / MANIFEST).read_text()
    done = _install_sh(top, tmp_path / "device", "--verify-only")
    assert done.returncode == 0 and "verified" in done.stdout, done.stderr
    assert "first install, no --key-sha256: trusting the bundle's own key" in done.stderr
    pinned = _install_sh(top, tmp_path / "device", "--verify-only", "--key-sha256", info.key_sha256)
    assert pinned.returncode == 0 and info.key_sha256 in pinned.stdout and not pinned.stderr, pinned.stderr
    assert not (tmp_path / "device").exists()


def test_an_unsigned_bundle_is_refused(signed, tmp_path):
    top = _extract(signed["info"].path, tmp_path)
    (top / SIGNATURE).unlink()
    _refused(_install_sh(top, tmp_path / "device"), tmp_path / "device", "not signed")


def test_a_bundle_signed_by_another_key_is_refused(signed, tmp_path):
    top = _extract(signed["info"].path, tmp_path)
    _resign(top, Ed25519PrivateKey.generate(), carry_key=False)
    _refused(_install_sh(top, tmp_path / "device"), tmp_path / "device", "not signed by the key this device trusts")


def test_a_bundle_resigned_with_another_key_it_carries_is_refused_by_a_pin_or_an_installed_key(signed, tmp_path):
    """Only a first install with no pin trusts the bundle's own key (trust on first use)."""
    top = _extract(signed["info"].path, tmp_path)
    _resign(top, Ed25519PrivateKey.generate(), carry_key=True)
    pin = signed["info"].key_sha256
    _refused(_install_sh(top, tmp_path / "device", "--key-sha256", pin), tmp_path / "device", "--key-sha256 pins")
    installed = tmp_path / "upgraded"  # a device whose agent trusts the fleet key already
    (installed / "versions" / "1" / "etc").mkdir(parents=True)
    shutil.copyfile(signed["public"], installed / "versions" / "1" / "etc" / "public.pem")
    (installed / "current").symlink_to("versions/1")
    before = sorted(p.relative_to(installed) for p in installed.rglob("*"))
    done = _install_sh(top, installed)
    assert done.returncode == 3 and "not signed by the key this device trusts" in done.stderr, done.stderr
    assert sorted(p.relative_to(installed) for p in installed.rglob("*")) == before
    assert _install_sh(top, tmp_path / "fresh", "--verify-only").returncode == 0


def test_an_altered_manifest_is_refused(signed, tmp_path):
    top = _extract(signed["info"].path, tmp_path)
    (top / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    with (top / MANIFEST).open("a") as manifest:  # listed, so only the signature can refuse it
        manifest.write(f"{hashlib.sha256(b'PK').hexdigest()}  ./wheels/evil-1.0-py3-none-any.whl\n")
    _refused(_install_sh(top, tmp_path / "device"), tmp_path / "device", "not signed by the key")


@pytest.mark.parametrize("member", ["config/agent.yaml.in", "install.sh", "wheels/devft_edge-0.0.0-py3-none-any.whl"])
def test_an_altered_member_is_refused(signed, tmp_path, member):
    """The signature still verifies; the signed manifest's sha256 catches the member."""
    top = _extract(signed["info"].path, tmp_path)
    with (top / member).open("ab") as file:
        file.write(b"\n# one more line\n")
    _refused(_install_sh(top, tmp_path / "device"), tmp_path / "device", "does not match MANIFEST.sha256")


def test_an_openssl_older_than_3_is_refused_with_the_reason(signed, tmp_path):
    """OpenSSL 1.1 cannot check an Ed25519 signature over a file (no -rawin): refuse, saying so."""
    top = _extract(signed["info"].path, tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "openssl").write_text('#!/bin/sh\necho "OpenSSL 1.1.1w  11 Sep 2023"\n')
    (fake / "openssl").chmod(0o755)
    done = _install_sh(top, tmp_path / "device", path=f"{fake}:{os.environ['PATH']}")
    _refused(done, tmp_path / "device", "OpenSSL 3.0 or later")


def test_build_refuses_a_signing_key_that_is_not_the_devices_trust_anchor(signed, tmp_path):
    spec = signed["spec"]
    _, other_public = generate_keypair(tmp_path / "other")
    with pytest.raises(BundleError, match="not the private half of --public-key"):
        build_bundle(
            BundleSpec(**{**spec.__dict__, "public_key": other_public, "signing_key": signed["private"]}),
            tmp_path / "x.tar.gz",
        )
    lone = tmp_path / "lone" / "public.pem"
    lone.parent.mkdir()
    shutil.copyfile(signed["public"], lone)
    with pytest.raises(BundleError, match="--signing-key"):
        build_bundle(BundleSpec(**{**spec.__dict__, "public_key": lone}), tmp_path / "y.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists() and not (tmp_path / "y.tar.gz").exists()
