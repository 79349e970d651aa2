"""What every detector decoder shares: the items it emits, its interface, and detector-series bookkeeping.

A decoder turns one multipart message into ``Item``s: ``start``, ``frames``
and ``end``, exactly as ``rrstem/1`` carries them, or ``bad`` with the
reason it is counted under. ``decode`` never raises on bad input.

``DetectorDecoder`` is the base of the adapters for detectors that stream a
*series* (a header, one message per image, maybe an end) and do not carry the
scan shape: it is given the scan shape (``rrstem serve --scan-shape``), turns
a series into one rrstem scan and files every ``BadMessage`` raised while
decoding as a ``bad`` item.

``Framing`` is what a protocol over plain TCP adds: how its byte stream is
cut into messages (Merlin's ``MPX`` framing, ``merlin.py``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Protocol, get_args

import numpy as np
from pydantic import ValidationError

from rrstem.stream.protocol import Calibration, End, Frames, Start


#: What an ``Item`` is: a scan's start, frames or end, or a rejected message.
ItemKind = Literal["start", "frames", "end", "bad"]
ITEM_KINDS: tuple[str, ...] = get_args(ItemKind)


@dataclass
class Item:
    """One decoded message, or a rejected one (``kind == "bad"``)."""

    kind: ItemKind
    message: Start | Frames | End | None = None
    frames: np.ndarray | None = None  # (count, h, w) view of the socket buffer
    reason: str = ""  # for bad items
    detail: str = ""
    scan_id: str | None = None
    count: int = 0  # frames affected, for bad frames messages


class Decoder(Protocol):
    """Turns one multipart message into items. Every detector protocol implements this."""

    def decode(self, parts: list[Any]) -> Item | list[Item]: ...


class BadMessage(ValueError):
    """A message this adapter rejects; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class Cut(NamedTuple):
    """What ``Framing.split`` found in a block of bytes."""

    end: int  # where the unread rest starts: an incomplete message, or bytes still to be judged
    messages: list[memoryview]  # the complete messages' payloads, views of the block
    skipped: int  # bytes skipped since the last good message and not yet reported
    resyncs: list[tuple[int, str]]  # (bytes skipped, why) for each resync to report, in order


class Framing:
    """How a TCP transport (``stream.receiver.TcpReceiver``) cuts a detector's byte stream into messages.

    A protocol over plain TCP names its framing in its ``Protocol`` entry
    (``stream/detectors/__init__.py``); the receiver makes one per connection
    and owns the buffers. ``split`` takes the bytes received so far,
    ``buf[:fill]``, and the bytes skipped but not yet reported; it returns a
    ``Cut``. After damage it skips to where a message may start again
    (``marker``), and reports what it skipped once it finds a good message
    (the receiver reports the rest when the connection closes).
    ``message_size`` tells the receiver how large a block the message at
    ``pos`` needs, once its length is in (else 0).
    """

    name = ""  # the message's name in resync details: "no complete <name> message"
    marker = ""  # where reading resumes after damage: "skipped ... up to the next <marker> prefix"

    def __init__(self, max_message: int = 1 << 28):
        self.max_message = max_message

    def split(self, buf: np.ndarray, fill: int, skipped: int) -> Cut:
        raise NotImplementedError

    def message_size(self, buf: np.ndarray, pos: int, fill: int) -> int:
        raise NotImplementedError


