"""Quantum Detectors ``.mib`` files (with or without their ``.hdr``) as replay sources.

A ``.mib`` file is a run of records, one per frame: an ``MQ1`` frame header
(``stream/detectors/merlin.py`` parses it; its data offset is the header's
size) and the pixels, big-endian, ``U08``/``U16``/``U32``, already assembled
for a quad. The file is memory-mapped with a structured dtype of
(header, pixels) records, so frames are read lazily, a chunk at a time.

The scan shape is ``scan_shape``, else ``ScanY x ScanX`` from the ``.hdr``
beside the file; a file with neither gets an error that asks for
``--scan-shape``. The file's frames stream in order as the acquisition; with
more frames than positions (sync offset, flyback), the receiver places them
(``rrstem serve/analyze --sync-offset N --flyback N``).

Damage: a truncated last record is reported (``damage``) and the complete
frames before it still stream (``valid_order``); frame headers are checked
against the first one as their chunks are read, and a header that disagrees
raises a ``ValueError`` that names the file, the frame and the fields.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from rrstem.simulators.source import Source
from rrstem.stream.detectors.base import BadMessage
from rrstem.stream.detectors.merlin import PIXEL_TYPES, parse_acquisition_header, parse_frame_header
from rrstem.stream.protocol import Start

MAGIC = b"MQ1,"


def is_mib(path: Path) -> bool:
    """A ``.mib``/``.hdr`` by its suffix, or a file that starts with an ``MQ1`` frame header."""
    if path.suffix.lower() in (".mib", ".hdr"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def _paths(path: Path) -> tuple[Path, Path | None]:
    if path.suffix.lower() == ".hdr":
        mibs = sorted(path.parent.glob(re.sub(r"([\[\]*?])", r"[\1]", path.stem) + "*.mib"))
        if not mibs:
            raise ValueError(f"cannot replay {path.name}: it is a Merlin .hdr; its .mib file ({path.stem}.mib) is missing")
        return mibs[0], path
    hdr = path.with_suffix(".hdr")
    return path, hdr if hdr.is_file() else None


class MibSource(Source):
    """A ``.mib`` file's frames, lazily, as one scan."""

    def __init__(self, path, scan_shape: tuple[int, int] | None = None, scan_id: str | None = None):
        self.path, self.hdr_path = _paths(Path(path))
        name = self.path.name
        if not self.path.is_file():
            raise ValueError(f"cannot replay {str(self.path)!r}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(4096)
        try:
            first = parse_frame_header(head)
        except BadMessage as exc:
            if exc.reason == "unsupported_pixel_type":  # a Merlin file, of a kind rrstem does not read
                raise ValueError(f"{name} is a Merlin .mib that rrstem cannot read: {exc}") from None
            raise ValueError(f"{name} is not a Merlin .mib file: its first frame header does not parse ({exc})") from None
        self.first = first
        try:
            self.fields = parse_acquisition_header(self.hdr_path.read_bytes()) if self.hdr_path else {}
        except BadMessage as exc:
            raise ValueError(f"{self.hdr_path.name} (the .hdr of {name}) cannot be read: {exc}; fix or move it away "
                             "and give --scan-shape NYxNX") from None
        self.record = first.data_offset + first.nbytes
        self.n_complete = size // self.record
        extra = size - self.n_complete * self.record
        self.damage = None
        if extra:
            self.damage = (f"{name} is truncated: it holds {self.n_complete} complete frame(s) of "
                           f"{self.record} bytes and {extra} byte(s) of a partial frame after them")
        if self.n_complete == 0:
            raise ValueError(self.damage or f"{name} holds no frames")
        shape = scan_shape
        if shape is None:
            sx, sy = self.fields.get("ScanX", ""), self.fields.get("ScanY", "")
            if not (sx.isdigit() and sy.isdigit()):
                why = "its .hdr has no ScanX/ScanY" if self.hdr_path else f"it has no .hdr file ({self.path.stem}.hdr)"
                raise ValueError(f"{name}: the scan shape is unknown ({why}); it holds {self.n_complete} frames: "
                                 "pass it with --scan-shape NYxNX")
            shape = (int(sy), int(sx))
        wire = np.dtype(PIXEL_TYPES[first.pixel_type][0])
        self._records = np.memmap(self.path, mode="r", shape=(self.n_complete,), dtype=np.dtype(
            [("header", f"S{first.data_offset}"), ("pixels", wire, first.shape)]))
        self._checked = np.zeros(self.n_complete, dtype=bool)
        self._first_header = bytes(self._records[0]["header"])
        stem = re.sub(r"[^A-Za-z0-9_.:+-]+", "_", self.path.stem)[:128] or "mib"
        meta = {"source_file": str(self.path.resolve()), "detector": "Quantum Detectors Merlin",
                "frame_header": {"chips": first.chips, "layout": first.layout, "pixel_type": first.pixel_type,
                                 "counter_depth": first.counter_depth}}
        if self.fields:
            meta["acquisition_header"] = self.fields
        self.start = Start(scan_id=scan_id or stem, scan_shape=shape, frame_shape=first.shape,
                           dtype=PIXEL_TYPES[first.pixel_type][1], metadata=meta)

    @property
    def n_frames(self) -> int:
        """Frames in the file: the acquisition, which may hold more frames than scan positions."""
        return self.n_complete

    @property
    def valid_order(self) -> range | None:
        """The frames to stream when the file is damaged (all the complete ones), else None."""
        return range(self.n_complete) if self.damage else None

    def chunk(self, first: int, count: int) -> np.ndarray:
        self._check_range(first, count)
        block = self._records[first:first + count]
        self._check_headers(first, block)
        return block["pixels"].astype(self.start.dtype)  # (count, h, w): big-endian -> native, the one copy

    def _check_headers(self, first: int, block) -> None:
        todo = ~self._checked[first:first + len(block)]
        if not todo.any():
            return
        # the fields that must agree: data offset, chips, width, height, pixel type, layout
        ref = self._first_header.split(b",")[2:8]
        heads = block["header"]
        for k in np.flatnonzero(todo):
            if bytes(heads[k][:80]).split(b",")[2:8] != ref:
                frame = first + int(k)
                try:
                    other = parse_frame_header(bytes(heads[k]) + bytes(self.first.nbytes))
                    got = f"{other.height}x{other.width} {other.pixel_type} {other.layout}, {other.chips} chip(s)"
                except BadMessage as exc:
                    got = f"unreadable ({exc})"
                f = self.first
                raise ValueError(f"{self.path.name}: the header of frame {frame} disagrees with frame 0's: it says "
                                 f"{got}; frame 0 says {f.height}x{f.width} {f.pixel_type} {f.layout}, "
                                 f"{f.chips} chip(s). Frames 0..{frame - 1} are readable")
        self._checked[first:first + len(block)] = True

    def close(self) -> None:
        self._records = None
