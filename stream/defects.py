"""The defect map: where the scan departs from its own crystal lattice.

A crystal's virtual ADF map repeats under the lattice's translations; a
missing atom, a substituted one, an adatom, an edge or a grain boundary does
not. So each position is compared with the positions one or more lattice
translations away:

1. **Translations** (``translations``): the peaks of the map's normalised
   autocorrelation (over the overlap of the map with its shifted self) that
   reach ``PEAK_SHARE`` of the strongest, the ``MAX_TRANSLATIONS`` shortest,
   refined to a fraction of a position. Nothing is assumed about the material or the
   scan step, and the field need not span whole unit cells.
2. **Lattice part**: at each position, the median of the map at the position
   plus and minus each translation (bilinear between positions), over those
   that fall inside the scored block. The median ignores a defect one
   translation away, so a defect leaves no ghost; a position with fewer than
   ``MIN_SAMPLES`` such neighbours (a corner) gets no score.
3. **Score**: the residual, in units of its own expected noise (the median of
   m samples adds ``pi/2m`` of the noise variance), smoothed by a Gaussian of
   ``SIGMA`` positions (a matched filter for a compact defect), scaled so an
   edge position, which averages fewer neighbours, has the same noise as an
   inner one, and divided by a robust scale: the larger of ``1.4826 MAD`` over
   the scan and ``FLOOR`` times the lattice part's RMS (so a noise-free scan's
   tiny interpolation misfit is not blown up). ``anomaly`` is its magnitude
   (a vacancy is dark, a heavier substitution bright); a position alarms when
   it exceeds ``THRESHOLD``.

While the scan fills in, only the first run of complete rows is scored (the
rest is NaN), and only once that block holds ``MIN_ROWS`` rows and twice the
smallest row offset of a lattice translation (so the lattice is seen across
rows, not only along them); before that, and for a map with no lattice (no
autocorrelation peak of ``MIN_CORRELATION``), there is no threshold (inf) and
no alarm.

Measured on the abTEM multislice scans (60 kV, 31 mrad; graphene vacancy and
Si substitution, pristine graphene and MoS2; noise-free, 1e6 and 1e5
e/pattern): ``docs/steering.md``, "The defect map".
"""

from __future__ import annotations

import threading

import numpy as np

from rrstem.stream.reductions.base import MapSpec
from rrstem.stream.workers import Budget

ANOMALY = "anomaly"  #: (ny, nx) float32 defect score (this module's units), NaN where not scored
ALARMS = "alarms"  #: (k, 2) int32 [y, x] of the positions above the threshold, highest first
ALARM_THRESHOLD = "anomaly_threshold"  #: () float32 the alarm threshold (inf: nothing scored yet)
#: the declarations of the three, for snapshots, the results file and the dashboard
DEFECT_SPECS = (MapSpec(ANOMALY, "robust_sigma", "defect map"),
                MapSpec(ALARMS, "", "[y, x] of the positions above the threshold, highest first", panel=False,
                        per_position=False),
                MapSpec(ALARM_THRESHOLD, "robust_sigma", "the alarm threshold on the defect map", panel=False,
                        per_position=False))

THRESHOLD = 10.0  #: alarm threshold on ``anomaly``
SIGMA = 1.0  #: Gaussian smoothing of the residual, in scan positions
FLOOR = 0.05  #: the noise scale is at least this share of the lattice part's RMS
MAX_TRANSLATIONS = 12  #: lattice translations compared (each both ways)
PEAK_SHARE = 0.6  #: a translation's autocorrelation peak reaches this share of the strongest
MIN_CORRELATION = 0.3  #: below this normalised autocorrelation there is no lattice
MIN_OVERLAP = 0.3  #: a translation must leave this share of the block overlapping itself
MIN_SAMPLES = 3  #: translated neighbours a position needs for a score
MIN_ROWS = 16  #: complete rows before anything is scored


