"""Resident memory of this process: its current size, its high-water mark, and resetting the mark.

Devices have 4-8 GB, so what a process *peaks* at decides whether a stage fits. The kernel keeps
the high-water mark of resident memory (``VmHWM``, what ``ru_maxrss`` and GNU ``time -v`` report)
and lets a process reset it (writing ``5`` to ``/proc/self/clear_refs``). Resetting separates one
phase's peak (loading a model, one training task) from the whole process's life, which is what
lets the planner's prediction for a stage be checked against the device that trained it.
Linux only: elsewhere :func:`reset_peak` says it could not and :func:`peak_bytes` falls back to
``ru_maxrss`` (the process's lifetime peak).
"""

from __future__ import annotations

import resource
from pathlib import Path

from devft_edge.errors import DevFTError

STATUS = Path("/proc/self/status")


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise DevFTError(f"{STATUS} has no {field}")


def peak_bytes() -> int:
    """Highest resident memory since the process started or the mark was last reset."""
    try:
        return status_bytes("VmHWM")
    except (OSError, DevFTError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak() -> bool:
    """Start a new high-water mark at the current resident size; False where the kernel cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
