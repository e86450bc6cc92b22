"""The device runtime for CPU-only aarch64 boards: the linux_aarch64 bundle's wheels install there.

PyPI's aarch64 torch is a CUDA build from 2.11.0 on: its metadata requires cuda-toolkit and the
nvidia-* wheels on every Linux machine, so on a Raspberry Pi ``pip check`` fails and ``import
torch`` cannot load libcublasLt. ``requirements-linux_aarch64.txt`` keeps aarch64 devices on a
CPU-only torch; the x86 stack is untouched. The long test reads every wheel's METADATA and
evaluates its requirement markers as an aarch64 Linux CPython 3.11 would (``packaging.markers``):
no CUDA requirement, and every requirement met by the set itself (what the device's ``pip check``
does). It reads the wheel cache bundles use (downloading what is missing: network the first time).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from devft_edge.ops.bundle import default_wheel_cache, fetch_wheels, requirements

AARCH64 = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.2",
    "os_name": "posix",
    "platform_machine": "aarch64",
    "platform_python_implementation": "CPython",
    "platform_release": "6.6.51+rpt-rpi-2712",
    "platform_system": "Linux",
    "platform_version": "#1 SMP PREEMPT Debian 1:6.6.51-1+rpt3",
    "python_full_version": "3.11.2",
    "python_version": "3.11",
    "sys_platform": "linux",
    "extra": "",
}
"""Marker environment of a Raspberry Pi 5 on Raspberry Pi OS bookworm (Debian 12's Python 3.11.2)."""
CUDA = re.compile(r"^(nvidia-.*|cuda-.*|triton|pytorch-triton.*)$")
"""Distributions that only a CUDA build of torch requires."""


def _pins(lines: list[str]) -> dict[str, str]:
    return {canonicalize_name(line.partition("==")[0]): line.partition("==")[2] for line in lines}


def test_aarch64_devices_pin_a_cpu_only_torch_and_nothing_else_changes():
    x86, arm = _pins(requirements("torch", "linux_x86_64")), _pins(requirements("torch", "linux_aarch64"))
    assert x86 == _pins(requirements("torch"))  # the x86 stack is requirements.txt's, as before
    assert arm["torch"] == "2.10.0" and x86["torch"] == "2.13.0"
    assert {k for k in arm if arm[k] != x86[k]} == {"torch"} and arm.keys() == x86.keys()
    assert _pins(requirements("ort", "linux_aarch64"))["torch"] == "2.10.0"


def _requires(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        text = archive.read(metadata).decode()
    head = text.split("\n\n", 1)[0]
    return [
        Requirement(line.split(":", 1)[1].strip()) for line in head.splitlines() if line.startswith("Requires-Dist:")
    ]


@pytest.mark.long
def test_the_aarch64_bundles_wheels_need_no_cuda_and_satisfy_each_other():
    pins = requirements("torch", "linux_aarch64")
    wheels = fetch_wheels(pins, "linux_aarch64", "3.11", default_wheel_cache() / "linux_aarch64-cp311")
    have = {parse_wheel_filename(w.name)[0]: parse_wheel_filename(w.name)[1] for w in wheels}
    cuda, unmet = [], []
    for wheel in wheels:
        for requirement in _requires(wheel):
            if requirement.marker is not None and not requirement.marker.evaluate(AARCH64):
                continue  # an extra, or another platform's (torch 2.10's nvidia-* are x86_64 only)
            name = canonicalize_name(requirement.name)
            if CUDA.match(name):
                cuda.append(f"{wheel.name}: {requirement}")
            elif name not in have or not requirement.specifier.contains(have[name], prereleases=True):
                unmet.append(f"{wheel.name}: {requirement} (bundle has {have.get(name, 'none')})")
    assert cuda == [] and unmet == []
    torch = next(w for w in wheels if w.name.startswith("torch-"))
    assert "aarch64" in torch.name and "+cu" not in torch.name
