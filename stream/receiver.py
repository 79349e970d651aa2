"""The receiver thread: ZeroMQ socket (or a detector's TCP port, ``TcpReceiver``) -> decoder (``stream/detectors/``) -> items -> bounded queue.

``make_receiver`` picks the thread by the protocol's entry in ``stream.detectors.PROTOCOLS``.

PULL (default) is lossless: when the queue is full the receiver stops reading,
ZeroMQ's high-water mark fills, and the sender blocks (back-pressure). SUB taps
a PUB stream: the publisher drops when we fall behind, and the pipeline counts
the index gaps as dropped frames.

Frame buffers are received without copying: an item holds a NumPy view of the
ZeroMQ frame, which stays alive as long as the view does.

Small messages are taken in batches: one image per message is how detectors
send (DECTRIS, one 96x96 image is 18 kB), and then the cost of each message
decides the rate. After one message the receiver takes what else is already
waiting (up to ``BATCH_MESSAGES`` messages or ``BATCH_BYTES``, never waiting
for more), decodes them together (a decoder's ``decode_many``, where it has a
fast path, e.g. stream2) and hands the pipeline one item per run of
consecutive frames (``merge_small``: the small frames are copied into one
array). Large messages are handed on one by one, as before, without a copy.

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
from typing import Any

import numpy as np
import zmq

from rrstem.stream.auth import Curve
from rrstem.stream.detectors import Decoder, Framing, Item, lookup
from rrstem.stream.protocol import Frames
from rrstem.stream.detectors.rrstem import RrstemDecoder
from rrstem.stream.workers import FailureHandler, Worker, ignore_failure

log = logging.getLogger("rrstem.receiver")

#: A batch of waiting messages ends at this many messages or bytes (whichever comes first).
BATCH_MESSAGES = 256
BATCH_BYTES = 4 << 20
#: Frames items up to this size are merged into runs (copied); larger ones are handed on as they are.
MERGE_BYTES = 256 << 10


def put_until_stopped(out: queue.Queue, item: Item, stop: threading.Event) -> None:
    """Put ``item`` on the bounded queue, waiting while it is full (back-pressure: the socket is not read
    until the pipeline catches up), unless ``stop`` is set."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class EndpointInUse(ValueError):
    """Binding failed because another socket holds the endpoint, most often the other side of the stream."""

    def __init__(self, endpoint: str):
        super().__init__(
            f"cannot bind {endpoint}: address already in use. Another process is bound to it: perhaps the other "
            "side of the stream, which also binds by default, or an earlier rrstem still running. Only one side "
            "may bind; let the other connect: add --connect to `rrstem simulate` or `rrstem replay`, or leave "
            "out --bind on `rrstem serve`")
        self.endpoint = endpoint


def bind_or_connect(sock: zmq.Socket, endpoint: str, bind: bool, curve: Curve | None = None) -> str:
    """Bind or connect ``sock`` to ``endpoint``; returns it, with the real port when a bind asked for port 0.

    With ``curve`` the socket is the CURVE server if it binds, the client if it
    connects (``stream/auth.py``). On failure the socket is closed and a
    ``ValueError`` says how to fix the endpoint: ``EndpointInUse`` if another
    socket is bound to it.
    """
    try:
        if curve is not None:
            curve.secure(sock, server=bind)
    except ValueError:  # a keys file missing: said by the error
        sock.close(linger=0)
        raise
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


