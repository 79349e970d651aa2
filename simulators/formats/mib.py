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

Damage costs only what is damaged: ``mib_records.index_records`` finds every
good record from the self-describing frame headers (resynchronising after a
damaged header, lost or inserted bytes, a damaged frame 0), each frame's
acquisition index from its sequence number (``mib_places``: records missing
from the file and duplicates); the ``.hdr``'s ``Frames in Acquisition``
counts frames the file ends before. The good frames stream
(``valid_order``), in chunks that hold good frames only; every skipped frame
is logged with its file offset and listed in the start's metadata
(``skipped_frames``), and ``problem`` says what is wrong. Frames against the
scan shape: ``common.fit_frames``, the rule of every reader.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from rrstem.simulators.formats.common import fit_frames
from rrstem.simulators.formats.mib_records import index_records
from rrstem.simulators.source import Source
from rrstem.stream.detectors.base import BadMessage
from rrstem.stream.detectors.merlin import FRAMES_KEY, PIXEL_TYPES, parse_acquisition_header, parse_frame_header
from rrstem.stream.protocol import Start

MAGIC = b"MQ1,"
#: Skipped frames listed in the start's metadata (and so the results file); the rest are counted.
LISTED_SKIPS = 100
log = logging.getLogger("rrstem.replay")


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
            raise ValueError(f"cannot read {path.name}: it is a Merlin .hdr; its .mib file ({path.stem}.mib) is missing")
        return mibs[0], path
    hdr = path.with_suffix(".hdr")
    return path, hdr if hdr.is_file() else None


#: How many frames' timestamps are read to find the scan lines of a .mib whose .hdr has no ScanX/ScanY.
LINE_SEARCH_FRAMES = 20000
#: A pause between frames that marks a new scan line: this much longer than the usual interval, in seconds
#: (frame times are given to the microsecond or nanosecond; their jitter is a few microseconds).
LINE_PAUSE = 10e-6


