"""The binned frames of one scan, preallocated, shared with the online trainer.

The pipeline thread is the only writer. The scan that owns the store writes a
frame, then sets the frame's flag in its ``filled`` mask; a frame never
changes after its flag is set, so a reader (the trainer, a control request)
that picks indices from ``filled`` always reads a complete frame without
taking a lock.

What is stored is the binned, masked frame itself, never anything derived from
the running mean: the mean changes as frames arrive, so the trainer subtracts
the *current* mean when it assembles a batch.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np


class _Spare:
    """One released store buffer, kept for the next scan of the same size.

    A new buffer costs its page mapping (measured 0.2 s to 1.9 s for 604 MB on
    these machines, depending on the host); scan after scan of one size, as
    at the microscope, reuses the same pages. Reused memory is not zeroed:
    rows are read only where the scan's ``filled`` mask says a frame was written.
    """

    lock = threading.Lock()
    buf: mmap.mmap | None = None

    @classmethod
    def take(cls, nbytes: int) -> mmap.mmap | None:
        with cls.lock:
            if cls.buf is not None and len(cls.buf) == nbytes:
                buf, cls.buf = cls.buf, None
                return buf
            return None

    @classmethod
    def give(cls, buf: mmap.mmap) -> None:
        with cls.lock:
            cls.buf = buf  # the newest released buffer replaces an older one


def _prefaulted(nbytes: int) -> mmap.mmap | None:
    """Zeroed memory whose pages are all mapped now, in one call (None where ``MAP_POPULATE`` is missing).

    Lazily mapped memory (``np.zeros``) faults its pages in while frames are
    written, on the ingest path, at a cost that depends on the kernel and the
    host. Populating the mapping when the scan's geometry is fixed costs that
    once, up front.
    """
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or nbytes == 0:
        return None
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)


class FrameStore:
    """Preallocated (n_positions, h, w) float32 frames; which rows are valid is the owner's to say."""

    def __init__(self, n_positions: int, binned_shape: tuple[int, int]):
        h, w = binned_shape
        nbytes = self.nbytes(n_positions, binned_shape)
        buf = _Spare.take(nbytes) or _prefaulted(nbytes)
        if buf is None:
            self.frames = np.zeros((n_positions, h, w), dtype=np.float32)
        else:
            self.frames = np.frombuffer(buf, dtype=np.float32).reshape(n_positions, h, w)
            weakref.finalize(self, _Spare.give, buf)  # back to the spare slot when this store is gone

    @staticmethod
    def nbytes(n_positions: int, binned_shape: tuple[int, int]) -> int:
        """What a store of this size holds."""
        return n_positions * binned_shape[0] * binned_shape[1] * 4

    def put(self, indices: np.ndarray, binned: np.ndarray) -> None:
        """Store frames at scan indices (unique). Writer thread only."""
        first, n = int(indices[0]), len(indices)
        if indices[-1] - first == n - 1 and (n < 3 or np.all(np.diff(indices) == 1)):
            # A run of consecutive frames (the usual case): slice assignment is ~25x faster
            # than fancy indexing into freshly mapped pages.
            self.frames[first:first + n] = binned
        else:
            self.frames[indices] = binned
