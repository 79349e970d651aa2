"""Electron optics for the phase-object CBED simulator: wavelength, sampling, probe.

Units: lengths in Angstrom, angles in mrad unless a name says otherwise. The
probe is an aberration-free, in-focus STEM probe: the inverse FFT of a round
aperture of the convergence semi-angle, with an edge softened over one
detector pixel so that the disc has no staircase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_H = 6.62607015e-34  # Planck constant, J s
_M0 = 9.1093837015e-31  # electron rest mass, kg
_E = 1.602176634e-19  # elementary charge, C
_C = 299792458.0  # speed of light, m/s


def wavelength_angstrom(energy_kev: float) -> float:
    """Relativistic electron wavelength in Angstrom (0.0487 at 60 keV)."""
    ev = energy_kev * 1e3 * _E
    return _H / math.sqrt(2 * _M0 * ev * (1 + ev / (2 * _M0 * _C**2))) * 1e10


def _smooth_sizes(limit: int) -> list[int]:
    """Even integers up to ``limit`` with no prime factor above 5 (fast FFT sizes)."""
    out = []
    for n in range(2, limit + 1, 2):
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            out.append(n)
    return out


@dataclass(frozen=True)
class Sampling:
    """How the scan maps onto the simulation grid.

    Scan index ``i`` along an axis sits at ``i * stride / sub`` grid pixels:
    either a scan step spans ``stride`` grid pixels (``sub == 1``) or a grid
    pixel spans ``sub`` scan steps (``stride == 1``), so every probe position
    is a whole grid pixel plus one of ``sub`` fixed fractions.
    """

    dx: float  #: grid pixel in Angstrom
    n: int  #: edge of the square FFT window around the probe, grid pixels
    stride: int  #: grid pixels per scan step
    sub: int  #: scan steps per grid pixel
    pixel_mrad: float  #: detector pixel (= FFT pixel) in mrad
    detector: int  #: detector edge in pixels (central crop of the FFT)

    def split(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer grid pixel and fraction index of scan indices ``i`` along one axis."""
        return divmod(np.asarray(i) * self.stride, self.sub)

    def crop_index(self) -> np.ndarray:
        """FFT indices of the detector pixels, zero frequency at pixel ``detector // 2``."""
        d = self.detector
        return np.arange(-(d // 2), d - d // 2) % self.n


def choose_sampling(step_a: float, detector: int, energy_kev: float, convergence_mrad: float,
                    half_angle_mrad: float) -> Sampling:
    """Pick a grid fine enough to carry scattering to the detector edge, with exact detector pixels.

    The phase grating must resolve angles up to detector edge + aperture, so
    ``dx <= lambda / (2 (half_angle + alpha))``. The FFT pixel is ``lambda /
    (n dx)``; ``n`` is the fast FFT size that makes it closest to
    ``2 half_angle / detector``.
    """
    lam = wavelength_angstrom(energy_kev)
    max_dx = 0.95 * lam / (2 * (half_angle_mrad + convergence_mrad) * 1e-3)
    if step_a >= max_dx:
        stride, sub = math.ceil(step_a / max_dx), 1
        dx = step_a / stride
    else:
        stride, sub = 1, int(max_dx // step_a)
        dx = step_a * sub
    target = lam / (2 * half_angle_mrad * 1e-3 / detector) / dx
    sizes = [s for s in _smooth_sizes(4 * math.ceil(target) + 8) if s >= detector]
    n = min(sizes, key=lambda s: abs(math.log(s / target)))
    return Sampling(dx=dx, n=n, stride=stride, sub=sub, pixel_mrad=lam / (n * dx) * 1e3, detector=detector)


def probe(s: Sampling, energy_kev: float, convergence_mrad: float, frac: tuple[float, float]) -> np.ndarray:
    """Complex probe in an ``n x n`` window, centred at pixel ``n // 2 + frac``, sum |psi|^2 = 1."""
    lam = wavelength_angstrom(energy_kev)
    k = np.fft.fftfreq(s.n, s.dx)  # 1/Angstrom
    theta = np.hypot(k[:, None], k[None, :]) * lam * 1e3  # mrad
    aperture = np.clip((convergence_mrad - theta) / s.pixel_mrad + 0.5, 0.0, 1.0)
    cy, cx = (s.n // 2 + frac[0]) * s.dx, (s.n // 2 + frac[1]) * s.dx
    ramp = np.exp(-2j * np.pi * (k[:, None] * cy + k[None, :] * cx))
    psi = np.fft.ifft2(aperture * ramp)
    return psi / np.sqrt(np.sum(np.abs(psi) ** 2))
