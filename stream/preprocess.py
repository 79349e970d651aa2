"""Frame preprocessing: the configuration, the bad-pixel mask and the disc geometry of a scan.

The crop, sum-binning and masking of every frame happen in the fused pass
(``stream/framepass.py``), for the ``Geometry`` fixed here.

Nothing here depends on the running mean: a binned frame is a fixed function
of the raw frame and of the ``Geometry`` fixed when the scan was calibrated
from its first frames.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from rrstem.stream.orientation import orient

log = logging.getLogger("rrstem.preprocess")


@dataclass(frozen=True)
class PreprocessConfig:
    bin: int = 1  # sum-binning factor (1 = none)
    crop: float | None = None  # crop the raw frame to this many disc radii around the disc; None = no crop
    disc_center: tuple[float, float] | None = None  # (cy, cx) in raw pixels, oriented; None = detect
    disc_radius: float | None = None  # in raw pixels; None = detect
    adf_inner: float = 1.2  # ADF inner radius in disc radii
    adf_outer: float | None = None  # ADF outer radius in disc radii; None = to the frame edge
    mask_saturated: bool = True  # zero pixels at the dtype maximum in the frame they occur in
    mask_outliers: bool = True  # zero pixels that are persistent outliers in the calibration frames
    outlier_factor: float = 8.0  # hot: calibration sum above this many times its 3x3 neighbourhood median
    calibration_frames: int = 64  # frames used to find the disc and the bad pixels
    flip_rows: bool = False  # reverse each raw frame's rows first (stream/orientation.py)
    transpose: bool = False  # then swap its rows and columns

    def __post_init__(self):
        if self.bin < 1:
            raise ValueError(f"bin must be >= 1, got {self.bin}")
        if self.crop is not None and self.crop <= 1:
            raise ValueError(f"crop is in disc radii and must be > 1, got {self.crop}")
        if self.calibration_frames < 1:
            raise ValueError("calibration_frames must be >= 1")


@dataclass(frozen=True)
class Geometry:
    """How raw frames map to binned frames, and where the disc is (binned pixels)."""

    frame_shape: tuple[int, int]  # raw (h, w), oriented: (w, h) of the file's frames if ``transpose``
    bin: int
    crop: tuple[int, int, int, int]  # raw (y0, y1, x0, x1) kept before binning
    center: tuple[float, float]  # disc centre (cy, cx), binned pixels
    radius: float  # disc radius, binned pixels
    adf_inner: float  # binned pixels
    adf_outer: float  # binned pixels
    masked: tuple[tuple[int, int], ...] = field(default=())  # raw (row, col) of persistently masked pixels
    flip_rows: bool = False  # raw frames had their rows reversed, then
    transpose: bool = False  # their rows and columns swapped, before anything else (stream/orientation.py)

    @property
    def binned_shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.crop
        return ((y1 - y0) // self.bin, (x1 - x0) // self.bin)

    def to_json(self) -> dict:
        d = asdict(self)
        d["masked"] = [list(p) for p in self.masked]
        d["binned_shape"] = list(self.binned_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        """The inverse of ``to_json``."""
        return cls(tuple(d["frame_shape"]), int(d["bin"]), tuple(d["crop"]), tuple(d["center"]), float(d["radius"]),
                   float(d["adf_inner"]), float(d["adf_outer"]), tuple(tuple(p) for p in d["masked"]),
                   bool(d.get("flip_rows", False)), bool(d.get("transpose", False)))

    def detector_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Boolean (h, w) bright-field and annular-dark-field masks on the binned frame."""
        h, w = self.binned_shape
        ky, kx = np.mgrid[0:h, 0:w]
        r = np.hypot(ky - self.center[0], kx - self.center[1])
        return r <= self.radius, (r >= self.adf_inner) & (r <= self.adf_outer)


