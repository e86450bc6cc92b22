"""Measure the machine this runs on and describe it as a device profile.

``devft-edge profile`` (and a device agent joining a fleet) reports what the device really has:
total and available memory from ``/proc/meminfo``, CPU cores and model, architecture, a CUDA
accelerator if torch sees one, a short fp32 matmul probe for the sustained throughput the
planner's step-time estimate divides by, and the resident memory of the training runtime itself
(:func:`runtime_bytes`), which differs by platform and which the memory model otherwise takes from
its calibration machine. Optionally it also measures the peak memory of a real
training step (:mod:`devft_edge.memcheck`), which the planner can be checked against.

What cannot be measured quickly is estimated and the ``sources`` section says so: reserved
memory is what the OS and other processes use right now (total - available) plus a margin, and
link speeds are placeholders until the agent measures a transfer.

What the process may really use can be less than the machine has: :func:`memory_limit_bytes`
reads the memory cgroup limit (v1 or v2) it runs under, and :func:`capped_profile` lowers a
profile's usable memory to it (what a device agent declares in its hello).
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

from devft_edge.errors import DevFTError
from devft_edge.profiles import GB, DeviceProfile, parse_profile

RESERVE_MARGIN_GB = 0.25
"""Headroom added to what is in use now, for the agent's own services and page cache."""
UNLIMITED_BYTES = 1 << 60
"""At or above this a cgroup v1 limit means none: v1 prints "unlimited" as about 2**63 (rounded
down to a page); cgroup v2 prints ``max``."""


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values


