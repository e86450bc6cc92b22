"""Transport benchmark: one blob through a real mosquitto with our chunk protocol, against C clients and TCP.

Every device downloads its stage pack (tens to hundreds of MB) through the broker, so the pulled,
chunked transfer of :mod:`devft_edge.blobs` must not be what makes a round slow. This benchmark
moves one random blob (100 MB by default) over this machine's loopback three ways, the sender
always in a child process so the GIL never serialises the two ends:

- **ours**: the sender holds the blob in a :class:`BlobStore` and answers each ``chunk_request``
  with the chunks asked for, exactly as the aggregator's ``_on_chunk_request`` does; the receiver
  (this process) pulls one window of missing chunks at a time with :class:`Download`, writes them
  at their offsets with :class:`BlobReceiver` and verifies the sha256 at the end, as the agent
  does. Both ends are :class:`devft_edge.mqtt.Connection` (paho-mqtt, QoS 1) on one mosquitto;
- **C clients**: ``mosquitto_pub -q 1 -f BLOB`` to ``mosquitto_sub -q 1 -C 1 -N > FILE`` through
  the same broker, the whole blob as ONE message (the broker config allows packets up to the MQTT
  limit of 256 MiB, so no chunking is needed; the C clients neither chunk nor hash);
- **TCP**: a child process ``sendall``s the file over one loopback connection in 1 MiB pieces;
  this process ``recv_into``s a buffer and writes it to a file.

Ours runs at every chunk size given. Each repetition runs the contenders back to back in a
rotating order and the figures are the per-repetition ratios (ours / C clients, ours / TCP), of
which the median is reported: load from other processes on a shared machine hits all three.
``--profile`` adds one profiled transfer per chunk size (cProfile on both threads of both ends:
the worker thread and paho's network thread) and reports where the time goes. The broker runs
with ``set_tcp_nodelay true`` as ``broker-config`` writes it, and ``Connection`` sets TCP_NODELAY:
with Nagle's algorithm on, each window's small request waited ~40 ms for a delayed ACK.

    python benchmarks/transport.py [--megabytes 100] [--chunk-kib 96 1024] [--repeats 5] [--profile]

About two minutes for the defaults on 2 cores; results go to ``benchmarks/results/system/transport.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from machine_load import load_average

from devft_edge.blob_transfer import Download
from devft_edge.blobs import DEFAULT_CHUNK_BYTES, WINDOW, BlobInfo, BlobStore, sha256_file
from devft_edge.mqtt import BrokerAddress, Connection
from devft_edge.protocol import AGGREGATOR, Envelope, Kind, ProtocolError, Reason, Topics, decode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from system_harness import MOSQUITTO, free_port, mosquitto  # noqa: E402  (the project's one way to run mosquitto)

RESULTS = HERE / "results" / "system" / "transport.json"
MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
DEVICE = "bench-device"
"""The receiver's device id: it pulls like an agent downloading its pack."""
C_TOPIC = "bench/c-clients"
GOAL_VS_C = 0.8
"""Ours should move at least this fraction of what mosquitto's own C clients move."""
TCP_PIECE = 1 << 20


def broker_config(port: int) -> str:
    """mosquitto.conf for the benchmark.

    ``max_packet_size`` is the MQTT maximum, so the C clients can move the blob as one message;
    ``max_inflight_messages`` is our download window, so the broker never holds back part of a
    window the receiver asked for (mosquitto's default is 20); the queue has room for a window.
    Subscriptions are also logged to ``$SYS/broker/log/M/subscribe``: the C-client run waits there
    for ``mosquitto_sub``'s subscription before it publishes (a log file would be buffered, and
    mosquitto started as root cannot write to our private directory).
    """
    return (
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        "log_dest stdout\nlog_dest topic\nlog_type error\nlog_type warning\nlog_type notice\nlog_type subscribe\n"
        f"max_packet_size 268435455\nmax_inflight_messages {WINDOW}\nmax_queued_messages 1000\n"
    )


# ---- ours: the sender child ---------------------------------------------------------------------


