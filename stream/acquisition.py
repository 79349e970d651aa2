"""From the frames a detector sends to the scan positions they belong to: sync offset and flyback.

Two things misalign real scans most often:

- a **sync offset**: the detector starts ``sync_offset`` frames before the scan
  (those first frames are skipped), or, when negative, ``-sync_offset`` frames
  late (the first positions are missing);
- **flyback**: the scan engine dwells ``flyback`` extra frames at the end of
  every scan line while the beam flies back; those frames are discarded.

An acquisition of a ``(ny, nx)`` scan therefore sends ``ny * (nx + flyback)``
frames after its sync offset. ``AcquisitionMap.place`` turns a run of frames
with consecutive *acquisition* indices (the order the detector sent them, from
0) into runs of scan positions; what it discards is counted by reason,
``sync_offset`` and ``flyback``. With both zero it is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The reasons under which discarded frames are counted (the scan's ``invalid_reasons``).
SYNC_OFFSET, FLYBACK = "sync_offset", "flyback"


@dataclass(frozen=True)
class AcquisitionMap:
    """Acquisition index -> scan position for a ``(ny, nx)`` scan with a sync offset and flyback."""

    scan_shape: tuple[int, int]
    sync_offset: int = 0  # > 0: frames to skip at the start; < 0: positions missing at the start
    flyback: int = 0  # extra frames at the end of each scan line, discarded

    def __post_init__(self):
        if self.flyback < 0:
            raise ValueError(f"flyback must be >= 0 frames per scan line, not {self.flyback}")
        ny, nx = self.scan_shape
        if ny < 1 or nx < 1:
            raise ValueError(f"scan shape must be positive, got {self.scan_shape!r}")

    @property
    def identity(self) -> bool:
        return self.sync_offset == 0 and self.flyback == 0

    @property
    def line(self) -> int:
        """Frames the detector sends per scan line."""
        return self.scan_shape[1] + self.flyback

    @property
    def frames_per_scan(self) -> int:
        """Frames one scan takes after the sync offset: ny * (nx + flyback)."""
        return self.scan_shape[0] * self.line

    @property
    def frames_in_acquisition(self) -> int:
        """Frames a detector sends for one whole scan, sync offset included."""
        return max(0, self.frames_per_scan + self.sync_offset)

    def positions(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """For acquisition indices first .. first+count-1: (kept offsets into the run, their scan indices, discarded by reason)."""
        acq = np.arange(first, first + count, dtype=np.int64) - self.sync_offset
        early = acq < 0
        line, col = np.divmod(acq, self.line)
        fly = ~early & (col >= self.scan_shape[1])
        keep = ~early & ~fly
        discarded = {k: int(v) for k, v in ((SYNC_OFFSET, early.sum()), (FLYBACK, fly.sum())) if v}
        kept = np.flatnonzero(keep)
        return kept, (line * self.scan_shape[1] + col)[kept], discarded

    def place(self, first: int, frames: np.ndarray) -> tuple[list[tuple[int, np.ndarray]], dict[str, int]]:
        """(runs of (first scan index, frames) with consecutive scan indices, discarded by reason)."""
        if self.identity:
            return [(first, frames)], {}
        kept, index, discarded = self.positions(first, len(frames))
        runs = []
        if len(kept):
            breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(kept) != 1)) + 1
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(kept)]):
                runs.append((int(index[lo]), frames[kept[lo]:kept[hi - 1] + 1]))
        return runs, discarded
