"""The binned frames of one scan, preallocated, shared with the online trainer.

The preprocessing thread is the only writer. It writes a frame, then sets the
frame's ``filled`` flag; a frame never changes after its flag is set, so a
reader (the trainer, a control request) that picks indices from ``filled``
always reads a complete frame without taking a lock.

What is stored is the binned, masked frame itself, never anything derived from
the running mean: the mean changes as frames arrive, so the trainer subtracts
the *current* mean when it assembles a batch.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import Callable

import numpy as np


class _Spare:
    """One released store buffer, kept for the next scan of the same size.

    A new buffer costs its page mapping (measured 0.2 s to 1.9 s for 604 MB on
    these machines, depending on the host); scan after scan of one size, as
    at the microscope, reuses the same pages. Reused memory is not zeroed:
    rows are read only where ``filled`` says a frame was written.
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
    """Preallocated (n_positions, h, w) float32 frames plus a filled mask."""

    def __init__(self, n_positions: int, binned_shape: tuple[int, int]):
        h, w = binned_shape
        nbytes = n_positions * h * w * 4
        buf = _Spare.take(nbytes) or _prefaulted(nbytes)
        if buf is None:
            self.frames = np.zeros((n_positions, h, w), dtype=np.float32)
        else:
            self.frames = np.frombuffer(buf, dtype=np.float32).reshape(n_positions, h, w)
            weakref.finalize(self, _Spare.give, buf)  # back to the spare slot when this store is gone
        self.filled = np.zeros(n_positions, dtype=bool)
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def put(self, indices: np.ndarray, binned: np.ndarray) -> None:
        """Store frames at scan indices (unique, not yet filled). Writer thread only."""
        first, n = int(indices[0]), len(indices)
        if indices[-1] - first == n - 1 and (n < 3 or np.all(np.diff(indices) == 1)):
            # A run of consecutive frames (the usual case): slice assignment is ~25x faster
            # than fancy indexing into freshly mapped pages.
            self.frames[first:first + n] = binned
        else:
            self.frames[indices] = binned
        self.filled[indices] = True
        self._count += len(indices)


class ScanData:
    """What the trainer sees of one scan.

    ``frames`` and ``filled`` are the live store arrays (read-only by
    convention). ``mean_pattern()`` and ``com_maps()`` return fresh copies of
    the current running reductions. ``ended`` is set when the scan's ``end``
    message (or the next ``start``) has been processed.
    """

    def __init__(
        self,
        scan_id: str,
        scan_shape: tuple[int, int],
        store: FrameStore,
        mean_pattern: Callable[[], np.ndarray],
        com_maps: Callable[[], dict[str, np.ndarray]],
    ):
        self.scan_id = scan_id
        self.scan_shape = tuple(scan_shape)
        self.store = store
        self._mean_pattern = mean_pattern
        self._com_maps = com_maps
        self.ended = threading.Event()

    @property
    def frames(self) -> np.ndarray:
        """(ny*nx, h, w) float32 binned frames; only rows with ``filled`` are valid."""
        return self.store.frames

    @property
    def filled(self) -> np.ndarray:
        """(ny*nx,) bool."""
        return self.store.filled

    @property
    def binned_shape(self) -> tuple[int, int]:
        return self.store.frames.shape[1:]

    def n_filled(self) -> int:
        return self.store.count

    def mean_pattern(self) -> np.ndarray:
        """(h, w) float32 running mean of the frames that have arrived."""
        return self._mean_pattern()

    def com_maps(self) -> dict[str, np.ndarray]:
        """(ny, nx) float32 ``com_magnitude`` and ``com_angle`` (rad), NaN where missing."""
        return self._com_maps()

    @classmethod
    def from_array(cls, scan_id: str, frames: np.ndarray) -> "ScanData":
        """A complete scan from a (ny, nx, h, w) array of binned frames.

        For tests and offline use: the mean and the COM are those of the whole
        array, the COM relative to the mean pattern's COM, in binned pixels.
        """
        ny, nx, h, w = frames.shape
        store = FrameStore(ny * nx, (h, w))
        store.put(np.arange(ny * nx), frames.reshape(ny * nx, h, w))
        flat = store.frames.astype(np.float64)
        mean = flat.mean(axis=0).astype(np.float32)
        ky, kx = np.mgrid[0:h, 0:w]
        total = flat.sum(axis=(1, 2))
        cx = (flat * kx).sum(axis=(1, 2)) / total
        cy = (flat * ky).sum(axis=(1, 2)) / total
        cx -= (mean * kx).sum() / mean.sum()
        cy -= (mean * ky).sum() / mean.sum()
        com = {
            "com_magnitude": np.hypot(cx, cy).reshape(ny, nx).astype(np.float32),
            "com_angle": np.arctan2(cy, cx).reshape(ny, nx).astype(np.float32),
        }
        data = cls(scan_id, (ny, nx), store, lambda: mean.copy(), lambda: {k: v.copy() for k, v in com.items()})
        data.ended.set()
        return data
