"""Transport of snapshots (PUB, <= snapshot_hz) and control requests (REP), in one thread.

Both sockets belong to the publisher thread alone (ZeroMQ sockets are not
thread-safe). The publisher builds nothing: it asks the service for a
snapshot when one is due and the service says something changed (or a 1 Hz
heartbeat is due, which keeps dashboards' "service unreachable" banners
honest), and it routes each control request to the service's ``ControlAPI``
(``stream/control.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Hashable, Protocol

import zmq

from rrstem.stream import control
from rrstem.stream.snapshot import Snapshot

log = logging.getLogger("rrstem.publisher")

HEARTBEAT_SECONDS = 1.0


class Published(control.ControlAPI, Protocol):
    """What the publisher needs of the service besides the control commands."""

    def snapshot(self) -> Snapshot:
        """The current snapshot (its ``seq`` is set by the publisher)."""

    def snapshot_key(self) -> Hashable:
        """Changes whenever a new snapshot would differ from the last one."""

    def report(self, where: str, exc: BaseException) -> None:
        """Record a failure that the service survives."""


class Publisher:
    def __init__(self, context: zmq.Context, publish: str | None, control_ep: str | None):
        self.seq = 0  # snapshots published
        self._pub = self._rep = None
        self.publish_endpoint = self.control_endpoint = None  # actual endpoints (port 0 resolved)
        if publish:
            self._pub = context.socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, 4)  # slow subscribers lose snapshots, never slow us
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(publish)
            self.publish_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        if control_ep:
            self._rep = context.socket(zmq.REP)
            self._rep.setsockopt(zmq.LINGER, 0)
            self._rep.bind(control_ep)
            self.control_endpoint = self._rep.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        for sock in (self._pub, self._rep):
            if sock is not None:
                sock.close(linger=0)

    def run(self, service: Published, stop: threading.Event, hz: float) -> None:
        """The thread body: serve control requests, publish when due, until ``stop`` is set.

        ``service`` is passed here, not kept: once the thread ends, nothing here refers to it.
        """
        period = 1.0 / hz
        next_pub, last_key, last_sent = 0.0, None, 0.0
        while not stop.is_set():
            now = time.monotonic()
            wait = max(0.001, min(next_pub - now, 0.1))
            if self._rep is not None and self._rep.poll(int(wait * 1000)):
                self._rep.send(control.pack(control.handle(service, self._rep.recv())))
                continue
            if self._rep is None:
                stop.wait(wait)
            now = time.monotonic()
            if now < next_pub or self._pub is None:
                continue
            next_pub = now + period
            key = service.snapshot_key()
            if key == last_key and now - last_sent < HEARTBEAT_SECONDS:
                continue
            try:
                snap = service.snapshot()
                self.seq += 1
                snap.header.seq = self.seq
                parts = snap.encode()
            except Exception as exc:  # a bad snapshot is reported; the service and later snapshots go on
                log.exception("snapshot failed")
                service.report("snapshot", exc)
                continue
            self._pub.send_multipart(parts, copy=False)
            last_key, last_sent = key, now
