"""The edge check: the agent installed and training on an emulated aarch64 userland (``make edge-check``).

What a Raspberry Pi owner's first run does, on this machine, under qemu-user emulation:

1. prerequisites: ``qemu-user-static``, ``binfmt-support``, ``debootstrap`` and ``mosquitto``
   from apt where missing; ``binfmt_misc`` mounted and ``qemu-aarch64`` registered;
2. an arm64 Debian 12 (bookworm) rootfs, built once with ``debootstrap --variant=minbase
   --include=python3,python3-venv`` and reused (``--rootfs``; about 15 minutes the first time);
3. the ``linux_aarch64`` bundle, built by ``devft-edge flash --bundle-only`` and signed with a
   fresh fleet key, copied into the rootfs and installed there by its own ``install.sh`` inside
   ``chroot`` with no network at all (``unshare --net``), ``pip check`` included, pinned to the
   fleet key; then ``import torch`` in the installed venv;
4. a broker (mosquitto) on loopback and an aggregator on the host; the installed agent starts
   inside the rootfs (the chroot shares the host's loopback) in a cgroup v1 memory group limited
   to its profile's budget (``rpi5-8gb``: total minus reserved), and one x86 agent on the host;
   a 2-stage tiny DevFT run with both devices in every round (``per_round`` = ``quorum`` = 2),
   then, with the same devices, the first stage of SmolLM2-135M (``stop_after`` 1);
5. ``devft-edge profile`` inside the rootfs; ``plan`` on the host must accept what it wrote;
6. checks: in each run every round holds an accepted update from the aarch64 device, no message
   was rejected, the run exported an adapter, the agent stayed under its cgroup limit; then
   writes what it measured (bundle size and build time, install time, emulated step time, the
   agent's peak in the cgroup against the planner's prediction) to ``--results`` (JSON) and
   ``docs/edge.md``.

Everything timed here runs under qemu on a shared machine: emulated step times are not a Pi's
speed (qemu-user translates every aarch64 instruction; NEON runs as scalar code), only evidence
that the agent trains there. Needs root (debootstrap, chroot, mount, cgroups). Exit 0 when every
check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APT = ("qemu-user-static", "binfmt-support", "debootstrap", "mosquitto")
SUITE = "bookworm"
DEVICE = "edge-pi"
"""The aarch64 device's id."""
X86_DEVICE = "edge-x86"
PROFILE = "rpi5-8gb"
FLEET = "edge"
PREFIX = "/opt/devft-edge"
"""Install prefix inside the rootfs."""
CGROUP = Path("/sys/fs/cgroup/memory/devft-edge-check")


