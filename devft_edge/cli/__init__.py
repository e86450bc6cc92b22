"""The ``devft-edge`` command line: thin wrappers over the library.

Each sub-command parses its options into the library's validated configs and calls one function;
logging is configured here and only here. The CLI belongs to the operations layer (see
:mod:`devft_edge.ops`): it may import the services and ``devft_edge.ops``, and nothing below it
imports the CLI. One module per command group, each with an ``add_<command>`` function that
registers a sub-command and the ``_run_*`` function that runs it:

- :mod:`~devft_edge.cli.run`: ``simulate``, ``demo`` (a whole federation on this machine);
- :mod:`~devft_edge.cli.plan`: ``plan``, ``profile`` (device profiles and stage plans);
- :mod:`~devft_edge.cli.fleet`: ``keygen``, ``enroll``, ``broker-config``, ``flash`` (a fleet's set-up);
- :mod:`~devft_edge.cli.pack`: ``pack``, ``pack inspect``, ``pack verify``;
- :mod:`~devft_edge.cli.services`: ``serve``, ``status``, ``agent`` (the services and their progress);
- :mod:`~devft_edge.cli.options`: option helpers several groups share.
"""

from __future__ import annotations

import argparse
import logging
import sys

from devft_edge.cli import fleet, pack, plan, run, services
from devft_edge.errors import DevFTError
from devft_edge.threads import configure_threads


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every sub-command.

    The run commands' options are made from the run configuration, whose import loads torch (seconds);
    given the ``command`` being run, only its options are built (None: all of them).
    """
    parser = argparse.ArgumentParser(
        prog="devft-edge", description="Developmental federated LoRA tuning for edge devices."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    # The order here is the order ``devft-edge --help`` lists the sub-commands in.
    run.add_simulate(sub, full=command in (None, "simulate"))
    run.add_demo(sub, full=command in (None, "demo"))
    plan.add_plan(sub)
    fleet.add_keygen(sub)
    fleet.add_enroll(sub)
    fleet.add_broker_config(sub)
    fleet.add_flash(sub)
    pack.add_pack(sub, full=command in (None, "pack"))
    services.add_serve(sub)
    services.add_status(sub)
    services.add_agent(sub)
    plan.add_profile(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``devft-edge`` console script."""
    # bitsandbytes (imported by peft when installed, already while the parser is built) warns that
    # its optional hub-downloaded CPU kernel is missing; we never download at run time and its
    # built-in CPU path is what we use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # OpenMP's idle threads sleep instead of spinning (where the user has not chosen): libgomp reads
    # this once, when torch is imported, which building the parser may do
    configure_threads()
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    try:
        return int(args.func(args))
    except DevFTError as exc:
        print(f"devft-edge: error: {exc}", file=sys.stderr)
        return 2