def memory_limit_bytes(
    proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup"
) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None when nothing limits it.

    cgroup v1 (the ``memory`` controller's line of ``/proc/self/cgroup``): the group's
    ``memory.limit_in_bytes`` and, lower when an ancestor limits it, ``hierarchical_memory_limit``
    from its ``memory.stat``. cgroup v2 (the ``0::`` line): the lowest ``memory.max`` of the group
    and its ancestors. Where both are mounted the lower limit found counts (the controller is on one
    of them only). A group path the mount does not show (a container whose own group is mounted
    as the root) is read at the mount's root. ``proc_cgroup`` and ``root`` are for tests.
    """
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    groups = {}  # controller list -> group path
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        groups[controllers] = path.strip("/")
    limits: list[int] = []
    v1 = next((path for controllers, path in groups.items() if "memory" in controllers.split(",")), None)
    if v1 is not None:
        mount = root / "memory"
        group = mount / v1 if (mount / v1).is_dir() else mount
        limits.append(_number(_read_text(group / "memory.limit_in_bytes")))
        for line in _read_text(group / "memory.stat").splitlines():
            if line.startswith("hierarchical_memory_limit "):
                limits.append(_number(line.split()[1]))
    if "" in groups:
        path = Path(groups[""])
        group = root / path if (root / path).is_dir() else root
        while True:  # the group and each ancestor below the root (the root has no memory.max)
            limits.append(_number(_read_text(group / "memory.max")))
            if group == root:
                break
            group = group.parent
    found = [limit for limit in limits if 0 < limit < UNLIMITED_BYTES]
    return min(found) if found else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _number(text: str) -> int:
    """A limit as written in a cgroup file; 0 (no limit) for ``max``, an absent file or anything else."""
    text = text.strip()
    return int(text) if text.isdigit() else 0


def capped_profile(profile: DeviceProfile, limit_bytes: int | None) -> DeviceProfile:
    """``profile`` with its usable memory (``total_gb - reserved_gb``, what the planner admits a
    stage by) no more than ``limit_bytes``, the memory cgroup limit of the process that trains.

    ``reserved_gb`` is raised (the machine's total stays what it is) and ``sources.reserved`` says
    why; a profile within the limit, or no limit (None), is returned unchanged.
    """
    if limit_bytes is None or profile.budget_bytes <= limit_bytes:
        return profile
    total = profile.memory.total_gb
    reserved = total - limit_bytes / GB
    while int((total - reserved) * GB) > limit_bytes:  # float rounding must not leave it a byte over
        reserved = math.nextafter(reserved, total)
    note = f"raised to leave {limit_bytes / 2**20:.0f} MiB usable: the agent's memory cgroup limit"
    return profile.model_copy(
        update={
            "memory": profile.memory.model_copy(update={"reserved_gb": reserved}),
            "sources": {**profile.sources, "reserved": f"{profile.sources.get('reserved', '')}; {note}".lstrip("; ")},
        }
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(size: int = 1024, seconds: float = 2.0) -> float:
    """Sustained fp32 GEMM throughput: repeated ``size x size`` matmuls for about ``seconds``."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool and caches
    runs, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size**3 * runs / elapsed / 1e9


def _cuda() -> tuple[str | None, float | None]:
    """Compute capability and fp32 GEMM GFLOP/s of a CUDA device torch can use, else (None, None)."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    major, minor = torch.cuda.get_device_capability(0)
    size = 2048
    a, b = torch.randn(size, size, device="cuda"), torch.randn(size, size, device="cuda")
    torch.mm(a, b)
    torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        torch.mm(a, b)
        runs += 1
    torch.cuda.synchronize()
    return f"{major}.{minor}", 2 * size**3 * runs / (time.perf_counter() - start) / 1e9


RUNTIME_PROBE = (
    "import torch, transformers, peft; from devft_edge.peak_memory import status_bytes; print(status_bytes('RssAnon'))"
)
"""A fresh interpreter imports the training runtime and prints its anonymous resident bytes: the
file-backed part (the libraries' mapped pages) depends on the page cache, not on the platform
(the same venv measured 100 and 170 MiB of it, freshly installed or not)."""


def runtime_bytes() -> int | None:
    """Anonymous resident memory of a fresh Python process with torch, transformers and peft imported, as
    :data:`devft_edge.memory.RUNTIME_REFERENCE_BYTES` was measured; None where ``/proc`` is missing."""
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        return None
    done = subprocess.run([sys.executable, "-c", RUNTIME_PROBE], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DevFTError(f"the runtime probe failed (exit {done.returncode}): {done.stderr.strip()[-1000:]}")
    return int(done.stdout.split()[-1])


def measure_profile(
    name: str, probe_seconds: float = 2.0, storage_path: str | Path = ".", step_model: str | None = None
) -> DeviceProfile:
    """A validated profile of this machine (see the module docstring for what is measured).

    With ``step_model`` it also measures a real training step (the model's first DevFT stage of
    four, batch 4 x 64 tokens, fp32) in a fresh process and records it as ``measured_step``.
    """
    import shutil

    mem = _meminfo()
    total_gb = mem["MemTotal"] / GB
    in_use_gb = (mem["MemTotal"] - mem.get("MemAvailable", mem["MemFree"])) / GB
    reserved_gb = min(round(in_use_gb + RESERVE_MARGIN_GB, 2), round(total_gb * 0.9, 2))
    arch = platform.machine()
    arch = {"arm64": "aarch64", "AMD64": "x86_64"}.get(arch, arch)
    capability, cuda_gflops = _cuda()
    cpu_gflops = matmul_gflops(seconds=probe_seconds)
    backend = "cuda" if capability else "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    runtime = runtime_bytes()
    data = {
        "description": f"measured by devft-edge profile on {platform.node() or 'this machine'} "
        f"({time.strftime('%Y-%m-%d', time.gmtime())})",
        "memory": {
            "total_gb": round(total_gb, 2),
            "reserved_gb": reserved_gb,
            "shared_with_gpu": bool(capability),
            **({"runtime_mb": round(runtime / 2**20)} if runtime else {}),
        },
        "cpu": {"arch": arch, "cores": cores, "model": _cpu_model()},
        "accelerator": {"kind": "cuda", "compute_capability": capability} if capability else {"kind": "none"},
        "quantizations": ["none", "fp16", "bf16", "int8", "int4"] + (["nf4"] if capability else []),
        "compute": {"sustained_gflops": round(cuda_gflops or cpu_gflops, 1), "backend": backend},
        "storage_gb": round(shutil.disk_usage(storage_path).total / GB, 1),
        "network": {"uplink_mbps": 10.0, "downlink_mbps": 10.0},
        "sources": {
            "memory": "measured: /proc/meminfo MemTotal",
            "reserved": f"measured: MemTotal - MemAvailable at profiling time + {RESERVE_MARGIN_GB} GiB margin",
            "runtime": "measured: RssAnon of a fresh interpreter with torch, transformers and peft imported"
            if runtime
            else "not measured (no /proc): the planner assumes its calibration machine's",
            "cpu": "measured: /proc/cpuinfo, usable cores from the scheduler affinity mask",
            "compute": f"measured: fp32 {'CUDA' if capability else 'CPU'} matmul probe ({probe_seconds:.0f} s)"
            + (f"; CPU probe {cpu_gflops:.1f} GFLOP/s" if capability else ""),
            "storage": f"measured: size of the file system holding {Path(storage_path).resolve()}",
            "network": "placeholder: not measured by the profiler; edit, or let the agent measure transfers",
        },
    }
    if step_model:
        data["measured_step"] = measure_step(step_model)
        data["sources"]["measured_step"] = "measured: devft_edge.memcheck in a fresh process"
    return parse_profile(data, name, f"<measured profile {name}>")


def measure_step(model: str, batch: int = 4, seq: int = 64) -> dict[str, object]:
    """Peak memory and time of one training step of ``model``'s first stage (S=4) on this machine."""
    from devft_edge.layers import num_layers
    from devft_edge.memcheck import measure_stages
    from devft_edge.models import load_config
    from devft_edge.quantization import QuantSpec
    from devft_edge.schedule import StageSchedule

    layers = StageSchedule(num_layers(load_config(model)), 4, 4).capacities[0]
    (result,) = measure_stages(model, [layers], QuantSpec("none"), batch, seq)
    return {
        "model": model,
        "layers": layers,
        "batch": batch,
        "seq": seq,
        "quant": "none",
        "peak_bytes": result.train_peak_bytes,
        "step_seconds": round(result.step_seconds, 4),
    }