def main(argv: list[str] | None = None) -> int:
    """Run the edge check; 0 when every check passes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = Path(os.environ.get("DEVFT_EDGE_CACHE", Path.home() / ".cache" / "devft-edge"))
    parser.add_argument("--rootfs", type=Path, default=cache / f"rootfs-arm64-{SUITE}", help="cached arm64 rootfs")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "edge-check", help="keys, bundle, run, logs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results-edge" / "edge_check.json")
    parser.add_argument(
        "--doc", type=Path, default=ROOT / "docs" / "edge.md", help="doc whose results block is rewritten"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the 2-stage run (one per stage at 2)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("edge-check needs root (debootstrap, chroot, mounts, cgroups)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"label": "emulation (qemu-user aarch64 on x86_64): times are not device speed"}
    results["load_before"] = _loadavg()
    prerequisites()
    results["rootfs"] = rootfs(args.rootfs)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    port = _free_port()
    broker = f"mqtt://127.0.0.1:{port}"
    aggregator_yaml, x86_yaml = write_fleet(args.work, broker, args.rounds)
    bundle, results["bundle"] = build_bundle(args.work, broker)
    with ExitStack() as stack:
        stack.enter_context(chroot_mounts(args.rootfs))
        results["install"] = install(args.rootfs, bundle, results["bundle"]["key_sha256"])
        start_fleet(args, stack, port, x86_yaml)
        results["run"] = run(args, aggregator_yaml)
        results["smollm2"] = run(args, args.work / "aggregator-smollm2.yaml")
        results["profile"] = profile_check(args.rootfs, args.work)
    results["load_after"] = _loadavg()
    results["checks"] = {
        **checks(results["run"], args.work / "aggregator" / "out"),
        **{
            f"SmolLM2 stage 1: {k}": v
            for k, v in checks(results["smollm2"], args.work / "aggregator-smollm2" / "out").items()
        },
        "profile measured in the rootfs is aarch64 and accepted by plan": results["profile"]["accepted"],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    write_doc(args.doc, results)
    failed = [name for name, ok in results["checks"].items() if not ok]
    print(f"edge-check: {'FAILED: ' + ', '.join(failed) if failed else 'every check passed'}; {args.results}")
    return 1 if failed else 0


# ---- 1, 2: prerequisites and the rootfs ---------------------------------------------------------


def prerequisites() -> None:
    """apt packages where missing, binfmt_misc mounted, qemu-aarch64 registered."""
    missing = [p for p in APT if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env).returncode != 0:
            _check(["apt-get", "update", "-q"], env=env)
            _check(["apt-get", "install", "-y", "-q", *missing], env=env)
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        _check(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    if not (binfmt / "qemu-aarch64").exists():
        _check(["update-binfmts", "--enable", "qemu-aarch64"])
    if "enabled" not in (binfmt / "qemu-aarch64").read_text():
        raise SystemExit("qemu-aarch64 is registered but not enabled in binfmt_misc")


def rootfs(path: Path) -> dict[str, Any]:
    """The arm64 rootfs at ``path``: built unless a complete one is there (a stamp file says so)."""
    stamp = path / ".devft-edge-rootfs"
    complete = (path / "usr/bin/python3").exists() and any(path.glob("usr/lib/python3*/venv/__init__.py"))
    began = time.monotonic()
    if not complete:
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        _check(
            ["nice", "-n", "10", "debootstrap", "--arch=arm64", "--variant=minbase"]
            + ["--include=python3,python3-venv,openssl", SUITE, str(path), "http://deb.debian.org/debian"]
        )
    stamp.write_text(f"{SUITE} arm64 minbase python3 python3-venv\n")
    machine = _check(["chroot", str(path), "uname", "-m"]).strip()
    python = _check(["chroot", str(path), "python3", "--version"]).strip()
    openssl = _check(["chroot", str(path), "openssl", "version"]).strip()
    if machine != "aarch64":
        raise SystemExit(f"the rootfs runs {machine}, not aarch64")
    return {
        "path": str(path),
        "built_now": not complete,
        "build_seconds": round(time.monotonic() - began, 1) if not complete else None,
        "machine": machine,
        "python": python,
        "openssl": openssl,
    }


# ---- 3: the fleet, the bundle and its install -------------------------------------------------


def write_fleet(work: Path, broker: str, rounds: int) -> tuple[Path, Path]:
    """Fleet key, the x86 agent's identity and config, the aggregator's configs: the tiny 2-stage
    run, and SmolLM2's first stage (``aggregator-smollm2.yaml``: 4 stages, ``stop_after`` 1)."""
    from devft_edge.identity import enroll
    from devft_edge.signing import generate_keypair

    private, public = generate_keypair(work / "keys")
    identity, _ = enroll(X86_DEVICE, work / "keys" / "devices", work / "x86" / "identity")
    x86 = {
        "device_id": X86_DEVICE,
        "fleet": FLEET,
        "broker": broker,
        "public_key": str(public),
        "identity": str(identity),
        "profile": "x86-cpu",
        "data": "synthetic:24:1",
        "cache_dir": str(work / "x86" / "cache"),
        "threads": 1,
    }
    aggregator = {
        "run_id": "edge-check",
        "fleet": FLEET,
        "broker": broker,
        "model": "tiny",
        "method": "devft",
        "stages": 2,
        "rounds": rounds,
        "per_round": 2,
        "quorum": 2,
        "selection_wait_s": 1800,
        "round_timeout_s": 1800,
        "quant": "int8",
        "train": {"steps": 2, "batch_size": 2, "seq_len": 48, "lr": 1e-3},
        "sign_key": str(private),
        "device_keys": str(work / "keys" / "devices"),
        "state_dir": str(work / "aggregator" / "state"),
        "out_dir": str(work / "aggregator" / "out"),
        "eval_examples": 4,
    }
    smollm2 = {
        **aggregator,
        "run_id": "edge-check-smollm2",
        "model": "smollm2",
        "stages": 4,
        "rounds": 4,
        "stop_after": 1,
        "state_dir": str(work / "aggregator-smollm2" / "state"),
        "out_dir": str(work / "aggregator-smollm2" / "out"),
    }
    (work / "x86.yaml").write_text(yaml.safe_dump(x86, sort_keys=False))
    (work / "aggregator.yaml").write_text(yaml.safe_dump(aggregator, sort_keys=False))
    (work / "aggregator-smollm2.yaml").write_text(yaml.safe_dump(smollm2, sort_keys=False))
    return work / "aggregator.yaml", work / "x86.yaml"


