"""``rrstem.client``: a program's handle on a running rrstem service.

::

    from rrstem.client import Client

    with Client(events="tcp://127.0.0.1:5558", control="tcp://127.0.0.1:5557",
                snapshots="tcp://127.0.0.1:5556") as c:
        snap = c.snapshot()                      # the newest maps and state
        for event in c.events(timeout=60):       # typed events (stream/events.py), as they happen
            if event.type == "anomaly":
                c.rescan((y0, y1, x0, x1), step_factor=0.5, dose_factor=4, scan_id=event.scan_id)
        c.save()

Every wait has a timeout (the client's ``timeout``, or the call's) and ends
in ``ClientTimeout``, whose message names the endpoint and what to check; a
service that answers ``ok: false`` raises ``ClientError`` with its reason.
Also the ``rrstem events`` and ``rrstem rescan`` commands (``add_client_args``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import zmq

from rrstem.stream.auth import Curve, curve_for
from rrstem.stream.cli import add_keys_option
from rrstem.stream.control import ControlClient, ControlError, ControlTimeout
from rrstem.stream.events import EVENT_TYPES, TOPIC_PREFIX, decode_event
from rrstem.stream.snapshot import Snapshot
from rrstem.stream.steering import parse_region

__all__ = ["Client", "ClientError", "ClientTimeout"]


class ClientError(RuntimeError):
    """The service refused a request (its reason is the message), or is not configured for it."""


class ClientTimeout(ClientError, TimeoutError):
    """Nothing came within the timeout: the service is not running there, or has nothing to say."""


class Client:
    """Snapshots (SUB), events (SUB) and control requests (REQ) of one service; give the endpoints you use."""

    def __init__(self, *, control: str | None = None, events: str | None = None, snapshots: str | None = None,
                 timeout: float = 5.0, context: zmq.Context | None = None, keys: "str | Path | Curve | None" = None):
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
        self.control_endpoint, self.events_endpoint, self.snapshots_endpoint = control, events, snapshots
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._curve = curve_for(keys, self._ctx)  # CURVE client (a ``rrstem keys`` folder), or None
        if self._curve is not None:
            self._curve.ready(server=False)
        self._control = ControlClient(control, timeout, self._ctx, keys=self._curve) if control else None
        self._events = self._snapshots = None
        if events:  # subscribe now, so the events from here on are kept until read
            self._events = self._sub(events, TOPIC_PREFIX, hwm=10_000)
        self.skipped = 0  # undecodable events skipped

    def _sub(self, endpoint: str, topic: bytes, hwm: int) -> zmq.Socket:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        if self._curve is not None:
            self._curve.secure(sock, server=False)
        sock.connect(endpoint)
        return sock

    # --- snapshots ---------------------------------------------------------------------

    def snapshot(self, timeout: float | None = None) -> Snapshot:
        """The newest snapshot: waits for one (the service publishes at least once a second), drains the rest."""
        if not self.snapshots_endpoint:
            raise ClientError("no snapshots endpoint: Client(snapshots='tcp://HOST:5556')")
        if self._snapshots is None:
            self._snapshots = self._sub(self.snapshots_endpoint, b"", hwm=4)
        wait = self.timeout if timeout is None else timeout
        if not self._snapshots.poll(int(wait * 1000)):
            raise ClientTimeout(f"no snapshot from {self.snapshots_endpoint} within {wait:g} s: is rrstem serve "
                                "running and publishing there (serve --publish)?")
        parts = self._snapshots.recv_multipart(copy=False)
        while self._snapshots.poll(0):
            parts = self._snapshots.recv_multipart(copy=False)
        return Snapshot.decode(parts)

    # --- events ------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None):
        """The next event (a ``stream.events`` model); ``ClientTimeout`` if none comes within ``timeout``."""
        if self._events is None:
            raise ClientError("no events endpoint: Client(events='tcp://HOST:5558')")
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._events.poll(None if math.isinf(left) else max(1, int(left * 1000))):
                raise ClientTimeout(f"no event from {self.events_endpoint} within {wait:g} s: is rrstem serve "
                                    "running with --events there, and a scan going?")
            try:
                return decode_event(self._events.recv_multipart())
            except ValueError:
                self.skipped += 1

    def events(self, timeout: float | None = None, types: tuple[str, ...] | None = None,
               until: float | None = None) -> Iterator:
        """Events as they come, of ``types`` (default: all). Raises ``ClientTimeout`` when ``timeout`` seconds
        pass without one (``math.inf``: wait for ever); stops at ``until`` (a ``time.monotonic()`` time)."""
        unknown = set(types or ()) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown event type(s) {sorted(unknown)}; types: {', '.join(EVENT_TYPES)}")
        while True:
            wait = self.timeout if timeout is None else timeout
            left = math.inf if until is None else until - time.monotonic()
            if left <= 0:
                return
            try:
                event = self.next_event(min(wait, left))
            except ClientTimeout:
                if left <= wait:  # ``until`` came: the end, not a failure
                    return
                raise
            if types is None or event.type in types:
                yield event

    # --- control -----------------------------------------------------------------------

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One control request; its reply map. ``ClientTimeout`` / ``ClientError`` as the class says."""
        if self._control is None:
            raise ClientError("no control endpoint: Client(control='tcp://HOST:5557')")
        try:
            return self._control.request(cmd, **args)
        except ControlTimeout as exc:
            raise ClientTimeout(f"{exc}: is rrstem serve running with --control {self.control_endpoint}?") from None
        except ControlError as exc:
            raise ClientError(str(exc)) from None

    def status(self) -> dict[str, Any]:
        return self.request("status")["status"]

    def save(self, path: str | None = None) -> str:
        """Write the current scan's results now (to ``path`` from now on, if given); returns the file's path."""
        return self.request("save", **({"path": str(path)} if path is not None else {}))["path"]

    def rescan(self, region, step_factor: float = 1.0, dwell_factor: float = 1.0, dose_factor: float = 1.0,
               scan_id: str | None = None) -> dict[str, Any]:
        """Ask for a subscan of ``region`` = (y0, y1, x0, x1) or ``"Y0:Y1,X0:X1"`` of scan ``scan_id`` (default:
        the current one). Returns the request the service published for the bridge (its ``scan_id`` is the
        subscan's); a request the service refuses raises ``ClientError`` saying why."""
        region = list(parse_region(region) if isinstance(region, str) else (int(v) for v in region))
        args: dict[str, Any] = dict(region=region, step_factor=float(step_factor), dwell_factor=float(dwell_factor),
                                    dose_factor=float(dose_factor))
        if scan_id is not None:
            args["scan_id"] = scan_id
        return self.request("rescan", **args)["request"]

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
        for sock in (self._events, self._snapshots):
            if sock is not None:
                sock.close(linger=0)
        self._events = self._snapshots = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- rrstem events, rrstem rescan ----------------------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    until = time.monotonic() + args.exit_after if args.exit_after else None
    types = tuple(args.type) if args.type else None
    n = 0
    with Client(events=args.connect, timeout=args.timeout, keys=args.keys) as client:
        try:
            for event in client.events(types=types, until=until):
                print(json.dumps(event.model_dump(mode="json")), flush=True)
                n += 1
                if args.count and n >= args.count:
                    break
        except ClientTimeout as exc:
            print(f"rrstem events: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    return 0


def cmd_rescan(args: argparse.Namespace) -> int:
    with Client(control=args.control, timeout=args.timeout, keys=args.keys) as client:
        try:
            req = client.rescan(args.region, args.step_factor, args.dwell_factor, args.dose_factor, args.scan_id)
        except ClientError as exc:
            print(f"rrstem rescan: error: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(req), flush=True)
    return 0


def _region_arg(text: str):
    try:
        return parse_region(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_client_args(sub) -> None:
    """Register ``events`` and ``rescan``."""
    p = sub.add_parser("events", help="print a service's events, one JSON line each",
                       description="Print the events a running service publishes (serve --events), one JSON "
                                   "line per event (docs/steering.md).")
    p.add_argument("--connect", default="tcp://127.0.0.1:5558", metavar="EP", help="the service's events endpoint")
    p.add_argument("--type", action="append", choices=EVENT_TYPES, help="only events of this type (repeatable)")
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N events (default: never)")
    p.add_argument("--exit-after", type=float, default=0.0, metavar="S", help="exit after S seconds (default: never)")
    p.add_argument("--timeout", type=float, default=math.inf, metavar="S",
                   help="fail (exit 1) if no event comes for S seconds (default: wait for ever)")
    add_keys_option(p, "the service's serve --keys DIR")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("rescan", help="ask a service for a subscan of a region",
                       description="Ask a running service for a subscan of a region of the current (or an earlier) "
                                   "scan; it validates the request and publishes it for the microscope bridge.")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", metavar="EP", help="the service's control endpoint")
    p.add_argument("--region", required=True, type=_region_arg, metavar="Y0:Y1,X0:X1",
                   help="scan positions Y0 <= y < Y1, X0 <= x < X1")
    p.add_argument("--step-factor", type=float, default=1.0, metavar="F", help="subscan step / scan step (0.5: "
                                                                               "twice as fine; default 1)")
    p.add_argument("--dwell-factor", type=float, default=1.0, metavar="F", help="dwell per position / the scan's")
    p.add_argument("--dose-factor", type=float, default=1.0, metavar="F", help="dose per position / the scan's")
    p.add_argument("--scan-id", default=None, help="the scan to rescan (default: the current one)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="wait this long for the reply (default 5)")
    add_keys_option(p, "the service's serve --keys DIR")
    p.set_defaults(func=cmd_rescan)
