"""Peak memory: resetting the high-water mark separates one phase's peak from the process's."""

from __future__ import annotations

import sys

import pytest

from devft_edge.peak_memory import peak_bytes, reset_peak, status_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux only")
def test_a_reset_forgets_an_earlier_peak() -> None:
    block = bytearray(256 * 2**20)  # resident: bytearray writes zeros into every page
    before = peak_bytes()
    assert before >= status_bytes("VmRSS") >= len(block)
    del block
    assert reset_peak()
    after = peak_bytes()
    assert after <= before - 200 * 2**20  # the freed block no longer counts
    assert after >= status_bytes("VmRSS") - 2**20
