"""Where each frame of a Merlin ``.mib`` file lies, found from its self-describing headers, around damage.

A ``.mib`` file is a run of records of one size: an ``MQ1`` header (its
sequence number, its data offset = the header's size, the frame geometry
and pixel type) and the pixels. ``index_records`` finds every good record:

- The **reference** header is the first one that parses and that the next
  record confirms (it starts where this header's record size says, with the
  same geometry), so a damaged frame 0 is skipped like any other.
- From a good record on, the records on the regular grid of that size are
  checked together (``MQ1,``, a numeric sequence number that counts on by
  one, and the reference's data offset, chips, size, pixel type and layout),
  a block at a time, so memory stays bounded for any file size.
- At a record that disagrees, the next good header is searched for from the
  last good frame's pixels on (the first ``MQ1,`` that parses, agrees, counts
  on from the last good sequence number and is confirmed by the record after
  it). Where it lies on the grid, only the frames between were damaged
  (their headers); where it does not, bytes were lost or inserted, and the
  last good frame, whose record runs into the damage, is dropped too.

A frame's place in the acquisition is its sequence number (from the first
frame's), so a frame after lost bytes still lands at its own scan position.
Every frame skipped is listed (``Skipped``: acquisition index, file offset,
reason), and a record the file ends inside (truncation) is listed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rrstem.stream.detectors.base import BadMessage
from rrstem.stream.detectors.merlin import FrameHeader, parse_frame_header

MAGIC = b"MQ1,"
#: Records checked together on the grid (their headers only are read): bounds the memory of a check.
BLOCK = 65536
#: Bytes read at a time while searching for the next header after damage.
SEARCH_BYTES = 4 << 20


@dataclass(frozen=True)
class Skipped:
    """One frame of the acquisition that is not read: its index (from 0), where its record is, and why."""

    frame: int
    offset: int
    reason: str

    def as_dict(self) -> dict:
        return {"frame": self.frame, "offset": self.offset, "reason": self.reason}


@dataclass
class RecordIndex:
    """The good frames of a ``.mib`` file: ``offsets[i]`` is the file offset of frame i's record (-1: skipped)."""

    reference: FrameHeader
    record: int  # bytes per record: header + pixels
    offsets: np.ndarray  # (n_frames,) int64
    skipped: list[Skipped]

    @property
    def n_frames(self) -> int:
        """Frames of the acquisition the file spans (good and skipped)."""
        return len(self.offsets)

    @property
    def good(self) -> np.ndarray:
        """Acquisition indices of the frames that can be read."""
        return np.flatnonzero(self.offsets >= 0)


def _layout(head: bytes) -> tuple[int, bytes]:
    """(width of the sequence field, the bytes from the data offset to the layout field) of an MQ1 header."""
    parts = head.split(b",")
    return len(parts[1]), b",".join(parts[2:8]) + b","


def _parse(mm: np.ndarray, at: int) -> FrameHeader | None:
    """The header at file offset ``at``, or None if none parses there."""
    if bytes(mm[at:at + 4]) != MAGIC:
        return None
    look = bytes(mm[at:at + 40]).split(b",")
    try:
        size = int(look[2]) if len(look) > 3 else 0
    except ValueError:
        return None
    if not 16 <= size <= 1 << 16:
        return None
    try:
        return parse_frame_header(bytes(mm[at:at + size]))
    except BadMessage:
        return None


class _Checker:
    """Checks headers against the reference's format, on a grid of records or one at a time."""

    def __init__(self, mm: np.ndarray, ref: FrameHeader, ref_head: bytes):
        self.mm, self.ref = mm, ref
        self.record = ref.data_offset + ref.nbytes
        _, self.fixed = _layout(ref_head)

    def agrees(self, at: int) -> FrameHeader | None:
        """The header at ``at`` if it parses and has the reference's format."""
        h = _parse(self.mm, at)
        return h if h is not None and h.same_format(self.ref) else None

    def confirmed(self, at: int) -> FrameHeader | None:
        """The header at ``at`` if it agrees and the record after it starts with an agreeing header (or the
        file ends within that next record)."""
        h = self.agrees(at)
        if h is None:
            return None
        nxt = at + self.record
        if nxt + len(MAGIC) > len(self.mm):
            return h
        after = self.agrees(nxt)
        return h if after is not None and after.sequence == h.sequence + 1 else None

    def grid(self, at: int, seq: int, n: int) -> int:
        """How many records from ``at`` on (up to ``n``) agree, with sequence numbers ``seq``, ``seq+1``, ..."""
        width, fixed = _layout(bytes(self.mm[at:at + self.ref.data_offset]))
        if fixed != self.fixed:
            return 0
        span = 4 + width + 1 + len(fixed)
        ref_row = np.frombuffer(bytes(self.mm[at:at + span]), np.uint8)
        powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
        done = 0
        while done < n:
            k = min(BLOCK, n - done)
            base = at + done * self.record
            heads = np.lib.stride_tricks.as_strided(self.mm[base:], shape=(k, span), strides=(self.record, 1))
            same = (heads[:, :4] == ref_row[:4]).all(1) & (heads[:, 4 + width:] == ref_row[4 + width:]).all(1)
            digits = heads[:, 4:4 + width].astype(np.int64) - 48
            numbers = ((digits >= 0) & (digits <= 9)).all(1)
            counts_on = digits @ powers == seq + done + np.arange(k)
            bad = np.flatnonzero(~(same & numbers & counts_on))
            if bad.size:
                return done + int(bad[0])
            done += k
        return n

    def search(self, start: int, after_seq: int) -> tuple[int, FrameHeader] | None:
        """The first confirmed header at or after ``start`` whose sequence number is above ``after_seq``."""
        size = len(self.mm)
        pos = start
        while pos < size:
            block = bytes(self.mm[pos:min(size, pos + SEARCH_BYTES + 3)])
            at = block.find(MAGIC)
            while at >= 0:
                h = self.confirmed(pos + at)
                if h is not None and h.sequence > after_seq:
                    return pos + at, h
                at = block.find(MAGIC, at + 1)
            pos += SEARCH_BYTES
        return None