def build_bundle(work: Path, broker: str) -> tuple[Path, dict[str, Any]]:
    """``devft-edge flash --bundle-only`` for the aarch64 device (enrolled by it)."""
    from devft_edge.ops.bundle import verify_bundle
    from devft_edge.signing import key_sha256, load_public_key

    out = work / f"{DEVICE}.tar.gz"
    began = time.monotonic()
    _check(
        [str(BIN / "devft-edge"), "flash", "--bundle-only", str(out), "--device-id", DEVICE, "--profile", PROFILE]
        + ["--broker", broker, "--fleet", FLEET, "--public-key", str(work / "keys" / "public.pem")]
        + ["--device-keys", str(work / "keys" / "devices"), "--platform", "linux_aarch64", "--threads", "2"]
        + ["--data", "synthetic:24:0"]
    )
    seconds = time.monotonic() - began
    env = verify_bundle(out, work / "keys" / "public.pem")
    with tarfile.open(out, "r:gz") as tar:
        wheels = sorted(Path(m.name).name for m in tar if m.name.endswith(".whl"))
    return out, {
        "bytes": out.stat().st_size,
        "wheels": len(wheels),
        "torch": next(w for w in wheels if w.startswith("torch-")),
        "build_seconds": round(seconds, 1),
        "version": env["version"],
        "key_sha256": key_sha256(load_public_key(work / "keys" / "public.pem")),
    }


@contextmanager
def chroot_mounts(rootfs_path: Path):
    """/proc, /sys and /dev inside the rootfs while the check runs (psutil and torch read them)."""
    mounted = []
    try:
        for source, target, how in (
            ("proc", "proc", ["-t", "proc"]),
            ("/sys", "sys", ["--rbind"]),
            ("/dev", "dev", ["--rbind"]),
        ):
            point = rootfs_path / target
            point.mkdir(exist_ok=True)
            if subprocess.run(["mountpoint", "-q", str(point)]).returncode != 0:
                _check(["mount", *how, source, str(point)])
                mounted.append(point)
        yield
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)])


