"""Watching a running aggregator from outside, as the adversarial benchmark does before, during and
after a flood: its memory, its state directory, how long it takes to answer, and its rejection counters.

- **memory**: ``VmRSS`` (now) and ``VmHWM`` (the process's peak so far) from ``/proc/<pid>/status``;
- **state directory**: allocated bytes (what ``du`` reports) per part: ``state.json``, ``seen.log``,
  the device records, complete blobs and partial uploads;
- **latency**: an enrolled :class:`Probe` device asks for one chunk of the open stage's pack and
  times the answer. The aggregator handles messages one at a time in arrival order, so this is the
  queueing delay any device's message meets, plus the handling of a chunk request;
- **counters**: the aggregator counts rejections per reason in memory and publishes them in its
  retained status. The probe's chunk request is answered only after everything that reached the
  broker before it was handled; a presence sent after the answer makes the aggregator publish its
  status, so the first status after the answer counts every message sent before the request.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attacker import Client
from hostile import PREFIX, down, up, valid_profile

from devft_edge.blobs import BlobInfo
from devft_edge.mqtt import BrokerLogin
from devft_edge.protocol import Envelope, Kind
from devft_edge.signing import Ed25519PrivateKey

PROBE = "probe"
STATUS = f"{PREFIX}/agg/status"


def memory(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of process ``pid`` in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def child_pid(name: str) -> int | None:
    """The pid of this process's child whose command is ``name`` (the broker the harness started)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            command, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if command == name and int(rest[1]) == os.getpid():
                return int(entry.name)
    return None


def state_dir_usage(directory: Path) -> dict[str, int]:
    """Allocated bytes of the aggregator's state directory by part, and ``total``."""
    parts = {"state.json": 0, "seen.log": 0, "devices": 0, "blobs": 0, "partial uploads": 0, "other": 0}
    for root, _, files in os.walk(directory):
        relative = Path(root).relative_to(directory).parts
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                size = (Path(root) / name).stat().st_blocks * 512
                if not relative and name in parts:
                    parts[name] += size
                elif relative[:1] == ("devices",):
                    parts["devices"] += size
                elif relative[:2] == ("blobs", "partial"):
                    parts["partial uploads"] += size
                elif relative[:1] == ("blobs",):
                    parts["blobs"] += size
                else:
                    parts["other"] += size
    return {**parts, "total": sum(parts.values())}


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """Median and 95th percentile (nearest rank) of ``seconds``, and how many."""
    if not seconds:
        return {"n": 0, "median_s": math.nan, "p95_s": math.nan}
    ordered = sorted(seconds)
    return {
        "n": len(ordered),
        "median_s": statistics.median(ordered),
        "p95_s": ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)],
    }


class Probe:
    """An enrolled device that never trains: it says hello, reports itself offline (so no round ever
    selects it) and then only asks for chunks and reads the status."""

    def __init__(self, broker: str, run_dir: Path, key: Ed25519PrivateKey, login: BrokerLogin | None = None) -> None:
        self.client = Client(broker, PROBE, [down(PROBE), STATUS], run_dir, key, login)
        self.lock = threading.Lock()
        self.pack: BlobInfo | None = None
        self._index = 0

    def join(self, task: Envelope) -> None:
        """Say hello while ``task``'s round is open (too late to be selected for it), then go offline."""
        self.client.publish(up(PROBE), Envelope(kind=Kind.HELLO, sender=PROBE, data={"profile": valid_profile()}))
        self._offline()
        self.follow(task)

    def follow(self, task: Envelope) -> None:
        """Ask for chunks of ``task``'s pack from now on (the open stage's)."""
        self.pack = BlobInfo.from_json(task.data["pack"])

    def latency(self, timeout: float = 120.0) -> float:
        """Seconds from a chunk request to its chunk."""
        with self.lock:
            return self._ask(timeout)

    def counters(self, timeout: float = 120.0) -> dict[str, int]:
        """The aggregator's rejection counters once it handled everything sent before this call."""
        with self.lock:
            self._ask(timeout)
            self._offline()
            status = self.client.next(Kind.STATUS, timeout)
            return dict(status.data["rejected"])

    def close(self) -> None:
        self.client.close()

    def _ask(self, timeout: float) -> float:
        assert self.pack is not None, "join first"
        pack, index = self.pack, self._index % self.pack.count
        self._index += 1
        request = Envelope(kind=Kind.CHUNK_REQUEST, sender=PROBE, data={**pack.to_json(), "missing": [index]})
        started = time.perf_counter()
        self.client.publish(up(PROBE), request)
        self.client.next(
            Kind.CHUNK, timeout, where=lambda m: m.data.get("blob") == pack.sha256 and m.data.get("index") == index
        )
        return time.perf_counter() - started

    def _offline(self) -> None:
        self.client.publish(
            f"{PREFIX}/dev/{PROBE}/presence", Envelope(kind=Kind.PRESENCE, sender=PROBE, data={"online": False})
        )


@dataclass
class During:
    """What a :func:`watching` thread saw: the RSS samples and the probe's latencies."""

    pid: int
    rss: list[tuple[float, int]] = field(default_factory=list)
    """``(time.monotonic(), RSS bytes)`` every 0.1 s, and whenever :meth:`sample` is called."""
    latency_s: list[float] = field(default_factory=list)

    def sample(self) -> None:
        """Read the RSS now."""
        self.rss.append((time.monotonic(), memory(self.pid)[0]))

    def rss_max(self, since: float = 0.0, until: float = math.inf) -> int:
        """The largest RSS sampled between ``since`` and ``until`` (monotonic seconds); 0 if none."""
        return max((rss for t, rss in self.rss if since <= t <= until), default=0)


@contextlib.contextmanager
def watching(probe: Probe, seen: During, probe_every: float = 0.5) -> Iterator[During]:
    """Sample the RSS every 0.1 s and the probe's latency every ``probe_every`` s into ``seen`` while
    the block runs (several blocks may add to one ``seen``)."""
    stop = threading.Event()

    def sample() -> None:
        next_probe = time.monotonic()
        while not stop.is_set():
            seen.sample()
            if time.monotonic() >= next_probe:
                seen.latency_s.append(probe.latency())
                next_probe = time.monotonic() + probe_every
            stop.wait(0.1)

    thread = threading.Thread(target=sample, name="watch", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=180)
