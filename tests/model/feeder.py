"""A scan that fills over time, like the service's store: for trainer tests and offline runs."""

from __future__ import annotations

import threading
import time

import numpy as np

from rrstem.stream.store import FrameStore, ScanData


def streamed_scan(frames: np.ndarray, scan_id: str = "streamed") -> tuple[ScanData, "Feeder"]:
    """A ScanData over (ny, nx, h, w) ``frames`` that starts empty; the Feeder fills it.

    The mean and COM are running (over the filled frames), as in the service.
    """
    ny, nx, h, w = frames.shape
    flat = frames.reshape(ny * nx, h, w).astype(np.float32)
    store = FrameStore(ny * nx, (h, w))
    sums = {"total": np.zeros((h, w)), "n": 0}
    ky, kx = np.mgrid[0:h, 0:w]
    tot = flat.sum(axis=(1, 2), dtype=np.float64)
    cx_all = (flat * kx).sum(axis=(1, 2), dtype=np.float64) / tot
    cy_all = (flat * ky).sum(axis=(1, 2), dtype=np.float64) / tot
    lock = threading.Lock()

    def mean_pattern():
        with lock:
            return (sums["total"] / max(sums["n"], 1)).astype(np.float32)

    def com_maps():
        mean = mean_pattern().astype(np.float64)
        s = mean.sum() or 1.0
        cx, cy = cx_all - (mean * kx).sum() / s, cy_all - (mean * ky).sum() / s
        mag, ang = np.hypot(cx, cy), np.arctan2(cy, cx)
        mag[~store.filled], ang[~store.filled] = np.nan, np.nan
        return {"com_magnitude": mag.reshape(ny, nx).astype(np.float32),
                "com_angle": ang.reshape(ny, nx).astype(np.float32)}

    data = ScanData(scan_id, (ny, nx), store, mean_pattern, com_maps)

    def put(lo, hi):
        idx = np.arange(lo, hi)
        with lock:
            sums["total"] += flat[lo:hi].sum(axis=0)
            sums["n"] += hi - lo
        store.put(idx, flat[lo:hi])

    return data, Feeder(data, put, ny * nx)


class Feeder:
    """Puts frames in row-major order at ``rate`` frames/s (chunks of ``chunk``), then sets ``ended``."""

    def __init__(self, data: ScanData, put, n: int):
        self.data, self.put, self.n = data, put, n
        self.thread: threading.Thread | None = None

    def feed(self, upto: int) -> None:
        """Synchronously fill positions count..upto-1."""
        lo = self.data.n_filled()
        if upto > lo:
            self.put(lo, upto)

    def run(self, rate: float, chunk: int = 64, end: bool = True) -> "Feeder":
        def go():
            t0 = time.monotonic()
            for lo in range(self.data.n_filled(), self.n, chunk):
                delay = t0 + lo / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.put(lo, min(lo + chunk, self.n))
            if end:
                self.data.ended.set()
        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()
        return self
