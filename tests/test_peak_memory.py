"""Peak memory: resetting the high-water mark separates one phase's peak from the process's; the
sampler tells anonymous memory from file-backed pages."""

from __future__ import annotations

import mmap
import sys
import time
from pathlib import Path

import pytest

from devft_edge.peak_memory import RssSampler, peak_bytes, reset_peak, status_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux only")
def test_a_reset_forgets_an_earlier_peak() -> None:
    block = bytearray(256 * 2**20)  # resident: bytearray writes zeros into every page
    before = peak_bytes()
    assert before >= status_bytes("VmRSS") - 2**20 >= len(block) - 2**20  # the mark may lag a few pages
    del block
    assert reset_peak()
    after = peak_bytes()
    assert after <= before - 200 * 2**20  # the freed block no longer counts
    assert after >= status_bytes("VmRSS") - 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and RssFile are Linux's")
def test_the_sampler_tells_anonymous_from_file_backed_growth(tmp_path: Path) -> None:
    mib = 2**20
    data = tmp_path / "blob"
    data.write_bytes(b"\x01" * (96 * mib))
    anon0, file0 = status_bytes("RssAnon"), status_bytes("RssFile")
    with RssSampler(interval=0.01) as rss:
        block = bytearray(160 * mib)  # anonymous, every page written
        time.sleep(0.2)
        del block
        with data.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            assert sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE)) == len(mapped) // mmap.PAGESIZE
            time.sleep(0.2)
    assert rss.anon >= anon0 + 150 * mib  # the freed block's peak was seen
    assert rss.file >= file0 + 90 * mib  # the mapped file's pages counted as file-backed, not anonymous
    assert rss.anon < anon0 + 150 * mib + 90 * mib
