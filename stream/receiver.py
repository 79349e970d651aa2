"""The receiver thread: ZeroMQ socket -> decoder (``stream/detectors/``) -> items -> bounded queue.

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

import zmq

from rrstem.stream.detectors import Decoder, Item
from rrstem.stream.detectors.rrstem import RrstemDecoder

log = logging.getLogger("rrstem.receiver")


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