def install(rootfs_path: Path, bundle: Path, key_sha256: str) -> dict[str, Any]:
    """Copy the bundle into the rootfs and install it there, offline, as on a Pi; then import torch."""
    staging = rootfs_path / "root" / "devft-bundle"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(rootfs_path / PREFIX.lstrip("/"), ignore_errors=True)  # a fresh install every run
    staging.mkdir(parents=True)
    shutil.copy2(bundle, staging / "bundle.tar.gz")
    device_env = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]
    device_env += ["LANG=C.UTF-8"]
    began = time.monotonic()
    done = subprocess.run(
        ["nice", "-n", "10", "unshare", "--net", "chroot", str(rootfs_path), *device_env, "sh", "-c"]
        + [
            "cd /root/devft-bundle && tar -xzf bundle.tar.gz && "
            f"sh devft-edge-agent/install.sh --prefix {PREFIX} --service none --key-sha256 {key_sha256}"
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"install.sh in the rootfs failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    probe = (
        "import platform, torch, transformers, peft; "
        "print(platform.machine(), torch.__version__, torch.cuda.is_available(), transformers.__version__)"
    )
    imported = _check(
        ["unshare", "--net", "chroot", str(rootfs_path), *device_env, f"{PREFIX}/current/venv/bin/python", "-c", probe]
    ).split()
    pip_check = subprocess.run(
        ["unshare", "--net", "chroot", str(rootfs_path), *device_env, f"{PREFIX}/current/venv/bin/pip", "check"],
        capture_output=True,
        text=True,
    )
    return {
        "seconds": round(seconds, 1),
        "offline": True,
        "stdout": done.stdout.strip().splitlines()[-1:],
        "pip_check": pip_check.stdout.strip(),
        "machine": imported[0],
        "torch": imported[1],
        "cuda": imported[2],
        "transformers": imported[3],
    }


# ---- 4: the run --------------------------------------------------------------------------------


def start_fleet(args: argparse.Namespace, stack: ExitStack, port: int, x86_yaml: Path) -> None:
    """Broker and x86 agent on the host; the aarch64 agent in the rootfs in a memory cgroup limited
    to its profile's budget. They serve every run that follows (a new aggregator is a new run)."""
    from devft_edge.profiles import load_profile

    work, logs = args.work, args.work / "logs"
    logs.mkdir()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stdout\n")
    stack.callback(
        _stop, _spawn([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)], logs / "mosquitto.log")
    )
    _wait_port(port)
    if CGROUP.exists():
        CGROUP.rmdir()
    CGROUP.mkdir()
    stack.callback(_remove_cgroup)
    (CGROUP / "memory.limit_in_bytes").write_text(str(load_profile(PROFILE).budget_bytes))
    x86 = _spawn([str(BIN / "devft-edge"), "-v", "agent", "--config", str(x86_yaml)], logs / "x86-agent.log", threads=1)
    stack.callback(_stop, x86)
    agent_cmd = (
        f"echo $$ > {CGROUP}/cgroup.procs && exec chroot {args.rootfs} env -i PATH=/usr/bin:/bin HOME=/root "
        f"LANG=C.UTF-8 {PREFIX}/current/venv/bin/devft-edge -v agent --config {PREFIX}/current/etc/agent.yaml"
    )
    edge = _spawn(["sh", "-c", agent_cmd], logs / "aarch64-agent.log")
    stack.callback(_stop, edge)


def run(args: argparse.Namespace, aggregator_yaml: Path) -> dict[str, Any]:
    """One aggregator run over the fleet; what it and the aarch64 agent's cgroup measured."""
    cfg = yaml.safe_load(aggregator_yaml.read_text())
    (CGROUP / "memory.max_usage_in_bytes").write_text("0")  # this run's peak, not the last one's
    failed_before = int((CGROUP / "memory.failcnt").read_text())
    began = time.monotonic()
    server = _spawn(
        [str(BIN / "devft-edge"), "-v", "serve", "--config", str(aggregator_yaml)],
        args.work / "logs" / f"{aggregator_yaml.stem}.log",
    )
    try:
        code = server.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _stop(server)
    wall = time.monotonic() - began
    out = Path(cfg["out_dir"])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    device = summary.get("devices", {}).get(DEVICE, {})
    steps = int(cfg["train"]["steps"])
    return {
        "model": cfg["model"],
        "stages_run": len(summary.get("stages", [])),
        "aggregator_exit": code,
        "wall_seconds": round(wall, 1),
        "rounds": summary.get("rounds"),
        "cgroup_limit_bytes": int((CGROUP / "memory.limit_in_bytes").read_text()),
        "cgroup_peak_bytes": int((CGROUP / "memory.max_usage_in_bytes").read_text()),
        "cgroup_failcnt": int((CGROUP / "memory.failcnt").read_text()) - failed_before,
        "agent_reported_peak_rss_bytes": device.get("peak_rss_bytes"),
        "predicted_peak_bytes": [st.get("predicted_peak_bytes") for st in summary.get("stages", [])],
        "local_steps": steps,
        "aarch64_updates": device.get("updates", 0),
        "aarch64_train_seconds": device.get("train_seconds"),
        "emulated_step_seconds": (
            round(device["train_seconds"] / (device["updates"] * steps), 2) if device.get("updates") else None
        ),
        "x86": summary.get("devices", {}).get(X86_DEVICE),
        "rejected": summary.get("rejected"),
        "final_eval_loss": summary.get("final_eval_loss"),
        "initial_eval_loss": summary.get("initial_eval_loss"),
    }


