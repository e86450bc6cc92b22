"""The memory limit a process really has (cgroup v1 and v2), read from fake /sys trees and the
real one, and a profile capped to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devft_edge.device_probe import capped_profile, memory_limit_bytes
from devft_edge.profiles import load_profile, parse_profile

V1_UNLIMITED = "9223372036854771712"  # what v1 prints for no limit (2**63 - 1 rounded down to a page)
MIB = 2**20


def _tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake ``/proc/self/cgroup`` and ``/sys/fs/cgroup`` under ``tmp_path``."""
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    root.mkdir(exist_ok=True)
    (tmp_path / "cgroup").write_text(proc)
    return tmp_path / "cgroup", root


V1_PROC = "9:name=systemd:/\n4:memory:/agents/pi\n3:cpuset:/\n0::/\n"


@pytest.mark.parametrize(
    ("files", "want"),
    [
        ({"memory/agents/pi/memory.limit_in_bytes": str(600 * MIB)}, 600 * MIB),
        ({"memory/agents/pi/memory.limit_in_bytes": V1_UNLIMITED}, None),
        (  # an ancestor's lower limit, as memory.stat reports it
            {
                "memory/agents/pi/memory.limit_in_bytes": V1_UNLIMITED,
                "memory/agents/pi/memory.stat": f"cache 0\nhierarchical_memory_limit {400 * MIB}\n",
            },
            400 * MIB,
        ),
        (  # the group's own limit under an unlimited hierarchy
            {
                "memory/agents/pi/memory.limit_in_bytes": str(700 * MIB),
                "memory/agents/pi/memory.stat": f"hierarchical_memory_limit {V1_UNLIMITED}\n",
            },
            700 * MIB,
        ),
        ({"memory/memory.limit_in_bytes": str(300 * MIB)}, 300 * MIB),  # a container: its group is the mount root
        ({}, None),  # no memory controller mounted
    ],
    ids=["v1-limit", "v1-unlimited", "v1-ancestor", "v1-own", "v1-container-root", "v1-unmounted"],
)
def test_cgroup_v1_limits(tmp_path, files, want) -> None:
    assert memory_limit_bytes(*_tree(tmp_path, V1_PROC, files)) == want


V2_PROC = "0::/system.slice/agent.service\n"


@pytest.mark.parametrize(
    ("files", "want"),
    [
        ({"system.slice/agent.service/memory.max": str(512 * MIB)}, 512 * MIB),
        ({"system.slice/agent.service/memory.max": "max"}, None),
        (  # the slice limits the service
            {"system.slice/agent.service/memory.max": "max", "system.slice/memory.max": str(256 * MIB)},
            256 * MIB,
        ),
        (
            {"system.slice/agent.service/memory.max": str(128 * MIB), "system.slice/memory.max": str(256 * MIB)},
            128 * MIB,
        ),
        ({"memory.max": str(200 * MIB)}, 200 * MIB),  # a container (cgroupns): its group is the root
        ({"system.slice/agent.service/cgroup.procs": "1"}, None),  # no memory controller enabled there
    ],
    ids=["v2-limit", "v2-max", "v2-ancestor", "v2-own", "v2-container-root", "v2-no-controller"],
)
def test_cgroup_v2_limits(tmp_path, files, want) -> None:
    assert memory_limit_bytes(*_tree(tmp_path, V2_PROC, files)) == want


def test_no_cgroup_file_or_nonsense_means_no_limit(tmp_path) -> None:
    assert memory_limit_bytes(tmp_path / "absent", tmp_path) is None
    proc, root = _tree(tmp_path, "garbage\n4:memory:/g\n", {"memory/g/memory.limit_in_bytes": "lots"})
    assert memory_limit_bytes(proc, root) is None


def test_the_real_limit_reads() -> None:
    """On this machine: a positive number of bytes, or None (no limit)."""
    limit = memory_limit_bytes()
    assert limit is None or limit > 0


V1_MEMORY = Path("/sys/fs/cgroup/memory")


def test_a_real_v1_group_limit_is_what_a_process_in_it_reads(tmp_path) -> None:
    """A child of this process's own v1 memory group with a limit; a process started in it reads
    that limit (as the kernel rounded it to a page)."""
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if "memory" in line.split(":")[1].split(",")), None)  # fmt: skip
    parent = V1_MEMORY / own.strip("/") if own is not None else None
    if os.geteuid() != 0 or parent is None or not os.access(parent, os.W_OK):
        pytest.skip("needs root and a writable cgroup v1 memory controller")
    group = parent / f"devft-probe-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(900 * MIB + 123))
        set_to = int((group / "memory.limit_in_bytes").read_text())
        code = "from devft_edge.device_probe import memory_limit_bytes; print(memory_limit_bytes())"
        script = f'echo $$ > {group}/cgroup.procs && exec "{sys.executable}" -c "{code}"'
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, check=True)
        assert int(out.stdout) == set_to and 900 * MIB - 4096 < set_to <= 900 * MIB + 123
    finally:
        group.rmdir()


def test_a_profile_is_capped_to_the_limit_and_the_aggregator_reads_the_same_budget() -> None:
    profile = load_profile("rpi5-8gb")  # 7.30 GiB usable
    assert capped_profile(profile, None) is profile
    assert capped_profile(profile, profile.budget_bytes) is profile
    assert capped_profile(profile, 64 * 2**30) is profile
    for limit in (600 * MIB, 600 * MIB + 1, 3 * 2**30 - 4096, 4096 * 5):
        capped = capped_profile(profile, limit)
        assert limit - 16 <= capped.budget_bytes <= limit
        assert (
            capped.memory.total_gb == profile.memory.total_gb and capped.memory.reserved_gb > profile.memory.reserved_gb
        )
        assert "cgroup" in capped.sources["reserved"]
        # what the hello carries, validated as the aggregator does: the same budget
        again = parse_profile(capped.model_dump(mode="json", exclude={"name"}), "pi", "<hello>")
        assert again.budget_bytes == capped.budget_bytes


def test_a_runtime_probe_that_fails_says_why(monkeypatch) -> None:
    """``devft-edge profile`` on a device whose runtime does not import gets the probe's error, not
    a traceback about parsing its output."""
    from devft_edge.device_probe import runtime_bytes
    from devft_edge.errors import DevFTError

    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(DevFTError, match="runtime probe failed"):
        runtime_bytes()
