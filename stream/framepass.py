"""One pass over each raw frame: crop, sum-binning, pixel masking, the per-frame weight sums, the mean-pattern
sum and the copy into the frame store, fused in one compiled loop (``stream/kernel.py``).

Ingest is bound by memory bandwidth, so every raw pixel is read once: the
binned row is formed, written into the store in the store's dtype
(``store.narrow_dtype``: uint16 for binned uint16 counts, checked per frame,
see ``Scan``), and reduced against each weight of the scan's weight table
(``reductions/weights.py``: intensity, first moments, bright field, annular
dark field, and whatever other reductions declare) while it is still in
cache. Integer counts are summed in float64 wherever no per-frame sum can
reach 2**53 (``accumulator``), so every sum is exact in any order and the
reductions vectorise; in int64 otherwise. Either way the sums are the same
numbers as a float64 NumPy reduction of the whole array. Float frames are
summed in float64.

Each raw frame is oriented first (``orientation.orient``, ``Geometry.flip_rows`` and ``transpose``): a
strided view, no copy, of the same compiled layout as any other strided frame.

Masking follows ``preprocess.calibrate``: a pixel at the dtype maximum is
zeroed in the frame it occurs in (``mask_saturated``), and the persistently
bad pixels of the ``Geometry`` are zeroed in every frame.

The loop releases the GIL. It compiles once per number of weights, raw dtype
and memory layout (numba keeps the machine code on disk, so a later process
loads it); ``warm_up`` compiles the usual ones at service start, before any
frame waits.

How the loop works (``kernel.source``): two loops per frame, both over
contiguous memory: the binning (raw rows summed column by column into a
scratch line, then the columns of each binned pixel, written to the store
row, with the largest binned value beside it), and the weight sums over the
binned frame, flat, with the mean-pattern sum. Weights are float32 where they
hold their values exactly (small integers), which halves what the sums loop
reads. Sums of integers in float64 are exact below 2**53 in any order and
their products with such weights are exact, so reassociation and fused
multiply-adds change no result; NaN and Inf still propagate. Frames of signed
or float dtypes are added to the mean-pattern sum only once they are known
valid (a finite intensity).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from rrstem.stream import kernel
from rrstem.stream.orientation import orient
from rrstem.stream.preprocess import Geometry
from rrstem.stream.reductions import registered
from rrstem.stream.reductions.weights import BUILT_IN, weight_images, weight_table
from rrstem.stream.store import narrow_dtype, store_dtype

log = logging.getLogger("rrstem.framepass")


def accumulator(raw_dtype: np.dtype, bin: int, binned_shape: tuple[int, int]) -> np.dtype:
    """float64 where every per-frame sum of integer counts stays below 2**53 (exact, and it vectorises);
    int64 for the rare integer frames whose sums could pass that; float64 for float frames."""
    raw = np.dtype(raw_dtype)
    if raw.kind not in "ui":
        return np.dtype(np.float64)
    h, w = binned_shape
    worst = max(abs(int(np.iinfo(raw).min)), int(np.iinfo(raw).max)) * bin * bin * h * w * max(h, w, 1)
    return np.dtype(np.float64 if worst < 2**53 else np.int64)


class FramePass:
    """The fused pass for one scan: fixed geometry, raw dtype, store array and weight images.

    ``__call__(rows, raw)`` bins ``raw`` into ``frames[rows]`` and returns the (n, k) float64 weight sums
    of each frame (column 0 its intensity), the (h, w) sum of its valid frames (a frame is valid when its
    intensity is finite; a frame with no counts is a valid measurement) and ``over``: None, or the first frame
    whose binned counts do not fit
    ``frames``' dtype (a narrow store, ``store.narrow_dtype``). There the pass stopped: the sums and the total
    are of the frames before it, and the caller passes the rest again into a wider store. Rows of invalid
    frames are written too: the scan's ``filled`` mask says which rows hold data.

    ``weights``: (k, h, w) images on the binned frame, the first all ones (``Partial.weight_images``); by
    default the five of the built-in reductions (intensity, moment x, moment y, bright field, annular dark field).
    """

    def __init__(self, geometry: Geometry, raw_dtype: np.dtype, frames: np.ndarray, mask_saturated: bool = True,
                 weights: np.ndarray | None = None):
        self.g = geometry
        raw_dtype = np.dtype(raw_dtype).newbyteorder("=")
        self.raw_dtype = raw_dtype
        self.frames = frames  # (n_positions, h, w): the store's array, in ``store_dtype`` or ``narrow_dtype``
        acc = accumulator(raw_dtype, geometry.bin, geometry.binned_shape)
        self._zero = acc.type(0)
        y0, y1, x0, x1 = geometry.crop
        inside = [(i, j) for i, j in geometry.masked if y0 <= i < y1 and x0 <= j < x1]
        self._mrows = np.array([i for i, _ in inside], dtype=np.int64)
        self._mcols = np.array([j for _, j in inside], dtype=np.int64)
        # floats are never masked as saturated; integers at their dtype's maximum, if ``mask_saturated``
        self._sat = bool(mask_saturated and raw_dtype.kind in "ui")
        self._satmax = raw_dtype.type(np.iinfo(raw_dtype).max if raw_dtype.kind in "ui" else 0)
        self._defer = raw_dtype.kind != "u"
        if weights is None:
            weights = weight_images(BUILT_IN, geometry)
        h, w = geometry.binned_shape
        if weights.shape[1:] != (h, w) or not (weights[0] == 1).all():
            raise ValueError(f"weights must be (k, {h}, {w}) images, the first all ones; got {weights.shape}")
        extra = weights[1:].reshape(len(weights) - 1, h * w)
        # float32 where it holds every weight exactly (it halves what the sums loop reads); the products are float64
        wtype = acc if acc != np.float64 else (np.float32 if np.array_equal(extra.astype(np.float32), extra)
                                               else np.float64)
        self._weights = np.ascontiguousarray(extra.astype(wtype)) if len(extra) else np.zeros((1, h * w), wtype)
        self._k = len(weights)
        self._kernel = kernel.compiled(self._k)
        # binning in store_dtype for counts (exact: it holds any binned sum), float64 for float frames
        counts = raw_dtype.kind in "ui"
        ltype = store_dtype(raw_dtype, geometry.bin) if counts else np.dtype(np.float64)
        self._lzero = ltype.type(0)
        fits = np.iinfo(frames.dtype).max if frames.dtype.kind in "ui" else np.inf
        self._smax = ltype.type(min(fits, np.iinfo(ltype).max) if counts else np.inf)
        self._line = np.zeros(geometry.binned_shape[1] * geometry.bin, dtype=ltype)
        self._acc = acc

    def __call__(self, rows: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
        if not raw.dtype.isnative:  # big-endian wire data (Merlin): one conversion, then the same pass
            raw = raw.astype(raw.dtype.newbyteorder("="))
        raw = orient(raw, self.g.flip_rows, self.g.transpose)  # a strided view: the loop reads it as it is
        sums = np.empty((len(rows), self._k), dtype=np.float64)
        total = np.zeros(self.g.binned_shape[0] * self.g.binned_shape[1], dtype=self._acc)
        over = self._kernel(raw, np.asarray(rows, dtype=np.int64), self.g.crop[0], self.g.crop[2], self.g.bin,
                            self._sat, self._satmax, self._mrows, self._mcols, self._weights, self._zero, self._lzero,
                            self._defer, self.frames, sums, total, self._line, self._smax)
        if over < 0:
            return sums, total.reshape(self.g.binned_shape), None
        return sums[:over], total.reshape(self.g.binned_shape), int(over)


def warm_up(dtypes=("uint16",), bins=(1, 2), strided: bool = True) -> float:
    """Compile (or load from the on-disk cache) the pass for these raw dtypes, contiguous and strided
    (``strided``: the views of a TCP receiver's block), for the store dtypes of these bins; returns seconds."""
    t0 = time.perf_counter()
    table = weight_table(registered())  # the weights every new scan computes
    g = Geometry((4, 4), 1, (0, 4, 0, 4), (1.5, 1.5), 1.0, 1.5, 3.0)
    for name in dtypes:
        for b in bins:
            gb = Geometry((4, 4), b, (0, 4, 0, 4), (1.5, 1.5), 1.0, 1.5, 3.0) if b > 1 else g
            fp = FramePass(gb, np.dtype(name), np.zeros((2, *gb.binned_shape), narrow_dtype(name, b)),
                           weights=weight_images(table, gb))
            raw = np.ones((2, 4, 4), dtype=name)
            fp(np.arange(2), raw)
            if strided:
                fp(np.arange(2), np.ones((2, 4, 8), dtype=name)[:, :, ::2])
    return time.perf_counter() - t0


class WarmUp(threading.Thread):
    """Compiles the usual passes in the background at service start (``warm_up``); logs how long it took."""

    def __init__(self, dtypes=("uint16",)):
        super().__init__(name="rrstem-warmup", daemon=True)
        self.dtypes = dtypes
        self.seconds: float | None = None

    def run(self) -> None:
        try:
            self.seconds = warm_up(self.dtypes)
            log.info("frame pass compiled for %s in %.2f s", ", ".join(self.dtypes), self.seconds)
        except Exception:  # a failed warm-up only means the first scan compiles its own pass
            log.exception("frame pass warm-up failed")
