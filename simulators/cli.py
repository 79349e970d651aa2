"""What the simulators contribute to the ``rrstem`` command line: ``simulate`` and ``replay``.

The one parser (``rrstem.cli``) registers them with
``add_simulate_args(subparsers)`` and ``add_replay_args(subparsers)``; each
sets ``func``, which takes the parsed arguments and returns an exit code.
Both share one set of streaming options (``--to``, ``--rate``, ``--connect``,
``--pub``, ...), because every source streams the same way. ``--protocol``
offers the names of ``stream.detectors.PROTOCOLS``, with help from their
descriptions, and each is sent by its sender in ``simulators/senders.py``.
"""

from __future__ import annotations

import argparse
import sys

from rrstem.simulators.bridge import Bridge, graphene_subscans, replay_subscans
from rrstem.simulators.dectris import COMPRESSIONS, HEADER_DETAILS
from rrstem.simulators.files import SUFFIXES, open_file
from rrstem.simulators.graphene import DEFECTS, GrapheneSource
from rrstem.simulators.merlin import LAYOUTS
from rrstem.simulators.senders import send_args
from rrstem.simulators import source as source_module
from rrstem.simulators.source import Source
from rrstem.stream.cli import add_keys_option, parse_scan_shape
from rrstem.stream.detectors import PROTOCOLS


def parse_dose(text: str) -> float | None:
    """Electrons per pattern; ``none``, ``inf`` or ``0`` mean noise-free."""
    if text.lower() in ("none", "inf", "0"):
        return None
    try:
        dose = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"dose must be electrons per pattern such as 3e6, or 'none', not {text!r}") from None
    if dose <= 0:
        raise argparse.ArgumentTypeError(f"dose must be positive, not {text!r}")
    return dose


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text!r}")
        return value
    return parse


def protocols_help() -> str:
    """What ``simulate/replay --protocol`` says of each protocol in ``PROTOCOLS``."""
    def one(p) -> str:
        return (f"{p.name}: {p.description}"
                + (", sends no scan shape (serve it with --scan-shape NYxNX)" if p.needs_scan_shape else "")
                + (f", served as the detector serves it, on --to tcp://HOST:PORT (rrstem serve --protocol {p.name} "
                   "--listen tcp://HOST:PORT connects to it)" if p.transport == "tcp" else ""))
    return "; ".join(one(p) for p in PROTOCOLS.values())


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming")
    g.add_argument("--to", required=True, metavar="EP",
                   help="ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555 (port 0 picks a free one) or ipc:///tmp/x")
    g.add_argument("--rate", type=_positive(float), default=None, metavar="FPS",
                   help="frames per second (default: as fast as possible)")
    g.add_argument("--connect", action="store_true",
                   help="connect to EP instead of binding it, for a receiver that binds it (serve --bind)")
    g.add_argument("--pub", action="store_true", help="PUB socket instead of PUSH (lossy tap; waits for a subscriber)")
    g.add_argument("--scan-id", default=None, help="scan id in the start message (default: derived from the source)")
    g.add_argument("--frames-per-message", type=_positive(int), default=None, metavar="N",
                   help="frames per message (default: ~2 MB messages)")
    g.add_argument("--timeout", type=_positive(float), default=30.0, metavar="S",
                   help="give up if no receiver takes frames for this long (default 30 s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_keys_option(g, "binding, the sender is the CURVE server and sends only to the clients in DIR/authorized/ "
                       "(serve --keys DIR); with --connect it is a CURVE client of serve --bind --keys DIR. "
                       "rrstem/1 only: detector protocols have no CURVE")
    b = p.add_argument_group("steering (a microscope bridge: docs/steering.md)")
    b.add_argument("--steer", default=None, metavar="EP",
                   help="after the scan, obey the rescan requests the service publishes on its steering endpoint "
                        "EP (serve --steering), streaming each subscan to --to")
    b.add_argument("--steer-idle", type=_positive(float), default=60.0, metavar="S",
                   help="with --steer: exit once no rescan request has come for S seconds (default 60)")
    d = p.add_argument_group("detector protocol")
    d.add_argument("--protocol", choices=PROTOCOLS, default=next(iter(PROTOCOLS)),
                   help=f"wire protocol (default %(default)s): {protocols_help()}")
    d.add_argument("--compression", choices=COMPRESSIONS, default="none",
                   help="DECTRIS protocols: pixel data compression (default none)")
    d.add_argument("--header-detail", choices=HEADER_DETAILS, default="basic",
                   help="simplon: how much the series header says (default basic)")
    d.add_argument("--series", type=int, default=1, metavar="N", help="DECTRIS protocols: series number (default 1)")
    d.add_argument("--layout", choices=LAYOUTS, default="1x1",
                   help="merlin: chip layout in the headers, single chip 1x1 or quad 2x2 (default 1x1)")
    d.add_argument("--sync-offset", type=int, default=0, metavar="N",
                   help="merlin: send a misaligned acquisition: N extra frames before the scan, or, negative, "
                        "the first -N positions never sent (default 0)")
    d.add_argument("--flyback", type=int, default=0, metavar="N",
                   help="merlin: N extra frames after each scan line, as the flyback of a real scan (default 0)")
    d.add_argument("--no-scan-xy", action="store_true",
                   help="merlin: leave ScanX/ScanY out of the acquisition header (serve then needs --scan-shape)")


