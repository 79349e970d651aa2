"""One interface for every frame source, and a ZeroMQ sender that streams it.

A ``Source`` is one scan: ``start`` is the ``rrstem/1`` start message (scan id,
shapes, dtype, calibration, metadata) and ``chunk(first, count)`` returns the
frames with row-major scan indices ``first .. first+count-1`` as a
``(count, h, w)`` array in that dtype. The synthetic graphene scan and every
file replay implement it, so ``stream`` can send any of them like a detector:
it binds (or connects) a PUSH or PUB socket, sends ``start``, the frames in
multi-frame messages, and ``end``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import zmq
from tqdm import tqdm

from rrstem.stream import protocol
from rrstem.stream.protocol import Start
from rrstem.stream.auth import Curve, warn_if_exposed
from rrstem.stream.receiver import bind_or_connect

#: The endpoint the most recent ``stream`` call bound or connected to, with the
#: real port when ``tcp://...:0`` was asked for.
LAST_ENDPOINT: str | None = None

#: Target size of one frames message when sending as fast as possible.
MESSAGE_BYTES = 2 << 20
#: Under rate pacing, send at least this many messages per second.
MIN_MESSAGES_PER_S = 20
#: Upper bound of bytes queued in the send socket (sets SNDHWM).
QUEUE_BYTES = 64 << 20


class Source(ABC):
    """A scan that can hand out its frames in row-major chunks."""

    start: Start

    @abstractmethod
    def chunk(self, first: int, count: int) -> np.ndarray:
        """Frames ``first .. first+count-1`` as a C-contiguous ``(count, h, w)`` array."""

    #: What is wrong with the source (a truncated file, missing data files), or None. A damaged
    #: source still hands out its first ``available_frames`` frames; the rest of the scan is missing.
    problem: str | None = None

    @property
    def n_frames(self) -> int:
        """Frames of the acquisition: the scan positions, or more where a sync offset or flyback adds some."""
        return self.start.n_positions

    @property
    def available_frames(self) -> int:
        """How many frames can be read: ``n_frames`` unless the source is damaged."""
        return self.n_frames

    @property
    def valid_order(self) -> Sequence[int] | None:
        """The frame indices to send when the good frames are not simply the first ``available_frames``
        (a file damaged in the middle), else None."""
        return None

    def _check_range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.n_frames:
            raise ValueError(
                f"frames {first}..{first + count - 1} are outside the scan of "
                f"{self.n_frames} frames; ask for 0 <= first and first + count <= {self.n_frames}"
            )
        if first + count > self.available_frames:
            raise ValueError(f"frames {first}..{first + count - 1} cannot be read: {self.problem}")

    def array(self) -> np.ndarray:
        """The whole scan as one ``(ny, nx, h, w)`` array in memory."""
        return self.chunk(0, self.n_frames).reshape(*self.start.scan_shape, *self.start.frame_shape)

    def close(self) -> None:
        """Release files or memory maps held by the source."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SeriesSource(Source):
    """A source over a flat, row-major series of frames: an array-like ``(n, h, w)``.

    ``frames[a:b]`` is read only when a chunk needs it (a memmap, an h5py
    dataset, a concatenation of them). A series shorter than the scan (a
    truncated file) hands out what it has; ``problem`` says why the rest is missing.
    ``n_frames``: the frames of the acquisition, when a sync offset or flyback
    makes them more than the scan positions.
    """

    def __init__(self, frames, start: Start, closer: Callable[[], None] | None = None, problem: str | None = None,
                 n_frames: int | None = None):
        if tuple(frames.shape[1:]) != tuple(start.frame_shape):
            raise ValueError(f"frames of shape {tuple(frames.shape[1:])} do not match the start message")
        self.frames = frames
        self.start = start
        self.problem = problem
        self._n_frames = n_frames or start.n_positions
        self._available = min(int(frames.shape[0]), self._n_frames)
        self._closer = closer
        self._dtype = np.dtype(start.dtype).newbyteorder("<")

    @property
    def n_frames(self) -> int:
        return self._n_frames

    @property
    def available_frames(self) -> int:
        return self._available

    def chunk(self, first: int, count: int) -> np.ndarray:
        self._check_range(first, count)
        return np.ascontiguousarray(self.frames[first:first + count], dtype=self._dtype)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None


