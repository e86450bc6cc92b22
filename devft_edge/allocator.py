"""Keep a training process's resident memory close to what its tensors need, and predictable.

glibc's malloc serves allocations below a *dynamic* mmap threshold (it starts at 128 KiB and rises
up to 32 MiB as big blocks are freed) from its heap arenas, and a freed heap block stays resident
until an allocation that fits reuses it. A training step allocates and frees many activations, so
the heap keeps growing: on SmolLM2 stage submodels the measured peak RSS was up to 2.3x higher
than with the threshold fixed at 1 MiB (2026-11-29: 30 layers, batch 8 x 256 tokens with gradient
checkpointing, 5.4 GiB against 2.3 GiB; median 1.38x over 21 configurations). Fixed at 1 MiB, the
tensors below it still left holes: peaks up to 20% apart between runs of one configuration and
a memory model that missed by up to 13.5%. Fixed at glibc's own starting value, 128 KiB, the
peaks are 0.95x those at 1 MiB (median; 0.78x at 30 layers and 4 x 64), the same in every run
(largest spread 0.1%), and predicted within -0.9% / +4.2% (docs/memory_model.md); steps take
1.10x as long (median; 0.86-1.49x, most where many 128 KiB-1 MiB tensors now fault in fresh
pages: `benchmarks/memory_model.py heap`, 2026-11-30). ``DEVFT_EDGE_HEAP=1048576`` trades back.
The device agent and the memory probe call :func:`bound_heap` before loading a model, and so does
the aggregator service: there the freed memory of each stage build (deep copies, quantization,
packing) otherwise stayed resident by chance of allocation order, 1 to 97 MiB between two like
points of a run (benchmarks/adversarial.py, 1,000 messages; with a 1 MiB bound, +1 MiB in each run).
The in-process simulator does not (it measures speed, not memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from devft_edge.errors import ConfigError

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number from glibc's ``malloc.h``."""
MMAP_THRESHOLD_BYTES = 128 << 10
"""Allocations of at least this many bytes get their own mapping (glibc's own starting value,
held fixed instead of rising)."""


HEAP_ENV = "DEVFT_EDGE_HEAP"
"""``default`` keeps glibc's dynamic threshold, a number of bytes fixes that threshold instead
(for measurements and comparisons); unset: :data:`MMAP_THRESHOLD_BYTES`."""


def heap_setting() -> int | None:
    """The threshold :func:`bound_heap` fixes: from :data:`HEAP_ENV` when set, None for ``default``.

    Raises:
        ConfigError: the variable is neither ``default`` nor a whole number of bytes >= 1.
    """
    value = os.environ.get(HEAP_ENV)
    if value is None:
        return MMAP_THRESHOLD_BYTES
    if value == "default":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{HEAP_ENV} must be 'default' or a threshold in bytes, got {value!r}")
    return int(value)


def bound_heap() -> bool:
    """Fix glibc's mmap threshold (:func:`heap_setting`); returns False (and logs why) where that is not done."""
    threshold = heap_setting()
    if threshold is None:
        logger.info("%s=default: leaving the allocator's dynamic mmap threshold alone", HEAP_ENV)
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("no glibc mallopt here; heap growth is left to the platform allocator")
        return False
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) refused; peak memory may exceed the plan", threshold)
        return False
    return True
