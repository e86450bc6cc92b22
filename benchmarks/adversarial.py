"""Adversarial benchmark: thousands of hostile messages of 43 kinds against a running aggregator.

Issue 14's measure: a real aggregator (``devft-edge serve``, tiny model, 2 stages x 2 rounds) and two
honest agents run on a broker while an attacker floods them. The attacker holds the keys of one
enrolled device, ``mallory``, which says hello, is selected for every round and never delivers;
behind the generated ACL it also holds the broker account of ``ghost-0``, a device the aggregator
never enrolled. Brokers:

- ``mosquitto-tls``: the config ``devft-edge broker-config --tls`` generates (TLS with client
  certificates, a password per user, the ACL). What mallory publishes on another device's topics
  is dropped by the broker, so those messages test the ACL, not the aggregator;
- ``embedded``: the broker ``serve`` starts when given none (amqtt, MQTT 3.1.1, anonymous): every
  message reaches the aggregator;
- ``mosquitto``: plain and anonymous, as the tests run it (the subset in ``make test``).

The kinds are run one after another, a few per round while the honest devices train
(``--rounds``), each followed by a barrier (:mod:`watch`) that reads the aggregator's rejection
counters once it has handled every message of the kind: the difference is what the kind was
rejected with, set beside what it must be rejected with. The retained poison is left on the broker
before the aggregator starts; the upload-quota flood runs last, once the honest updates of the
last round are in (each offer replaces mallory's previous partial upload, so it never fills the
quota). Before the first kind and after the last, with the honest devices idle: the aggregator's
memory, its state directory and 20 probe latencies; during the kinds, its RSS every 0.1 s and a
probe every 0.5 s. At the end the run must have finished with only the honest devices in each
round, each at its declared sample count, and the merged LoRA must equal the robust weighted mean
(``devft_edge/robust.py``) of the honest updates, recomputed here from the blobs.

The parts: ``hostile.py`` (the message kinds and the reason each must get), ``attacker.py`` (the
attacker's clients and the transfer attacks), ``flood.py`` (the kinds as phases, counted),
``watch.py`` (memory, state directory, latency, counters) and ``merge_check.py`` (the merges
recomputed); this module starts the broker and the services, runs the rounds and reports.

    python benchmarks/adversarial.py run --broker mosquitto-tls --messages 10000
    python benchmarks/adversarial.py run --broker embedded --messages 10000
    python benchmarks/adversarial.py report --markdown /tmp/adversarial.md

A few minutes per run on 2 cores; results go to ``benchmarks/results-adversarial/<broker>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import pwd
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from flood import (
    GHOST,
    QUOTA_OFFERS,
    REPLAYS,
    REQUESTS,
    RETAINED,
    UPLOAD_QUOTA,
    Attacker,
    Flood,
    Phase,
    leave_poison,
    plan,
)
from hostile import HONEST, KINDS, MALLORY, up, valid_profile
from machine_load import load_average
from merge_check import RoundCheck, check_rounds
from watch import PROBE, During, Probe, child_pid, latency_summary, memory, state_dir_usage, watching

from devft_edge.mqtt import BrokerLogin
from devft_edge.ops.broker import EmbeddedBroker
from devft_edge.ops.broker_config import BrokerSpec, write_broker_config
from devft_edge.protocol import Envelope, Kind, Reason, decode, unseal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from system_harness import enrolled, free_port, mosquitto, start, stop, write_configs  # noqa: E402

logger = logging.getLogger("adversarial")

RESULTS = HERE / "results-adversarial"
BrokerName = Literal["mosquitto", "mosquitto-tls", "embedded"]
BROKERS: tuple[BrokerName, ...] = ("mosquitto", "mosquitto-tls", "embedded")
SAMPLES = {"dev-0": 12, "dev-1": 40}
"""The honest devices' data sizes: robust weighting caps dev-1's 40 at twice dev-0's 12, so the merge
check tells robust weights (12, 24) from plain FedAvg (12, 40)."""
SERVE_RATE = 4 * 2**20
"""Chunk bytes served per device and second: the burst (2 windows, 8 MiB) covers an honest device's
7.2 MB pack; a request for a whole window (4 MiB) is then served once a second."""
BASE_MESSAGES = sum(k.count for k in KINDS.values()) + REPLAYS + REQUESTS + QUOTA_OFFERS + RETAINED
"""Messages at scale 1 besides the transfer attacks' (a few dozen)."""