def answer(connection: Connection, topics: Topics, store: BlobStore, message: Envelope) -> None:
    """Answer one chunk request as the aggregator's ``_on_chunk_request`` does."""
    info = BlobInfo.from_json(message.data)
    if not store.has(info.sha256):
        raise ProtocolError(Reason.STALE, f"asked for blob {info.sha256[:12]}..., which is not here")
    missing = [int(i) for i in message.data.get("missing", [])][:WINDOW]
    for index, chunk in store.chunks(info, missing):
        reply = Envelope(kind=Kind.CHUNK, sender=AGGREGATOR, data={**info.to_json(), "index": index}, body=chunk)
        connection.publish(topics.down(message.sender), reply.encode())


def profiled_network_thread(connection: Connection, profiler: cProfile.Profile) -> None:
    """Make paho's network thread (started by ``Connection.start``) run under ``profiler``.

    cProfile only sees the thread that enabled it; paho looks ``_thread_main`` up on the
    instance when it starts the thread, so wrapping it there profiles that thread too.
    """
    client = connection.client
    run = client._thread_main

    def main() -> None:
        profiler.enable()
        try:
            run()
        finally:
            profiler.disable()

    client._thread_main = main  # type: ignore[method-assign]


def cmd_serve(args: argparse.Namespace) -> int:
    """Child process: serve the blobs of ``--store`` to chunk requests until stdin closes."""
    store, topics = BlobStore(args.store), Topics()
    connection = Connection(BrokerAddress.parse(args.broker), "bench-aggregator", [topics.all_up])
    profilers = (cProfile.Profile(), cProfile.Profile()) if args.profile else None
    if profilers:
        profiled_network_thread(connection, profilers[1])
    connection.start()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    if profilers:
        profilers[0].enable()
    while not stop.is_set():
        try:
            item = connection.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        message = decode(item.payload)
        if message.kind is Kind.CHUNK_REQUEST:
            answer(connection, topics, store, message)
    connection.stop()
    if profilers:
        profilers[0].disable()
        profilers[0].dump_stats(f"{args.profile}.worker")
        profilers[1].dump_stats(f"{args.profile}.network")
    return 0


@contextlib.contextmanager
def child(*args: str) -> Iterator[str]:
    """This script with ``args`` as a child process; yields the first line it prints (when it is ready).

    Closing its stdin is the signal to stop, so a profiled child writes its profile before exiting.
    """
    process = subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"child {args[0]} exited before it was ready (exit {process.wait()})")
        yield line.strip()
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- ours: the receiver -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pull:
    """One pulled transfer."""

    seconds: float
    """From the first chunk request to the verified blob in the store."""
    verify_seconds: float
    """The last chunk's ``add``: writing it, hashing the whole file, moving it into the store."""
    requests: int
    """Chunk requests sent (one per window)."""


def pull(connection: Connection, store: BlobStore, info: BlobInfo, stall_seconds: float = 10.0) -> Pull:
    """Download ``info`` into ``store`` as the agent does: a window of missing chunks at a time."""
    topics = Topics()
    while not connection.inbox.empty():  # nothing left over from an earlier transfer
        connection.inbox.get_nowait()
    download = Download(store.receiver(info), stall_seconds=stall_seconds)
    requests = 0

    def ask() -> None:
        nonlocal requests
        missing = download.request(time.monotonic())
        if missing:
            request = Envelope(kind=Kind.CHUNK_REQUEST, sender=DEVICE, data={**info.to_json(), "missing": missing})
            connection.publish(topics.up(DEVICE), request.encode())
            requests += 1

    start = time.perf_counter()
    ask()
    while True:
        try:
            item = connection.inbox.get(timeout=0.5)
        except queue.Empty:
            if download.stalled(time.monotonic()):
                ask()
            continue
        message = decode(item.payload)
        if message.kind is not Kind.CHUNK or message.data.get("blob") != info.sha256:
            continue
        before_add = time.perf_counter()
        if download.add(int(message.data["index"]), message.body, time.monotonic()):
            end = time.perf_counter()
            return Pull(seconds=end - start, verify_seconds=end - before_add, requests=requests)
        ask()


def run_ours(connection: Connection, root: Path, info: BlobInfo) -> Pull:
    """One timed pull into a fresh store (nothing cached from an earlier repetition)."""
    store = BlobStore(root / "received")
    try:
        return pull(connection, store, info)
    finally:
        shutil.rmtree(root / "received")


# ---- the C clients and raw TCP ------------------------------------------------------------------


