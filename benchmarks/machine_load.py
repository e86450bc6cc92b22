"""The machine's load while a benchmark runs.

The development machine is shared and noisy, so every benchmark records the load averages before
and after its run beside its figures: a ratio measured under load is read with that in mind.
"""

from __future__ import annotations

from pathlib import Path


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
