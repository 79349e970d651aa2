"""The receiver thread: ZeroMQ socket -> decoder (``stream/detectors/``) -> items -> bounded queue.

PULL (default) is lossless: when the queue is full the receiver stops reading,
ZeroMQ's high-water mark fills, and the sender blocks (back-pressure). SUB taps
a PUB stream: the publisher drops when we fall behind, and the pipeline counts
the index gaps as dropped frames.

Frame buffers are received without copying: an item holds a NumPy view of the
ZeroMQ frame, which stays alive as long as the view does.

Exactly one side of a stream binds its endpoint. ``bind_or_connect`` opens a
socket for either side (the senders in ``simulators/`` use it too) and turns a
failure into a ``ValueError`` that says what to do; ``EndpointInUse`` when the
endpoint is already bound.
"""

from __future__ import annotations

import logging
import queue
import threading

import zmq

from rrstem.stream.detectors import Decoder, Item
from rrstem.stream.detectors.rrstem import RrstemDecoder

log = logging.getLogger("rrstem.receiver")


class EndpointInUse(ValueError):
    """Binding failed because another socket holds the endpoint, most often the other side of the stream."""

    def __init__(self, endpoint: str):
        super().__init__(
            f"cannot bind {endpoint}: address already in use. Another process is bound to it: perhaps the other "
            "side of the stream, which also binds by default, or an earlier rrstem still running. Only one side "
            "may bind; let the other connect: add --connect to `rrstem simulate` or `rrstem replay`, or leave "
            "out --bind on `rrstem serve`")
        self.endpoint = endpoint


def bind_or_connect(sock: zmq.Socket, endpoint: str, bind: bool) -> str:
    """Bind or connect ``sock`` to ``endpoint``; returns it, with the real port when a bind asked for port 0.

    On failure the socket is closed and a ``ValueError`` says how to fix the
    endpoint: ``EndpointInUse`` if another socket is bound to it.
    """
    try:
        if not bind:
            sock.connect(endpoint)
            return endpoint
        sock.bind(endpoint)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if bind and exc.errno == zmq.EADDRINUSE:
            raise EndpointInUse(endpoint) from None
        verb, example = ("bind to", "tcp://127.0.0.1:0") if bind else ("connect to", "tcp://HOST:PORT")
        raise ValueError(f"cannot {verb} {endpoint!r}: {exc}; use e.g. {example} or ipc:///tmp/name") from None


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
        self.endpoint = bind_or_connect(self.sock, endpoint, bind)
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
