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

from rrstem.stream.badpixels import reasons_of
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
    mask_outliers: bool = True  # zero hot pixels (and report dead ones) that the calibration frames show
    outlier_factor: float = 8.0  # hot: calibration sum above this many times its brightest neighbour's (+5 sigma)
    mask_file: str | None = None  # a known detector mask, FILE.npy or FILE.h5[:DATASET], non-zero = masked
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
    mask_reasons: tuple[int, ...] = field(default=())  # why each is masked: bits of ``badpixels.REASONS``

    @property
    def binned_shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.crop
        return ((y1 - y0) // self.bin, (x1 - x0) // self.bin)

    def to_json(self) -> dict:
        d = asdict(self)
        d["masked"] = [list(p) for p in self.masked]
        d["mask_reasons"] = list(self.mask_reasons)
        d["binned_shape"] = list(self.binned_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        """The inverse of ``to_json``."""
        return cls(tuple(d["frame_shape"]), int(d["bin"]), tuple(d["crop"]), tuple(d["center"]), float(d["radius"]),
                   float(d["adf_inner"]), float(d["adf_outer"]), tuple(tuple(p) for p in d["masked"]),
                   bool(d.get("flip_rows", False)), bool(d.get("transpose", False)),
                   tuple(int(r) for r in d.get("mask_reasons", ())))

    def mask_reasons_image(self) -> np.ndarray:
        """The raw (h, w) uint8 reasons of every pixel (``badpixels.REASONS``; 0 = not masked)."""
        out = np.zeros(self.frame_shape, dtype=np.uint8)
        if self.masked:
            rc = np.asarray(self.masked, dtype=np.int64)
            out[rc[:, 0], rc[:, 1]] = self.mask_reasons if len(self.mask_reasons) == len(self.masked) else 255
        return out

    def detector_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Boolean (h, w) bright-field and annular-dark-field masks on the binned frame."""
        h, w = self.binned_shape
        ky, kx = np.mgrid[0:h, 0:w]
        r = np.hypot(ky - self.center[0], kx - self.center[1])
        return r <= self.radius, (r >= self.adf_inner) & (r <= self.adf_outer)


def find_bad_pixels(frames: np.ndarray, cfg: PreprocessConfig, known: np.ndarray | None = None) -> np.ndarray:
    """Raw (h, w) uint8 reasons (``badpixels.REASONS``; 0 = good) of every pixel: the ``known`` ones (given,
    from the detector), those stuck at the dtype maximum, and the hot and dead ones the frames show."""
    known = np.zeros(frames.shape[1:], np.uint8) if known is None else known
    return reasons_of(frames, known, cfg.mask_saturated, cfg.mask_outliers, cfg.outlier_factor)


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


def calibrate(frames: np.ndarray, cfg: PreprocessConfig, known: np.ndarray | None = None) -> Geometry:
    """Fix the geometry of a scan from its first raw frames (n, h, w), as the file or the wire has them;
    ``known``: the (h, w) uint8 reasons of the pixels known to be bad before any frame
    (``badpixels.known_reasons``), in the same pixel order as the frames.

    The frames and ``known`` are oriented first (``cfg.flip_rows``, ``cfg.transpose``); every position, radius
    and masked pixel of the ``Geometry`` is in the oriented frame, and the fused pass orients each frame the
    same way.
    """
    frames = orient(frames, cfg.flip_rows, cfg.transpose)
    if known is not None:
        known = orient(known, cfg.flip_rows, cfg.transpose)
    h, w = frames.shape[1:]
    b = cfg.bin
    if h < b or w < b:
        raise ValueError(f"bin {b} is larger than the {h}x{w} frame")
    reasons = find_bad_pixels(frames, cfg, known)
    bad = reasons != 0
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
    rows, cols = np.nonzero(bad)
    masked = tuple((int(i), int(j)) for i, j in zip(rows, cols))
    return Geometry((h, w), b, (y0, y1, x0, x1), center, radius, cfg.adf_inner * radius, outer, masked,
                    cfg.flip_rows, cfg.transpose, tuple(int(r) for r in reasons[rows, cols]))
