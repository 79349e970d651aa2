"""Transport of snapshots (PUB, <= snapshot_hz) and control requests (REP), in one thread.

Both sockets belong to the publisher thread alone (ZeroMQ sockets are not
thread-safe). The publisher builds nothing: it asks the service for a
snapshot when one is due and the service says something changed (or a 1 Hz
heartbeat is due, which keeps dashboards' "service unreachable" banners
honest), and it routes each control request to the service's ``ControlAPI``
(``stream/control.py``).

A snapshot derives the whole scan's maps, so its cost grows with the scan:
snapshots are kept to ``SNAPSHOT_SHARE`` of one
core (``workers.Budget``), so a large scan is shown at a lower rate instead of
slowing ingest. The budget counts the publisher thread's CPU time, not wall
time: under ingest a snapshot's wall time was 2-4 times its CPU time (waits
for a core and for the GIL), and those waits take nothing from ingest. A milestone (a scan starts, has every position, ends, has its
results: ``snapshot_milestone``) is published at once, outside the budget:
that is the snapshot a user waits for, and one per scan costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Hashable, Protocol

import zmq

from rrstem.stream import control
from rrstem.stream.auth import Curve
from rrstem.stream.snapshot import Snapshot
from rrstem.stream.workers import Budget

log = logging.getLogger("rrstem.publisher")

HEARTBEAT_SECONDS = 1.0
#: Longest the thread sleeps between looks at the service: how late a milestone snapshot can be.
POLL_SECONDS = 0.02
#: Share of one core that snapshots may take (building and encoding them) ...
SNAPSHOT_SHARE = 0.1
#: ... and while frames arrive faster than FAST_FPS, when ingest needs every cycle and the scan is over in
#: seconds. A whole snapshot of a 512x512 scan with the DPC maps takes 25-30 ms of CPU once most of it is
#: filled (bench/README.md, "Measurements behind defaults"): 6% gives 2.2-2.7 Hz over such a scan (1.1-1.9 Hz
#: over its second half); 3% gave 1.0-1.3 Hz. Milestones still go out at once.
SNAPSHOT_FAST_SHARE = 0.06
FAST_FPS = 5000.0


class Published(Protocol):
    """What the publisher publishes (``report.Reporter``)."""

    def snapshot(self) -> Snapshot:
        """The current snapshot (its ``seq`` is set by the publisher)."""

    def snapshot_key(self) -> Hashable:
        """Changes whenever a new snapshot would differ from the last one."""

    def frame_rate(self) -> float:
        """Frames per second the current scan is taking (0 when none is being acquired)."""

    def snapshot_milestone(self) -> Hashable:
        """Changes only at the moments a user waits for (a scan starts, has every position, ends, has its
        results); cheap, asked at every look."""

    def report(self, where: str, exc: BaseException) -> None:
        """Record a failure that the service survives."""


def _bind(sock: zmq.Socket, endpoint: str, curve: Curve | None) -> str:
    if curve is not None:
        curve.secure(sock, server=True)
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class Publisher:
    """The snapshot PUB and control REP sockets, both bound; with ``curve`` both are CURVE servers
    (``stream/auth.py``). ``read_only``: control commands that change state are refused (``control.handle``)."""

    def __init__(self, context: zmq.Context, publish: str | None, control_ep: str | None,
                 curve: Curve | None = None, read_only: bool = False):
        self.seq = 0  # snapshots published
        self.read_only = read_only
        self.refused: Counter[str] = Counter()  # control requests refused as read-only, by command
        self._pub = self._rep = None
        self.publish_endpoint = self.control_endpoint = None  # actual endpoints (port 0 resolved)
        try:
            if publish:
                self._pub = context.socket(zmq.PUB)
                self._pub.setsockopt(zmq.SNDHWM, 4)  # slow subscribers lose snapshots, never slow us
                self._pub.setsockopt(zmq.LINGER, 0)
                self.publish_endpoint = _bind(self._pub, publish, curve)
            if control_ep:
                self._rep = context.socket(zmq.REP)
                self._rep.setsockopt(zmq.LINGER, 0)
                self.control_endpoint = _bind(self._rep, control_ep, curve)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in (self._pub, self._rep):
            if sock is not None:
                sock.close(linger=0)

    def _encode(self, source: Published) -> list:
        snap = source.snapshot()
        self.seq += 1
        snap.header.seq = self.seq
        return snap.encode()

    def run(self, api: control.ControlAPI, source: Published, stop: threading.Event, hz: float) -> None:
        """The thread body: serve control requests (``api``), publish ``source``'s snapshots when due, until
        ``stop`` is set.

        ``api`` and ``source`` are passed here, not kept: once the thread ends, nothing here refers to them.
        """
        budget = Budget(SNAPSHOT_SHARE, floor=1.0 / hz, fast_share=SNAPSHOT_FAST_SHARE, fast_fps=FAST_FPS,
                        cpu=True)
        last_key, last_sent, last_milestone = None, 0.0, None
        while not stop.is_set():
            now = time.monotonic()
            wait = max(0.001, min(budget.next - now, POLL_SECONDS))
            if self._rep is not None and self._rep.poll(int(wait * 1000)):
                reply = control.handle(api, self._rep.recv(), read_only=self.read_only)
                if reply.get("read_only"):
                    self.refused[reply["cmd"]] += 1
                    log.warning("refused control %r: %s", reply["cmd"], reply["error"])
                self._rep.send(control.pack(reply))
                continue
            if self._rep is None:
                stop.wait(wait)
            now = time.monotonic()
            if self._pub is None:
                continue
            milestone = source.snapshot_milestone()
            if milestone == last_milestone and not budget.due(now):
                continue
            key = source.snapshot_key()
            if milestone == last_milestone and key == last_key and now - last_sent < HEARTBEAT_SECONDS:
                budget.spent(now, 0.0)
                continue
            last_milestone = milestone  # a failing snapshot is not retried at every look
            try:
                parts = budget.run(self._encode, source, rate=source.frame_rate())
            except Exception as exc:  # a bad snapshot is reported; the service and later snapshots go on
                log.exception("snapshot failed")
                source.report("snapshot", exc)
                continue
            self._pub.send_multipart(parts, copy=False)
            last_key, last_sent = key, now
