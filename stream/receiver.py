"""The receiver thread: ZeroMQ socket -> decoded, size-checked items -> bounded queue.

PULL (default) is lossless: when the queue is full the receiver stops reading,
ZeroMQ's high-water mark fills, and the sender blocks (back-pressure). SUB taps
a PUB stream: the publisher drops when we fall behind, and the pipeline counts
the index gaps as dropped frames.

Frame buffers are received without copying: an item holds a NumPy view of the
ZeroMQ frame, which stays alive as long as the view does.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import zmq

from rrstem.stream.protocol import End, Frames, ProtocolError, Start, decode_header, frames_array

log = logging.getLogger("rrstem.receiver")


@dataclass
class Item:
    """One decoded message, or a rejected one (``kind == "bad"``)."""

    kind: str  # start | frames | end | bad
    message: Start | Frames | End | None = None
    frames: np.ndarray | None = None  # (count, h, w) view of the socket buffer
    reason: str = ""  # for bad items
    detail: str = ""
    scan_id: str | None = None
    count: int = 0  # frames affected, for bad frames messages


class Decoder(Protocol):
    """Turns one multipart message into items. Detector adapters implement this too."""

    def decode(self, parts: list[Any]) -> Item | list[Item]: ...


class Receiver(threading.Thread):
    """Reads one socket until ``stop`` is set. Stores its exception in ``error`` if it fails."""

    def __init__(self, context: zmq.Context, endpoint: str, out: queue.Queue, stop: threading.Event,
                 bind: bool = False, mode: str = "pull", hwm: int = 64, decoder: Decoder | None = None):
        super().__init__(name="rrstem-receiver", daemon=True)
        if mode not in ("pull", "sub"):
            raise ValueError(f"receiver mode must be 'pull' or 'sub', got {mode!r}")
        self.out, self.stop, self.mode = out, stop, mode
        self.decoder = decoder or RrstemDecoder()
        self.error: BaseException | None = None
        self.sock = context.socket(zmq.PULL if mode == "pull" else zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        if mode == "sub":
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        if bind:
            self.sock.bind(endpoint)
        else:
            self.sock.connect(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self.messages = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.sock.poll(100):
                    continue
                parts = self.sock.recv_multipart(copy=False)
                self.messages += 1
                items = self.decoder.decode(parts)
                for item in items if isinstance(items, list) else [items]:
                    self._put(item)
        except BaseException as exc:  # stored and reported by the service
            self.error = exc
            log.exception("receiver failed")
        finally:
            self.sock.close(linger=0)

    def _put(self, item: Item) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue  # back-pressure: stop reading the socket until the pipeline catches up



class RrstemDecoder:
    """The ``rrstem/1`` protocol: headers validated, frame buffers size-checked against their scan's start."""

    def __init__(self):
        self._starts: dict[str, Start] = {}

    def decode(self, parts: list[Any]) -> Item:
        try:
            msg = decode_header(parts[0].buffer)
        except ProtocolError as exc:
            return Item("bad", reason="undecodable", detail=str(exc))
        if isinstance(msg, Start):
            if len(parts) != 1:
                return Item("bad", reason="extra_part", detail=f"start message has {len(parts)} parts, expected 1",
                            scan_id=msg.scan_id)
            self._starts[msg.scan_id] = msg
            if len(self._starts) > 64:  # keep only recent scans for validation
                self._starts.pop(next(iter(self._starts)))
            return Item("start", msg, scan_id=msg.scan_id)
        if isinstance(msg, End):
            if len(parts) != 1:
                return Item("bad", reason="extra_part", detail=f"end message has {len(parts)} parts, expected 1",
                            scan_id=msg.scan_id)
            return Item("end", msg, scan_id=msg.scan_id)
        if len(parts) != 2:
            return Item("bad", reason="missing_part" if len(parts) < 2 else "extra_part",
                        detail=f"frames message has {len(parts)} parts, expected 2 (header, buffer)",
                        scan_id=msg.scan_id, count=msg.count)
        start = self._starts.get(msg.scan_id)
        if start is None:
            return Item("bad", reason="no_start", detail=f"frames for scan {msg.scan_id!r} before its start message",
                        scan_id=msg.scan_id, count=msg.count)
        try:
            frames = frames_array(start, msg, parts[1].buffer)
        except ProtocolError as exc:
            return Item("bad", reason="bad_size", detail=str(exc), scan_id=msg.scan_id, count=msg.count)
        return Item("frames", msg, frames=frames, scan_id=msg.scan_id, count=msg.count)