class BlockPool:
    """Blocks of memory for the frames of batched small messages, used again once nothing views them.

    A fresh block per batch would pay its page faults on every first write, on top of the copy.
    ``get(rows, row_bytes)`` hands out a (rows, row_bytes) uint8 view of a pooled block that no item, scan
    or store still holds (its only references are the pool's and the check's own), else a new block,
    pooled up to ``keep`` of them.
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._blocks: list[np.ndarray] = []

    def get(self, rows: int, row_bytes: int) -> np.ndarray:
        for block in self._blocks:
            # 3 references: the list's, this loop's and getrefcount's argument; any view of it adds one
            if block.shape[1] == row_bytes and block.shape[0] >= rows and sys.getrefcount(block) <= 3:
                return block[:rows]
        block = np.empty((rows, row_bytes), np.uint8)
        if len(self._blocks) >= self.keep:
            self._blocks.pop(0)
        self._blocks.append(block)
        return block


# --- one detector series -> one rrstem scan ----------------------------------------------------


@dataclass
class Series:
    """The detector series being received; it becomes the scan ``scan_id``."""

    key: Any  # the detector's series id
    scan_id: str
    frame_shape: tuple[int, int] | None  # None: taken from the first image
    dtype: str | None  # None: taken from the first image
    calibration: dict[str, float]  # Calibration fields
    metadata: dict[str, Any]
    channel: str | None = None  # the detector channel (threshold) whose images are used
    bad_pixels: tuple = ()  # [row, col] of the pixels the detector's pixel mask names (``Start.bad_pixels``)
    start: Start | None = None
    images: int = 0  # image messages seen, valid or not: the series' frames_sent


class DetectorDecoder:
    """Series bookkeeping shared by the detector decoders; subclasses implement ``_decode``.

    ``_decode(parts)`` returns items and may raise ``BadMessage`` anywhere; it
    calls ``_begin`` on a series header, ``_image`` for each image and
    ``_end`` at the series end.
    """

    protocol = ""  # the name in PROTOCOLS, used in messages

    def __init__(self, scan_shape: tuple[int, int] | None):
        if scan_shape is None:
            raise ValueError(f"the {self.protocol} protocol does not carry the scan shape: pass it with "
                             f"--scan-shape NYxNX, e.g. rrstem serve --protocol {self.protocol} --scan-shape 64x64")
        ny, nx = (int(v) for v in scan_shape)
        if ny < 1 or nx < 1:
            raise ValueError(f"scan shape must be positive, got {scan_shape!r}")
        self.scan_shape = (ny, nx)
        self.series: Series | None = None
        self._earlier: dict[Any, str] = {}  # series key -> scan id of the last few series that started a scan

    def decode(self, parts: list[Any]) -> Item | list[Item]:
        return self._guard(self._decode, parts)

    def _guard(self, fn: Callable, *args) -> Any:
        """``fn(*args)``, or the ``bad`` item of the ``BadMessage`` (or any other exception) it raised."""
        try:
            return fn(*args)
        except BadMessage as exc:
            return Item("bad", reason=exc.reason, detail=f"{self.protocol}: {exc}")
        except Exception as exc:  # a malformed message must never stop the receiver
            return Item("bad", reason="undecodable", detail=f"{self.protocol}: {type(exc).__name__}: {exc}")

    def _decode(self, parts: list[Any]) -> Item | list[Item]:
        raise NotImplementedError

    def _begin(self, series: Series) -> list[Item]:
        """A series header: the scan starts now if its frame shape and dtype are known, else at its first image."""
        old = self.series
        if old is not None and old.start is not None and old.key != series.key:
            self._earlier[old.key] = old.scan_id  # its late images are that scan's, counted stale
            for key in list(self._earlier)[:-8]:
                del self._earlier[key]
        self.series = series
        return [self._start()] if series.frame_shape and series.dtype else []

    def _start(self) -> Item:
        s = self.series
        try:
            s.start = Start(scan_id=s.scan_id, scan_shape=self.scan_shape, frame_shape=s.frame_shape, dtype=s.dtype,
                            calibration=Calibration(**s.calibration), metadata=s.metadata, bad_pixels=s.bad_pixels)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise BadMessage("bad_header", f"series {s.key} cannot start a scan: {where}: {first['msg']}") from None
        return Item("start", s.start, scan_id=s.scan_id)

    def _image(self, key: Any, index: int, parse: Callable[[], tuple[tuple[int, int], str, Callable]]) -> list[Item]:
        """One image: ``parse()`` returns its (h, w), dtype and a function that returns its pixels."""
        s = self.series
        if s is None or s.key != key:
            earlier = self._earlier.get(key)
            if earlier is not None and index >= 0:  # a late image of an earlier series: stale, as for rrstem/1
                return [Item("frames", Frames(scan_id=earlier, first=index, count=1), scan_id=earlier)]
            return [Item("bad", reason="no_start", detail=f"{self.protocol}: image {index} of series {key} arrived "
                         "without its series header", count=1)]
        s.images += 1
        items = []
        try:
            shape, dtype, pixels = parse()
            if s.start is None:
                s.frame_shape, s.dtype = s.frame_shape or shape, s.dtype or dtype
                items.append(self._start())
            st = s.start
            if shape != st.frame_shape or dtype != st.dtype:
                raise BadMessage("bad_shape", f"image is {shape[0]}x{shape[1]} {dtype}; the series is "
                                 f"{st.frame_shape[0]}x{st.frame_shape[1]} {st.dtype}")
            frame = pixels().reshape(1, *shape)  # (1, h, w)
            # model_construct: one image per message makes this the per-message cost; the scan id was validated
            # at the series start and the index is a non-negative int (``_uint``)
            items.append(Item("frames", Frames.model_construct(scan_id=s.scan_id, first=index, count=1), frames=frame,
                              scan_id=s.scan_id, count=1))
        except BadMessage as exc:
            items.append(Item("bad", reason=exc.reason, detail=f"{self.protocol}: series {key} image {index}: {exc}",
                              scan_id=s.scan_id, count=1))
        return items

    def _end(self, key: Any, scan_id: str) -> list[Item]:
        s = self.series
        if s is None or s.key != key:  # the service counts an end it has no scan for
            return [Item("end", End(scan_id=scan_id, frames_sent=0), scan_id=scan_id)]
        self.series = None
        if s.start is None:
            return [Item("bad", reason="empty_series", detail=f"{self.protocol}: series {key} ended without images",
                         scan_id=s.scan_id)]
        return [Item("end", End(scan_id=s.scan_id, frames_sent=s.images), scan_id=s.scan_id)]