@dataclass(frozen=True)
class Snapshot:
    """The aggregator with the honest devices idle."""

    rss_bytes: int
    hwm_bytes: int
    broker_rss_bytes: int | None
    state_dir: dict[str, int]
    latency: dict[str, float]
    latency_s: list[float]


@dataclass(frozen=True)
class Flooded:
    """The aggregator while the kinds ran (the honest devices training in rounds 1-3)."""

    rss_max_bytes: int
    latency: dict[str, float]
    latency_s: list[float]
    rss_mb: list[tuple[float, float]]
    """Every RSS sample: seconds since the start of the run, MB."""


@dataclass(frozen=True)
class Result:
    """One run of the benchmark."""

    broker: str
    command: str
    messages: int
    kinds: int
    seconds: float
    phases: list[Phase]
    before: Snapshot
    during: Flooded
    after: Snapshot
    end_state_dir: dict[str, int]
    kept_uploads: dict[str, int]
    """Mallory's rejected updates still in the aggregator's blob store at the end: blobs and bytes."""
    honest_rejected: int
    """Lines of the honest agents' logs about something of theirs being rejected (must be none)."""
    strays: dict[str, int]
    """Messages the broker delivered to a client without a subscription to their topic, by client
    (the benchmark's clients drop them; the agents refuse them as retained replays, ``agents``)."""
    stray_topics: list[str]
    """A few of the benchmark's clients' stray topics."""
    inbox_dropped: int
    """Lines of the aggregator's log about messages dropped because its inbox was full."""
    rejected: dict[str, int]
    """The aggregator's counters at the end (``state.json``)."""
    history: list[list[str]]
    rounds: list[RoundCheck]
    finished: bool
    load_before: list[float]
    load_after: list[float]
    machine: dict[str, Any]
    benchmark: str = "adversarial"

    @property
    def merged_correctly(self) -> bool:
        checked = [r for r in self.rounds if r.max_abs_diff is not None]
        samples_ok = all(r.num_samples == SAMPLES for r in self.rounds)
        return (
            bool(checked) and samples_ok and all(r.max_abs_diff is not None and r.max_abs_diff < 1e-5 for r in checked)
        )

    @property
    def ok(self) -> bool:
        honest_only = all(devices == list(HONEST) for devices in self.history)
        clean = self.honest_rejected == 0 and self.inbox_dropped == 0
        return self.finished and honest_only and clean and self.merged_correctly and all(p.ok for p in self.phases)


# ---- the broker and the services ----------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """A running broker: its URL, the logins of its users (none when anonymous), its pid."""

    url: str
    logins: dict[str, BrokerLogin]
    pid: int | None

    @property
    def acl(self) -> bool:
        return bool(self.logins)

    def login(self, user: str) -> BrokerLogin | None:
        return self.logins.get(user)


@contextlib.contextmanager
def broker(name: BrokerName, directory: Path) -> Iterator[Broker]:
    """Start the broker ``name`` with its files under ``directory``."""
    if name == "embedded":
        embedded = EmbeddedBroker()
        with embedded as url:
            yield Broker(url, {}, embedded.process.pid if embedded.process else None)
        return
    if name == "mosquitto":
        with mosquitto(directory / "broker") as url:
            yield Broker(url, {}, child_pid("mosquitto"))
        return
    spec = BrokerSpec(
        fleet="t",
        devices=(*HONEST, MALLORY, GHOST, PROBE),
        tls=True,
        port=free_port(),
        bind="127.0.0.1",
        run_as=pwd.getpwuid(os.geteuid()).pw_name,  # as root, mosquitto would switch to a user that can't read 0600
    )
    files = write_broker_config(spec, directory / "conf")
    logins = {
        i.username: BrokerLogin(
            username=i.username,
            password_file=i.password_file,
            tls_ca=i.directory / "ca.pem",
            tls_cert=i.directory / "client.pem",
            tls_key=i.directory / "client.key",
        )
        for i in files.identities
    }
    conf = files.conf.read_text() + f"log_dest file {directory / 'broker.log'}\n"
    with mosquitto(directory / "broker", spec.listen_port, conf):
        yield Broker(spec.url, logins, child_pid("mosquitto"))


