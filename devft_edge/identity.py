"""Device identities: each device's ed25519 key, enrolled with the fleet by its public half.

The broker's ACL (``broker-config``) keeps a device on its own topics, but the embedded broker and
any anonymous broker let every client publish anywhere. So the application authenticates too:
every device message is sealed with the device's own key (:func:`devft_edge.protocol.seal`), and
the aggregator verifies the seal with the key enrolled for the device id in the topic before it
parses a byte of the message. A device id without an enrolled key is refused outright.

Enrolment is a file: ``<device_keys>/<device-id>.pem`` holds the device's public key. ``flash``
and ``enroll`` write it, and keep the device's private key beside it on the operator's machine
(``<device_keys>/private/<device-id>/private.pem``, mode 0600) so a re-flash installs the same
identity; on the device it is a bundle secret (mode 0600). The aggregator reads an enrolment on
first contact, so a device enrolled while the aggregator runs joins without a restart; a re-keyed
device needs an aggregator restart (known keys are cached).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

from devft_edge.errors import ConfigError
from devft_edge.protocol import DEVICE_ID
from devft_edge.signing import PRIVATE_FILE, Ed25519PublicKey, fingerprint, generate_keypair, load_public_key

RECHECK_S = 10.0
"""How often the aggregator looks again for the key file of a device id it did not find: a flood
of messages from unknown ids costs one ``stat`` per id per interval, not one per message."""
MAX_UNKNOWN = 4096
"""Unknown device ids remembered (least recently seen dropped first), so the negative cache is bounded."""


class Enrolment:
    """The enrolled device keys of one fleet, read from a directory on demand."""

    def __init__(self, directory: str | Path, recheck_s: float = RECHECK_S) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(
                f"device_keys {self.directory}: no such directory (enrol devices with `devft-edge enroll`)"
            )
        self.recheck_s = recheck_s
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._order: dict[str, int] = {}

    def key(self, device_id: str, clock: float | None = None) -> Ed25519PublicKey | None:
        """The enrolled public key of ``device_id``, or None when it is not enrolled (or its file is unusable)."""
        if device_id in self._keys:
            return self._keys[device_id]
        clock = time.monotonic() if clock is None else clock
        checked = self._unknown.get(device_id)
        if checked is not None and clock - checked < self.recheck_s:
            self._unknown.move_to_end(device_id)
            return None
        path = self.directory / f"{device_id}.pem"
        key = None
        if DEVICE_ID.fullmatch(device_id) and path.is_file():
            try:
                key = load_public_key(path)
            except ConfigError:
                key = None
        if key is None:
            self._unknown[device_id] = clock
            self._unknown.move_to_end(device_id)
            while len(self._unknown) > MAX_UNKNOWN:
                self._unknown.popitem(last=False)
            return None
        self._unknown.pop(device_id, None)
        self._keys[device_id] = key
        return key

    def index(self, device_id: str) -> int:
        """``device_id``'s position among the enrolled ids in natural order: its client index, which
        seeds its training the way the simulator seeds client ``index``'s (the listing is re-read
        only for an id it does not hold)."""
        from devft_edge.selection import natural_key

        if device_id not in self._order:
            ids = (p.stem for p in self.directory.glob("*.pem"))
            self._order = {d: i for i, d in enumerate(sorted(ids, key=natural_key))}
        return self._order.get(device_id, len(self._order))


def enroll(device_id: str, device_keys: str | Path, identity_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Create ``device_id``'s key pair in ``identity_dir`` and enrol its public key in ``device_keys``.

    ``identity_dir`` defaults to ``<device_keys>/private/<device-id>``. Returns (the device's
    private key, its enrolment file). Refuses to replace an existing enrolment: re-keying a device
    is a deliberate act (delete the old file first).
    """
    if not DEVICE_ID.fullmatch(device_id):
        raise ConfigError(f"device id {device_id!r} must match {DEVICE_ID.pattern}")
    device_keys = Path(device_keys)
    enrolled = device_keys / f"{device_id}.pem"
    if enrolled.exists():
        raise ConfigError(f"{device_id} is already enrolled ({enrolled}); remove that file to re-key the device")
    if identity_dir is None:
        (device_keys / "private").mkdir(mode=0o700, parents=True, exist_ok=True)  # private keys: owner only
        identity_dir = device_keys / "private" / device_id
    private, public = generate_keypair(identity_dir)
    device_keys.mkdir(parents=True, exist_ok=True)
    enrolled.write_bytes(public.read_bytes())
    return private, enrolled


def identity(device_id: str, device_keys: str | Path) -> Path:
    """The private key of ``device_id`` kept by :func:`enroll`, enrolling the device first if it is new."""
    device_keys = Path(device_keys)
    private = device_keys / "private" / device_id / PRIVATE_FILE
    if private.is_file():
        return private
    if (device_keys / f"{device_id}.pem").exists():
        raise ConfigError(
            f"{device_id} is enrolled in {device_keys} but its private key {private} is gone; "
            f"remove {device_keys / (device_id + '.pem')} to give the device a new identity"
        )
    return enroll(device_id, device_keys)[0]


def describe(path: str | Path) -> str:
    """``<file> (key id <fingerprint>)`` of an enrolled public key, for logs and CLI output."""
    return f"{path} (key id {fingerprint(load_public_key(path))})"
