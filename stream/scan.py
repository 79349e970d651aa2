"""One scan in the service: validation, counters, calibration, reductions and store.

Only the pipeline thread calls ``add`` and ``finish``; other threads call
``snapshot`` (which takes the lock briefly to copy the sums) and read the
store through ``data``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter

import numpy as np

from rrstem.stream.maps import FrameSum, PositionSums
from rrstem.stream.preprocess import Binner, Geometry, PreprocessConfig, calibrate
from rrstem.stream.protocol import Start
from rrstem.stream.store import FrameStore, ScanData

log = logging.getLogger("rrstem.scan")

#: Bytes of float64 work per sub-batch. Larger temporaries are mapped fresh by malloc on every
#: batch and page-fault each time (measured: 3x the CPU per frame at 96x96, bin 1).
_WORK_BYTES = 4 << 20

#: Counter names, as in the results file.
COUNTERS = ("received", "missing", "duplicate", "invalid", "stale", "dropped")


class RateLimitedLog:
    """Logs the first few occurrences of each reason, then every 1000th, so bad input cannot flood the log."""

    def __init__(self, logger: logging.Logger, first: int = 5, every: int = 1000):
        self._log, self._first, self._every = logger, first, every
        self._seen: Counter[str] = Counter()

    def warning(self, reason: str, msg: str, *args) -> None:
        self._seen[reason] += 1
        k = self._seen[reason]
        if k <= self._first or k % self._every == 0:
            suffix = f" [{reason} #{k}]" if k > 1 else ""
            self._log.warning(msg + suffix, *args)


def check_memory(start: Start, cfg: PreprocessConfig, fraction: float = 0.75) -> None:
    """Refuse a scan whose preallocated frame store could not fit in this machine's memory."""
    h, w = start.frame_shape
    need = start.n_positions * (-(-h // cfg.bin)) * (-(-w // cfg.bin)) * 4  # float32 binned frames
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on Linux: no check
        return
    if need > fraction * total:
        raise ValueError(f"scan {start.scan_id} ({start.scan_shape[0]}x{start.scan_shape[1]} positions of "
                         f"{h}x{w} frames at bin {cfg.bin}) needs {need / 2**30:.1f} GiB for its binned frames; "
                         f"this machine has {total / 2**30:.1f} GiB: use a larger --bin or --crop")


def _readers(sums: FrameSum, positions: PositionSums, lock: threading.Lock):
    """The trainer's views of the running mean and COM.

    Closures over the reductions, not methods of the ``ScanState``: a bound
    method would make state and data a reference cycle, freed only by the
    cyclic garbage collector, which can keep a finished scan's frame store
    (gigabytes) alive long after the next scan has started.
    """

    def mean_pattern() -> np.ndarray:
        with lock:
            return sums.snapshot()["mean_pattern"]

    def com_maps() -> dict[str, np.ndarray]:
        with lock:
            maps = positions.snapshot()
        return {k: maps[k] for k in ("com_magnitude", "com_angle")}

    return mean_pattern, com_maps


class ScanState:
    def __init__(self, start: Start, cfg: PreprocessConfig, lossy: bool = False):
        check_memory(start, cfg)
        self.start = start
        self.cfg = cfg
        self.lossy = lossy  # SUB mode: positions that never arrived were dropped, not missing
        n = start.n_positions
        self.counters: Counter[str] = Counter({k: 0 for k in COUNTERS})
        self.reasons: Counter[str] = Counter()  # invalid frames by reason
        self.arrived = np.zeros(n, dtype=bool)  # a valid frame for this position was accepted
        self.touched = np.zeros(n, dtype=bool)  # any in-range frame came for this position
        self.frames_sent: int | None = None
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.first_frame_at: float | None = None  # perf_counter of the first and last frames taken
        self.last_frame_at: float | None = None
        self.geometry: Geometry | None = None
        self.binner: Binner | None = None
        self.sums: FrameSum | None = None
        self.positions: PositionSums | None = None
        self.store: FrameStore | None = None
        self.data: ScanData | None = None
        self.ready = threading.Event()  # geometry fixed, store and reductions exist
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_count = 0
        self._highest = -1
        self._lock = threading.Lock()
        self.log = RateLimitedLog(log)

    @property
    def scan_id(self) -> str:
        return self.start.scan_id

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def invalid(self, reason: str, count: int, detail: str) -> None:
        self.counters["invalid"] += count
        self.reasons[reason] += count
        self.log.warning(reason, "scan %s: %d invalid frame(s): %s", self.scan_id, count, detail)

    # --- ingest (pipeline thread) -------------------------------------------------

    def add(self, first: int, frames: np.ndarray) -> None:
        """Validate and take ``frames`` (n, h, w) for scan indices first .. first + n - 1."""
        if self.first_frame_at is None:
            self.first_frame_at = time.perf_counter()
        n_pos = self.start.n_positions
        idx = np.arange(first, first + len(frames))
        inside = idx < n_pos
        if not inside.all():
            bad = idx[~inside]
            self.invalid("out_of_range", len(bad), f"indices {bad[0]}..{bad[-1]} outside the {n_pos}-position scan")
            idx, frames = idx[inside], frames[inside]
        if self.lossy and len(idx) and idx[0] > self._highest + 1:
            gap = int(idx[0] - self._highest - 1)
            self.counters["dropped"] += gap
            self.log.warning("gap", "scan %s: %d frame(s) dropped before index %d", self.scan_id, gap, idx[0])
        if len(idx):
            self._highest = max(self._highest, int(idx[-1]))
            self.touched[idx] = True
        dup = self.arrived[idx]
        if dup.any():
            self.counters["duplicate"] += int(dup.sum())
            self.log.warning("duplicate", "scan %s: %d duplicate frame(s), first index %d",
                             self.scan_id, int(dup.sum()), idx[dup][0])
            idx, frames = idx[~dup], frames[~dup]
        if not len(idx):
            return
        if self.binner is None:
            self._pending.append((idx, np.array(frames)))  # copy: the socket buffer is released after this
            self._pending_count += len(idx)
            self.arrived[idx] = True  # reserve now so duplicates among pending frames are caught
            if self._pending_count >= min(self.cfg.calibration_frames, n_pos):
                self._calibrate()
            return
        self._process(idx, frames)

    def _calibrate(self) -> None:
        idx = np.concatenate([i for i, _ in self._pending])
        raw = np.concatenate([f for _, f in self._pending])
        self._pending, self._pending_count = [], 0
        self.arrived[idx] = False  # _process marks them again if valid
        finite = np.isfinite(raw.reshape(len(raw), -1).sum(axis=1)) if raw.dtype.kind == "f" else np.ones(len(raw), bool)
        use = raw[finite] if finite.any() else raw
        g = calibrate(np.nan_to_num(use, nan=0.0, posinf=0.0, neginf=0.0) if raw.dtype.kind == "f" else use, self.cfg)
        cal = self.start.calibration
        pixel_mrad = cal.detector_pixel_mrad * g.bin if cal.detector_pixel_mrad else None
        with self._lock:
            self.geometry = g
            self.binner = Binner(g, np.dtype(self.start.dtype), self.cfg.mask_saturated)
            self.sums = FrameSum(g.binned_shape)
            self.positions = PositionSums(self.start.scan_shape, g, pixel_mrad)
            self.store = FrameStore(self.start.n_positions, g.binned_shape)
            self.data = ScanData(self.scan_id, self.start.scan_shape, self.store,
                                 *_readers(self.sums, self.positions, self._lock))
        log.info("scan %s: disc at (%.1f, %.1f) r=%.1f binned px, binned %s, %d masked pixel(s)",
                 self.scan_id, *g.center, g.radius, g.binned_shape, len(g.masked))
        self.ready.set()
        self._process(idx, raw)

    def _process(self, idx: np.ndarray, raw: np.ndarray) -> None:
        """Bin, validate and reduce, in sub-batches whose temporaries stay small and in cache."""
        per = max(1, _WORK_BYTES // (8 * int(np.prod(self.geometry.binned_shape))))  # float64 sums dominate
        for lo in range(0, len(idx), per):
            self._process_batch(idx[lo:lo + per], raw[lo:lo + per])

    def _process_batch(self, idx: np.ndarray, raw: np.ndarray) -> None:
        binned = self.binner(raw)
        products = self.positions.products(binned)  # the per-frame sums, computed once
        totals = products[:, 0]
        ok = np.isfinite(totals) & (totals != 0)
        if not ok.all():
            nonfinite = ~np.isfinite(totals)
            if nonfinite.any():
                self.invalid("nan_or_inf", int(nonfinite.sum()), f"NaN or Inf pixels, first index {idx[nonfinite][0]}")
            zero = np.isfinite(totals) & (totals == 0)
            if zero.any():
                self.invalid("zero_sum", int(zero.sum()), f"frame sum is zero (no COM), first index {idx[zero][0]}")
            idx, binned, products = idx[ok], binned[ok], products[ok]
            if not len(idx):
                return
        self.arrived[idx] = True
        with self._lock:
            self.sums.update(idx, binned)
            self.positions.update(idx, binned, products)
        self.store.put(idx, binned)
        self.counters["received"] += len(idx)
        self.last_frame_at = time.perf_counter()

    def finish(self, frames_sent: int | None) -> None:
        """The scan ended: calibrate if it never did, and count what never arrived."""
        if self.binner is None and self._pending:
            self._calibrate()
        self.frames_sent = frames_sent
        lost = int(self.start.n_positions - self.touched.sum())
        self.counters["dropped" if self.lossy else "missing"] = lost
        if lost:
            log.warning("scan %s ended with %d of %d positions %s", self.scan_id, lost, self.start.n_positions,
                        "dropped" if self.lossy else "missing")
        self.ended_at = time.time()
        if self.data is not None:
            self.data.ended.set()

    # --- readers (any thread) ------------------------------------------------------

    def snapshot(self) -> dict[str, np.ndarray]:
        """Current maps and mean pattern; empty before calibration."""
        if not self.ready.is_set():
            return {}
        with self._lock:
            return {**self.sums.snapshot(), **self.positions.snapshot()}

    def counter_dict(self) -> dict[str, int]:
        """Counters so far; ``missing`` is known only once the scan has ended."""
        return {k: int(self.counters[k]) for k in COUNTERS}
