"""Scans over plain arrays for the model tests (``ArrayScan`` implements ``interface.ScanView``), and helpers.

``ArrayScan(frames)`` starts empty and is filled in row-major order, at once
(``feed``) or over time from a thread (``run``), like the service's scan: the
mean pattern and the COM are running reductions over the frames that have
arrived, the COM relative to the running mean pattern's COM, in pixels.
``ArrayScan.complete(frames)`` is a scan that has every frame and has ended.
"""

from __future__ import annotations

import threading
import time

import numpy as np



class ArrayScan:
    """A ``ScanView`` over (ny, nx, h, w) ``frames`` that fills when told to."""

    def __init__(self, frames: np.ndarray, scan_id: str = "streamed"):
        ny, nx, h, w = frames.shape
        self.scan_id, self.scan_shape = scan_id, (ny, nx)
        self._source = frames.reshape(ny * nx, h, w).astype(np.float32)  # (N, h, w)
        self._frames = np.zeros_like(self._source)
        self._filled = np.zeros(ny * nx, dtype=bool)
        self._sum = np.zeros((h, w), dtype=np.float64)
        self._count = 0
        self._ended = False
        self._lock = threading.Lock()  # one writer at a time; readers copy the sums under it
        self.thread: threading.Thread | None = None
        ky, kx = np.mgrid[0:h, 0:w]
        total = self._source.sum(axis=(1, 2), dtype=np.float64)
        self._k = ky, kx
        self._cx = (self._source * kx).sum(axis=(1, 2), dtype=np.float64) / total  # (N,) absolute COM, px
        self._cy = (self._source * ky).sum(axis=(1, 2), dtype=np.float64) / total

    @classmethod
    def complete(cls, frames: np.ndarray, scan_id: str = "complete") -> "ArrayScan":
        scan = cls(frames, scan_id)
        scan.feed(scan.scan_shape[0] * scan.scan_shape[1])
        scan.end()
        return scan

    # --- ScanView ----------------------------------------------------------------------------

    @property
    def binned_shape(self) -> tuple[int, int]:
        return self._source.shape[1:]

    @property
    def frames(self) -> np.ndarray:
        return self._frames

    @property
    def filled(self) -> np.ndarray:
        return self._filled

    @property
    def ended(self) -> bool:
        return self._ended

    def n_filled(self) -> int:
        return self._count

    def mean_pattern(self) -> np.ndarray:
        with self._lock:
            return (self._sum / max(self._count, 1)).astype(np.float32)

    def com_maps(self) -> dict[str, np.ndarray]:
        ky, kx = self._k
        with self._lock:
            mean, filled = self._sum / max(self._count, 1), self._filled.copy()
        s = mean.sum() or 1.0
        cx, cy = self._cx - (mean * kx).sum() / s, self._cy - (mean * ky).sum() / s
        mag, ang = np.hypot(cx, cy), np.arctan2(cy, cx)
        mag[~filled], ang[~filled] = np.nan, np.nan
        return {"com_magnitude": mag.reshape(self.scan_shape).astype(np.float32),  # (N,) -> (ny, nx)
                "com_angle": ang.reshape(self.scan_shape).astype(np.float32)}

    # --- filling -------------------------------------------------------------------------------

    def feed(self, upto: int) -> None:
        """Fill positions n_filled()..upto-1 now (each frame is written before its filled flag)."""
        with self._lock:
            lo = self._count
            if upto <= lo:
                return
            self._frames[lo:upto] = self._source[lo:upto]
            self._filled[lo:upto] = True
            self._sum += self._source[lo:upto].sum(axis=0, dtype=np.float64)
            self._count = upto

    def end(self) -> None:
        """No more frames will arrive."""
        self._ended = True

    def run(self, rate: float, chunk: int = 64, end: bool = True) -> "ArrayScan":
        """Fill the rest from a thread at ``rate`` frames/s, ``chunk`` at a time, then ``end()`` (if ``end``)."""
        def go():
            t0, first = time.monotonic(), self._count
            for lo in range(first, len(self._source), chunk):
                delay = t0 + (lo - first) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the pace of a detector, not a wait for a condition
                self.feed(min(lo + chunk, len(self._source)))
            if end:
                self.end()
        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()
        return self




def tilted_discs(ny=10, nx=10, h=16, w=16) -> np.ndarray:
    """A disc whose intensity is tilted by a smooth vector field over the scan: a known COM pattern."""
    yy, xx = np.mgrid[0:h, 0:w] - (h - 1) / 2
    disc = (np.hypot(yy, xx) < h / 4).astype(np.float32)
    out = np.empty((ny, nx, h, w), dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            gy, gx = 0.08 * np.sin(2 * np.pi * y / ny), 0.08 * np.cos(2 * np.pi * x / nx)
            out[y, x] = 100 * disc * (1 + gy * yy + gx * xx)
    return out


#: a small, fast trainer for 16x16 frames (TrainerConfig.from_dict overrides, model options flat)
FAST = dict(hidden=24, min_frames=16, batch_size=8, pixels=48, heldout=8, consolidate_seconds=2.0,
            refresh_seconds=0.1, eval_seconds=0.2, eval_pixels=32, log_every=1, mask=None)


def wait_for(cond, timeout: float = 30.0) -> bool:
    """Poll ``cond`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


class FakeClock:
    """A clock for ``TrainingRun(clock=...)`` that stands still until ``t`` is set."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t
