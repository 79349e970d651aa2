"""Each frame of a damaged Merlin ``.mib`` file at its place in the acquisition, by its sequence number.

``mib_records.index_records`` walks the file and describes it, in file
order, as pieces: runs of good records (``Run``), record slots on the grid
whose frame cannot be read (``Slot``: a damaged header, a record the file
ends inside), good headers whose record runs into damage (``Lost``), and
bytes off the grid (``Gap``: bytes lost or inserted). ``place`` turns them
into where each frame is and why each missing frame is missing.

Merlin numbers the frames of an acquisition from 1, so a frame's index in
the acquisition is its sequence number - 1, whatever else is lost: a file
missing its first record starts at index 1. Between two frames whose
sequence numbers are known, the frames missing are those whose numbers are
absent; they are matched with the slots between, one for one where the
counts agree. A record whose sequence number is already read is a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The sequence number of a Merlin acquisition's first frame.
FIRST_SEQUENCE = 1


@dataclass(frozen=True)
class Skipped:
    """Frames of the acquisition that are not read: the first's index (from 0), where its record is (or would
    be), why, and how many frames from ``frame`` on it stands for (0: a record ignored, its frame is read)."""

    frame: int
    offset: int
    reason: str
    count: int = 1

    def as_dict(self) -> dict:
        out = {"frame": self.frame, "offset": self.offset, "reason": self.reason}
        if self.count != 1:
            out["count"] = self.count
        return out


@dataclass
class Run:
    """Good records on one grid: ``count`` frames of sequence numbers ``sequence`` on, from file offset ``offset``."""

    sequence: int
    offset: int
    count: int


@dataclass
class Slot:
    """A record slot on the grid whose frame is not read: its header's sequence number where it has the
    acquisition's format (None otherwise), and why."""

    offset: int
    sequence: int | None
    reason: str


@dataclass
class Lost:
    """A good header whose record runs into damage: its frame is known (by ``sequence``) but not read."""

    sequence: int
    offset: int
    reason: str


@dataclass
class Gap:
    """Bytes lost or inserted from ``offset``: the records after it lie off the grid of those before."""

    offset: int


def place(pieces: list, record: int) -> tuple[np.ndarray, list[Skipped]]:
    """(file offset of each frame's record, -1 where it is not read; the frames skipped) from the pieces of a
    file, in file order."""
    known = [p for p in pieces if isinstance(p, (Run, Lost))]
    first = min([FIRST_SEQUENCE, *(p.sequence for p in known)])  # a writer that counts from 0 is read as such
    last = max(p.sequence + (p.count - 1 if isinstance(p, Run) else 0) for p in known)
    offsets = np.full(last - first + 1, -1, dtype=np.int64)
    for run in (p for p in pieces if isinstance(p, Run)):
        offsets[run.sequence - first:run.sequence - first + run.count] = run.offset + record * np.arange(run.count)
    tail = pieces[max(i for i, p in enumerate(pieces) if isinstance(p, (Run, Lost))) + 1:]
    trailing = sum(isinstance(p, Slot) and _read(p, offsets, first) is None for p in tail)  # frames after the last known
    offsets = np.concatenate([offsets, np.full(trailing, -1, dtype=np.int64)])
    skipped: list[Skipped] = []
    done, pending, gap = first - 1, [], None  # the last sequence number placed; slots and gap since
    for p in pieces:
        if isinstance(p, Slot):
            frame = _read(p, offsets, first)
            if frame is not None:
                skipped.append(Skipped(frame, p.offset, f"duplicate of frame {frame}", count=0))
            else:
                pending.append(p)
        elif isinstance(p, Gap):
            gap = p.offset
        else:
            skipped += _between(pending, gap, done, p.sequence, first, p.offset)
            pending, gap = [], None
            if isinstance(p, Lost):
                skipped.append(Skipped(p.sequence - first, p.offset, p.reason))
            done = p.sequence + (p.count - 1 if isinstance(p, Run) else 0)
    skipped += [Skipped(done + 1 + i - first, p.offset, p.reason) for i, p in enumerate(pending)]
    return offsets, skipped


def _read(slot: Slot, offsets: np.ndarray, first: int) -> int | None:
    """The frame index of the slot's sequence number when that frame is read from another record, else None."""
    frame = None if slot.sequence is None else slot.sequence - first
    return frame if frame is not None and 0 <= frame < len(offsets) and offsets[frame] >= 0 else None


def _between(slots: list[Slot], gap: int | None, after: int, before: int, first: int, at: int) -> list[Skipped]:
    """The frames missing between sequence numbers ``after`` and ``before`` (the next known record, at file
    offset ``at``), given the slots and gap between them in the file."""
    missing = before - after - 1
    index = after + 1 - first
    if missing <= 0:
        return []  # nothing is missing: damaged bytes between two consecutive frames hold no frame
    if gap is not None:
        return [Skipped(index, gap, f"its record lies in damaged bytes (lost or inserted) from offset {gap}",
                        count=missing)]
    if len(slots) == missing:
        return [Skipped(index + i, s.offset, s.reason) for i, s in enumerate(slots)]
    numbers = f"sequence number {after + 1}" if missing == 1 else f"sequence numbers {after + 1} to {before - 1}"
    if not slots:
        return [Skipped(index, at, f"not in the file: no record has {numbers}", count=missing)]
    return [Skipped(index, slots[0].offset, f"its record is damaged or not in the file: {len(slots)} damaged "
                                            f"records lie where the records of {numbers} belong", count=missing)]
