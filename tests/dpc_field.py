"""An exact DPC field for tests: grad V of Gaussians in the scan's frame, and what a turned, mirrored detector sees."""

from __future__ import annotations

import numpy as np

ANGLE, FLIP = 37.0, True  # the detector's turn against the scan
SCAN, DET, RADIUS = 32, 16, 5  # scan positions per side, detector pixels per side, disc radius (px)


def field(seed=5):
    """(gx, gy): grad V in the scan's frame, in detector px of COM shift, max ~0.1 px; V: Gaussians."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SCAN, :SCAN].astype(float)
    gx, gy = np.zeros((SCAN, SCAN)), np.zeros((SCAN, SCAN))
    for py, px, w in zip(*rng.uniform(3, SCAN - 3, (2, 14)), rng.uniform(1.5, 2.5, 14)):
        v = np.exp(-((y - py) ** 2 + (x - px) ** 2) / (2 * w**2))
        gx += -(x - px) / w**2 * v
        gy += -(y - py) / w**2 * v
    scale = 0.1 / np.abs(np.hypot(gx, gy)).max()
    return gx * scale, gy * scale


def to_detector(gx, gy, angle=ANGLE, flip=FLIP):
    """``F R(-angle) (gx, gy)`` plus a descan plane: what the detector sees."""
    a = np.deg2rad(angle)
    dx, dy = np.cos(a) * gx + np.sin(a) * gy, -np.sin(a) * gx + np.cos(a) * gy
    y, x = np.mgrid[:gx.shape[0], :gx.shape[1]] / SCAN
    return dx + 0.03 + 0.05 * x - 0.02 * y, (-dy if flip else dy) - 0.01 + 0.04 * y
