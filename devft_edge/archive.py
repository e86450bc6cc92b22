"""What kind of tar member a reader is looking at, before it reads a byte of it.

Packs and bundles accept plain files (and bundles directories) only. ``tarfile`` counts GNU sparse
members (type ``S``, or pax ``GNU.sparse.*`` keys) as regular files, yet a few KB of them expand to
gigabytes of holes, and links or devices would reach outside the directory being written; so both
readers ask here first.
"""

from __future__ import annotations

import tarfile

_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
    tarfile.DIRTYPE: "directory",
    tarfile.CONTTYPE: "contiguous file",
}
PLAIN_FILE = "plain file"


def member_kind(info: tarfile.TarInfo) -> str:
    """``plain file`` for a regular file that is not sparse; otherwise what it is, in words."""
    if info.sparse is not None or any(key.startswith("GNU.sparse") for key in info.pax_headers):
        return "sparse file"
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return PLAIN_FILE
    return _KINDS.get(info.type, f"member of type {info.type!r}")
