"""Fourier integration of a gradient field (the iDPC map), for fields that are not periodic.

Given ``(gx, gy)``, the gradient of some map ``phi`` sampled on the scan grid, ``phi`` is found in
Fourier space: ``d/dx`` is multiplication by ``2 pi i kx`` (k in cycles per scan step), so the least
squares answer is ``phi_hat = (kx gx_hat + ky gy_hat) / (2 pi i (k**2 + k_c**2))``.

The FFT treats the map as periodic; a scan is not, and its edges would ring. So the field is taken
as mirrored to twice its size in each direction, as the gradient of ``phi`` mirrored at the edges
(``gx`` changes sign when mirrored along x, ``gy`` along y); that extension is periodic and smooth
across the seams. The mirrored arrays are never built: an even extension's Fourier transform is the
cosine transform (DCT-II) of the original and an odd one's the sine transform (DST-II), so
``phi``'s cosine coefficients are ``-(kx S_x C_y[gx] + ky C_x S_y[gy]) / (2 pi (k**2 + k_c**2))``
with ``k = (m / 2nx, l / 2ny)`` for ``m < nx``, ``l < ny``, and ``phi`` is their inverse cosine
transform. Each transform runs along one axis at a time, as an FFT of the original length
(``_dct``), on the original grid: a quarter of the points of the mirrored 2D FFT. The frequency of
the mirrored grid's Nyquist bin (half a cycle per step) has no derivative that is real; it is left
out along both axes.

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


def _twiddle(n: int) -> np.ndarray:
    """``exp(-i pi k / 2n)`` for the ``n // 2 + 1`` bins of a real FFT of length ``n``."""
    return np.exp(-0.5j * np.pi * np.arange(n // 2 + 1) / n)


def _dct(f: np.ndarray) -> np.ndarray:
    """DCT-II along the last axis: ``C[k] = sum_j f[j] cos(pi k (j + 1/2) / n)``, ``k < n``, by one real FFT
    of length n (Makhoul): the even samples, then the odd ones reversed, transformed and turned by
    ``exp(-i pi k / 2n)`` give ``C[k]`` as the real part and ``C[n - k]`` as minus the imaginary part."""
    n = f.shape[-1]
    w = np.fft.rfft(np.concatenate([f[..., ::2], f[..., 1::2][..., ::-1]], axis=-1)) * _twiddle(n)
    out = np.empty(f.shape)
    out[..., :n // 2 + 1] = w.real
    out[..., n - 1:n // 2:-1] = w.imag[..., 1:(n + 1) // 2]
    out[..., n // 2 + 1:] *= -1
    return out


def _idct(c: np.ndarray) -> np.ndarray:
    """The inverse of ``_dct`` along the last axis (a scaled DCT-III), by one inverse real FFT of length n."""
    n = c.shape[-1]
    w = np.empty(c.shape[:-1] + (n // 2 + 1,), dtype=complex)  # C[k] - i C[n - k], with C[n] = 0
    w.real = c[..., :n // 2 + 1]
    w.imag[..., 0] = 0.0
    w.imag[..., 1:] = c[..., n - 1:(n - 1) // 2:-1]
    w.imag[..., 1:] *= -1
    v = np.fft.irfft(w / _twiddle(n), n)
    out = np.empty(c.shape)
    out[..., ::2] = v[..., :(n + 1) // 2]
    out[..., 1::2] = v[..., :(n + 1) // 2 - 1:-1]
    return out


def _dst(f: np.ndarray) -> np.ndarray:
    """DST-II along the last axis for ``k < n``: ``S[k] = sum_j f[j] sin(pi k (j + 1/2) / n)`` (``S[0] = 0``), as
    the DCT-II of ``(-1)**j f`` read backwards (``S[k] = C[n - k]``; ``C[0]``, the Nyquist bin ``S[n]``, is
    left out)."""
    g = f.copy()
    g[..., 1::2] *= -1
    c = _dct(g)
    c[..., 1:] = c[..., :0:-1].copy()
    c[..., 0] = 0.0
    return c


def _t(a: np.ndarray) -> np.ndarray:
    """The map transposed, contiguous: the next transform runs along its other axis."""
    return np.ascontiguousarray(a.T)


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
    ky = (np.arange(ny) / (2 * ny))[:, None]  # cycles per step of the mirrored grid's bins 0 .. n - 1
    kx = (np.arange(nx) / (2 * nx))[None, :]
    k2 = kx**2 + ky**2 + k_c**2
    k2[0, 0] = 1.0  # the mean, not fixed by a gradient: kx = ky = 0 there, so its coefficient is 0
    # gx is odd under the x mirror (sine along x), even under the y mirror (cosine along y); gy the reverse
    # transforms along x, then along y on the transposed maps (nx, ny), then back
    coef = -(kx.T * _dct(_t(_dst(fx))) + ky.T * _dst(_t(_dct(fy)))) / (2 * np.pi * k2.T)  # (nx, ny)
    phi = _idct(_t(_idct(coef))) * step
    out[box] = np.where(known[box], phi, np.nan)
    return out
