"""The ``rrstem`` command line: one parser, to which each package contributes its subcommands.

======================  ==========================  =============================================
subcommand              registered by               runs
======================  ==========================  =============================================
``demo``                ``rrstem.commands``         simulator + service + dashboard, one command
``serve``               ``rrstem.stream.cli``       the service, scan after scan
``simulate``            ``rrstem.simulators.cli``   a synthetic graphene scan, sent like a detector
``replay``              ``rrstem.simulators.cli``   a recorded file, sent like a detector
``analyze``             ``rrstem.commands``         a file through the service, in one process
``dashboard``           ``rrstem.gui``              the live dashboard of a running service
``keys``                ``rrstem.stream.cli``       CURVE certificates for ``--keys DIR`` (authenticated sockets)
``events``              ``rrstem.client``           a running service's events, one JSON line each
``rescan``              ``rrstem.client``           ask a running service for a subscan
``export``              ``rrstem.export``           a scan's binned frames as a py4DSTEM DataCube or .zspy
======================  ==========================  =============================================

Each ``add_*_args(subparsers)`` adds one subcommand and sets ``func``, which
takes the parsed arguments and returns the exit code. Run it as ``rrstem``
(the entry point ``rrstem.cli:main``) or ``python -m rrstem.cli``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rrstem.client import add_client_args
from rrstem.commands import add_analyze_args, add_demo_args
from rrstem.export import add_export_args
from rrstem.gui import add_dashboard_args
from rrstem.simulators.cli import add_replay_args, add_simulate_args
from rrstem.stream.cli import add_keys_args, add_serve_args

#: Commands that run a service and so log what it does (INFO) unless told otherwise.
SERVICE_COMMANDS = ("serve", "demo", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrstem", description="Live 4D-STEM analysis beside the microscope.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_args(sub)
    add_serve_args(sub)
    add_simulate_args(sub)
    add_replay_args(sub)
    add_analyze_args(sub)
    add_dashboard_args(sub)
    add_keys_args(sub)
    add_client_args(sub)
    add_export_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    if args.command in SERVICE_COMMANDS and args.verbose == 0:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"rrstem {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
