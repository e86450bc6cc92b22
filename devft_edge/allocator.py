"""Keep a training process's resident memory close to what its tensors need.

glibc's malloc serves allocations below a *dynamic* mmap threshold (it rises up to 32 MiB as big
blocks are freed) from its heap arenas, and a freed heap block stays resident. A training step
allocates and frees many activations of 1-30 MiB, so the heap keeps growing: on SmolLM2 stage
submodels the measured peak RSS was up to 2.3x higher than with a fixed 1 MiB threshold (30
layers, batch 8 x 256 tokens with gradient checkpointing: 5.4 GiB against 2.3 GiB; median 1.38x
over 21 configurations; see docs/memory_model.md). With the threshold fixed, every larger tensor
is its own mapping that goes back to the OS when freed, at a cost of about 13% step time (median;
21-33% with gradient checkpointing: fresh mappings fault their pages in).
The device agent and the memory probe call :func:`bound_heap` before loading a model, and so does
the aggregator service: there the freed memory of each stage build (deep copies, quantization,
packing) otherwise stayed resident by chance of allocation order, 1 to 97 MiB between two like
points of a run (benchmarks/adversarial.py, 1,000 messages; with the bound, +1 MiB in each run).
The in-process simulator does not (it measures speed, not memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number from glibc's ``malloc.h``."""
MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations of at least this many bytes get their own mapping."""


HEAP_ENV = "DEVFT_EDGE_HEAP"
"""Set to ``default`` to keep glibc's dynamic threshold (for measurements and comparisons)."""


def bound_heap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; returns False (and logs why) where that is not done."""
    if os.environ.get(HEAP_ENV) == "default":
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