class Receiver(Worker):
    """Reads one socket until ``stop`` is set: a worker thread, so an exception that ends it is kept in
    ``error`` and handed to ``on_failure``."""

    def __init__(self, context: zmq.Context, endpoint: str, out: queue.Queue, stop: threading.Event,
                 bind: bool = False, mode: str = "pull", hwm: int = 64, decoder: Decoder | None = None,
                 curve: Curve | None = None, on_failure: FailureHandler = ignore_failure):
        super().__init__("rrstem-receiver", self._loop, on_failure)
        if mode not in ("pull", "sub"):
            raise ValueError(f"receiver mode must be 'pull' or 'sub', got {mode!r}")
        self.out, self.stop, self.mode = out, stop, mode
        self.decoder = decoder or RrstemDecoder()
        self.sock = context.socket(zmq.PULL if mode == "pull" else zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        if mode == "sub":
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoint = bind_or_connect(self.sock, endpoint, bind, curve)
        self.messages = 0

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.sock.poll(100):
                    continue
                for item in self._batch():
                    self._put(item)
        finally:
            self.sock.close(linger=0)

    def _batch(self) -> list[Item]:
        """One message, plus the small ones already waiting behind it, decoded; runs of small frames merged."""
        messages = [self._recv(0)]
        size = sum(len(p) for p in messages[0])
        while len(messages) < BATCH_MESSAGES and size < BATCH_BYTES:
            try:
                parts = self._recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            messages.append(parts)
            size += sum(len(p) for p in parts)
        self.messages += len(messages)
        if len(messages) == 1:
            items = self.decoder.decode(messages[0])
            return items if isinstance(items, list) else [items]
        return merge_small(decode_all(self.decoder, messages))

    def _recv(self, flags: int) -> list[zmq.Frame]:
        """One whole message, its parts as frames (zero-copy). ``recv_multipart`` asks the socket for more
        parts with a ``getsockopt`` call per part; a frame says so itself (``more``), which saves a
        microsecond per one-part message."""
        parts = [self.sock.recv(flags, copy=False)]
        while parts[-1].more:
            parts.append(self.sock.recv(copy=False))
        return parts

    def _put(self, item: Item) -> None:
        put_until_stopped(self.out, item, self.stop)


# --- plain TCP: a detector's data port (Merlin), cut into messages by the protocol's framing -------------


def tcp_address(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (host, port); a ``ValueError`` that says what is expected otherwise."""
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:/]+):(\d+)", endpoint)
    if not m:
        raise ValueError(f"a TCP detector endpoint is tcp://HOST:PORT, e.g. tcp://merlin-pc:6342, not {endpoint!r}")
    return m.group(1).strip("[]"), int(m.group(2))


class TcpReceiver(Worker):
    """Connects to a detector's TCP data port (the Merlin PC serves it) and reads messages until ``stop``.

    ``framing`` (a ``stream.detectors.Framing``, e.g. Merlin's ``MpxFraming``)
    cuts the byte stream into messages. The same contract as ``Receiver``:
    decoded items go on the bounded queue ``out`` (when it is full, the socket
    is not read and TCP holds the sender back), every wait has a timeout, and
    the exception that ended the thread is kept in ``error``. Messages are
    received straight into a block of memory (``recv_into``) and frames are
    views of it, handed on in batches of consecutive frames, not copied.

    Damage is counted, never fatal: bytes the framing skips to the next
    possible message (e.g. up to the next ``MPX,``) become a ``resync`` item
    that says how many; a dropped connection is logged, counted
    (``connection_lost``) and retried with back-off, and the decoder carries
    on where it was.
    """

    def __init__(self, endpoint: str, out: queue.Queue, stop: threading.Event, decoder: Decoder, framing: Framing,
                 backoff: tuple[float, float] = (0.05, 2.0), block: int = 4 << 20,
                 on_failure: FailureHandler = ignore_failure):
        super().__init__("rrstem-receiver", self._loop, on_failure)
        self.address = tcp_address(endpoint)
        self.endpoint = endpoint
        self.out, self.stop, self.decoder, self.framing = out, stop, decoder, framing
        self.backoff = backoff
        self.messages = self.connections = self.disconnects = self.resyncs = self.skipped_bytes = 0
        self.block = block

    def _loop(self) -> None:
        delay = self.backoff[0]
        while not self.stop.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=1.0)
            except OSError as exc:
                (log.warning if delay == self.backoff[0] else log.debug)(
                    "cannot connect to %s (%s); retrying every %.2f..%.0f s", self.endpoint, exc, *self.backoff)
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
            self.disconnects += 1
            delay = self.backoff[0] if got else min(2 * delay, self.backoff[1])
            log.warning("connection to %s lost (%s); reconnecting", self.endpoint, reason)
            self._put(Item("bad", reason="connection_lost", detail=f"{self.endpoint}: {reason}"))

    def _read(self, sock: socket.socket) -> bool:
        """Read messages until the connection closes (returns whether any arrived) or ``stop`` is set.

        Reads into a block as much as the socket has, cuts it into messages,
        decodes them and hands on their items, then carries the incomplete
        tail into a fresh block (the items still view the old one): under
        load a block holds many frames, received with one ``recv_into`` and
        handed on as one batch (``coalesce``); at worst one message per block
        is copied.
        """
        got, skipped = False, 0
        buf, fill = np.empty(self.block, np.uint8), 0
        while not self.stop.is_set():
            try:
                n = sock.recv_into(memoryview(buf)[fill:])
            except socket.timeout:
                continue
            if n == 0:  # closed: skipped bytes not yet reported and an unfinished message are counted
                if skipped or fill:
                    self._resync_item(skipped + fill, f"bytes that are no complete {self.framing.name} message, "
                                      "before the connection closed")
                return got
            fill += n
            pos, messages, skipped, resyncs = self.framing.split(buf, fill, skipped)
            for count, why in resyncs:
                self._resync_item(count, why)
            if messages:
                got = True
                self.messages += len(messages)
                items: list[Item] = []
                for message in messages:
                    out = self.decoder.decode([message])
                    items += out if isinstance(out, list) else [out]
                for item in coalesce(items, buf):
                    self._put(item)
            need = max(self.block, self.framing.message_size(buf, pos, fill))
            tail = fill - pos
            if messages or need > len(buf):  # items view this block: the tail moves to a new one
                new = np.empty(need, np.uint8)
                new[:tail] = buf[pos:fill]
                buf, fill = new, tail
            elif pos:  # only skipped bytes: move the tail down in place
                buf[:tail] = buf[pos:fill].copy()
                fill = tail
        return got

    def _resync_item(self, skipped: int, why: str) -> None:
        self.resyncs += 1
        self.skipped_bytes += skipped
        skip = f"skipped {skipped} byte(s) up to the next {self.framing.marker} prefix: " if skipped else ""
        self._put(Item("bad", reason="resync", detail=f"{self.endpoint}: {skip}{why}"))

    def _put(self, item: Item) -> None:
        put_until_stopped(self.out, item, self.stop)


def make_receiver(protocol: str, context: zmq.Context, endpoint: str, out: queue.Queue, stop: threading.Event,
                  decoder: Decoder, *, bind: bool = False, mode: str = "pull", curve: Curve | None = None,
                  on_failure: FailureHandler = ignore_failure) -> Receiver | TcpReceiver:
    """The receiver thread of the protocol named ``protocol`` (``stream.detectors.PROTOCOLS``): a ``Receiver``
    over ZeroMQ; over plain TCP a ``TcpReceiver`` with the protocol's framing, connected to the detector's port."""
    spec = lookup(protocol)
    if spec.transport == "tcp":  # the detector serves its port: connect to it
        if bind or mode != "pull":
            raise ValueError(f"the {spec.name} detector serves its data port over plain TCP and rrstem "
                             "connects to it: drop --bind and --sub")
        return TcpReceiver(endpoint, out, stop, decoder, spec.framing(), on_failure=on_failure)
    return Receiver(context, endpoint, out, stop, bind=bind, mode=mode, decoder=decoder, curve=curve,
                    on_failure=on_failure)


def decode_all(decoder: Decoder, messages: list[list[Any]]) -> list[Item]:
    """The items of several messages, in order: the decoder's ``decode_many`` if it has one."""
    many = getattr(decoder, "decode_many", None)
    if many is not None:
        return many(messages)
    out: list[Item] = []
    for parts in messages:
        items = decoder.decode(parts)
        out += items if isinstance(items, list) else [items]
    return out


def merge_small(items: list[Item]) -> list[Item]:
    """Merge runs of small ``frames`` items (each at most ``MERGE_BYTES``) of one scan with consecutive indices,
    the same frame shape and dtype, into one item each: their frames copied into one (n, h, w) array."""
    def small(item: Item) -> bool:
        return item.kind == "frames" and item.frames is not None and item.frames.nbytes <= MERGE_BYTES

    return _merge_runs(items, small, lambda run, item: small(item) and _follows(run[-1], item),
                       lambda run: np.concatenate([i.frames for i in run]))


def _merge_runs(items: list[Item], takes, continues, join) -> list[Item]:
    """Runs of items that ``takes(item)`` accepts and each ``continues(run, item)``: one ``frames`` item each,
    whose frames are ``join(run)``; every other item as it is, in order."""
    out: list[Item] = []
    run: list[Item] = []

    def flush():
        if len(run) == 1:
            out.append(run[0])
        elif run:
            head = run[0].message
            count = sum(i.count for i in run)
            out.append(Item("frames", Frames.model_construct(scan_id=head.scan_id, first=head.first, count=count),
                            frames=join(run), scan_id=head.scan_id, count=count))
        run.clear()

    for item in items:
        if run and not continues(run, item):
            flush()
        if takes(item):
            run.append(item)
        else:
            out.append(item)
    flush()
    return out


def _follows(last: Item, item: Item) -> bool:
    """``item`` continues ``last``: the same scan, the next index, frames of the same shape and dtype."""
    return (item.scan_id == last.scan_id and item.message.first == last.message.first + last.count
            and item.frames.shape[1:] == last.frames.shape[1:] and item.frames.dtype == last.frames.dtype)


def coalesce(items: list[Item], buf: np.ndarray) -> list[Item]:
    """Merge runs of one-scan ``frames`` items with consecutive indices whose frames lie at a constant stride in ``buf``.

    The merged item's frames are one strided (n, h, w) view of ``buf``: many
    frames per pipeline step, still without a copy.
    """
    def view(run: list[Item]) -> np.ndarray:
        first = run[0].frames
        stride = _address(run[1].frames) - _address(first)
        return np.ndarray((len(run), *first.shape[1:]), first.dtype, buffer=buf,
                          offset=_address(first) - buf.ctypes.data, strides=(stride, *first.strides[1:]))

    def takes(item: Item) -> bool:
        return item.kind == "frames" and item.count == 1 and _inside(item.frames, buf)

    return _merge_runs(items, takes, lambda run, item: takes(item) and _continues(run, item), view)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _inside(a: np.ndarray, buf: np.ndarray) -> bool:
    lo = buf.ctypes.data
    return a.flags.c_contiguous and lo <= _address(a) and _address(a) + a.nbytes <= lo + buf.nbytes


def _continues(run: list[Item], item: Item) -> bool:
    last, first = run[-1], run[0]
    if item.kind != "frames" or item.count != 1 or not _follows(last, item):
        return False
    step = _address(item.frames) - _address(last.frames)
    return step > 0 and (len(run) == 1 or step == _address(run[1].frames) - _address(first.frames))