def add_simulate_args(subparsers) -> argparse.ArgumentParser:
    """Register ``simulate``: stream a synthetic graphene scan."""
    p = subparsers.add_parser(
        "simulate", help="stream a synthetic graphene 4D-STEM scan",
        description="Stream a synthetic 60 kV graphene scan (phase-object CBED, 31 mrad probe) like a detector.")
    p.add_argument("--scan", type=parse_scan_shape, default=(64, 64), metavar="NYxNX",
                   help="scan shape: 64x48, or 64 for 64x64 (default 64x64)")
    p.add_argument("--detector", type=int, default=128, metavar="N", help="detector edge in pixels, 64..256 (default 128)")
    p.add_argument("--dose", type=parse_dose, default=3e6, metavar="D",
                   help="electrons per pattern, Poisson noise (default 3e6); 'none' for noise-free")
    p.add_argument("--defect", choices=DEFECTS, default="none", help="defect at the scan centre (default none)")
    p.add_argument("--step-nm", type=_positive(float), default=0.02, help="scan step in nm (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    _add_stream_args(p)
    p.set_defaults(func=run_simulate)
    return p


def add_replay_args(subparsers) -> argparse.ArgumentParser:
    """Register ``replay``: stream a recorded 4D file."""
    p = subparsers.add_parser(
        "replay", help="stream a recorded 4D-STEM file",
        description=f"Stream a recorded (scan_y, scan_x, det_y, det_x) array ({', '.join(SUFFIXES)}) like a detector.")
    p.add_argument("input", metavar="INPUT", help="the file to replay")
    p.add_argument("--key", default=None, metavar="NAME", help="array (.npz) or dataset path (HDF5) when there are several")
    p.add_argument("--scan-shape", type=parse_scan_shape, default=None, metavar="NYxNX",
                   help="scan shape of a flat series of frames (a DECTRIS master file, a .mib without ScanX/ScanY)")
    _add_stream_args(p)
    p.set_defaults(func=run_replay)
    return p


def _stream_args(args, source: Source, command: str) -> int:
    s = source.start

    def announce(endpoint: str) -> None:
        verb = "connected to" if args.connect else "bound"
        print(f"rrstem {command}: {verb} {endpoint}; scan {s.scan_id}: {s.scan_shape[0]}x{s.scan_shape[1]} "
              f"frames of {s.frame_shape[0]}x{s.frame_shape[1]} {s.dtype}", file=sys.stderr, flush=True)

    if source.problem:
        print(f"rrstem {command}: warning: {source.problem}; sending the {source.available_frames} good frames "
              f"of {source.n_frames}", file=sys.stderr, flush=True)
    order = source.valid_order  # a damaged file: the frames before the damage
    stats = send_args(source, args, order, announce)  # the protocol's sender (simulators/senders.py)
    print(f"rrstem {command}: sent {stats.frames} frames in {stats.seconds:.2f} s "
          f"({stats.frames_per_s:.0f} frames/s) to {stats.endpoint}", file=sys.stderr, flush=True)
    if source.problem:  # README "Exit codes": 1, the scan sent is incomplete
        print(f"rrstem {command}: error: {source.problem}; the {stats.frames} good frames were sent",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _run(command: str, make_source, args, subscans=None) -> int:
    try:
        with make_source() as source:
            if args.steer is None:
                return _stream_args(args, source, command)
            if args.protocol != "rrstem":
                raise ValueError("--steer streams subscans in rrstem/1: drop --protocol")
            with Bridge(args.steer, subscans(source)) as bridge:
                code = _stream_args(args, source, command)
                return code or _obey(args, bridge, source, command)
    except (ValueError, TimeoutError) as exc:
        print(f"rrstem {command}: error: {exc}", file=sys.stderr, flush=True)
        return 1


def _obey(args, bridge: Bridge, parent: Source, command: str) -> int:
    """Stream every subscan the bridge accepts, until none has come for ``--steer-idle`` seconds."""
    print(f"rrstem {command}: obeying rescan requests from {args.steer} (until {args.steer_idle:g} s without one)",
          file=sys.stderr, flush=True)
    rate = args.rate
    if not args.connect and source_module.LAST_ENDPOINT:
        args.to = source_module.LAST_ENDPOINT  # bound on port 0: every subscan binds the port the scan had
    while True:
        sub = bridge.next_subscan(args.steer_idle)
        if sub is None:
            print(f"rrstem {command}: no rescan request for {args.steer_idle:g} s; done", file=sys.stderr, flush=True)
            return 0
        bridge.wait_parent_ended(sub)
        dwell = sub.start.metadata.get("rescan", {}).get("dwell_factor", 1.0)
        args.rate = None if rate is None else rate / dwell  # a longer dwell per position: fewer frames per second
        with sub:
            code = _stream_args(args, sub, command)
        args.rate = rate
        if code:
            return code


def run_simulate(args) -> int:
    """Stream the graphene scan described by ``args``; returns the exit code."""
    return _run("simulate", lambda: GrapheneSource(
        args.scan, args.detector, defect=args.defect, dose=args.dose, seed=args.seed,
        step_nm=args.step_nm, scan_id=args.scan_id), args, graphene_subscans)


def run_replay(args) -> int:
    """Stream the file named by ``args.input``; returns the exit code."""
    return _run("replay", lambda: open_file(args.input, args.key, scan_id=args.scan_id, scan_shape=args.scan_shape,
                                               extra_ok=True),
                args, replay_subscans)