def _reference(mm: np.ndarray) -> tuple[int, FrameHeader, bytes]:
    """The first header that parses and that the record after it confirms; ValueError if there is none."""
    size, pos = len(mm), 0
    while pos < size:
        block = bytes(mm[pos:min(size, pos + SEARCH_BYTES + 3)])
        at = block.find(MAGIC)
        while at >= 0:
            h = _parse(mm, pos + at)
            if h is not None:
                head = bytes(mm[pos + at:pos + at + h.data_offset])
                if _Checker(mm, h, head).confirmed(pos + at) is not None:
                    return pos + at, h, head
            at = block.find(MAGIC, at + 1)
        pos += SEARCH_BYTES
    raise ValueError("no MQ1 frame header in it parses and is followed by a frame of its size")


def index_records(mm: np.ndarray) -> RecordIndex:
    """Every good record of the ``.mib`` bytes ``mm`` (a uint8 memmap of the file): see the module docstring."""
    size = len(mm)
    ref_at, ref, ref_head = _reference(mm)
    check = _Checker(mm, ref, ref_head)
    record = check.record
    seq0 = ref.sequence - int(round(ref_at / record))  # the sequence number of frame 0
    runs: list[list[int]] = []  # [first frame, its offset, count] of each run of good records on one grid
    skipped = [Skipped(i, i * record, "its record runs into damage: the next frame header does not follow it"
                       if check.agrees(i * record) else "its frame header is damaged (no valid header there)")
               for i in range(ref.sequence - seq0)]
    pos, seq = ref_at, ref.sequence
    while True:
        n = (size - pos) // record
        run = check.grid(pos, seq, n)
        if run:
            runs.append([seq - seq0, pos, run])
        if run == n:
            pos, seq = pos + n * record, seq + n
            break
        damaged = pos + run * record  # the record that disagrees
        found = check.search(damaged - record + ref.data_offset, seq + run - 1)
        if found is None:
            skipped.append(Skipped(seq + run - seq0, damaged, f"no valid frame header from here to the end of the "
                                                               f"file ({size - damaged} bytes)"))
            return RecordIndex(ref, record, _dense(runs, record, seq + run - seq0 + 1), skipped)
        at, h = found
        expected = damaged + (h.sequence - seq - run) * record
        if at != expected:  # bytes lost or inserted: the last good record runs into the damage
            runs[-1][2] -= 1
            last = runs[-1][0] + runs[-1][2]
            skipped.append(Skipped(last, runs[-1][1] + runs[-1][2] * record, f"its record runs into damage: the next frame header "
                                                            f"lies {at - expected:+d} bytes from where the record "
                                                            f"size puts it"))
        for s in range(seq + run, h.sequence):
            skipped.append(Skipped(s - seq0, damaged + (s - seq - run) * record,
                                   "its frame header is damaged (disagrees with the acquisition's)"))
        pos, seq = at, h.sequence
    n_frames = seq - seq0
    if pos < size:  # the file ends inside a record
        skipped.append(Skipped(n_frames, pos, f"truncated: the file ends {size - pos} bytes into its record of "
                                              f"{record} bytes"))
        n_frames += 1
    return RecordIndex(ref, record, _dense(runs, record, n_frames), skipped)


def _dense(runs: list[list[int]], record: int, n: int) -> np.ndarray:
    """Each frame's record offset (-1 where none) from the runs of good records."""
    out = np.full(n, -1, dtype=np.int64)
    for first, offset, count in runs:
        out[first:first + count] = offset + record * np.arange(count, dtype=np.int64)
    return out