def _neighbourhood_median(img: np.ndarray) -> np.ndarray:
    """Median of the 8 neighbours of every pixel (edges padded by reflection)."""
    p = np.pad(img, 1, mode="reflect")
    h, w = img.shape
    shifts = [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    return np.median(np.stack(shifts), axis=0)


def find_bad_pixels(frames: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Raw (h, w) mask of pixels that are stuck at the dtype maximum or are persistent hot outliers."""
    bad = np.zeros(frames.shape[1:], dtype=bool)
    if cfg.mask_saturated and frames.dtype.kind in "ui":
        bad |= (frames == np.iinfo(frames.dtype).max).all(axis=0)
    if cfg.mask_outliers and len(frames) >= 2:
        total = frames.sum(axis=0, dtype=np.float64)
        total[bad] = 0
        med = _neighbourhood_median(total)
        # Hot: far above its neighbourhood, by a margin that Poisson noise cannot explain.
        bad |= total > cfg.outlier_factor * med + 10 * np.sqrt(med + 1) + 10
    return bad


def detect_disc(mean: np.ndarray) -> tuple[tuple[float, float], float]:
    """Centre (cy, cx) and radius of the bright-field disc of a mean pattern, in its pixels.

    Thresholds half-way between the background (5th percentile) and the disc
    level (99th percentile); the radius is that of a disc of the same area.
    """
    lo, hi = np.percentile(mean, [5, 99])
    if not hi > lo:
        raise ValueError("cannot find the bright-field disc: the mean pattern is flat; pass disc_center and disc_radius")
    inside = mean > (lo + hi) / 2
    ky, kx = np.nonzero(inside)
    weights = mean[ky, kx]
    center = (float(np.average(ky, weights=weights)), float(np.average(kx, weights=weights)))
    return center, math.sqrt(inside.sum() / math.pi)


def calibrate(frames: np.ndarray, cfg: PreprocessConfig) -> Geometry:
    """Fix the geometry of a scan from its first raw frames (n, h, w), as the file or the wire has them.

    The frames are oriented first (``cfg.flip_rows``, ``cfg.transpose``); every position, radius and masked
    pixel of the ``Geometry`` is in the oriented frame, and the fused pass orients each frame the same way.
    """
    frames = orient(frames, cfg.flip_rows, cfg.transpose)
    h, w = frames.shape[1:]
    b = cfg.bin
    if h < b or w < b:
        raise ValueError(f"bin {b} is larger than the {h}x{w} frame")
    bad = find_bad_pixels(frames, cfg)
    mean = frames.mean(axis=0, dtype=np.float64)
    mean[bad] = 0
    if cfg.disc_center is None or cfg.disc_radius is None:
        try:
            (cy, cx), r = detect_disc(mean)
        except ValueError as exc:
            log.warning("%s; assuming a disc of radius %d at the frame centre", exc, min(h, w) // 4)
            (cy, cx), r = ((h - 1) / 2, (w - 1) / 2), min(h, w) / 4
    if cfg.disc_center is not None:
        cy, cx = cfg.disc_center
    if cfg.disc_radius is not None:
        r = cfg.disc_radius
    if cfg.crop is None:
        y0, y1, x0, x1 = 0, h - h % b, 0, w - w % b
    else:
        half = math.ceil(cfg.crop * r / b) * b
        y0 = max(0, int(round(cy)) - half) // b * b
        x0 = max(0, int(round(cx)) - half) // b * b
        y1 = y0 + min(2 * half, (h - y0) // b * b)
        x1 = x0 + min(2 * half, (w - x0) // b * b)
    # Binned pixel (i, j) covers raw rows y0 + i*b .. y0 + i*b + b-1; its centre is at raw y0 + i*b + (b-1)/2.
    center = ((cy - y0 - (b - 1) / 2) / b, (cx - x0 - (b - 1) / 2) / b)
    radius = r / b
    outer = np.inf if cfg.adf_outer is None else cfg.adf_outer * radius
    masked = tuple((int(i), int(j)) for i, j in zip(*np.nonzero(bad)))
    return Geometry((h, w), b, (y0, y1, x0, x1), center, radius, cfg.adf_inner * radius, outer, masked,
                    cfg.flip_rows, cfg.transpose)