def _local_peaks(r: np.ndarray) -> np.ndarray:
    """Where ``r`` exceeds all 8 neighbours (edges never)."""
    around = np.max([np.roll(r, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], axis=0)
    peak = r > around
    peak[[0, -1], :] = peak[:, [0, -1]] = False
    return peak


def sample(a: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``a`` at every position shifted by (dy, dx), bilinear; NaN where that falls outside ``a``."""
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w]
    y, x = yy + dy, xx + dx
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    inside = (y0 >= 0) & (x0 >= 0) & ((y0 < h - 1) | ((y0 == h - 1) & (fy == 0))) & \
             ((x0 < w - 1) | ((x0 == w - 1) & (fx == 0)))
    y0, x0 = np.clip(y0, 0, h - 1), np.clip(x0, 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    v = (a[y0, x0] * (1 - fy) * (1 - fx) + a[y1, x0] * fy * (1 - fx)
         + a[y0, x1] * (1 - fy) * fx + a[y1, x1] * fy * fx)
    return np.where(inside, v, np.nan)


def _refine(a: np.ndarray, dy: int, dx: int) -> tuple[float, float]:
    """Sub-position translation near (dy, dx): per axis, the vertex of a parabola through the mean squared
    difference between ``a`` and its shifted self at -0.5, 0 and +0.5 positions."""
    out = [float(dy), float(dx)]
    for axis in (0, 1):
        e = []
        for o in (-0.5, 0.0, 0.5):
            t = [float(dy), float(dx)]
            t[axis] += o
            e.append(float(np.nanmean((sample(a, *t) - a) ** 2)))
        curve = e[0] - 2 * e[1] + e[2]
        if curve > 0:
            out[axis] += float(np.clip(0.25 * (e[0] - e[2]) / curve, -0.5, 0.5))
    return out[0], out[1]


def translations(block: np.ndarray) -> list[tuple[float, float]]:
    """Up to ``MAX_TRANSLATIONS`` lattice translations (dy, dx) of an (h, w) map, one of each +- pair, the
    shortest of those whose peak reaches ``PEAK_SHARE`` of the strongest; [] if the map has no lattice."""
    a = block - block.mean()
    h, w = a.shape
    spec = np.fft.rfft2(a, (2 * h, 2 * w))
    ones = np.fft.rfft2(np.ones_like(a), (2 * h, 2 * w))
    corr = np.fft.fftshift(np.fft.irfft2(np.abs(spec) ** 2, (2 * h, 2 * w)))  # lag (0, 0) at [h, w]
    overlap = np.fft.fftshift(np.fft.irfft2(np.abs(ones) ** 2, (2 * h, 2 * w)))
    ok = overlap > MIN_OVERLAP * h * w
    if not corr[h, w] > 0:
        return []
    r = np.where(ok, corr / np.maximum(overlap, 1.0), -np.inf) / (corr[h, w] / (h * w))
    ly, lx = np.mgrid[-h:h, -w:w]
    half = (ly > 0) | ((ly == 0) & (lx > 0))
    iy, ix = np.nonzero(_local_peaks(r) & half & ok & (np.hypot(ly, lx) >= 2))
    if not len(iy):
        return []
    value = r[iy, ix]
    best = float(value.max())
    if best < MIN_CORRELATION:
        return []
    strong = np.flatnonzero(value >= PEAK_SHARE * best)
    order = strong[np.argsort(np.hypot(ly[iy[strong], ix[strong]], lx[iy[strong], ix[strong]]), kind="stable")]
    order = order[:MAX_TRANSLATIONS]  # the shortest: they overlap the most of the block
    return [_refine(block, int(ly[iy[k], ix[k]]), int(lx[iy[k], ix[k]])) for k in order]


def _smooth(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable convolution with ``kernel``, zero outside ``img``."""
    r = len(kernel) // 2
    p = np.pad(img, r)
    t = sum(kernel[i] * p[i:i + img.shape[0], :] for i in range(len(kernel)))
    return sum(kernel[j] * t[:, j:j + img.shape[1]] for j in range(len(kernel)))


def block_score(block: np.ndarray) -> np.ndarray | None:
    """(h, w) float64 ``anomaly`` of a complete block of a VADF map (NaN where a position has too few
    translated neighbours), or None if the block shows no lattice yet (module docstring)."""
    if block.shape[0] < MIN_ROWS or block.shape[1] < MIN_ROWS or not np.std(block) > 0:
        return None
    shifts = translations(block)
    across = [abs(dy) for dy, _ in shifts if abs(dy) >= 1]
    if not across or block.shape[0] < 2 * min(across):
        return None
    samples = np.stack([sample(block, s * dy, s * dx) for dy, dx in shifts for s in (1, -1)])  # (2T, h, w)
    m = np.isfinite(samples).sum(axis=0)
    ok = m >= MIN_SAMPLES
    if ok.sum() < MIN_ROWS:
        return None
    lattice = np.nanmedian(np.where(ok, samples, 0.0), axis=0)
    noise = np.sqrt(1 + np.pi / 2 / np.maximum(m, 1))  # the median of m samples adds pi/2m of the variance
    res = np.where(ok, (block - lattice) / noise, 0.0)
    r = int(np.ceil(3 * SIGMA))
    kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / SIGMA) ** 2)
    weight = ok.astype(np.float64)
    total = np.maximum(_smooth(weight, kernel), 1e-12)
    smooth = _smooth(res, kernel) / total
    gain = np.sqrt(_smooth(weight, kernel ** 2)) / total  # the noise left of a unit white residual
    gain = np.where(ok, gain, 1.0)  # (0 far from any scored position)
    smooth = np.where(ok, smooth * np.median(gain[ok]) / gain, np.nan)
    smooth -= np.nanmedian(smooth)
    scale = max(1.4826 * float(np.nanmedian(np.abs(smooth))), FLOOR * float(np.std(lattice[ok])), 1e-300)
    return np.abs(smooth) / scale


