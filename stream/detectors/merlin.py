"""Quantum Detectors Merlin: the data port's messages (``MPX`` framing, acquisition header, ``MQ1`` frames).

On the wire (plain TCP, the Merlin PC serves port 6342) every message is
``MPX,<10-digit length>,<payload>``, where the length counts the payload plus
the comma before it. ``MpxFraming`` cuts the stream into payloads for the TCP
transport (``stream.receiver.TcpReceiver``) and resynchronises on the next
``MPX,`` after damage; ``MerlinDecoder`` turns one payload into items:

- ``HDR,`` then ``Key:\\tValue`` lines up to ``End``: the acquisition header.
  Used: ``Frames in Acquisition (Number)`` (0: continuous), ``Frames per
  Trigger (Number)``, ``Counter Depth (number)``, ``Assembly Size``, and
  ``ScanX``/``ScanY`` when present; all of it goes into the scan's metadata.
- ``MQ1,<sequence>,<data offset>,<chips>,<width>,<height>,<pixel type>,
  <layout>,<chip select>,<timestamp>,<shutter s>,<counter>,<colour>,<gain>,
  ...[,MQ1A,<timestamp ns>,<shutter ns>,<counter depth>]`` padded to the data
  offset, then the pixels. Pixel types ``U08``, ``U16``, ``U32`` are
  big-endian and already assembled by the Merlin PC (a quad is one 512x512,
  or 514x514 with gaps, image), so the frame shape is the header's height x
  width for every layout. The raw ``R64`` type is refused (``unsupported_pixel_type``).

Pixels are not copied and not byte-swapped here: a frame is a big-endian view
of the message buffer, and binning (``stream/preprocess.py``), the first pass
that reads every pixel, converts the byte order as it sums, which costs far
less than a separate in-place swap (``bench/README.md``).

The scan shape is ``--scan-shape``, else ``ScanY x ScanX``, else
``(frames // frames per trigger) x (frames per trigger - flyback)``. The
Merlin sends no end message: a scan ends with its last frame, by the frame
count of the header (the last sequence number), or, when an acquisition holds
several scans or is continuous (frame count 0), after every
``ny * (nx + flyback)`` frames (after the sync offset). Frame indices handed
on are acquisition indices within the scan: the service applies the sync
offset and flyback (``stream/acquisition.py``) for every protocol alike.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.detectors.base import BadMessage, Cut, Framing, Item
from rrstem.stream.protocol import MAX_SCAN_EDGE, End, Frames, Start

#: Merlin pixel type -> (wire dtype, the scan's little-endian dtype name)
PIXEL_TYPES = {"U08": (">u1", "uint8"), "U16": (">u2", "uint16"), "U32": (">u4", "uint32")}
FRAMES_KEY = "Frames in Acquisition (Number)"
PER_TRIGGER_KEY = "Frames per Trigger (Number)"
MPX_PREFIX = re.compile(rb"MPX,(\d{10}),")
PREFIX_SIZE = 15  # b"MPX," + 10 digits + b","


class MpxFraming(Framing):
    """The data port's byte stream -> ``MPX`` payloads; bytes that are no ``MPX,<length>,`` prefix are skipped
    up to the next ``MPX,``, and a length outside 2 .. ``max_message`` + 1 is skipped too."""

    name, marker = "MPX", "MPX,"

    def split(self, buf: np.ndarray, fill: int, skipped: int) -> Cut:
        mv = memoryview(buf)
        pos, out, resyncs = 0, [], []
        while fill - pos >= PREFIX_SIZE:
            m = MPX_PREFIX.match(bytes(mv[pos:pos + PREFIX_SIZE]))
            if m is None:
                at = bytes(mv[pos + 1:fill]).find(b"MPX,")
                jump = at + 1 if at >= 0 else max(1, fill - pos - 3)  # keep a possible partial "MPX" at the end
                skipped += jump
                pos += jump
                continue
            length = self._length(mv, pos, fill, int(m.group(1)) - 1, resyncs)  # the field counts the comma
            if length is None:
                break  # the rest comes with the next read
            if not 0 < length <= self.max_message:
                resyncs.append((0, f"message length {length + 1} is outside 2..{self.max_message + 1}"))
                skipped, pos = skipped + 1, pos + 1
                continue
            if skipped:
                resyncs.append((skipped, "bytes that are no MPX message"))
                skipped = 0
            if pos + PREFIX_SIZE + length > fill:
                break  # incomplete: the rest comes with the next read
            out.append(mv[pos + PREFIX_SIZE:pos + PREFIX_SIZE + length])
            pos += PREFIX_SIZE + length
        return Cut(pos, out, skipped, resyncs)

    def _length(self, mv: memoryview, pos: int, fill: int, field: int, resyncs: list) -> int | None:
        """The payload length of the message at ``pos``: its length ``field``, unless it carries an MQ1 frame
        whose own header (data offset and geometry) gives another length and the data show the header right
        (the next ``MPX,`` follows the header's length, not the field's): then one bad length field costs
        nothing, not the rest of the stream. None: not enough bytes here yet to judge."""
        head = mv[pos + PREFIX_SIZE:fill]
        frame = frame_length(head)  # an MQ1 frame's own length, from its header's offset and geometry
        if frame is None:
            if bytes(head[:4]) == b"MQ1," and len(head) < FRAME_HEADER_LOOK:
                return None  # an MQ1 header's first fields not all here yet
            return field
        if frame == field or frame > self.max_message:
            return field
        at_field, at_frame = pos + PREFIX_SIZE + field, pos + PREFIX_SIZE + frame
        if at_field + 4 <= fill and bytes(mv[at_field:at_field + 4]) == b"MPX,":
            return field  # the field leads to the next message: the header is the damaged one
        if at_frame + 4 > fill:
            return None  # judged once the bytes after the header's length are here
        if bytes(mv[at_frame:at_frame + 4]) != b"MPX,":
            return field  # neither leads to a next message: as the field says (the decoder reports the frame)
        resyncs.append((0, f"message length {field + 1} disagrees with its MQ1 frame header ({frame + 1}), "
                           "which the next message confirms: the header's is used"))
        return frame

    def message_size(self, buf: np.ndarray, pos: int, fill: int) -> int:
        if fill - pos < PREFIX_SIZE:
            return 0
        m = MPX_PREFIX.match(bytes(memoryview(buf)[pos:pos + PREFIX_SIZE]))
        if m is None:
            return 0
        field = int(m.group(1)) - 1
        frame = frame_length(memoryview(buf)[pos + PREFIX_SIZE:fill])
        # room for the message and the next prefix, which may decide between the field's and the header's length
        length = max(field if field <= self.max_message else 0, frame or 0)
        return PREFIX_SIZE + length + PREFIX_SIZE if length else 0


def parse_acquisition_header(payload: bytes) -> dict[str, str]:
    """``HDR,`` text -> {key: value}; ``BadMessage`` if it is not one or lacks the frame counts."""
    text = bytes(payload).decode("latin-1")
    lines = text.split("\n")
    if not lines[0].startswith("HDR"):
        raise BadMessage("bad_header", "acquisition header does not start with HDR,")
    fields: dict[str, str] = {}
    ended = False
    for line in lines[1:]:
        if line.strip().startswith("End"):
            ended = True
            break
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if not ended:
        raise BadMessage("bad_header", "acquisition header has no End line")
    for key in (FRAMES_KEY, PER_TRIGGER_KEY):
        value = fields.get(key, "")
        if not value.isdigit():
            raise BadMessage("bad_header", f"acquisition header: {key!r} is {value or 'missing'!r}, not a count")
    return fields


def scan_shape_from_header(fields: dict[str, str], sync_offset: int = 0, flyback: int = 0) -> tuple[int, int] | None:
    """``ScanY x ScanX``, else from the frame count and frames per trigger; None if neither tells."""
    sx, sy = fields.get("ScanX", ""), fields.get("ScanY", "")
    if sx.isdigit() and sy.isdigit() and int(sx) > 0 and int(sy) > 0:
        return int(sy), int(sx)
    frames, per_trigger = int(fields[FRAMES_KEY]), int(fields[PER_TRIGGER_KEY])
    if frames > 0 and per_trigger > flyback and (frames - max(sync_offset, 0)) // per_trigger > 0:
        return (frames - max(sync_offset, 0)) // per_trigger, per_trigger - flyback
    return None


@dataclass(frozen=True)
class FrameHeader:
    """The fields of one ``MQ1`` frame header that rrstem uses."""

    sequence: int
    data_offset: int
    chips: int
    width: int
    height: int
    pixel_type: str
    layout: str
    timestamp: str
    counter_depth: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def nbytes(self) -> int:
        """Pixel bytes that follow the header."""
        return self.width * self.height * np.dtype(PIXEL_TYPES[self.pixel_type][0]).itemsize

    def same_format(self, other: "FrameHeader") -> bool:
        return (self.data_offset, self.chips, self.shape, self.pixel_type, self.layout) == (
            other.data_offset, other.chips, other.shape, other.pixel_type, other.layout)


def parse_frame_header(buf) -> FrameHeader:
    """An ``MQ1`` header at the start of ``buf``; ``BadMessage`` if it does not parse."""
    head = bytes(buf[:40]).split(b",")  # MQ1,<sequence>,<data offset>: the sequence may outgrow 6 digits
    if head[0] != b"MQ1" or len(head) < 4:
        raise BadMessage("bad_frame_header", f"frame header starts {bytes(buf[:16])!r}, not MQ1,<sequence>,<offset>")
    try:
        offset = int(head[2])
    except ValueError:
        raise BadMessage("bad_frame_header", f"frame header data offset {head[2][:8]!r} is not a number") from None
    if not 16 <= offset <= len(buf):
        raise BadMessage("bad_frame_header", f"frame header data offset {offset} outside the {len(buf)}-byte message")
    parts = bytes(buf[:offset]).decode("ascii", errors="replace").split(",")
    try:
        seq, chips, width, height = int(parts[1]), int(parts[3]), int(parts[4]), int(parts[5])
        pixel_type, layout, timestamp = parts[6].strip(), parts[7].strip(), parts[9]
    except (IndexError, ValueError) as exc:
        raise BadMessage("bad_frame_header", f"frame header fields do not parse ({exc})") from None
    depth = None
    if "MQ1A" in parts:
        k = parts.index("MQ1A")
        tail = parts[k + 3].strip(" \x00\r\n") if len(parts) > k + 3 else ""
        depth = int(tail) if tail.isdigit() else None
    if pixel_type not in PIXEL_TYPES:
        raise BadMessage("unsupported_pixel_type", f"pixel type {pixel_type!r} (layout {layout}); rrstem reads the "
                         "assembled types U08, U16 and U32: set the Merlin to a counter depth of 1, 6, 12 or 24 "
                         "bits without raw (R64) output")
    if width < 1 or height < 1 or seq < 0:
        raise BadMessage("bad_frame_header", f"frame header says {width}x{height} pixels, sequence {seq}")
    return FrameHeader(seq, offset, chips, width, height, pixel_type, layout, timestamp, depth)


#: Bytes of an MQ1 frame header the framing reads for the frame's own length (the first seven fields).
FRAME_HEADER_LOOK = 64


def frame_length(buf) -> int | None:
    """The length of the ``MQ1`` frame message that starts ``buf``, from the first fields of its header (data
    offset, width, height, pixel type); None if ``buf`` does not start with them. (The decoder checks the
    whole header; this is the framing's quick look, once per message.)"""
    head = bytes(buf[:FRAME_HEADER_LOOK])
    if not head.startswith(b"MQ1,"):
        return None
    parts = head.split(b",")
    if len(parts) < 8:  # the pixel type and the field after it: the header's first fields are all here
        return None
    try:
        offset, width, height = int(parts[2]), int(parts[4]), int(parts[5])
        wire = PIXEL_TYPES[parts[6].strip().decode("ascii")][0]
    except (ValueError, KeyError, UnicodeDecodeError):
        return None
    if offset < 16 or width < 1 or height < 1:
        return None
    return offset + width * height * np.dtype(wire).itemsize


def frame_pixels(buf, header: FrameHeader) -> np.ndarray:
    """The (h, w) big-endian pixels after ``header`` in ``buf``, viewed without copying; ``BadMessage`` on a size mismatch."""
    got = len(buf) - header.data_offset
    if got != header.nbytes:
        raise BadMessage("bad_size", f"frame {header.sequence} has {got} pixel bytes; its header says "
                         f"{header.height}x{header.width} {header.pixel_type} = {header.nbytes}")
    wire = np.dtype(PIXEL_TYPES[header.pixel_type][0])
    return np.frombuffer(buf, dtype=wire, count=header.width * header.height,
                         offset=header.data_offset).reshape(header.shape)


@dataclass
class _Acquisition:
    number: int
    fields: dict[str, str]
    frames: int  # frames in acquisition; 0: continuous
    map: AcquisitionMap | None  # None: no scan shape known
    scan: int = -1  # the scan (within the acquisition) now open, -1: none
    scan_id: str = ""
    start: Start | None = None
    first: FrameHeader | None = None
    sent: int = 0  # frames of the open scan seen
    open: bool = False  # the scan ``scan`` has started and not ended
    metadata: dict[str, Any] = field(default_factory=dict)


class MerlinDecoder:
    """One ``MPX`` payload -> items. Never raises on bad input (``decode``)."""

    protocol = "merlin"

    def __init__(self, scan_shape: tuple[int, int] | None = None, sync_offset: int = 0, flyback: int = 0):
        self.scan_shape = tuple(scan_shape) if scan_shape is not None else None
        self.sync_offset, self.flyback = int(sync_offset), int(flyback)
        if self.scan_shape is not None:
            AcquisitionMap(self.scan_shape, self.sync_offset, self.flyback)  # validates
        self.acq: _Acquisition | None = None
        self._acquisitions = 0
        self._session = time.strftime("%Y%m%d-%H%M%S")

    def decode(self, parts: list[Any]) -> list[Item]:
        buf = getattr(parts[0], "buffer", parts[0])
        try:
            if len(parts) != 1:
                raise BadMessage("extra_part", f"{len(parts)} parts; a Merlin message is one payload")
            head = bytes(buf[:4])
            if head == b"HDR,":
                return self._header(buf)
            if head == b"MQ1,":
                return self._frame(buf)
            raise BadMessage("unknown_message", f"message starts {bytes(buf[:8])!r}, neither HDR, nor MQ1,")
        except BadMessage as exc:
            acq = self.acq
            frame = exc.reason not in ("bad_header", "unknown_message", "extra_part", "no_scan_shape")
            return [Item("bad", reason=exc.reason, detail=f"merlin: {exc}",
                         scan_id=acq.scan_id if acq is not None and acq.scan >= 0 else None, count=int(frame))]
        except Exception as exc:  # a malformed message must never stop the receiver
            return [Item("bad", reason="undecodable", detail=f"merlin: {type(exc).__name__}: {exc}")]

    # --- acquisition header ---------------------------------------------------------------

    def _header(self, buf) -> list[Item]:
        fields = parse_acquisition_header(buf)
        self._acquisitions += 1
        shape = self.scan_shape or scan_shape_from_header(fields, self.sync_offset, self.flyback)
        too_large = shape is not None and max(shape) > MAX_SCAN_EDGE
        amap = AcquisitionMap(shape, self.sync_offset, self.flyback) if shape and not too_large else None
        self.acq = _Acquisition(self._acquisitions, fields, int(fields[FRAMES_KEY]), amap,
                                metadata={"detector": "Quantum Detectors Merlin", "acquisition_header": fields})
        if too_large:
            raise BadMessage("bad_header", f"acquisition {self._acquisitions}: scan shape {shape[0]}x{shape[1]} "
                             f"exceeds {MAX_SCAN_EDGE} positions per edge")
        if amap is None:
            raise BadMessage("no_scan_shape", f"acquisition {self._acquisitions} has no ScanX/ScanY and "
                             f"{fields[FRAMES_KEY]} frames in acquisition: pass the scan shape with --scan-shape "
                             "NYxNX (rrstem serve --protocol merlin --scan-shape 256x256)")
        return []

    # --- frames ----------------------------------------------------------------------------

    def _frame(self, buf) -> list[Item]:
        header = parse_frame_header(buf)
        acq = self.acq
        if acq is None or acq.map is None:
            raise BadMessage("no_start", f"frame {header.sequence} arrived without a usable acquisition header")
        pixels = frame_pixels(buf, header).reshape(1, *header.shape)  # (1, h, w); size checked before any state changes
        items: list[Item] = []
        i = header.sequence - 1  # sequence numbers count from 1
        if acq.frames and i >= acq.frames:
            raise BadMessage("beyond_acquisition", f"frame {header.sequence} of an acquisition of {acq.frames}")
        per = acq.map.frames_per_scan
        k = max(0, i - self.sync_offset) // per
        if k < acq.scan:  # a late frame of an earlier scan: the service counts it as stale
            return [Item("frames", Frames(scan_id=self._scan_id(acq, k), first=i - k * per, count=1),
                         frames=pixels, scan_id=self._scan_id(acq, k),
                         count=1)]
        if k > acq.scan:
            if acq.open:
                items.append(self._end_scan(acq))
            items.append(self._start_scan(acq, k, header))
        if not header.same_format(acq.first):
            f = acq.first
            raise BadMessage("bad_shape", f"frame {header.sequence} is {header.height}x{header.width} "
                             f"{header.pixel_type} {header.layout}; the scan's first frame is "
                             f"{f.height}x{f.width} {f.pixel_type} {f.layout}")
        acq.sent += 1
        items.append(Item("frames", Frames(scan_id=acq.scan_id, first=i - k * per, count=1),
                          frames=pixels, scan_id=acq.scan_id, count=1))
        last_of_scan = i - self.sync_offset == (k + 1) * per - 1
        if last_of_scan or (acq.frames and i == acq.frames - 1):
            items.append(self._end_scan(acq))
        return items

    def _scan_id(self, acq: _Acquisition, k: int) -> str:
        return f"merlin-{self._session}-a{acq.number}" + (f"-s{k + 1}" if k or acq.frames == 0 or
                                                         (acq.frames > acq.map.frames_in_acquisition) else "")

    def _start_scan(self, acq: _Acquisition, k: int, header: FrameHeader) -> Item:
        acq.scan, acq.first, acq.sent, acq.open = k, header, 0, True
        acq.scan_id = self._scan_id(acq, k)
        meta = {**acq.metadata, "frame_header": {"chips": header.chips, "layout": header.layout,
                                                 "pixel_type": header.pixel_type,
                                                 "counter_depth": header.counter_depth,
                                                 "first_timestamp": header.timestamp},
                "scan_in_acquisition": k}
        acq.start = Start(scan_id=acq.scan_id, scan_shape=acq.map.scan_shape, frame_shape=header.shape,
                          dtype=PIXEL_TYPES[header.pixel_type][1], metadata=meta)
        return Item("start", acq.start, scan_id=acq.scan_id)

    def _end_scan(self, acq: _Acquisition) -> Item:
        item = Item("end", End(scan_id=acq.scan_id, frames_sent=acq.sent), scan_id=acq.scan_id)
        acq.sent, acq.open = 0, False
        return item
