"""``configure_threads``: OpenMP environment defaults where unset, the user's values kept, and
torch's thread count when asked (no timing: ``benchmarks/shared_cpu.py`` measures the effect)."""

from __future__ import annotations

import torch

from devft_edge.threads import DEFAULTS, configure_threads


def test_sets_defaults_where_unset() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    configure_threads(environ=env)
    assert env == {"PATH": "/bin", **DEFAULTS}
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_keeps_the_users_values() -> None:
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    configure_threads(environ=env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_reports_that_the_environment_is_too_late_once_torch_is_imported() -> None:
    # torch is imported in this process (above): libgomp has read its environment already
    assert configure_threads(environ={}) is False


def test_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        configure_threads(1, environ={})
        assert torch.get_num_threads() == 1
        configure_threads(None, environ={})  # None leaves torch's count alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