def profile_check(rootfs_path: Path, work: Path) -> dict[str, Any]:
    """``devft-edge profile`` inside the rootfs (as a device owner would), then ``plan`` on the host
    with the profile it wrote: the profile must say aarch64 and ``plan`` must accept it."""
    inside = "/root/edge-pi-measured.yaml"
    device_env = ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/root", "LANG=C.UTF-8"]
    began = time.monotonic()
    _check(
        ["unshare", "--net", "chroot", str(rootfs_path), *device_env, f"{PREFIX}/current/venv/bin/devft-edge"]
        + ["profile", "--name", "edge-pi-measured", "--probe-seconds", "2", "--out", inside]
    )
    seconds = time.monotonic() - began
    measured = work / "edge-pi-measured.yaml"
    shutil.copy2(rootfs_path / inside.lstrip("/"), measured)
    profile = yaml.safe_load(measured.read_text())
    plan = subprocess.run(
        [str(BIN / "devft-edge"), "plan", "--model", "smollm2", "--profile", str(measured), "--json"],
        capture_output=True,
        text=True,
    )
    arch = profile.get("cpu", {}).get("arch")
    return {
        "seconds": round(seconds, 1),
        "arch": arch,
        "cores": profile.get("cpu", {}).get("cores"),
        "total_gb": profile.get("memory", {}).get("total_gb"),
        "runtime_mb": profile.get("memory", {}).get("runtime_mb"),
        "sustained_gflops": profile.get("compute", {}).get("sustained_gflops"),
        "plan_exit": plan.returncode,
        "accepted": arch == "aarch64" and plan.returncode == 0,
    }


def checks(run_results: dict[str, Any], out: Path) -> dict[str, bool]:
    """What must hold: the run finished, the aarch64 device delivered an accepted update every round."""
    rounds = run_results.get("rounds") or 0
    adapter = out / "adapter"
    return {
        "run finished": run_results["aggregator_exit"] == 0 and rounds > 0,
        "aarch64 update accepted every round": rounds > 0 and run_results["aarch64_updates"] == rounds,
        "no message rejected": not any((run_results.get("rejected") or {}).values()),
        "adapter exported": adapter.is_dir() and any(adapter.iterdir()),
        "agent stayed under the cgroup limit": run_results["cgroup_failcnt"] == 0,
    }


# ---- 5: the report ---------------------------------------------------------------------------

BEGIN, END = "<!-- edge-check results: begin -->", "<!-- edge-check results: end -->"