def defect_score(vadf: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """(ny, nx) float64 ``anomaly`` of a VADF map over its first run of complete rows; NaN elsewhere."""
    vadf = np.asarray(vadf, dtype=np.float64)
    out = np.full(vadf.shape, np.nan)
    rows = np.flatnonzero(np.asarray(filled, dtype=bool).all(axis=1) & np.isfinite(vadf).all(axis=1))
    if len(rows) < MIN_ROWS:
        return out
    y0 = rows[0]
    y1 = y0 + int(np.argmax(np.diff(np.r_[rows, -1]) != 1)) + 1  # the first run of complete rows
    score = block_score(vadf[y0:y1])
    if score is not None:
        out[y0:y1] = score
    return out


def alarms(score: np.ndarray, threshold: float) -> np.ndarray:
    """(k, 2) int32 [y, x] of the positions with ``score`` above ``threshold``, highest first."""
    a = np.where(np.isfinite(score), score, -np.inf)
    flat = np.flatnonzero(a.ravel() > threshold)
    flat = flat[np.argsort(-a.ravel()[flat], kind="stable")]
    return np.stack(np.unravel_index(flat, score.shape), axis=1).astype(np.int32).reshape(-1, 2)


def defect_maps(vadf: np.ndarray, filled: np.ndarray, threshold: float = THRESHOLD) -> dict[str, np.ndarray]:
    """``ANOMALY``, ``ALARMS`` and ``ALARM_THRESHOLD`` (inf while nothing is scored) of a VADF map."""
    score = defect_score(vadf, filled)
    thr = float(threshold) if np.isfinite(score).any() else float("inf")
    return {ANOMALY: score.astype(np.float32), ALARMS: alarms(score, thr),
            ALARM_THRESHOLD: np.array(thr, dtype=np.float32)}


class DefectMap:
    """One scan's defect maps, recomputed only when there is something new to score.

    ``maps(scan_maps, ended, refresh)`` takes the scan's maps (``vadf`` and ``filled``) and returns the defect
    maps. Only a ``refresh`` recomputes them (the events thread's, which scores them, and the finisher's
    for the results): while the scan runs, only when more complete rows are in, at most once per
    ``min_interval`` s and for at most a ``busy`` share of the time (a large map takes seconds); once
    it has ended, once more. Snapshots and the trainer get the last ones without waiting, so their own
    cadence never pays for it (before the first: NaN, no threshold, no alarms).
    While frames arrive faster than ``fast_fps`` (the caller's ``rate``) the share is ``busy_fast``: then
    ingest needs every cycle (the ``busy`` share would cost it a noticeable part of its rate) and the scan is
    over within seconds, before a steering client could act on a map.
    """

    def __init__(self, threshold: float = THRESHOLD, min_interval: float = 0.2, busy: float = 0.2,
                 busy_fast: float = 0.02, fast_fps: float = 5000.0):
        self.threshold = threshold
        self._budget = Budget(busy, floor=min_interval, fast_share=busy_fast, fast_fps=fast_fps)
        self._key: tuple | None = None
        self._maps: dict[str, np.ndarray] = {}
        # The publisher, the events and the finisher threads all ask. ``_lock`` guards the last maps and is
        # held only to read or replace them, so a snapshot (the one that reports a scan's last frame above all)
        # never waits for a recompute; ``_compute`` runs one recompute at a time.
        self._lock = threading.Lock()
        self._compute = threading.Lock()

    def maps(self, scan_maps: dict[str, np.ndarray], ended: bool = False, refresh: bool = False,
             rate: float = 0.0) -> dict[str, np.ndarray]:
        if "vadf" not in scan_maps or "filled" not in scan_maps:
            return {}
        filled = np.asarray(scan_maps["filled"], dtype=bool)
        key = (int(np.argmin(np.r_[filled.all(axis=1), False])), bool(ended))  # (complete rows, ended)
        with self._lock:
            if not refresh:
                return self._maps or {ANOMALY: np.full(filled.shape, np.nan, dtype=np.float32),
                                      ALARMS: np.zeros((0, 2), dtype=np.int32),
                                      ALARM_THRESHOLD: np.array(np.inf, dtype=np.float32)}
        with self._compute:
            with self._lock:  # another thread may have scored this key while this one waited
                if key == self._key or (not ended and self._maps and not self._budget.due()):
                    return self._maps
            found = self._budget.run(defect_maps, scan_maps["vadf"], filled, self.threshold, rate=rate)
            with self._lock:
                self._maps, self._key = found, key
            return found
