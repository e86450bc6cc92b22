"""The aggregator's state directory: one aggregator at a time (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cloud_aggregator.state import lock_state_dir
from devft_edge.errors import ConfigError


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = lock_state_dir(tmp_path / "state")
    with pytest.raises(ConfigError, match=f"in use by another aggregator \\(pid {os.getpid()}\\)"):
        lock_state_dir(tmp_path / "state")
    first.close()
    lock_state_dir(tmp_path / "state").close()  # free again once the holder is gone


def test_the_lock_ends_with_the_process_even_killed(tmp_path):
    """A kill -9 leaves the lock file behind but not the lock: a restart must not be refused."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cloud_aggregator.state import lock_state_dir; "
            f"h = lock_state_dir({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=str(holder.pid)):
            lock_state_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_state_dir(tmp_path).close()
