"""Reductions over a scan, kept as sums that can be merged.

Each reduction has ``update(indices, binned)``, an in-place ``merge(other)``
and ``snapshot()``, which derives the final quantities. Nothing derived from
the running mean is stored: COM relative to the mean pattern's COM is formed
only in ``snapshot()``, from raw sums. This is the package's one COM
computation.

Which positions hold data is not a reduction's business: the scan owns the
one ``filled`` mask and passes it to ``PositionSums.snapshot``.
"""

from __future__ import annotations

import numpy as np

from rrstem.stream.preprocess import Geometry
from rrstem.stream.snapshot import Arrays


class FrameSum:
    """Sum of the binned frames: the mean pattern."""

    def __init__(self, binned_shape: tuple[int, int], dtype=np.float64):
        self.total = np.zeros(binned_shape, dtype=dtype)  # float64, or int64 for counts too large for it
        self.count = 0

    def update(self, indices: np.ndarray, binned: np.ndarray) -> None:
        self.add(len(indices), binned.sum(axis=0, dtype=self.total.dtype))

    def add(self, count: int, total: np.ndarray) -> None:
        """Take ``count`` frames already summed into ``total`` (the fused pass, ``framepass.FramePass``)."""
        self.total += total
        self.count += count

    def merge(self, other: "FrameSum") -> None:
        self.total += other.total
        self.count += other.count

    def snapshot(self) -> dict[str, np.ndarray]:
        mean = self.total / max(self.count, 1)
        return {Arrays.MEAN_PATTERN: mean.astype(np.float32)}


class PositionSums:
    """Per scan position: total intensity, first moments, bright and dark field.

    One (n, P) x (P, 5) product per batch gives all five sums; the weights are
    fixed by the geometry. Sums and maps are float64, so integer counts sum exactly.
    COM is in binned pixels, or in mrad when ``pixel_mrad`` (one binned pixel)
    is known.
    """

    COLUMNS = ("intensity", "moment_x", "moment_y", "vbf", "vadf")

    def __init__(self, scan_shape: tuple[int, int], geometry: Geometry, pixel_mrad: float | None = None):
        self.scan_shape = tuple(scan_shape)
        n = scan_shape[0] * scan_shape[1]
        h, w = geometry.binned_shape
        ky, kx = np.mgrid[0:h, 0:w].astype(np.float64)
        bf, adf = geometry.detector_masks()
        self._weights = np.stack([np.ones((h, w)), kx, ky, bf, adf]).reshape(5, h * w).T.copy()
        self.sums = np.zeros((n, 5), dtype=np.float64)  # zero where no frame was taken
        self.pixel_mrad = pixel_mrad

    @property
    def unit(self) -> str:
        return "mrad" if self.pixel_mrad else "px"

    def products(self, binned: np.ndarray) -> np.ndarray:
        """(n, 5) float64 sums of each binned frame; column 0 is its total intensity.

        NaN or Inf pixels give non-finite sums, which the caller counts as invalid frames.
        """
        with np.errstate(invalid="ignore", over="ignore"):
            return binned.reshape(len(binned), -1).astype(np.float64) @ self._weights  # (n, P) x (P, 5)

    def update(self, indices: np.ndarray, binned: np.ndarray | None, products: np.ndarray | None = None) -> None:
        """Take frames at ``indices``; pass ``products`` if already computed (then ``binned`` may be None)."""
        self.sums[indices] = self.products(binned) if products is None else products

    def merge(self, other: "PositionSums") -> None:
        self.sums += other.sums

    def snapshot(self, filled: np.ndarray) -> dict[str, np.ndarray]:
        """(ny, nx) float64 maps over the ``filled`` positions (a (ny*nx,) bool mask), NaN elsewhere.

        COM is relative to the COM of the mean pattern of the filled positions.
        """
        ny, nx = self.scan_shape
        filled = filled.reshape(-1)
        s = self.sums[filled]
        maps = {name: np.full(ny * nx, np.nan, dtype=np.float64) for name in Arrays.SCAN_MAPS}
        if len(s):
            total = s[:, 0].sum()
            ref_x = s[:, 1].sum() / total  # COM of the mean pattern
            ref_y = s[:, 2].sum() / total
            scale = self.pixel_mrad or 1.0
            com_x = (s[:, 1] / s[:, 0] - ref_x) * scale
            com_y = (s[:, 2] / s[:, 0] - ref_y) * scale
            for name, values in ((Arrays.VBF, s[:, 3]), (Arrays.VADF, s[:, 4]), (Arrays.COM_X, com_x),
                                 (Arrays.COM_Y, com_y), (Arrays.COM_MAGNITUDE, np.hypot(com_x, com_y)),
                                 (Arrays.COM_ANGLE, np.arctan2(com_y, com_x))):
                maps[name][filled] = values
        return {k: v.reshape(ny, nx) for k, v in maps.items()}
