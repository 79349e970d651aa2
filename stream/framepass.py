"""One pass over each raw frame: crop, sum-binning, pixel masking, the five position sums, the mean-pattern sum
and the copy into the frame store, fused in one compiled loop (numba).

Ingest is bound by memory bandwidth, so every raw pixel is read once: the
binned row is formed, written into the store in the store's dtype
(``store.narrow_dtype``: uint16 for binned uint16 counts, checked per frame,
see ``Scan``), and reduced into the frame's intensity, first moments
(x, y), virtual bright field and virtual annular dark field while it is still
in cache. Integer counts are summed in float64 wherever no per-frame sum can
reach 2**53 (``accumulator``), so every sum is exact in any order and the
reductions vectorise; in int64 otherwise. Either way the sums are the same
numbers as a float64 NumPy reduction of the whole array. Float frames are
summed in float64.

Masking follows ``preprocess.calibrate``: a pixel at the dtype maximum is
zeroed in the frame it occurs in (``mask_saturated``), and the persistently
bad pixels of the ``Geometry`` are zeroed in every frame.

The kernel releases the GIL. It compiles once per raw dtype and memory layout
(``cache=True`` keeps the machine code on disk, so a later process loads it);
``warm_up`` compiles the usual ones at service start, before any frame waits.
"""

from __future__ import annotations

import logging
import threading
import time

import numba
import numpy as np

from rrstem.stream.preprocess import Geometry
from rrstem.stream.store import narrow_dtype, store_dtype

log = logging.getLogger("rrstem.framepass")