def scan_lines(n_frames: int, per_trigger: int, times: np.ndarray) -> tuple[tuple[int, int] | None, str]:
    """The (ny, nx) scan of an acquisition without ScanX/ScanY, and how it was found, or (None, "").

    A line-triggered scan takes ``Frames per Trigger`` frames per line (> 1: that is the line); with one frame
    per trigger, the pauses between frames that are longer than the usual interval by ``LINE_PAUSE`` mark the
    line starts, and must come every nx frames. A series with no such structure is not guessed at.
    """
    if n_frames == 1:
        return (1, 1), "one frame"
    if per_trigger > 1 and n_frames % per_trigger == 0:
        return (n_frames // per_trigger, per_trigger), f"{per_trigger} frames per trigger in its .hdr"
    gaps = np.diff(times)
    if len(gaps) < 2 or not np.isfinite(gaps).all():
        return None, ""
    long = np.flatnonzero(gaps > np.median(gaps) + LINE_PAUSE) + 1  # frame indices that start a line
    if not len(long):
        return None, ""
    nx = int(long[0])
    seen = len(times)
    if n_frames % nx or not np.array_equal(long, np.arange(nx, seen, nx)):
        return None, ""
    return (n_frames // nx, nx), f"a pause in its frame times every {nx} frames"


def _said(s) -> str:
    """A skipped frame (or frames) for a sentence: which, where, and why (its reason's first clause)."""
    which = f"frame {s.frame}" if s.count <= 1 else f"frames {s.frame} to {s.frame + s.count - 1}"
    return f"{which} at offset {s.offset}: {s.reason.split(':')[0]}"


class MibSource(Source):
    """A ``.mib`` file's good frames, lazily, as one scan (module docstring)."""

    def __init__(self, path, scan_shape: tuple[int, int] | None = None, scan_id: str | None = None,
                 sync_offset: int = 0, flyback: int = 0, extra_ok: bool = False):
        self.path, self.hdr_path = _paths(Path(path))
        name = self.path.name
        if not self.path.is_file():
            raise ValueError(f"cannot read {str(self.path)!r}: no such file")
        self._raw = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        self._refuse_unreadable(name)
        try:
            self.index = index_records(self._raw)
        except ValueError as exc:
            raise ValueError(f"{name} is not a Merlin .mib file: {exc}") from None
        first = self.first = self.index.reference
        self.fields, hdr_problem = self._acquisition_header(name, scan_shape)
        declared = self.fields.get(FRAMES_KEY, "")
        if declared.isdigit():  # 0: continuous
            self.index.extend(int(declared), len(self._raw), f"not in the file: it ends before them (its .hdr says "
                                                             f"the acquisition has {declared} frames)")
        self.skipped = sorted(self.index.skipped, key=lambda s: s.frame)
        for s in self.skipped[:LISTED_SKIPS]:
            log.warning("%s: frame %d (file offset %d) skipped: %s", name, s.frame, s.offset, s.reason)
        shape = scan_shape or self._hdr_scan_shape(name)
        _, short = fit_frames(self.n_frames, shape, name, sync_offset, flyback, extra_ok)
        self.problem = "; ".join(p for p in (self._damage(name), short, hdr_problem) if p) or None
        meta = {"source_file": str(self.path.resolve()), "detector": "Quantum Detectors Merlin",
                "frame_header": {"chips": first.chips, "layout": first.layout, "pixel_type": first.pixel_type,
                                 "counter_depth": first.counter_depth}}
        if self.fields:
            meta["acquisition_header"] = self.fields
        if self.problem:
            meta["source_problem"] = self.problem
        if self.skipped:
            meta["skipped_frames"] = [s.as_dict() for s in self.skipped[:LISTED_SKIPS]]
            meta["skipped_frames_count"] = len(self.skipped)
        stem = re.sub(r"[^A-Za-z0-9_.:+-]+", "_", self.path.stem)[:128] or "mib"
        self.start = Start(scan_id=scan_id or stem, scan_shape=shape, frame_shape=first.shape,
                           dtype=PIXEL_TYPES[first.pixel_type][1], metadata=meta)
        self._record = np.dtype([("header", f"S{first.data_offset}"),
                                 ("pixels", PIXEL_TYPES[first.pixel_type][0], first.shape)])

    def _refuse_unreadable(self, name: str) -> None:
        """A Merlin file of a kind rrstem does not read (raw R64) is refused by what it is."""
        try:
            parse_frame_header(bytes(self._raw[:4096]))
        except BadMessage as exc:
            if exc.reason == "unsupported_pixel_type":
                raise ValueError(f"{name} is a Merlin .mib that rrstem cannot read: {exc}") from None

    def _acquisition_header(self, name: str, scan_shape) -> tuple[dict, str | None]:
        """The .hdr's fields; a damaged .hdr is refused, unless the scan shape is given (then it is ignored)."""
        if self.hdr_path is None:
            return {}, None
        try:
            return parse_acquisition_header(self.hdr_path.read_bytes()), None
        except BadMessage as exc:
            why = f"{self.hdr_path.name} (the .hdr of {name}) cannot be read: {exc}"
            if scan_shape is None:
                raise ValueError(f"{why}; fix or move it away and give --scan-shape NYxNX") from None
            log.warning("%s; it is ignored (the scan shape is given)", why)
            return {}, f"{why}; it is ignored"

    def _hdr_scan_shape(self, name: str) -> tuple[int, int]:
        """ScanY x ScanX of the .hdr; else the lines the acquisition shows (``scan_lines``), logged; else an
        error that asks for ``--scan-shape``."""
        sx, sy = self.fields.get("ScanX", ""), self.fields.get("ScanY", "")
        if sx.isdigit() and sy.isdigit():
            return int(sy), int(sx)
        per_trigger = self.fields.get("Frames per Trigger (Number)", "")
        shape, how = scan_lines(self.n_frames, int(per_trigger) if per_trigger.isdigit() else 1,
                                self._timestamps(LINE_SEARCH_FRAMES))
        if shape is not None:
            log.warning("%s: no ScanX/ScanY; reading it as a %dx%d scan (%s); give --scan-shape NYxNX if that is "
                        "wrong", name, *shape, how)
            return shape
        why = ("its .hdr has no ScanX/ScanY, and neither its frames per trigger nor" if self.hdr_path
               else f"it has no .hdr file ({self.path.stem}.hdr), and no")
        raise ValueError(f"{name}: the scan shape is unknown ({why} pauses in its frame times mark scan lines); it "
                         f"holds {self.n_frames} frames: pass it with --scan-shape NYxNX")

    def _timestamps(self, limit: int) -> np.ndarray:
        """Seconds of the first ``limit`` frames' header timestamps (NaN where a frame is skipped or has none)."""
        out = np.full(min(limit, self.n_frames), np.nan)
        size = self.first.data_offset
        for i, at in enumerate(self.index.offsets[:len(out)]):
            if at >= 0:
                fields = bytes(self._raw[at:at + min(size, 512)]).split(b",")
                try:  # the MQ1A extension has nanoseconds; field 9 has microseconds
                    stamp = fields[fields.index(b"MQ1A") + 1].decode().rstrip("Z") if b"MQ1A" in fields \
                        else fields[9].decode()
                    whole, _, frac = stamp.replace("T", " ").partition(".")
                    out[i] = datetime.fromisoformat(whole).timestamp() + float("0." + (frac or "0"))
                except (ValueError, IndexError):
                    pass
        return out

    def _damage(self, name: str) -> str | None:
        """One sentence on the skipped frames (the first few, each with its reason), or None."""
        if not self.skipped:
            return None
        lost, ignored = self.n_frames - self.n_good, sum(s.count == 0 for s in self.skipped)
        what = ([f"{lost} of its {self.n_frames} frames skipped"] if lost else []) + (
            [f"{ignored} record{'s' if ignored > 1 else ''} ignored"] if ignored else [])
        shown = "; ".join(_said(s) for s in self.skipped[:5])
        more = f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        read = f"the other {self.n_good} frames are read" if lost else f"all {self.n_good} frames are read"
        return f"{name} is damaged: {' and '.join(what)} ({shown}{more}); {read}"

    @property
    def n_frames(self) -> int:
        """Frames of the acquisition in the file (good and skipped), which may be more than scan positions."""
        return self.index.n_frames

    @property
    def n_good(self) -> int:
        return int(self.index.good.size)

    @property
    def available_frames(self) -> int:
        return self.n_good

    @property
    def valid_order(self) -> np.ndarray | None:
        """The acquisition indices of the good frames when some are skipped, else None (all of them)."""
        return self.index.good if self.skipped else None

    def chunk(self, first: int, count: int) -> np.ndarray:
        """Frames ``first .. first+count-1`` of the acquisition; every one of them must be good."""
        offsets = self.index.offsets[first:first + count] if 0 <= first else np.zeros(0, np.int64)
        if first < 0 or len(offsets) != count or (offsets < 0).any():
            bad = [first + int(k) for k in np.flatnonzero(offsets < 0)][:5]
            raise ValueError(f"frames {first}..{first + count - 1} of {self.path.name} cannot be read: "
                             + (f"frames {bad} are damaged" if bad else f"it holds {self.n_frames} frames"))
        out = np.empty((count, *self.start.frame_shape), dtype=self.start.dtype)
        record = self.index.record
        starts = [0, *(np.flatnonzero(np.diff(offsets) != record) + 1)]  # where the grid of records shifts
        for a, b in zip(starts, [*starts[1:], count]):
            block = np.ndarray((b - a,), dtype=self._record, buffer=self._raw, offset=int(offsets[a]),
                               strides=(record,))
            out[a:b] = block["pixels"]  # big-endian -> native, the one copy
        return out

    def close(self) -> None:
        self._raw = None
