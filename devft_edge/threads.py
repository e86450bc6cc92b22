"""Threading of torch's CPU work when the cores are shared with other processes.

torch's CPU kernels run on GNU OpenMP (``libgomp``), whose idle worker threads busy-wait (spin)
for a while after every parallel region before they sleep. Alone on the cores that saves a wake-up;
beside another CPU-bound process the spinning threads burn the time slices the other process, and
this one's own working thread, need, and small training steps (many short parallel regions) slow
down far beyond a fair share (see ``docs/system_benchmarks.md``, "A shared CPU").

:func:`configure_threads` sets the OpenMP environment defaults (only where the user has not set
them) and, when asked, torch's thread count. libgomp reads its environment once, when it is loaded
(on ``import torch``), so the environment part only takes effect when this runs before torch is
imported in the process; the thread count works at any time.
"""

from __future__ import annotations

import os
import sys

DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""OpenMP environment defaults: idle threads sleep instead of spinning."""


def configure_threads(threads: int | None = None, environ: dict[str, str] | None = None) -> bool:
    """Set the OpenMP defaults where unset and, if ``threads`` is given, torch's thread count.

    Args:
        threads: torch intra-op threads (None: leave torch's default, all cores).
        environ: the environment to update (default: ``os.environ``; tests pass a dict).

    Returns:
        Whether the environment can still take effect: False when torch was already imported, so
        libgomp has read its settings already (the thread count is applied either way).
    """
    env = os.environ if environ is None else environ
    in_time = "torch" not in sys.modules
    for name, value in DEFAULTS.items():
        env.setdefault(name, value)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return in_time
