"""The receiver thread: ZeroMQ socket (or a detector's TCP port, ``TcpReceiver``) -> decoder (``stream/detectors/``) -> items -> bounded queue.

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
import re
import socket
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


# --- plain TCP: the Merlin data port ---------------------------------------------------------

MPX_PREFIX = re.compile(rb"MPX,(\d{10}),")
PREFIX_SIZE = 15  # b"MPX," + 10 digits + b","


def tcp_address(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (host, port); a ``ValueError`` that says what is expected otherwise."""
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:/]+):(\d+)", endpoint)
    if not m:
        raise ValueError(f"a TCP detector endpoint is tcp://HOST:PORT, e.g. tcp://merlin-pc:6342, not {endpoint!r}")
    return m.group(1).strip("[]"), int(m.group(2))


class TcpReceiver(threading.Thread):
    """Connects to a detector's TCP data port (the Merlin PC serves it) and reads ``MPX`` messages until ``stop``.

    The same contract as ``Receiver``: decoded items go on the bounded queue
    ``out`` (when it is full, the socket is not read and TCP holds the sender
    back), every wait has a timeout, and the exception that ended the thread
    is kept in ``error``. Each message's payload is received straight into
    its own buffer (``recv_into``), so frames are viewed, never copied.

    Damage is counted, never fatal: bytes that are not an ``MPX,<length>,``
    prefix are skipped up to the next ``MPX,`` (a ``resync`` item says how
    many); a dropped connection is logged, counted (``connection_lost``) and
    retried with back-off, and the decoder carries on where it was.
    """

    def __init__(self, endpoint: str, out: queue.Queue, stop: threading.Event, decoder: Decoder,
                 max_message: int = 1 << 28, backoff: tuple[float, float] = (0.05, 2.0)):
        super().__init__(name="rrstem-receiver", daemon=True)
        self.address = tcp_address(endpoint)
        self.endpoint = endpoint
        self.out, self.stop, self.decoder = out, stop, decoder
        self.max_message, self.backoff = max_message, backoff
        self.error: BaseException | None = None
        self.messages = self.connections = self.disconnects = self.resyncs = self.skipped_bytes = 0
        self._pending = bytearray()  # bytes read past a message boundary while resynchronising

    def run(self) -> None:
        delay = self.backoff[0]
        try:
            while not self.stop.is_set():
                try:
                    sock = socket.create_connection(self.address, timeout=1.0)
                except OSError as exc:
                    log.debug("cannot connect to %s (%s); retrying in %.2f s", self.endpoint, exc, delay)
                    self.stop.wait(delay)
                    delay = min(2 * delay, self.backoff[1])
                    continue
                self.connections += 1
                log.info("connected to %s", self.endpoint)
                try:
                    sock.settimeout(0.1)
                    got = self._read(sock)
                except (ConnectionError, OSError) as exc:
                    got, reason = True, f"{type(exc).__name__}: {exc}"
                else:
                    reason = "closed by the sender"
                finally:
                    sock.close()
                if self.stop.is_set():
                    break
                self._pending.clear()
                self.disconnects += 1
                delay = self.backoff[0] if got else min(2 * delay, self.backoff[1])
                log.warning("connection to %s lost (%s); reconnecting", self.endpoint, reason)
                self._put(Item("bad", reason="connection_lost", detail=f"{self.endpoint}: {reason}"))
        except BaseException as exc:  # stored and reported by the service
            self.error = exc
            log.exception("receiver failed")

    def _read(self, sock: socket.socket) -> bool:
        """Read messages until the connection closes (returns whether any arrived) or ``stop`` is set."""
        got = False
        while not self.stop.is_set():
            prefix = self._prefix(sock)
            if prefix is None:
                return got
            length = prefix - 1  # the length counts the comma before the payload
            if not 0 < length <= self.max_message:
                self._resync_item(0, f"message length {prefix} is outside 2..{self.max_message + 1}")
                self._pending[:0] = b"PX,%010d," % prefix  # look for the next MPX, after this one's M
                continue
            payload = bytearray(length)
            view = memoryview(payload)
            n = min(len(self._pending), length)
            view[:n] = self._pending[:n]
            del self._pending[:n]
            if not self._fill(sock, view[n:]):
                return got
            got = True
            self.messages += 1
            items = self.decoder.decode([view])
            for item in items if isinstance(items, list) else [items]:
                self._put(item)
        return got

    def _prefix(self, sock) -> int | None:
        """The length of the next ``MPX,<length>,`` prefix, skipping (and counting) anything before it; None if closed."""
        skipped = 0
        while True:
            while len(self._pending) < PREFIX_SIZE:
                # in step, read just the prefix, so the payload lands in its own buffer uncopied
                if not self._more(sock, PREFIX_SIZE - len(self._pending) if not skipped else 4096):
                    return None
            m = MPX_PREFIX.match(self._pending)
            if m:
                length = int(m.group(1))  # before the buffer changes under the match
                del self._pending[:PREFIX_SIZE]
                if skipped:
                    self._resync_item(skipped, "bytes that are no MPX message")
                return length
            at = self._pending.find(b"MPX,", 1)
            drop = at if at > 0 else max(1, len(self._pending) - 3)  # keep a possible partial "MPX" at the end
            del self._pending[:drop]
            skipped += drop

    def _resync_item(self, skipped: int, why: str) -> None:
        self.resyncs += 1
        self.skipped_bytes += skipped
        self._put(Item("bad", reason="resync", detail=f"{self.endpoint}: skipped {skipped} byte(s) up to the next "
                       f"MPX, prefix: {why}"))

    def _more(self, sock, size: int) -> bool:
        """Append up to ``size`` bytes from the socket to ``_pending``; False when the connection closed (or stop)."""
        while not self.stop.is_set():
            try:
                chunk = sock.recv(size)
            except socket.timeout:
                continue
            if not chunk:
                return False
            self._pending += chunk
            return True
        return False

    def _fill(self, sock, view: memoryview) -> bool:
        """Receive exactly ``len(view)`` bytes into ``view``; False when the connection closed (or stop)."""
        while len(view) and not self.stop.is_set():
            try:
                n = sock.recv_into(view)
            except socket.timeout:
                continue
            if n == 0:
                return False
            view = view[n:]
        return not len(view)

    def _put(self, item: Item) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue  # back-pressure: the socket is not read until the pipeline catches up