def wait_for_log(log: Connection, text: str, timeout: float = 10.0) -> None:
    """Until the broker logs a line containing ``text`` (``log`` is subscribed to its log topic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            if text in log.inbox.get(timeout=0.1).payload.decode(errors="replace"):
                return
    raise TimeoutError(f"mosquitto never logged {text!r}")


def run_c_clients(port: int, log: Connection, blob: Path, out: Path, number: int) -> float:
    """Seconds from starting ``mosquitto_pub`` until ``mosquitto_sub`` wrote the message and exited."""
    assert MOSQUITTO_PUB is not None and MOSQUITTO_SUB is not None
    common = ["-h", "127.0.0.1", "-p", str(port), "-t", C_TOPIC, "-q", "1"]
    sub_id, pub_id = f"bench-csub-{number}", f"bench-cpub-{number}"
    with out.open("wb") as sink:
        sub = subprocess.Popen([MOSQUITTO_SUB, *common, "-C", "1", "-N", "-i", sub_id], stdout=sink)
    try:
        wait_for_log(log, f"{sub_id} 1 {C_TOPIC}")
        start = time.perf_counter()
        pub = subprocess.Popen([MOSQUITTO_PUB, *common, "-f", str(blob), "-i", pub_id])
        sub.wait(timeout=300)
        seconds = time.perf_counter() - start
        if pub.wait(timeout=60) != 0 or sub.returncode != 0:
            raise RuntimeError(f"mosquitto_pub exit {pub.returncode}, mosquitto_sub exit {sub.returncode}")
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    if sha256_file(out) != sha256_file(blob):  # not timed: only proves the right bytes arrived
        raise RuntimeError(f"mosquitto_sub wrote {out.stat().st_size} bytes that differ from the blob")
    out.unlink()
    return seconds


def cmd_serve_tcp(args: argparse.Namespace) -> int:
    """Child process: send ``--file`` to every connection on a loopback port until stdin closes."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.1)
        print(server.getsockname()[1], flush=True)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection, open(args.file, "rb") as f:
                while piece := f.read(TCP_PIECE):
                    connection.sendall(piece)
    return 0


def run_tcp(port: int, out: Path, size: int) -> float:
    """Seconds to connect, receive the whole file and write it to ``out``."""
    buffer = bytearray(TCP_PIECE)
    view = memoryview(buffer)
    received = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s, out.open("wb") as f:
        while count := s.recv_into(buffer):
            f.write(view[:count])
            received += count
    seconds = time.perf_counter() - start
    out.unlink()
    if received != size:
        raise RuntimeError(f"TCP moved {received} bytes of {size}")
    return seconds


# ---- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkResult:
    """All repetitions at one chunk size; rates in MB/s (10^6 bytes per second)."""

    chunk_bytes: int
    chunks: int
    ours_mb_s: list[float]
    c_clients_mb_s: list[float]
    tcp_mb_s: list[float]
    ratio_vs_c_clients: list[float]
    ratio_vs_tcp: list[float]
    verify_seconds: list[float]
    requests: int
    median_ours_mb_s: float
    median_c_clients_mb_s: float
    median_tcp_mb_s: float
    median_ratio_vs_c_clients: float
    median_ratio_vs_tcp: float
    meets_goal: bool


