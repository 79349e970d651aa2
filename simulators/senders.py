"""The sender of every protocol in ``stream.detectors.PROTOCOLS``, as ``rrstem simulate`` and ``replay`` call it.

``SENDERS`` maps each protocol's name to a ``Sender``: ``send(source, args,
order, on_endpoint)`` reads the parsed command line and calls the protocol's
sender (``source.stream`` for rrstem/1, ``dectris.stream_detector``,
``merlin.serve_merlin``); ``options`` names the protocol-specific options it
reads (``SPECIFIC``), which ``send_args`` refuses for every other protocol.
The rest comes from the protocol's entry: ``--keys`` only where it speaks
CURVE, no ``--connect``/``--pub`` where the detector serves a TCP port.

The table is keyed by name here, rather than named in the ``Protocol`` entry
as a ``"module:function"`` string: ``stream/`` then says nothing of
``simulators/`` (not even in a string the import check cannot see), a sender
is an ordinary import that fails when the module loads rather than on first
use, and its command-line options stay beside it; ``tests/test_protocols.py``
checks that every protocol in the table has one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from rrstem.simulators.dectris import stream_detector
from rrstem.simulators.merlin import serve_merlin
from rrstem.simulators.source import Source, StreamStats, stream
from rrstem.stream.detectors import PROTOCOLS, lookup

#: send(source, args, order or None, on_endpoint) -> StreamStats
Send = Callable[[Source, argparse.Namespace, "Sequence[int] | None", Callable[[str], None]], StreamStats]


@dataclass(frozen=True)
class Sender:
    send: Send
    options: tuple[str, ...] = ()  # the protocol-specific options (SPECIFIC) it reads


#: Options that only some protocols' senders read: dest -> (flag, default). Refused for the others.
SPECIFIC = {"compression": ("--compression", "none"), "layout": ("--layout", "1x1"),
            "sync_offset": ("--sync-offset", 0), "flyback": ("--flyback", 0), "no_scan_xy": ("--no-scan-xy", False)}


def _zmq(args: argparse.Namespace, on_endpoint) -> dict:
    """The options of a ZeroMQ sender (``source.stream``, ``dectris.stream_detector``)."""
    return dict(bind=not args.connect, socket_type="pub" if args.pub else "push", rate=args.rate,
                progress=not args.no_progress, timeout=args.timeout, on_endpoint=on_endpoint)


def _rrstem(source, args, order, on_endpoint) -> StreamStats:
    return stream(source, args.to, frames_per_message=args.frames_per_message, order=order, keys=args.keys,
                  **_zmq(args, on_endpoint))


def _dectris(source, args, order, on_endpoint) -> StreamStats:
    return stream_detector(source, args.to, protocol=args.protocol, compression=args.compression,
                           header_detail=args.header_detail, series=args.series, order=order,
                           **_zmq(args, on_endpoint))


def _merlin(source, args, order, on_endpoint) -> StreamStats:
    return serve_merlin(source, args.to, layout=args.layout, sync_offset=args.sync_offset, flyback=args.flyback,
                        scan_xy=not args.no_scan_xy, rate=args.rate, progress=not args.no_progress,
                        timeout=args.timeout, on_endpoint=on_endpoint,
                        order=None if order is None else np.asarray(order))


#: protocol name -> its sender; every name in PROTOCOLS has one.
SENDERS: dict[str, Sender] = {
    "rrstem": Sender(_rrstem),
    "simplon": Sender(_dectris, ("compression",)),
    "stream2": Sender(_dectris, ("compression",)),
    "merlin": Sender(_merlin, ("layout", "sync_offset", "flyback", "no_scan_xy")),
}


def send_args(source: Source, args: argparse.Namespace, order: Sequence[int] | None,
              on_endpoint: Callable[[str], None]) -> StreamStats:
    """Send ``source`` as ``args.protocol`` with the options in ``args``; a ``ValueError`` for options the
    protocol does not take."""
    spec, sender = lookup(args.protocol), SENDERS[args.protocol]
    if args.keys is not None and not spec.curve:
        raise ValueError(f"--keys applies to --protocol {' or '.join(n for n, p in PROTOCOLS.items() if p.curve)}: "
                         f"{spec.name} has no CURVE, as the detectors that speak it have none")
    wrong = [(flag, [n for n, s in SENDERS.items() if dest in s.options]) for dest, (flag, default) in SPECIFIC.items()
             if getattr(args, dest) != default and dest not in sender.options]
    if wrong:
        raise ValueError("; ".join(f"{flag} applies to --protocol {' or '.join(takers)}" for flag, takers in wrong)
                         + f", not {spec.name}")
    if spec.transport == "tcp" and (args.connect or args.pub):
        raise ValueError(f"the {spec.name} detector serves its data port over plain TCP: rrstem serve --protocol "
                         f"{spec.name} connects to it; drop --connect and --pub")
    return sender.send(source, args, order, on_endpoint)
