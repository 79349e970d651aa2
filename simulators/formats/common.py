"""What every format reader returns (``Loaded``), and the unit conversions their calibrations share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rrstem.simulators.optics import wavelength_angstrom
from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.protocol import Calibration

#: Lengths in nm, angles in mrad, reciprocal lengths in 1/nm, per unit as files spell them.
LENGTH_NM = {"nm": 1.0, "Å": 0.1, "A": 0.1, "angstrom": 0.1, "pm": 1e-3, "um": 1e3, "µm": 1e3, "m": 1e9}
ANGLE_MRAD = {"mrad": 1.0, "rad": 1e3, "urad": 1e-3, "µrad": 1e-3}
RECIPROCAL_PER_NM = {"1/nm": 1.0, "nm^-1": 1.0, "1/Å": 10.0, "1/A": 10.0, "A^-1": 10.0, "Å^-1": 10.0, "1/m": 1e-9}

_HC_KEV_A = 12.398419843320026  # h c in keV Angstrom
_MC2_KEV = 510.99895  # electron rest energy in keV


@dataclass
class Loaded:
    """A file's frames as a reader found them.

    ``data`` is a 4D ``(ny, nx, h, w)`` array-like, or, when ``flat``, a
    row-major series ``(n, h, w)`` that needs a scan shape (the file's own
    ``scan_shape``, else ``--scan-shape``). Either is read lazily by slicing.
    ``problem`` says what is wrong with a damaged file whose first frames are
    still good (``data`` then holds only those).
    """

    data: Any
    calibration: Calibration = field(default_factory=Calibration)
    metadata: dict = field(default_factory=dict)
    closer: Callable[[], None] | None = None
    flat: bool = False
    scan_shape: tuple[int, int] | None = None
    problem: str | None = None
    n_frames: int | None = None  # frames the file says it holds, when a flat series is damaged
    bad_pixels: tuple[tuple[int, int], ...] = ()  # [row, col] the file's own pixel mask names (``Start.bad_pixels``)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None


def energy_from_wavelength_kev(wavelength_a: float) -> float:
    """Electron energy in keV whose relativistic wavelength is ``wavelength_a`` Angstrom."""
    pc = _HC_KEV_A / wavelength_a
    return math.sqrt(pc * pc + _MC2_KEV * _MC2_KEV) - _MC2_KEV


def length_nm(scale, units) -> float | None:
    """A scan step in nm from a scale and its unit, or None if the unit is not a length."""
    units = (units or "").strip()
    if scale and units in LENGTH_NM:
        return abs(float(scale)) * LENGTH_NM[units]
    return None


def pixel_mrad(scale, units, energy_kev: float | None) -> float | None:
    """A detector pixel in mrad from a scale in angle or reciprocal-length units (the latter needs the energy)."""
    units = (units or "").strip()
    if not scale:
        return None
    if units in ANGLE_MRAD:
        return abs(float(scale)) * ANGLE_MRAD[units]
    if units in RECIPROCAL_PER_NM and energy_kev:
        return abs(float(scale)) * RECIPROCAL_PER_NM[units] * wavelength_angstrom(energy_kev) / 10 * 1e3
    return None


def calibration(energy_kev=None, convergence_mrad=None, detector_pixel_mrad=None, scan_step_nm=None) -> Calibration:
    """A ``Calibration`` of the positive values given; zeros and None are left unset."""
    values = dict(energy_kev=energy_kev, convergence_mrad=convergence_mrad,
                  detector_pixel_mrad=detector_pixel_mrad, scan_step_nm=scan_step_nm)
    return Calibration(**{k: float(v) for k, v in values.items() if v is not None and float(v) > 0})


def text(value) -> str:
    """An HDF5 / zarr attribute as a str."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if hasattr(value, "tolist"):
        value = value.tolist()
        if isinstance(value, bytes):
            return value.decode(errors="replace")
    return str(value)


#: How many of a file's datasets an error lists.
LISTED = 10


def pick(candidates: dict[str, tuple], key: str | None, what: str, path: Path) -> str:
    """The 4D entry named ``key``, or the only 4D entry; clear errors otherwise."""
    four_d = [k for k, shape in candidates.items() if len(shape) == 4]
    shown = list(candidates.items())[:LISTED]  # a file of thousands of datasets gets a line, not a page
    listing = ", ".join(f"{k} {tuple(s)}" for k, s in shown) or "none"
    if len(candidates) > LISTED:
        listing += f", and {len(candidates) - LISTED} more"
    if key is not None:
        if key not in candidates:
            raise ValueError(f"{path.name} has no {what} {key!r}; it holds: {listing}")
        return key
    if len(four_d) == 1:
        return four_d[0]
    if not four_d:
        raise ValueError(f"{path.name} holds no 4D {what}; it holds: {listing}")
    raise ValueError(f"{path.name} holds several 4D {what}s ({', '.join(four_d)}); choose one with key= / --key")


def fit_frames(n_frames: int, scan_shape: tuple[int, int], what: str, sync_offset: int = 0,
               flyback: int = 0, extra_ok: bool = False) -> tuple[int, str | None]:
    """The one rule of every reader for a file's frames against the scan: (frames the acquisition takes, what
    is short, or None).

    The acquisition of a ``(ny, nx)`` scan takes ``ny * (nx + flyback) + sync_offset`` frames
    (``stream/acquisition.py``). A file with more is refused (a ``ValueError``: the scan shape does not fit,
    unless ``--sync-offset``/``--flyback`` account for the extra frames); one with fewer (damaged, truncated)
    is analysed as far as it goes, and the second value says so: its results are incomplete.
    ``extra_ok`` (``rrstem replay``): a file with more frames is sent whole, as the detector sent it; the
    receiver's ``--sync-offset``/``--flyback`` place them, or it counts the extra frames invalid.
    """
    expected = AcquisitionMap(tuple(scan_shape), sync_offset, flyback).frames_in_acquisition
    ny, nx = scan_shape
    if n_frames > expected and extra_ok:
        return n_frames, None
    if n_frames > expected:
        took = f"{expected} frames" + (f" (sync offset {sync_offset}, flyback {flyback})"
                                       if sync_offset or flyback else "")
        raise ValueError(f"{what} holds {n_frames} frames, more than the {ny}x{nx} scan takes ({took}); fix "
                         "--scan-shape, or account for the extra frames with --sync-offset N / --flyback N")
    if n_frames < expected:
        return expected, f"{what} holds {n_frames} frames, fewer than the {expected} the {ny}x{nx} scan takes"
    return expected, None