def configure(run_dir: Path, where: Broker, rounds: int, train_steps: int) -> tuple[Path, list[Path]]:
    """The aggregator's and the honest agents' configs, logged in to ``where``."""
    agg_config, agent_configs = write_configs(
        run_dir,
        where.url,
        devices=len(HONEST),
        rounds=rounds,
        per_round=len(HONEST) + 1,
        quorum=len(HONEST),
        round_timeout_s=3600,  # mallory holds each round open until it is done with it
        selection_wait_s=3600,  # every round has all three devices, however slowly the agents start
        round_split="equal",
        train={"steps": train_steps, "batch_size": 2, "seq_len": 48, "lr": 1e-3},
        serve_rate_bytes_per_s=SERVE_RATE,
        upload_quota_bytes=UPLOAD_QUOTA,
    )
    logins = {agg_config: where.login("aggregator-t")}
    for device, path in zip(HONEST, agent_configs, strict=True):
        config = yaml.safe_load(path.read_text())
        config["data"] = f"synthetic:{SAMPLES[device]}:{device[-1]}"
        path.write_text(yaml.safe_dump(config))
        logins[path] = where.login(device)
    for path, login in logins.items():
        if login is not None:
            config = yaml.safe_load(path.read_text())
            config.update(json.loads(login.model_dump_json(exclude_none=True)))
            path.write_text(yaml.safe_dump(config))
    return agg_config, agent_configs


