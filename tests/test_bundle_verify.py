"""verify_bundle on hand-made bundles: links, devices, sparse files, paths outside the top directory
and oversized text members are refused; a clean bundle verifies (real bundles need pip: test_flash)."""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from pathlib import Path

import pytest

from devft_edge.ops.bundle import MANIFEST, MAX_BUNDLE_TEXT_BYTES, TOP, BundleError, verify_bundle

ENV = b"version=0.1.0-abc\nplatform=linux_aarch64\n"
FILES = {"bundle.env": ENV, "install.sh": b"#!/bin/sh\n", "wheels/a-1.0-py3-none-any.whl": b"PK"}
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


def _bundle(path: Path, files: dict[str, bytes], extra: tuple[bytes, ...] = (), manifest: bytes | None = None) -> Path:
    """A bundle laid out as build_bundle lays it out: ``TOP/`` holding ``files``, the ``extra`` raw
    members and a MANIFEST.sha256 (by default, the one listing ``files``)."""
    entries = [_entry(_member(TOP, tarfile.DIRTYPE)), _entry(_member(f"{TOP}/wheels", tarfile.DIRTYPE))]
    entries += [_entry(_member(f"{TOP}/{name}"), data) for name, data in files.items()]
    entries += [*extra, _entry(_member(f"{TOP}/{MANIFEST}"), _manifest(files) if manifest is None else manifest)]
    path.write_bytes(gzip.compress(b"".join(entries) + bytes(2 * tarfile.BLOCKSIZE)))
    return path


def test_a_clean_bundle_verifies(tmp_path):
    assert verify_bundle(_bundle(tmp_path / "b.tar.gz", FILES)) == {"version": "0.1.0-abc", "platform": "linux_aarch64"}


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
