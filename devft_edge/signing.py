"""Ed25519 keys and signatures for packs and agent bundles.

The aggregator signs every pack's manifest with its private key; a device is provisioned with the
matching public key (by ``devft-edge flash``) and refuses any pack whose manifest signature does
not verify. ``flash`` signs each agent bundle's manifest with the same key, and the bundle's
``install.sh`` checks it with ``openssl`` before it changes anything. Keys are PEM files: PKCS#8
for the private key (written owner-read-only), SubjectPublicKeyInfo for the public one, so
standard tools (``openssl pkey``, ``openssl pkeyutl -verify -rawin``) read them too.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from devft_edge.errors import ConfigError

PRIVATE_FILE = "private.pem"
PUBLIC_FILE = "public.pem"


def generate_keypair(directory: str | Path) -> tuple[Path, Path]:
    """Write a fresh ed25519 pair as ``private.pem`` (mode 0600) and ``public.pem``; refuses to overwrite."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_FILE, directory / PUBLIC_FILE
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite existing key files: {', '.join(existing)}")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an ed25519 private key PEM; a missing file or another key type is a :class:`ConfigError`."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read private key: {error.strerror}") from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path}: not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an ed25519 public key PEM; a missing file or another key type is a :class:`ConfigError`."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read public key: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(f"{path}: not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key


def public_key_from_pem(data: bytes, source: str) -> Ed25519PublicKey:
    """An ed25519 public key from PEM bytes (e.g. a bundle member, named ``source`` in errors)."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as error:
        raise ConfigError(f"{source}: not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{source}: not an ed25519 key ({type(key).__name__})")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte ed25519 signature of ``data``."""
    return key.sign(data)


def verifies(key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``data``."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def key_sha256(key: Ed25519PublicKey) -> str:
    """Hex sha256 of a public key's 32 raw bytes: what ``install.sh --key-sha256`` pins.

    A device computes the same with ``openssl pkey -pubin -outform DER | tail -c 32 | sha256sum``
    (an Ed25519 SubjectPublicKeyInfo is a 12-byte header and the raw key); :func:`fingerprint` is
    its first 16 digits.
    """
    import hashlib

    return hashlib.sha256(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def same_key(private: Ed25519PrivateKey, public: Ed25519PublicKey) -> bool:
    """Whether ``public`` is the public half of ``private``."""
    return key_sha256(private.public_key()) == key_sha256(public)


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short hex id of a public key (first 16 hex digits of the sha256 of its raw bytes), for logs."""
    import hashlib

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