# ---- the run -------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], timeout: float, what: str, server: subprocess.Popen | None = None) -> Any:
    """Poll ``condition`` until it is truthy (its value); raise if ``timeout`` passes or the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            value = condition()
            if value:
                return value
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the aggregator exited ({server.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def honest_accepted(run_dir: Path, round_index: int) -> bool:
    state = json.loads((run_dir / "agg" / "state" / "state.json").read_text())
    round_ = state.get("open_round") or {}
    return round_.get("index") == round_index and set(HONEST) <= set(round_.get("accepted", {}))


def snapshot(pid: int, broker_pid: int | None, state_dir: Path, probe: Probe, probes: int) -> Snapshot:
    latencies = [probe.latency() for _ in range(probes)]
    rss, hwm = memory(pid)
    broker_rss = memory(broker_pid)[0] if broker_pid else None
    return Snapshot(rss, hwm, broker_rss, state_dir_usage(state_dir), latency_summary(latencies), latencies)


def run(
    run_dir: Path,
    broker_name: BrokerName,
    messages: int,
    rounds: int = 4,
    train_steps: int = 2,
    probes: int = 20,
    publish_rate: float = 0.0,
    seed: int = 0,
    command: str = "",
) -> Result:
    """One benchmark run under ``run_dir``: about ``messages`` hostile messages against a tiny run."""
    started = time.monotonic()
    load_before = load_average()
    scale = messages / BASE_MESSAGES
    rng = random.Random(seed)
    state_dir = run_dir / "agg" / "state"
    with contextlib.ExitStack() as stack:
        where = stack.enter_context(broker(broker_name, run_dir / "broker"))
        agg_config, agent_configs = configure(run_dir, where, rounds, train_steps)
        attacker = Attacker(where.url, where.logins, run_dir, enrolled(run_dir, MALLORY), publish_rate)
        stack.callback(attacker.close)
        mallory = attacker.mallory
        probe_key = enrolled(run_dir, PROBE)  # before the aggregator starts, as every enrolment
        poison = leave_poison(attacker, scale)
        server = start("serve", "--config", str(agg_config), log=run_dir / "serve.log")
        stack.callback(stop, server)
        for config in agent_configs:
            stack.callback(stop, start("agent", "--config", str(config), log=run_dir / f"{config.stem}.log"))
        wait_until(lambda: json.loads((state_dir / "state.json").read_text()).get("stage"), 300, "stage 1", server)
        mallory.publish(up(MALLORY), Envelope(kind=Kind.HELLO, sender=MALLORY, data={"profile": valid_profile()}))
        probe = Probe(where.url, run_dir, probe_key, where.login(PROBE))
        stack.callback(probe.close)
        during = During(server.pid)
        flood = Flood(attacker, probe, during, run_dir, scale, rng)
        tasks: dict[int, Envelope] = {}
        before = after = None
        for index, names in enumerate(plan(rounds)):
            task = mallory.next(Kind.TASK, timeout=600, where=lambda m, i=index: m.round == i)
            mallory.task = tasks[index] = task
            if index == 0 or task.stage != tasks[index - 1].stage:
                flood.start = mallory.start_lora()
            if index == 0:
                wait_until(lambda: honest_accepted(run_dir, 0), 600, "the honest updates of round 0", server)
                probe.join(task)
                flood.counters = probe.counters()
                before = snapshot(server.pid, where.pid, state_dir, probe, probes)
                what = "a poisoned hello left retained on uplinks before the start"
                expected = {Reason.RETAINED.value: poison}
                flood.phases.append(Phase("retained", what, 0, poison, expected, dict(flood.counters)))
            probe.follow(task)
            with watching(probe, during):
                for name in names:
                    if name == "quota":
                        wait_until(lambda i=index: honest_accepted(run_dir, i), 600, "the last honest updates", server)
                    flood.run(name)
            if index == rounds - 1:
                after = snapshot(server.pid, where.pid, state_dir, probe, probes)
            mallory.publish(up(MALLORY), task.reply(Kind.REFUSAL, MALLORY, reason=Reason.MEMORY))
        assert before is not None and after is not None
        if server.wait(timeout=600) != 0:
            raise RuntimeError(f"the aggregator failed: {(run_dir / 'serve.log').read_text()[-3000:]}")
        state = json.loads((state_dir / "state.json").read_text())
    offered = {decode(unseal(o, up(MALLORY), None)).data["blob"] for o in mallory.offers}
    kept = [state_dir / "blobs" / blob for blob in offered if (state_dir / "blobs" / blob).is_file()]
    agent_lines = [line for c in agent_configs for line in (run_dir / f"{c.stem}.log").read_text().splitlines()]
    clients = [*attacker.clients.values(), probe.client, *([attacker.sniffer] if attacker.sniffer else [])]
    strays = {c.client_id: len(c.strays) for c in clients}
    strays["agents"] = sum("rejected: retained message on" in line for line in agent_lines)
    phases = flood.phases
    return Result(
        broker=broker_name,
        command=command,
        messages=sum(p.sent for p in phases),
        kinds=len(phases),
        seconds=round(time.monotonic() - started, 1),
        phases=phases,
        before=before,
        during=Flooded(
            rss_max_bytes=during.rss_max(),
            latency=latency_summary(during.latency_s),
            latency_s=[round(s, 4) for s in during.latency_s],
            rss_mb=[(round(t - started, 2), round(rss / 1e6, 1)) for t, rss in during.rss],
        ),
        after=after,
        end_state_dir=state_dir_usage(state_dir),
        kept_uploads={"blobs": len(kept), "bytes": sum(p.stat().st_blocks * 512 for p in kept)},
        honest_rejected=sum("rejected" in line for line in agent_lines) - strays["agents"],
        strays=strays,
        stray_topics=sorted({topic for c in clients for topic in c.strays})[:8],
        inbox_dropped=(run_dir / "serve.log").read_text().count("inbox full"),
        rejected=state["rejected"],
        history=[h["devices"] for h in state["history"]],
        rounds=check_rounds(run_dir, tasks, state),
        finished=bool(state["finished"]),
        load_before=load_before,
        load_after=load_average(),
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    )


# ---- command line --------------------------------------------------------------------------------


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _ms(latency: dict[str, float]) -> str:
    return f"{latency['median_s'] * 1e3:.1f} / {latency['p95_s'] * 1e3:.1f} (n={latency['n']})"


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _cell(phase: dict[str, Any]) -> str:
    """What the aggregator counted for a kind, marked against what it must have counted."""
    text = _reasons(phase["counted"])
    text += " ✓" if phase["counted"] == phase["expected"] else f" ✗ (must be {_reasons(phase['expected'])})"
    if phase["answered"]:
        text += f"; {phase['answered']} answered"
    if phase["dropped_by_broker"]:
        text += f"; {phase['dropped_by_broker']:,} dropped by the ACL"
    return text


def markdown(reports: list[dict[str, Any]]) -> list[str]:
    """Tables of results files, the brokers side by side."""
    lines = []
    for r in reports:
        ok = sum(p["counted"] == p["expected"] for p in r["phases"])
        lines.append(
            f"- `{r['broker']}`: {r['messages']:,} messages of {r['kinds']} kinds, `{r['command']}`, "
            f"{r['seconds']:.0f} s on {r['machine']['cpus']} CPUs, load average {r['load_before'][0]:.2f} before "
            f"and {r['load_after'][0]:.2f} after; {ok} of {len(r['phases'])} kinds counted exactly as they must "
            f"be; run finished: {r['finished']}, merged per round: {', '.join('+'.join(h) for h in r['history'])}."
        )
    brokers = [r["broker"] for r in reports]
    lines += [
        "",
        "| kind | round | what | " + " | ".join(f"sent, `{b}` | counted, `{b}`" for b in brokers) + " |",
        "|---|---:|---|" + "---:|---|" * len(reports),
    ]
    for i, phase in enumerate(reports[0]["phases"]):
        cells = [f"{r['phases'][i]['sent']:,} | {_cell(r['phases'][i])}" for r in reports]
        lines.append(f"| {phase['kind']} | {phase['round']} | {phase['what']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| aggregator | " + " | ".join(f"`{b}` before | during | after | end" for b in brokers) + " |",
        "|---|" + "---:|---:|---:|---:|" * len(reports),
    ]

    def row(label: str, cells: Callable[[dict[str, Any]], list[str]]) -> str:
        return f"| {label} | " + " | ".join(" | ".join(cells(r)) for r in reports) + " |"

    def rss(r: dict[str, Any]) -> list[str]:
        during = _mb(r["during"]["rss_max_bytes"]) + " (max)"
        return [_mb(r["before"]["rss_bytes"]), during, _mb(r["after"]["rss_bytes"]), ""]

    def hwm(r: dict[str, Any]) -> list[str]:
        return [_mb(r["before"]["hwm_bytes"]), "", _mb(r["after"]["hwm_bytes"]), ""]

    def broker_rss(r: dict[str, Any]) -> list[str]:
        return [_mb(r["before"]["broker_rss_bytes"]), "", _mb(r["after"]["broker_rss_bytes"]), ""]

    def latency(r: dict[str, Any]) -> list[str]:
        return [_ms(r["before"]["latency"]), _ms(r["during"]["latency"]), _ms(r["after"]["latency"]), ""]

    def usage(part: str) -> Callable[[dict[str, Any]], list[str]]:
        def cells(r: dict[str, Any]) -> list[str]:
            kib = [r["before"]["state_dir"][part], r["after"]["state_dir"][part], r["end_state_dir"][part]]
            return [f"{kib[0] / 1024:,.0f}", "", f"{kib[1] / 1024:,.0f}", f"{kib[2] / 1024:,.0f}"]

        return cells

    lines += [
        row("RSS, MB", rss),
        row("peak RSS (VmHWM), MB", hwm),
        row("broker RSS, MB", broker_rss),
        row("chunk-request latency, median / p95 ms (probes)", latency),
    ]
    for part in reports[0]["before"]["state_dir"]:
        label = "state directory, KiB (du)" if part == "total" else f"&nbsp;&nbsp;{part}, KiB"
        lines.append(row(label, usage(part)))
    lines += [
        "",
        "| broker | round | stage | merged | declared samples | robust weights | max abs diff to the robust mean "
        "| to plain FedAvg | note |",
        "|---|---:|---:|---|---|---|---:|---:|---|",
    ]
    for r in reports:
        for c in r["rounds"]:
            diff = "-" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.1e}"
            fedavg = "-" if c["fedavg_diff"] is None else f"{c['fedavg_diff']:.1e}"
            samples = ", ".join(f"{d} {n}" for d, n in c["num_samples"].items())
            lines.append(
                f"| `{r['broker']}` | {c['round']} | {c['stage']} | {'+'.join(c['devices'])} | {samples} | "
                f"{', '.join(f'{w:g}' for w in c['robust_weights'])} | {diff} | {fedavg} | {c['note']} |"
            )
    lines.append("")
    for r in reports:
        kept = r["kept_uploads"]
        topics = f" (topics such as {', '.join(r['stray_topics'][:3])})" if r["stray_topics"] else ""
        lines.append(
            f"- `{r['broker']}`: rejections counted in all: {_reasons(r['rejected'])}. Mallory's rejected uploads "
            f"left in the blob store: {kept['blobs']} ({_mb(kept['bytes'])} MB). Honest agents' log lines about a "
            f"rejection: {r['honest_rejected']}; aggregator log lines about a full inbox: {r['inbox_dropped']}. "
            f"Messages the broker delivered without a subscription: {_reasons(r['strays'])}{topics}."
        )
    return lines


def _cmd_run(args: argparse.Namespace) -> int:
    out = args.out or RESULTS / f"{args.broker}.json"
    command = shlex.join(["python", "benchmarks/adversarial.py", *sys.argv[1:]])
    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="adversarial-") as tmp:
        run_dir = Path(args.keep) if args.keep else Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        result = run(
            run_dir,
            args.broker,
            args.messages,
            rounds=args.rounds,
            train_steps=args.train_steps,
            probes=args.probes,
            publish_rate=args.publish_rate,
            seed=args.seed,
            command=command,
        )
    print(f"load average after: {load_average()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {**asdict(result), "ok": result.ok, "merged_correctly": result.merged_correctly}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(markdown([report])))
    print(f"\n{'OK' if result.ok else 'NOT OK'}; results in {out}")
    return 0 if result.ok else 1


def _cmd_report(args: argparse.Namespace) -> int:
    files = args.results or sorted(RESULTS.glob("*.json"))
    text = "\n".join(markdown([json.loads(Path(path).read_text()) for path in files])) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``run`` and ``report``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="one run against one broker")
    run_parser.add_argument("--broker", choices=BROKERS, default="mosquitto-tls")
    run_parser.add_argument("--messages", type=int, default=10000, help="hostile messages, about (at least this many)")
    run_parser.add_argument("--rounds", type=int, default=4, help="rounds of the run (2 stages), the kinds spread over")
    run_parser.add_argument(
        "--train-steps", type=int, default=40, help="local steps per round of the honest devices (~10-20 s each)"
    )
    run_parser.add_argument("--probes", type=int, default=20, help="latency probes before and after the flood")
    run_parser.add_argument("--publish-rate", type=float, default=0.0, help="messages per second at most (0: no limit)")
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS}/<broker>.json)")
    run_parser.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it (logs, state)")
    run_parser.set_defaults(func=_cmd_run)
    report = sub.add_parser("report", help="markdown tables of results files")
    report.add_argument("results", type=Path, nargs="*", help=f"results JSONs (default: {RESULTS}/*.json)")
    report.add_argument("--markdown", type=Path, default=None)
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
