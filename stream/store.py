"""The binned frames of one scan, preallocated, shared with the online trainer.

The pipeline thread is the only writer. The scan that owns the store writes a
frame, then sets the frame's flag in its ``filled`` mask; a frame never
changes after its flag is set, so a reader (the trainer, a control request)
that picks indices from ``filled`` always reads a complete frame without
taking a lock.

What is stored is the binned, masked frame itself, never anything derived from
the running mean: the mean changes as frames arrive, so the trainer subtracts
the *current* mean when it assembles a batch.

Frames are stored in their own dtype where that is exact: counts stay
counts. A scan starts in ``narrow_dtype``, the raw dtype itself (uint16
counts at bin 1 in uint16, and at bin 2 and more in uint16 too, half of what
any-sum-fits would take: a binned pixel of a real scan rarely passes 65535).
The fused pass checks every binned frame against the store's maximum; the
first frame that does not fit makes the scan move to ``store_dtype``, which
holds any binned sum (uint32 for uint16 counts), before that frame is
stored, so nothing wraps around. Readers take a scan's ``filled`` mask
before its ``frames``: a row flagged before the move is in both stores, one
flagged after it only in the new one. The trainer converts to float when it
builds a minibatch. Float frames are stored as float32.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref

import numpy as np

from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.protocol import Start


class _Spare:
    """One released store buffer, kept for the next scan of the same size.

    A new buffer costs its page mapping, up to seconds for a large scan; scan
    after scan of one size, as at the microscope, reuses the same pages. Reused memory is not zeroed:
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


def store_dtype(raw_dtype, bin: int) -> np.dtype:
    """The dtype that holds every binned frame of ``raw_dtype`` pixels at ``bin`` exactly.

    Integers: the narrowest of (u)int8/16/32/64 that holds ``bin**2`` times the raw dtype's range,
    so a sum of ``bin x bin`` raw pixels can never wrap. Floats: float32.
    """
    raw = np.dtype(raw_dtype)
    if raw.kind == "f":
        return np.dtype(np.float32)
    if raw.kind not in "ui":
        raise ValueError(f"frames of dtype {raw} cannot be stored: expected integer or float pixels")
    info, k = np.iinfo(raw), bin * bin
    lo, hi = int(info.min) * k, int(info.max) * k
    for name in (("uint8", "uint16", "uint32", "uint64") if raw.kind == "u" else ("int8", "int16", "int32", "int64")):
        t = np.iinfo(name)
        if t.min <= lo and hi <= t.max:
            return np.dtype(name)
    raise ValueError(f"bin {bin} is too large for {raw} frames: a binned pixel could exceed 64 bits")


def narrow_dtype(raw_dtype, bin: int) -> np.dtype:
    """The dtype a scan's store starts in: unsigned counts in their own dtype (uint8 binned: uint16), which
    holds any binned frame whose pixels do not pass its maximum; otherwise ``store_dtype``."""
    raw = np.dtype(raw_dtype)
    wide = store_dtype(raw, bin)
    if raw.kind != "u" or bin == 1:
        return wide
    narrow = np.dtype(f"u{max(raw.itemsize, 2)}")
    return narrow if narrow.itemsize < wide.itemsize else wide


class FrameStore:
    """Preallocated (n_positions, h, w) frames in ``dtype``; which rows are valid is the owner's to say.

    The fused pass (``framepass.FramePass``) writes ``frames`` directly, from the pipeline thread only.
    """

    def __init__(self, n_positions: int, binned_shape: tuple[int, int], dtype=np.float32):
        h, w = binned_shape
        self.dtype = np.dtype(dtype)
        nbytes = self.nbytes(n_positions, binned_shape, self.dtype)
        buf = _Spare.take(nbytes) or _prefaulted(nbytes)
        if buf is None:
            self.frames = np.zeros((n_positions, h, w), dtype=self.dtype)
        else:
            self.frames = np.frombuffer(buf, dtype=self.dtype).reshape(n_positions, h, w)
            weakref.finalize(self, _Spare.give, buf)  # back to the spare slot when this store is gone

    @staticmethod
    def nbytes(n_positions: int, binned_shape: tuple[int, int], dtype=np.float32) -> int:
        """What a store of this size holds."""
        return n_positions * binned_shape[0] * binned_shape[1] * np.dtype(dtype).itemsize


def check_memory(start: Start, cfg: PreprocessConfig, fraction: float = 0.75, per_position: int = 0) -> None:
    """Refuse a scan whose memory could not fit in this machine's: its narrow store, the wide one as well where
    counts could outgrow the narrow one (both are held while it moves), and ``per_position`` bytes for each
    position besides the store (the reductions' sums, the maps a snapshot builds, the rrVAE's maps)."""
    h, w = start.frame_shape
    binned = (-(-h // cfg.bin), -(-w // cfg.bin))
    dtype, narrow = store_dtype(start.dtype, cfg.bin), narrow_dtype(start.dtype, cfg.bin)
    store = FrameStore.nbytes(start.n_positions, binned, dtype)
    if narrow != dtype:
        store += FrameStore.nbytes(start.n_positions, binned, narrow)
    maps = per_position * start.n_positions
    need = store + maps
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on Linux: no check
        return
    if need > fraction * total:
        raise ValueError(f"scan {start.scan_id} ({start.scan_shape[0]}x{start.scan_shape[1]} positions of "
                         f"{h}x{w} frames at bin {cfg.bin}) needs {need / 2**30:.1f} GiB: {store / 2**30:.1f} GiB for "
                         f"its binned frames ({dtype}) and {maps / 2**30:.1f} GiB for its maps; this machine has "
                         f"{total / 2**30:.1f} GiB: use a larger --bin or --crop, or scan fewer positions")