SUMS = 5  #: per-frame sums, in ``maps.PositionSums.COLUMNS`` order: intensity, moment_x, moment_y, vbf, vadf


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _frame_pass(raw, rows, y0, x0, b, sat, satmax, mrows, mcols, weights, zero, lzero, defer, store, sums, total,
                line, smax):
    """Bin raw (n, H, W) frames into ``store[rows]``; per-frame sums into ``sums`` (n, 5); ``total`` += valid frames.
    Returns -1, or the first frame k with a binned pixel above ``smax`` (the store dtype's maximum), where it
    stopped: frames before k are complete, frame k's store row is not (its value would have wrapped).

    Two loops per frame, both over contiguous memory: the binning (raw rows summed column by column into
    ``line``, then the columns of each binned pixel, written to the store row), and the five sums over the
    binned frame, flat, against ``weights`` (5, h*w: 1, x, y, bright field, annular dark field; float32, which
    holds these small integers exactly, for a float64 accumulator), with the mean-pattern sum ``total`` (h*w).
    The binned frame is still in cache for the second loop.

    ``zero`` (0 of the accumulator type) fixes the type of the sums; ``lzero`` (0 of ``line``'s type) that of the
    binning: ``store.store_dtype`` for integer frames (it holds any binned sum, so binning is exact integer
    arithmetic; the store itself may be narrower, ``store.narrow_dtype``, hence ``smax``), float64 for float frames. ``sat``: a pixel equal to ``satmax`` (of the raw dtype) counts 0. ``mrows``/``mcols``: raw coordinates of the persistently masked pixels inside the crop.
    ``defer``: add a frame to ``total`` only once it is known valid (signed or float frames); otherwise in the
    same loop (unsigned counts: an invalid, zero-sum frame adds zero). ``line``: scratch of (wb * b,).
    Sums of integers in float64 are exact below 2**53 in any order and their products with the weights are
    exact, so reassociation (vectorised reductions) and fused multiply-adds change no result; NaN and Inf still
    propagate.
    """
    n = raw.shape[0]
    hb, wb = store.shape[1], store.shape[2]
    wc = wb * b
    p_all = hb * wb
    wx, wy, wbf, wadf = weights[1], weights[2], weights[3], weights[4]
    held = np.zeros(p_all if defer else 0, total.dtype)  # a deferred frame's pixels, until it is known valid
    dst = held if defer else total
    for k in range(n):
        out = store[rows[k]]
        top = lzero  # the largest binned pixel of this frame, before masking
        for i in range(hb):
            o = out[i]
            # the b raw rows of binned row i, summed column by column (contiguous reads), saturated pixels as 0
            src = raw[k, y0 + i * b, x0:x0 + wc]
            if b == 1:
                for x in range(wc):
                    v = src[x]
                    o[x] = lzero if sat and v == satmax else lzero + v
                continue
            for x in range(wc):
                v = src[x]
                line[x] = lzero if sat and v == satmax else lzero + v
            for di in range(1, b):
                src = raw[k, y0 + i * b + di, x0:x0 + wc]
                for x in range(wc):
                    v = src[x]
                    line[x] += lzero if sat and v == satmax else lzero + v
            # then the b columns of each binned pixel; a constant stride for the usual bins, which vectorises
            # (a max reduction beside the store, which vectorises, where a branch per pixel would not)
            if b == 2:
                for j in range(wb):
                    a = line[2 * j] + line[2 * j + 1]
                    top = max(top, a)
                    o[j] = a
            elif b == 3:
                for j in range(wb):
                    a = line[3 * j] + line[3 * j + 1] + line[3 * j + 2]
                    top = max(top, a)
                    o[j] = a
            elif b == 4:
                for j in range(wb):
                    a = line[4 * j] + line[4 * j + 1] + line[4 * j + 2] + line[4 * j + 3]
                    top = max(top, a)
                    o[j] = a
            else:
                for j in range(wb):
                    a = line[j * b]
                    for dj in range(1, b):
                        a += line[j * b + dj]
                    top = max(top, a)
                    o[j] = a
        if top > smax:
            return k  # a binned pixel does not fit the store: the caller widens it and passes frames k.. again
        for m in range(mrows.shape[0]):  # the persistently bad pixels: take back what they added
            v = raw[k, mrows[m], mcols[m]]
            if not (sat and v == satmax):  # else already counted as zero
                bi, bj = (mrows[m] - y0) // b, (mcols[m] - x0) // b
                out[bi, bj] = out[bi, bj] - v
        flat = out.reshape(p_all)
        s_i, s_x, s_y, s_bf, s_adf = zero, zero, zero, zero, zero
        # one loop for both, adding into ``dst``: with ``if not defer`` inside it, numba vectorised nothing
        # (13 us for a 96x96 frame, against 6 us this way). A deferred frame goes to ``held``, then to ``total``.
        if defer:
            held[:] = 0
        for p in range(p_all):
            a = zero + flat[p]
            s_i += a
            s_x += a * wx[p]
            s_y += a * wy[p]
            s_bf += a * wbf[p]
            s_adf += a * wadf[p]
            dst[p] += a
        if defer and s_i == s_i and s_i != 0 and abs(s_i) != np.inf:
            for p in range(p_all):
                total[p] += held[p]
        sums[k, 0] = s_i
        sums[k, 1] = s_x
        sums[k, 2] = s_y
        sums[k, 3] = s_bf
        sums[k, 4] = s_adf
    return -1


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
    """The fused pass for one scan: fixed geometry, raw dtype and store array.

    ``__call__(rows, raw)`` bins ``raw`` into ``frames[rows]`` and returns the (n, 5) float64 sums
    of each frame, the (h, w) sum of its valid frames (a frame is valid when its intensity is finite
    and not zero) and ``over``: None, or the first frame whose binned counts do not fit ``frames``' dtype
    (a narrow store, ``store.narrow_dtype``). There the pass stopped: the sums and the total are of the frames
    before it, and the caller passes the rest again into a wider store. Rows of invalid frames are written
    too: the scan's ``filled`` mask says which rows hold data.
    """

    def __init__(self, geometry: Geometry, raw_dtype: np.dtype, frames: np.ndarray, mask_saturated: bool = True):
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
        bf, adf = geometry.detector_masks()
        h, w = geometry.binned_shape
        ky, kx = np.mgrid[0:h, 0:w]
        # float32 holds these small integers exactly and halves what the sums loop reads (products are float64)
        wtype = np.float32 if acc == np.float64 else acc
        self._weights = np.stack([np.ones((h, w)), kx, ky, bf, adf]).reshape(SUMS, h * w).astype(wtype)
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
        sums = np.empty((len(rows), SUMS), dtype=np.float64)
        total = np.zeros(self.g.binned_shape[0] * self.g.binned_shape[1], dtype=self._acc)
        over = _frame_pass(raw, np.asarray(rows, dtype=np.int64), self.g.crop[0], self.g.crop[2], self.g.bin,
                           self._sat, self._satmax, self._mrows, self._mcols, self._weights, self._zero, self._lzero,
                           self._defer, self.frames, sums, total, self._line, self._smax)
        if over < 0:
            return sums, total.reshape(self.g.binned_shape), None
        return sums[:over], total.reshape(self.g.binned_shape), int(over)


def warm_up(dtypes=("uint16",), bins=(1, 2), strided: bool = True) -> float:
    """Compile (or load from the on-disk cache) the pass for these raw dtypes, contiguous and strided
    (``strided``: the views of a TCP receiver's block), for the store dtypes of these bins; returns seconds."""
    t0 = time.perf_counter()
    g = Geometry((4, 4), 1, (0, 4, 0, 4), (1.5, 1.5), 1.0, 1.5, 3.0)
    for name in dtypes:
        for b in bins:
            gb = Geometry((4, 4), b, (0, 4, 0, 4), (1.5, 1.5), 1.0, 1.5, 3.0) if b > 1 else g
            fp = FramePass(gb, np.dtype(name), np.zeros((2, *gb.binned_shape), narrow_dtype(name, b)))
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
