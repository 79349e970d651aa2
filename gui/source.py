"""The dashboard's two links to the service: snapshots (SUB) and control (REQ).

Neither class touches Qt. ``SnapshotSource.poll`` is called from the GUI
timer and never blocks; ``ControlWorker`` runs the blocking control requests
on its own thread so that a slow or absent service cannot freeze the window.
With ``keys`` (a ``rrstem keys`` folder) both are CURVE clients of the
service (``stream/auth.py``).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from rrstem.stream.auth import Curve, curve_for
from rrstem.stream.control import ControlClient, ControlError, ControlTimeout, unpack_array
from rrstem.stream.snapshot import Snapshot


class SnapshotSource:
    """SUB socket that keeps only the newest snapshot.

    ``zmq.CONFLATE`` does not support multipart messages, so the socket is
    drained instead: every queued message is received and all but the last
    are dropped undecoded (counted in ``skipped``).
    """

    def __init__(self, endpoint: str, context: zmq.Context | None = None, hwm: int = 4,
                 keys: str | Path | Curve | None = None):
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        curve = curve_for(keys, self._ctx)
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        if curve is not None:
            try:
                curve.secure(self._sock, server=False)
            except ValueError:
                self._sock.close()
                raise
        self._sock.connect(endpoint)
        self.received = 0  # messages taken off the socket
        self.skipped = 0  # messages dropped because a newer one was queued
        self.last_time: float | None = None  # monotonic time of the last message

    def poll(self, timeout: float = 0.0) -> Snapshot | None:
        """Newest snapshot queued on the socket, or None. Waits at most ``timeout`` s.

        Raises ``rrstem.stream.protocol.ProtocolError`` if the newest message
        cannot be decoded.
        """
        if timeout > 0 and not self._sock.poll(int(timeout * 1000)):
            return None
        newest = None
        while True:
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if newest is not None:
                self.skipped += 1
            newest = parts
            self.received += 1
        if newest is None:
            return None
        self.last_time = time.monotonic()
        return Snapshot.decode(newest)

    def close(self) -> None:
        self._sock.close()


@dataclass
class ControlReply:
    """Outcome of one control request, handed back to the GUI thread."""

    cmd: str
    args: dict[str, Any]
    ok: bool
    reply: dict[str, Any] = field(default_factory=dict)  # arrays already unpacked
    error: str | None = None
    timeout: bool = False  # True when the service did not answer at all


def _unpack_arrays(reply: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in reply.items():
        if isinstance(value, dict) and {"dtype", "shape", "data"} <= value.keys():
            out[key] = unpack_array(value)
        else:
            out[key] = value
    return out


class ControlWorker:
    """Runs control requests one at a time on a background thread.

    ``submit`` never blocks; ``replies`` drains finished requests without
    blocking. Only the newest pending ``frame`` request is kept: clicking
    quickly across a map does not queue up stale frames.
    """

    def __init__(self, endpoint: str, timeout: float = 2.0, keys: str | Path | Curve | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.curve = curve_for(keys, zmq.Context.instance())
        if self.curve is not None:
            self.curve.ready(server=False)  # a missing keys file is said here, not lost on the worker thread
        self._requests: queue.Queue = queue.Queue(maxsize=16)
        self._replies: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rrstem-dashboard-control", daemon=True)
        self._thread.start()

    def submit(self, cmd: str, **args: Any) -> bool:
        """Queue a request; False if too many are pending."""
        if cmd == "frame":
            self._drop_pending("frame")
        try:
            self._requests.put_nowait((cmd, args))
        except queue.Full:
            return False
        return True

    def _drop_pending(self, cmd: str) -> None:
        with self._requests.mutex:
            kept = [item for item in self._requests.queue if item[0] != cmd]
            self._requests.queue.clear()
            self._requests.queue.extend(kept)

    def replies(self) -> list[ControlReply]:
        out = []
        while True:
            try:
                out.append(self._replies.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        client = ControlClient(self.endpoint, timeout=self.timeout, context=zmq.Context.instance(), keys=self.curve)
        try:
            while not self._stop.is_set():
                try:
                    cmd, args = self._requests.get(timeout=0.1)
                except queue.Empty:
                    continue
                self._replies.put(self._request(client, cmd, args))
        finally:
            client.close()

    def _request(self, client: ControlClient, cmd: str, args: dict[str, Any]) -> ControlReply:
        try:
            reply = client.request(cmd, **args)
        except ControlError as exc:
            timeout = isinstance(exc, ControlTimeout)
            return ControlReply(cmd, args, ok=False, error=str(exc), timeout=timeout)
        except Exception as exc:  # undecodable reply, socket error: report, never die
            return ControlReply(cmd, args, ok=False, error=f"{type(exc).__name__}: {exc}")
        return ControlReply(cmd, args, ok=True, reply=_unpack_arrays(reply))

    def close(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
