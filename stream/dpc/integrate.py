"""Fourier integration of a gradient field (the iDPC map), for fields that are not periodic.

Given ``(gx, gy)``, the gradient of some map ``phi`` sampled on the scan grid, ``phi`` is found in
Fourier space: ``d/dx`` is multiplication by ``2 pi i kx`` (k in cycles per scan step), so the least
squares answer is ``phi_hat = (kx gx_hat + ky gy_hat) / (2 pi i (k**2 + k_c**2))``.

The FFT treats the map as periodic; a scan is not, and its edges would ring. So the field is first
mirrored to twice its size in each direction, as the gradient of ``phi`` mirrored at the edges
(``gx`` changes sign when mirrored along x, ``gy`` along y); that extension is periodic and smooth
across the seams, and the result is cropped back.

``k_c`` (``cutoff``, cycles per scan step) is a Tikhonov term for the lowest frequencies, where
``1/k`` amplifies noise and any descan left over: a wave of frequency ``k`` keeps the fraction
``k**2 / (k**2 + k_c**2)`` of its amplitude, half at ``k = k_c``. The mean of the result is 0
(nothing fixes it). O(N log N).
"""

from __future__ import annotations

import numpy as np


def default_cutoff(shape: tuple[int, int]) -> float:
    """A quarter of the lowest frequency of the mirrored grid: waves longer than 4x the scan are damped."""
    return 1.0 / (8.0 * max(shape))


def integrate_gradient(gx: np.ndarray, gy: np.ndarray, *, step: float = 1.0,
                       cutoff: float | None = None) -> np.ndarray:
    """The map whose gradient (per ``step``) is ``(gx, gy)``; NaN where either component is not finite.

    Positions with no value are handled in two ways: whole rows and columns without values at the
    edges (a scan not yet finished) are cropped off; isolated gaps inside are set to 0 (no
    deflection: after descan removal, the field's mean) before integrating. The result's unit is the
    field's times ``step``'s (mrad * nm for mrad and a step in nm; mrad * px with ``step=1``).
    ``cutoff``: see the module docstring; None for ``default_cutoff``, 0 for none (only the mean set).
    """
    gx, gy = np.asarray(gx, float), np.asarray(gy, float)
    if gx.shape != gy.shape or gx.ndim != 2:
        raise ValueError(f"gx and gy must be 2D maps of one shape, not {gx.shape} and {gy.shape}")
    known = np.isfinite(gx) & np.isfinite(gy)
    out = np.full(gx.shape, np.nan)
    rows, cols = np.flatnonzero(known.any(axis=1)), np.flatnonzero(known.any(axis=0))
    if not len(rows):
        return out
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fx, fy = np.where(known[box], gx[box], 0.0), np.where(known[box], gy[box], 0.0)
    ny, nx = fx.shape
    k_c = default_cutoff((ny, nx)) if cutoff is None else float(cutoff)
    # mirrored to (2ny, 2nx): phi(x) = phi(-1 - x), so gx is odd under the x mirror, even under the y mirror
    ex = np.block([[fx, -fx[:, ::-1]], [fx[::-1], -fx[::-1, ::-1]]])
    ey = np.block([[fy, fy[:, ::-1]], [-fy[::-1], -fy[::-1, ::-1]]])
    ky = np.fft.fftfreq(2 * ny)[:, None]
    kx = np.fft.rfftfreq(2 * nx)[None, :]
    k2 = kx**2 + ky**2 + k_c**2
    k2[0, 0] = 1.0  # the mean, not fixed by a gradient: kx = ky = 0 there, so phi_hat is 0
    phi_hat = (kx * np.fft.rfft2(ex) + ky * np.fft.rfft2(ey)) / (2j * np.pi * k2)
    phi = np.fft.irfft2(phi_hat, s=(2 * ny, 2 * nx))[:ny, :nx] * step
    out[box] = np.where(known[box], phi, np.nan)
    return out
