"""``serve``, ``agent`` and ``status``: run the aggregator or a device agent, and watch a run."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from devft_edge.errors import DevFTError

if TYPE_CHECKING:
    from devft_edge.cli.options import Subparsers
    from devft_edge.mqtt import BrokerLogin


def _run_serve(args: argparse.Namespace) -> int:
    import contextlib

    from cloud_aggregator.config import AggregatorConfig
    from cloud_aggregator.service import Aggregator
    from devft_edge.ops.broker import EmbeddedBroker

    for name in ("cloud_aggregator", "devft_edge.mqtt"):  # a service's log is its progress display
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = AggregatorConfig.from_file(args.config)
    broker = args.broker or cfg.broker
    with contextlib.ExitStack() as stack:
        if broker is None:
            embedded = EmbeddedBroker(port=args.embedded_port)
            broker = stack.enter_context(embedded)
            print(f"embedded broker on {broker}: start agents with --broker {broker}", flush=True)
        state = Aggregator(cfg, broker).run()
    print(
        f"run {state.run_id}: {'finished' if state.finished else 'stopped'} after {state.rounds_done} rounds, "
        f"stage {state.stage}; up {state.bytes_up / 1e6:.1f} MB, down {state.bytes_down / 1e6:.1f} MB"
    )
    return 0


def _status_login(args: argparse.Namespace) -> BrokerLogin | None:
    """``status``'s login flags as a :class:`~devft_edge.mqtt.BrokerLogin` (None without any)."""
    from pydantic import ValidationError

    from devft_edge.errors import ConfigError
    from devft_edge.mqtt import BrokerLogin
    from devft_edge.ops.broker_config import monitor_username

    fields = dict(
        username=args.username or (monitor_username(args.fleet) if args.password_file else None),
        password_file=args.password_file,
        tls_ca=args.ca,
        tls_cert=args.cert,
        tls_key=args.key,
    )
    if not any(fields.values()):
        return None
    try:
        return BrokerLogin(**fields)
    except ValidationError as error:
        raise ConfigError([f"{'.'.join(map(str, e['loc'])) or 'login'}: {e['msg']}" for e in error.errors()]) from None


def _run_status(args: argparse.Namespace) -> int:
    import queue
    import time

    from devft_edge.messages import Status
    from devft_edge.mqtt import BrokerAddress, Connection
    from devft_edge.protocol import Kind, ProtocolError, Topics, decode, unseal
    from devft_edge.signing import load_public_key

    topic = Topics(f"devft/{args.fleet}").status
    key = load_public_key(args.public_key) if args.public_key else None
    login = _status_login(args)
    connection = Connection(
        BrokerAddress.parse(args.broker), f"status-{args.fleet}-{id(args)}", [topic], login=login, persistent=False
    )
    connection.start(timeout=args.timeout)
    deadline = time.monotonic() + args.timeout
    data, refused = None, ""
    try:
        while data is None:  # only the status topic's STATUS counts (some brokers also replay others)
            item = connection.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            try:
                message = decode(unseal(item.payload, item.topic, key))
            except ProtocolError as error:
                refused = f" (a message was refused: {error})"
                continue
            if item.topic == topic and message.kind is Kind.STATUS:
                data = message.data
    except queue.Empty:
        raise DevFTError(f"no aggregator status on {topic} within {args.timeout:.0f} s{refused}") from None
    finally:
        connection.stop()
    status = Status.from_data(data)
    if args.json:
        print(json.dumps(status.to_data(), indent=2))
        return 0
    r, loss = status.round_open, status.eval_loss
    print(
        f"run {status.run}: stage {status.stage}/{status.stages}, round {status.round}/{status.rounds}"
        f"{' (finished)' if status.finished else ''}\n"
        f"  devices online: {', '.join(status.devices_online) or '-'}"
        f" ({status.devices_online_count} online, {status.devices_known} known)\n"
        f"  open round: {'-' if r is None else f'{r.index}, updates {len(r.accepted)}/{len(r.selected)}'}\n"
        f"  bytes up {status.bytes_up / 1e6:.1f} MB, down {status.bytes_down / 1e6:.1f} MB; "
        f"last eval loss {'-' if loss is None else f'{loss:.4f}'}; refused tasks: {sum(status.refusals.values())}"
    )
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent
    from device_agent.config import AgentConfig

    for name in ("device_agent", "devft_edge.mqtt"):  # a service's log is its progress display
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = AgentConfig.from_file(args.config)
    if args.broker:
        cfg = cfg.model_copy(update={"broker": args.broker})
    Agent(cfg).run(max_seconds=args.max_seconds)
    return 0


def add_serve(sub: Subparsers) -> None:
    """``serve``: the cloud aggregator service."""
    sv = sub.add_parser("serve", help="run the cloud aggregator service")
    sv.add_argument("--config", type=Path, required=True, help="aggregator YAML config")
    sv.add_argument("--broker", default=None, help="mqtt://host:port (default: the config's, else embedded)")
    sv.add_argument("--embedded-port", type=int, default=None, help="port of the embedded broker (default: free)")
    sv.set_defaults(func=_run_serve)


def add_status(sub: Subparsers) -> None:
    """``status``: a run's progress from the aggregator's retained status."""
    st = sub.add_parser("status", help="show a run's progress from the aggregator's retained status")
    st.add_argument("--broker", required=True, help="mqtt[s]://host:port")
    st.add_argument("--username", default=None, help="MQTT username (default with --password-file: monitor-<fleet>)")
    st.add_argument("--password-file", type=Path, default=None, help="file whose first line is the password")
    st.add_argument("--ca", type=Path, default=None, help="CA certificate (PEM) of an mqtts:// broker")
    st.add_argument("--cert", type=Path, default=None, help="client certificate (PEM), if the broker requires one")
    st.add_argument("--key", type=Path, default=None, help="private key (PEM) of --cert")
    st.add_argument("--fleet", default="default", help="fleet name (topic prefix devft/<fleet>)")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the status")
    st.add_argument(
        "--public-key",
        type=Path,
        default=None,
        help="the aggregator's public key: show the status only if it signed it",
    )
    st.add_argument("--json", action="store_true", help="print the status document")
    st.set_defaults(func=_run_status)


def add_agent(sub: Subparsers) -> None:
    """``agent``: the on-device training agent."""
    ag = sub.add_parser("agent", help="run the on-device training agent")
    ag.add_argument("--config", type=Path, required=True, help="agent YAML config")
    ag.add_argument("--broker", default=None, help="mqtt://host:port (overrides the config)")
    ag.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: run until killed)")
    ag.set_defaults(func=_run_agent)
