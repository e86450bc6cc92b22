"""Resident memory of this process: its current size, its high-water mark, and resetting the mark.

Devices have 4-8 GB, so what a process *peaks* at decides whether a stage fits. The kernel keeps
the high-water mark of resident memory (``VmHWM``, what ``ru_maxrss`` and GNU ``time -v`` report)
and lets a process reset it (writing ``5`` to ``/proc/self/clear_refs``). Resetting separates one
phase's peak (loading a model, one training task) from the whole process's life, which is what
lets the planner's prediction for a stage be checked against the device that trained it.
:class:`RssSampler` splits a phase's peak into anonymous memory (what the planner models: weights,
activations, optimizer state) and file-backed pages (mapped libraries and files), which the
high-water mark cannot. Linux only: elsewhere :func:`reset_peak` says it could not and :func:`peak_bytes` falls back to
``ru_maxrss`` (the process's lifetime peak).
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path
from types import TracebackType

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


class RssSampler:
    """The largest ``RssAnon`` and ``RssFile`` seen while the context is open, sampled by a thread.

    The kernel's high-water mark counts both kinds together; when a device's peak departs from the
    planner's prediction, the split says whether the process's own allocations (anonymous) or the
    pages it maps from files grew. Sampling can miss a short spike between two samples, so the
    maxima are lower bounds; reading ``/proc/self/status`` every ``interval`` seconds costs well
    under a millisecond of CPU each time.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.anon = 0
        """Largest ``RssAnon`` sampled, bytes (0 where the kernel has no such field)."""
        self.file = 0
        """Largest ``RssFile`` sampled, bytes."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        """Read both fields once and keep the maxima."""
        try:
            self.anon = max(self.anon, status_bytes("RssAnon"))
            self.file = max(self.file, status_bytes("RssFile"))
        except (OSError, DevFTError):
            self._stop.set()  # not Linux, or an old kernel: nothing to sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
