"""Where each frame of a Merlin ``.mib`` file lies, found from its self-describing headers, around damage.

A ``.mib`` file is a run of records of one size: an ``MQ1`` header (its
sequence number, its data offset = the header's size, the frame geometry
and pixel type) and the pixels. ``index_records`` finds every good record:

- The **reference** header is the first one that parses and that the next
  record confirms (it starts where this header's record size says, with the
  same geometry and the next sequence number). The record slots before it,
  on its grid, are read back from it: a header there with the acquisition's
  format and a lower sequence number is a good frame, so a damaged frame 0
  or frame 1 costs that frame only.
- From a good record on, the records on the regular grid of that size are
  checked together (``MQ1,``, a numeric sequence number that counts on by
  one, and the reference's data offset, chips, size, pixel type and layout),
  a block at a time, so memory stays bounded for any file size.
- At a record that disagrees, the next good header is searched for from the
  last good frame's pixels on (the first ``MQ1,`` that parses, agrees, has a
  higher sequence number and is confirmed by the record after it). Where it
  lies on the grid, no bytes were lost: the slots between are read like
  those before the reference (damaged headers, duplicates), and frames whose
  sequence numbers are absent are simply not in the file. Where it lies off
  the grid, bytes were lost or inserted, and the last good frame, whose
  record runs into the damage, is dropped too.

``mib_places.place`` then puts each frame at its sequence number - 1 and
says why each missing frame is missing (``Skipped``: acquisition index, file
offset, reason); a record the file ends inside (truncation) is listed the
same way, and a repeated record as a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rrstem.simulators.formats.mib_places import Gap, Lost, Run, Skipped, Slot, place
from rrstem.stream.detectors.base import BadMessage
from rrstem.stream.detectors.merlin import FrameHeader, parse_frame_header

__all__ = ["RecordIndex", "Skipped", "index_records"]

MAGIC = b"MQ1,"
#: Records checked together on the grid (their headers only are read): bounds the memory of a check.
BLOCK = 65536
#: Bytes read at a time while searching for the next header after damage.
SEARCH_BYTES = 4 << 20


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

    def extend(self, n_frames: int, offset: int, reason: str) -> None:
        """Count the acquisition up to ``n_frames`` (what its ``.hdr`` says) when the file ends before that: the
        frames after the file's last are skipped, at ``offset`` (the file's end), for ``reason``."""
        more = n_frames - self.n_frames
        if more > 0:
            self.skipped.append(Skipped(self.n_frames, offset, reason, count=more))
            self.offsets = np.concatenate([self.offsets, np.full(more, -1, dtype=np.int64)])


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
    pieces = _before(check, ref_at, ref.sequence)
    pos, seq = ref_at, ref.sequence  # a confirmed header, and its sequence number
    while True:
        n = (size - pos) // record
        run = max(1, check.grid(pos, seq, n)) if n else 0  # a confirmed header's record is good
        if run:
            pieces.append(Run(seq, pos, run))
        damaged, last = pos + run * record, seq + run - 1  # the record that disagrees; the last good number
        if damaged == size:
            pos = damaged
            break
        found = check.search(damaged - record + ref.data_offset, last)
        if found is None or (run == n and found[0] == damaged):  # the rest: slots on from the last good frame
            slots = (size - damaged) // record
            pieces += _slots(check, damaged, slots, last, None)
            pos = damaged + slots * record
            break
        at, h = found
        if (at - damaged) % record == 0:  # on the grid: no bytes were lost
            pieces += _slots(check, damaged, (at - damaged) // record, last, h.sequence)
        else:  # bytes lost or inserted: the last good record runs into them
            pieces[-1].count -= 1  # (run > 0: a confirmed header's record is good unless the file ends in it)
            if not pieces[-1].count:
                pieces.pop()
            shift = at - damaged - (h.sequence - last - 1) * record
            pieces += [Lost(last, damaged - record, f"its record runs into damage: the next frame header lies "
                                                    f"{shift:+d} bytes from where the record size puts it"),
                       Gap(min(at, damaged))]
        pos, seq = at, h.sequence
    if pos < size:  # the file ends inside a record
        h = check.agrees(pos)
        pieces.append(Slot(pos, h and h.sequence, f"truncated: the file ends {size - pos} bytes into its record "
                                                  f"of {record} bytes"))
    offsets, skipped = place(pieces, record)
    return RecordIndex(ref, record, offsets, skipped)


def _before(check: _Checker, ref_at: int, sequence: int) -> list:
    """The pieces of the file before the reference (at ``ref_at``, of sequence number ``sequence``)."""
    slots = ref_at // check.record
    first = ref_at - slots * check.record
    pieces = _slots(check, first, slots, -1, sequence)
    if first:  # bytes off the reference's grid at the start: lost or inserted in the first record
        h = check.agrees(0)
        below = min([sequence, *(p.sequence for p in pieces if isinstance(p, Run))])
        pieces.insert(0, Lost(h.sequence, 0, "its record runs into damage: the next frame header does not follow "
                                             "it") if h is not None and h.sequence < below else Gap(0))
    return pieces


def _slots(check: _Checker, first: int, count: int, after: int, before: int | None) -> list:
    """The ``count`` record slots on the grid from file offset ``first``, between the good frames of sequence
    numbers ``after`` and ``before`` (None: the file's end): a header of the acquisition's format whose number
    lies between theirs (and below the next slot's) is a good frame, read back from ``before``; up to the end
    of the file, read on from ``after``, it must count on by one."""
    found: dict[int, FrameHeader | None] = {k: check.agrees(first + k * check.record) for k in range(count)}
    good: set[int] = set()
    if before is not None:
        bound = before
        for k in reversed(range(count)):
            h = found[k]
            if h is not None and after < h.sequence < bound:
                good.add(k)
                bound = h.sequence
    else:
        for k in range(count):
            h = found[k]
            if h is not None and h.sequence == after + 1:
                good.add(k)
            after += 1
    pieces = []
    for k in range(count):
        at, h = first + k * check.record, found[k]
        if k in good:
            pieces.append(Run(h.sequence, at, 1))
        else:
            pieces.append(Slot(at, h and h.sequence, _why(check, at, h)))
    return pieces


def _why(check: _Checker, at: int, h: FrameHeader | None) -> str:
    """Why the header at ``at`` (``h``: it has the acquisition's format) is not a good frame's."""
    if h is not None:
        return f"its frame header is damaged (its sequence number {h.sequence} is out of order)"
    if _parse(check.mm, at) is not None:
        return "its frame header is damaged (disagrees with the acquisition's)"
    return "its frame header is damaged (no valid header there)"