def write_doc(doc: Path, results: dict[str, Any]) -> None:
    """Rewrite the results block of ``docs/edge.md`` (between its markers) from ``results``."""
    bundle, inst, run_, sm, prof = (results[k] for k in ("bundle", "install", "run", "smollm2", "profile"))
    mib = 2**20
    from devft_edge.memory import runtime_difference

    # the planner's prediction for this device once its profile's measured runtime is known
    offset = runtime_difference(prof["runtime_mb"] * mib if prof.get("runtime_mb") else None)

    def peaks(run: dict[str, Any]) -> str:
        shown = ", ".join(f"{p / mib:.0f}" for p in run["predicted_peak_bytes"] if p) or "-"
        on_device = ", ".join(f"{(p + offset) / mib:.0f}" for p in run["predicted_peak_bytes"] if p)
        return f"{shown} MiB" + (f" ({on_device} MiB with the runtime the device's profile measured)" if offset else "")

    sm_predicted, predicted = peaks(sm), peaks(run_)
    reported = run_["agent_reported_peak_rss_bytes"]
    lines = [
        BEGIN,
        f"Last run: {time.strftime('%Y-%m-%d')}, {results['label']}; load average before "
        f"{results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f} (a shared 2-core machine).",
        "",
        "| what | measured |",
        "|---|---|",
        f"| rootfs | {results['rootfs']['python']}, {results['rootfs']['openssl']}, `uname -m` "
        f"{results['rootfs']['machine']}{' (built now)' if results['rootfs']['built_now'] else ' (cached)'} |",
        f"| bundle | {bundle['bytes'] / 1e6:.1f} MB, {bundle['wheels']} wheels, `{bundle['torch']}`, built in "
        f"{bundle['build_seconds']:.0f} s (wheels cached) |",
        f"| install (`install.sh`, no network, `pip check`) | {inst['seconds']:.0f} s emulated; then torch "
        f"{inst['torch']} imports on {inst['machine']}, CUDA {inst['cuda']} |",
        f"| run | {run_['rounds']} rounds, 2 stages, {run_['aarch64_updates']} aarch64 updates accepted, "
        f"{run_['wall_seconds']:.0f} s wall |",
        f"| emulated training seconds per local step (tiny model, batch 2, seq 48; the task's setup "
        f"included) | {run_['emulated_step_seconds']} s (x86 agent beside it, native: "
        f"{_per_step(run_['x86'], run_)} s) |",
        f"| agent peak charged to the cgroup (limit {run_['cgroup_limit_bytes'] / 2**30:.2f} GiB) | "
        f"{run_['cgroup_peak_bytes'] / mib:.0f} MiB; the agent's own peak RSS {reported / mib if reported else 0:.0f}"
        " MiB (library pages the install already cached are charged to the host's group, not this one) |",
        f"| planner's predicted peak per stage | {predicted} (qemu's own memory is in the measured "
        "figures, not in the prediction) |",
        f"| SmolLM2-135M, first stage ({sm['stages_run']} of 4 run: `stop_after` 1), int8 pack, batch 2 x 48 | "
        f"{sm['aarch64_updates']} aarch64 updates accepted in {sm['rounds']} rounds, {sm['wall_seconds']:.0f} s wall; "
        f"{sm['emulated_step_seconds']} s per emulated local step; peak charged to the cgroup "
        f"{sm['cgroup_peak_bytes'] / mib:.0f} MiB, agent's own peak RSS "
        f"{(sm['agent_reported_peak_rss_bytes'] or 0) / mib:.0f} MiB, predicted {sm_predicted} |",
        f"| `devft-edge profile` inside the rootfs | {prof['seconds']:.0f} s; arch {prof['arch']}, {prof['cores']} "
        f"cores, {prof['total_gb']} GB, runtime {prof.get('runtime_mb')} MiB, {prof['sustained_gflops']} GFLOP/s "
        "(emulated); `plan --model smollm2` "
        f"with it: exit {prof['plan_exit']} |",
        "",
        "Checks: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in results["checks"].items()) + ".",
        END,
    ]
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    doc.write_text(text)


# ---- helpers ---------------------------------------------------------------------------------


def _per_step(device: dict[str, Any] | None, run_results: dict[str, Any]) -> str:
    """Training seconds per local step of ``device`` (``-`` if it sent nothing)."""
    if not device or not device.get("updates"):
        return "-"
    return f"{device['train_seconds'] / (device['updates'] * run_results['local_steps']):.2f}"


def _check(argv: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _spawn(argv: list[str], log: Path, threads: int | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("w") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this script started (its own session: the chroot's agent is its child)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        except ProcessLookupError:
            pass


def _remove_cgroup() -> None:
    for _ in range(20):
        if not (CGROUP / "cgroup.procs").read_text().strip():
            break
        time.sleep(0.5)
    try:
        CGROUP.rmdir()
    except OSError:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


if __name__ == "__main__":
    sys.exit(main())