class ArraySource(Source):
    """A source over a 4D array-like ``(ny, nx, h, w)``: ndarray, memmap or h5py dataset.

    Only the scan rows a chunk needs are read, so memory maps and HDF5
    datasets stay lazy. Frames are returned little-endian, as the protocol sends them.
    """

    def __init__(self, data, start: Start, closer: Callable[[], None] | None = None):
        if tuple(data.shape) != (*start.scan_shape, *start.frame_shape):
            raise ValueError(f"array shape {tuple(data.shape)} does not match the start message")
        self.data = data
        self.start = start
        self._closer = closer
        self._dtype = np.dtype(start.dtype).newbyteorder("<")

    def chunk(self, first: int, count: int) -> np.ndarray:
        self._check_range(first, count)
        nx = self.start.scan_shape[1]
        y0, y1 = first // nx, -(-(first + count) // nx)
        rows = np.asarray(self.data[y0:y1]).reshape(-1, *self.start.frame_shape)
        off = first - y0 * nx
        return np.ascontiguousarray(rows[off:off + count], dtype=self._dtype)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None


@dataclass(frozen=True)
class StreamStats:
    """What one ``stream`` call sent."""

    endpoint: str
    frames: int
    messages: int
    seconds: float

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else math.inf


def default_frames_per_message(frame_nbytes: int, rate: float | None = None) -> int:
    """Frames per message: ~2 MB per message, and at least 20 messages/s under a rate."""
    n = max(1, MESSAGE_BYTES // max(1, frame_nbytes))
    if rate is not None:
        n = min(n, max(1, int(rate // MIN_MESSAGES_PER_S)))
    return n


def _runs(order: Iterable[int], limit: int) -> Iterator[tuple[int, int]]:
    """Group frame indices into (first, count) runs of consecutive indices, at most ``limit`` long."""
    first = count = None
    for i in order:
        i = int(i)
        if count is not None and i == first + count and count < limit:
            count += 1
            continue
        if count is not None:
            yield first, count
        first, count = i, 1
    if count is not None:
        yield first, count


def message_plan(source: Source, fpm: int | None = None, order: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(first, count) of each frames message ``stream`` sends of ``source`` as fast as it can (``fpm`` frames
    per message, ``default_frames_per_message`` by default), in order: a scan split across workers
    (``rrstem.scaleout``) calibrates on the same first messages as the service."""
    fpm = fpm or default_frames_per_message(source.start.frame_nbytes)
    n = source.n_frames
    if order is None:  # a damaged source sends what it has; the receiver counts the rest as missing
        have = source.available_frames
        return [(f, min(fpm, have - f)) for f in range(0, have, fpm)]
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if order.size and (order.min() < 0 or order.max() >= n):
        raise ValueError(f"order holds frame indices outside 0..{n - 1}; pass indices of this scan")
    return list(_runs(order, fpm))


def _open_socket(ctx: zmq.Context, endpoint: str, bind: bool, socket_type: str, hwm: int, timeout_ms: int,
                 curve: Curve | None = None):
    kinds = {"push": zmq.PUSH, "pub": zmq.XPUB}  # XPUB is a PUB that tells us when someone subscribes
    if socket_type not in kinds:
        raise ValueError(f"socket_type must be 'push' or 'pub', not {socket_type!r}")
    sock = ctx.socket(kinds[socket_type])
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    sock.setsockopt(zmq.LINGER, timeout_ms)
    if not bind:  # queue only to a receiver whose handshake is done: a peer that refuses our keys times out the send
        sock.setsockopt(zmq.IMMEDIATE, 1)
    endpoint = bind_or_connect(sock, endpoint, bind, curve)  # a ValueError that says what to do if it fails
    if bind and curve is None:
        warn_if_exposed([(endpoint, "sender")])
    return sock, endpoint


def _wait_for_subscriber(sock, endpoint: str, timeout: float) -> None:
    if not sock.poll(int(timeout * 1000), zmq.POLLIN):
        raise TimeoutError(f"no subscriber connected to {endpoint} within {timeout:g} s; start the receiver first")
    sock.recv()  # the subscription message


class RrstemEncoder:
    """``rrstem/1``: a start, one ``frames`` message per chunk of consecutive frames, an end."""

    per_frame = False  # many frames per message

    def __init__(self, start: Start):
        self.start = start
        self.label = start.scan_id

    def header(self) -> list:
        return [self.start.encode()]

    def messages(self, first: int, frames: np.ndarray) -> Iterator[tuple[list, int]]:
        """(parts, frames in them) for the chunk starting at scan index ``first``."""
        frames = np.ascontiguousarray(frames)
        head = protocol.Frames(scan_id=self.start.scan_id, first=first, count=len(frames)).encode()
        yield [head, memoryview(frames.reshape(-1))], len(frames)

    def end(self, sent: int) -> list:
        return [protocol.End(scan_id=self.start.scan_id, frames_sent=sent).encode()]


def stream(
    source: Source,
    endpoint: str,
    *,
    bind: bool = True,
    socket_type: str = "push",
    rate: float | None = None,
    frames_per_message: int | None = None,
    progress: bool = True,
    order: Sequence[int] | None = None,
    timeout: float = 10.0,
    on_endpoint: Callable[[str], None] | None = None,
    context: zmq.Context | None = None,
    encoder=None,
    grace: float = 0.0,
    keys: str | Path | None = None,
) -> StreamStats:
    """Send ``source`` as one scan: header, frames, end (``rrstem/1`` unless another ``encoder``).

    ``bind=True`` (the default) binds ``endpoint`` like a detector does;
    ``tcp://127.0.0.1:0`` picks a free port, which is passed to
    ``on_endpoint`` and stored in ``LAST_ENDPOINT`` before anything is sent.
    ``socket_type`` is ``"push"`` (lossless, back-pressure) or ``"pub"``
    (waits for the first subscriber, then never blocks: slow subscribers lose
    frames). ``rate`` paces frames/s against an absolute clock; ``None`` sends
    as fast as possible. ``order`` optionally lists the frame indices to send
    (a permutation, a subset, or with repeats, to exercise receivers). A send
    that no receiver takes within ``timeout`` seconds raises ``TimeoutError``.
    ``encoder`` turns chunks into messages (``RrstemEncoder``, or a detector
    protocol's: ``simulators/dectris.py``); the socket stays open ``grace``
    seconds after the end, as a detector that stays up does. ``keys``, a
    ``rrstem keys`` folder: CURVE, as the server if it binds (only the
    folder's authorized clients get frames), else as the client.
    """
    global LAST_ENDPOINT
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be a positive number of frames/s or None, not {rate!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
    start = source.start
    encoder = encoder or RrstemEncoder(start)
    fpm = frames_per_message or default_frames_per_message(start.frame_nbytes, rate)
    if fpm < 1:
        raise ValueError(f"frames_per_message must be >= 1, not {fpm}")
    plan = message_plan(source, fpm, order)
    hwm = max(4, QUEUE_BYTES // max(1, (1 if encoder.per_frame else fpm) * start.frame_nbytes))
    # Our own context unless one is shared (inproc): closing a socket does not wait for its queue,
    # terminating its context does (up to the linger), so the last frames are never cut off at exit.
    own = context is None
    ctx = zmq.Context() if own else context
    curve = None
    try:
        curve = Curve(keys, ctx) if keys is not None else None
        sock, endpoint = _open_socket(ctx, endpoint, bind, socket_type, hwm, int(timeout * 1000), curve)
    except BaseException:
        if curve is not None:
            curve.close()
        if own:
            ctx.term()  # its socket is closed already: nothing to wait for
        raise
    LAST_ENDPOINT = endpoint
    if on_endpoint is not None:
        on_endpoint(endpoint)
    sent = messages = 0
    bar = tqdm(total=sum(c for _, c in plan), unit="frame", unit_scale=True, disable=not progress,
               desc=encoder.label, mininterval=0.5)
    try:
        if socket_type == "pub":
            _wait_for_subscriber(sock, endpoint, timeout)
        _send(sock, lambda: sock.send_multipart(encoder.header()), endpoint, timeout)
        t0 = time.perf_counter()  # the clock starts once a receiver has taken the start
        for first, count in plan:
            frames = source.chunk(first, count)
            for parts, n in encoder.messages(first, frames):
                if rate is not None:  # like a detector, a frame goes out once its dwell time is over
                    delay = t0 + (sent + n) / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                _send(sock, lambda: sock.send_multipart(parts, copy=False), endpoint, timeout)
                sent += n
                messages += 1
            bar.update(count)
        _send(sock, lambda: sock.send_multipart(encoder.end(sent)), endpoint, timeout)
        seconds = time.perf_counter() - t0
        time.sleep(grace)
    finally:
        bar.close()
        sock.close()  # lingers up to `timeout` so queued messages still go out
        if curve is not None:
            curve.close()  # its authenticator's sockets are closed before the context ends; connected peers stay
        if own:
            ctx.term()  # blocks until the queue is delivered or the linger runs out
    return StreamStats(endpoint=endpoint, frames=sent, messages=messages + 2, seconds=seconds)


def _send(sock, send: Callable[[], None], endpoint: str, timeout: float) -> None:
    try:
        send()
    except zmq.Again:
        raise TimeoutError(
            f"no receiver took frames from {endpoint} within {timeout:g} s; "
            "start `rrstem serve` (or another PULL socket) on this endpoint, or raise the timeout; a receiver with "
            "CURVE (serve --keys DIR) takes frames only from a sender given keys from that folder (--keys DIR)"
        ) from None