def profile_summary(paths: list[str], top: int) -> dict[str, object]:
    """Total seconds and the ``top`` functions by own time of a thread's cProfile dump."""
    stats = pstats.Stats(*paths, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    return {
        "total_seconds": round(stats.total_tt, 3),  # type: ignore[attr-defined]
        "top": [
            {
                "function": f"{Path(file).name}:{line}({name})",
                "calls": calls,
                "own_seconds": round(own, 3),
                "cumulative_seconds": round(cumulative, 3),
            }
            for (file, line, name), (_, calls, own, cumulative, _) in rows[:top]
        ],
    }


@dataclass(frozen=True)
class Setup:
    """What every transfer shares: the broker, the blob, the sender's store."""

    url: str
    port: int
    blob: Path
    info: BlobInfo
    """The blob as the sender's store describes it (default chunk size)."""
    sender_store: BlobStore
    warm: BlobInfo
    """A one-chunk blob pulled untimed first, to prove both ends are subscribed."""

    def sender(self, *extra: str) -> contextlib.AbstractContextManager[str]:
        """The chunk-serving child process."""
        return child("serve", "--broker", self.url, "--store", str(self.sender_store.root), *extra)

    def receiver(self, network_profiler: cProfile.Profile | None = None) -> Connection:
        """The pulling end, connected and warmed up (its paho thread under ``network_profiler`` if given)."""
        connection = Connection(BrokerAddress.parse(self.url), DEVICE, [Topics().down(DEVICE)])
        if network_profiler is not None:
            profiled_network_thread(connection, network_profiler)
        connection.start()
        # Not timed: a request lost to a subscription race is asked again after a short stall
        # here, never inside a timed transfer.
        pull(connection, BlobStore(self.blob.parent / "warm"), self.warm, stall_seconds=1.0)
        shutil.rmtree(self.blob.parent / "warm")
        return connection


def measure(setup: Setup, chunk_sizes: list[int], repeats: int) -> list[ChunkResult]:
    """Every contender ``repeats`` times per chunk size, interleaved in a rotating order."""
    blob, size, port = setup.blob, setup.info.size, setup.port
    tmp = blob.parent
    results = []
    with setup.sender(), child("serve-tcp", "--file", str(blob)) as tcp_port_line:
        tcp_port = int(tcp_port_line)
        receiver = setup.receiver()
        log = Connection(BrokerAddress.parse(setup.url), "bench-log", ["$SYS/broker/log/M/subscribe"])
        log.start()
        number = 0
        for chunk_bytes in chunk_sizes:
            info = BlobInfo(setup.info.sha256, size, chunk_bytes)
            ours, c_rates, tcp_rates, verify = [], [], [], []
            requests = 0
            for repeat in range(repeats):
                contenders = ["ours", "c", "tcp"]
                for contender in contenders[repeat % 3 :] + contenders[: repeat % 3]:
                    number += 1
                    # Untimed: write back what earlier transfers left dirty, so that no contender
                    # pays for the previous one's 100 MB of page-cache write-back.
                    os.sync()
                    if contender == "ours":
                        result = run_ours(receiver, tmp, info)
                        ours.append(size / result.seconds / 1e6)
                        verify.append(round(result.verify_seconds, 4))
                        requests = result.requests
                    elif contender == "c":
                        c_rates.append(size / run_c_clients(port, log, blob, tmp / "c.out", number) / 1e6)
                    else:
                        tcp_rates.append(size / run_tcp(tcp_port, tmp / "tcp.out", size) / 1e6)
                print(
                    f"chunk {chunk_bytes // 1024} KiB, repeat {repeat + 1}: ours {ours[-1]:.0f} MB/s, "
                    f"C clients {c_rates[-1]:.0f} MB/s, TCP {tcp_rates[-1]:.0f} MB/s, load {load_average()[0]}",
                    flush=True,
                )
            vs_c = [o / c for o, c in zip(ours, c_rates, strict=True)]
            vs_tcp = [o / t for o, t in zip(ours, tcp_rates, strict=True)]
            results.append(
                ChunkResult(
                    chunk_bytes=chunk_bytes,
                    chunks=info.count,
                    ours_mb_s=[round(x, 1) for x in ours],
                    c_clients_mb_s=[round(x, 1) for x in c_rates],
                    tcp_mb_s=[round(x, 1) for x in tcp_rates],
                    ratio_vs_c_clients=[round(x, 3) for x in vs_c],
                    ratio_vs_tcp=[round(x, 3) for x in vs_tcp],
                    verify_seconds=verify,
                    requests=requests,
                    median_ours_mb_s=round(statistics.median(ours), 1),
                    median_c_clients_mb_s=round(statistics.median(c_rates), 1),
                    median_tcp_mb_s=round(statistics.median(tcp_rates), 1),
                    median_ratio_vs_c_clients=round(statistics.median(vs_c), 3),
                    median_ratio_vs_tcp=round(statistics.median(vs_tcp), 3),
                    meets_goal=statistics.median(vs_c) >= GOAL_VS_C,
                )
            )
        receiver.stop()
        log.stop()
    return results


def main_run(args: argparse.Namespace) -> int:
    if MOSQUITTO is None or MOSQUITTO_PUB is None or MOSQUITTO_SUB is None:
        print("mosquitto, mosquitto_pub and mosquitto_sub are needed (apt-get install mosquitto mosquitto-clients)")
        return 2
    size = int(args.megabytes * 1e6)
    chunk_sizes = [int(k * 1024) for k in args.chunk_kib]
    load_before = load_average()
    profiles: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="devft-transport-") as tmp_name:
        tmp = Path(tmp_name)
        blob = tmp / "blob.bin"
        with blob.open("wb") as f:
            for offset in range(0, size, 1 << 24):
                f.write(os.urandom(min(1 << 24, size - offset)))
        sender_store = BlobStore(tmp / "sender")
        info = sender_store.add_file(blob)
        warm = sender_store.add_bytes(os.urandom(1000))
        port = free_port()
        config = broker_config(port) + "".join(f"{line}\n" for line in args.broker_option)
        with mosquitto(tmp / "broker", port, config) as url:
            setup = Setup(url, port, blob, info, sender_store, warm)
            results = measure(setup, chunk_sizes, args.repeats)
            if args.profile:  # after the measured sender is gone: one sender per broker, or both would answer
                profiles = profile_transfers(setup, chunk_sizes, args.profile_top)
    load_after = load_average()
    report = {
        "benchmark": "transport",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "mosquitto": subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.splitlines()[0],
        "load_before": load_before,
        "load_after": load_after,
        "size_bytes": size,
        "repeats": args.repeats,
        "window_chunks": WINDOW,
        "broker_config_extra": args.broker_option,
        "c_clients_mode": "mosquitto_pub -q 1 -f BLOB -> mosquitto_sub -q 1 -C 1 -N > FILE, the blob as one message",
        "goal_ratio_vs_c_clients": GOAL_VS_C,
        "results": [asdict(r) for r in results],
        "profile": profiles,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"chunk {r.chunk_bytes // 1024} KiB ({r.chunks} chunks): ours {r.median_ours_mb_s} MB/s, "
            f"C clients {r.median_c_clients_mb_s} MB/s, TCP {r.median_tcp_mb_s} MB/s; median ratio ours/C "
            f"{r.median_ratio_vs_c_clients} (goal >= {GOAL_VS_C}: {'met' if r.meets_goal else 'missed'}), "
            f"ours/TCP {r.median_ratio_vs_tcp}"
        )
    print(f"load average before {load_before}, after {load_after}; wrote {out}")
    return 0


def profile_transfers(setup: Setup, chunk_sizes: list[int], top: int) -> dict[str, object]:
    """One transfer per chunk size with all four threads (two per end) under cProfile."""
    found: dict[str, object] = {}
    tmp = setup.blob.parent
    for chunk_bytes in chunk_sizes:
        prefix = tmp / f"profile-{chunk_bytes}"
        worker, network = cProfile.Profile(), cProfile.Profile()
        with setup.sender("--profile", str(prefix)):
            receiver = setup.receiver(network)
            worker.enable()
            result = run_ours(receiver, tmp, BlobInfo(setup.info.sha256, setup.info.size, chunk_bytes))
            worker.disable()
            receiver.stop()
        worker.dump_stats(f"{prefix}.recv-worker")
        network.dump_stats(f"{prefix}.recv-network")
        found[str(chunk_bytes)] = {
            "mb_s_profiled": round(setup.info.size / result.seconds / 1e6, 1),
            "receiver_worker": profile_summary([f"{prefix}.recv-worker"], top),
            "receiver_network": profile_summary([f"{prefix}.recv-network"], top),
            "sender_worker": profile_summary([f"{prefix}.worker"], top),
            "sender_network": profile_summary([f"{prefix}.network"], top),
        }
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="internal: the chunk-serving child process")
    serve.add_argument("--broker", required=True)
    serve.add_argument("--store", required=True)
    serve.add_argument("--profile", default=None, help="write cProfile dumps to PREFIX.worker / PREFIX.network")
    serve_tcp = sub.add_parser("serve-tcp", help="internal: the raw TCP sending child process")
    serve_tcp.add_argument("--file", required=True)
    parser.add_argument("--megabytes", type=float, default=100.0, help="blob size in MB (10^6 bytes)")
    parser.add_argument(
        "--chunk-kib", type=float, nargs="+", default=[DEFAULT_CHUNK_BYTES / 1024, 1024.0], help="our chunk sizes"
    )
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each contender per chunk size")
    parser.add_argument("--profile", action="store_true", help="add one profiled transfer per chunk size")
    parser.add_argument("--profile-top", type=int, default=12, help="functions listed per profiled thread")
    parser.add_argument(
        "--broker-option", action="append", default=[], help="extra mosquitto.conf line (repeatable), for experiments"
    )
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "serve-tcp":
        return cmd_serve_tcp(args)
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
