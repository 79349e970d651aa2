"""The scan-detector rotation and flip, found from the COM field itself.

A specimen's electrostatic potential deflects the beam along the gradient of its phase, and a
gradient has no curl. Seen from the detector the field is turned (and maybe mirrored), which turns
divergence into curl; the calibration finds the turn that leaves the least curl.

Method. With ``e = F @ detector`` (F the optional flip, see ``field``), turning by ``a`` gives
``curl = cos(a) curl_e + sin(a) div_e`` at every position, so the mean squared curl over the
positions is ``J(a) = (A + B)/2 + (A - B)/2 cos 2a + C sin 2a`` with ``A = sum curl_e**2``,
``B = sum div_e**2``, ``C = sum curl_e div_e``. Its minimum is found in closed form (no angle grid),
for both flips, and the flip with the lower minimum wins. ``a`` and ``a + 180`` leave the same curl;
the turn by 180 degrees flips the divergence's sign and is resolved by the convention below.

Sign convention. The COM of the diffraction pattern moves towards positive phase gradient (for the
FFT convention ``exp(-2 pi i k x)``, the one of diffraction): the beam is pulled towards the atoms,
where the projected potential is highest, so the corrected field points towards the atoms and its
divergence is negative on them. Of the two angles, the one is chosen for which the strongest
divergence (the ``POLARITY_FRACTION`` of positions with the largest ``|div|``) is mostly negative.
This assumes positive, peaked scatterers (atoms, particles) in the rows used; a specimen of holes,
or rows that only hold the outskirts of the scatterers' fields, read turned by 180.

Only positions where the stencil has all four neighbours finite count, so a scan filled row by row
calibrates on the rows it has, and a frame with no counts only removes its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rrstem.stream.dpc.field import d_dx, d_dy, remove_descan

#: the part of the positions, by largest |divergence|, whose sign decides between ``a`` and ``a + 180``
POLARITY_FRACTION = 0.02
#: bootstrap resamples of the scan rows for the angle's uncertainty (seeded: the result is reproducible)
BOOTSTRAP_SAMPLES = 200


class NotEnoughData(ValueError):
    """Too few positions with a full stencil yet (a scan needs 3 rows and 3 columns with values)."""


@dataclass(frozen=True)
class Calibration:
    """The turn from the detector's frame to the scan's, and how well the data pin it down.

    Apply it with ``field.to_scan_frame(com_x, com_y, angle_deg, flip)``.
    """

    angle_deg: float            #: rotation, degrees in [0, 360), from +x towards +y (see ``field``)
    flip: bool                  #: the detector's rows mirrored (its y axis) before the rotation
    angle_uncertainty_deg: float  #: std of the angle over bootstrap resamples of the rows (statistical only); NaN from 1 row
    curl_ratio: float           #: RMS curl / RMS divergence after the correction; ~0 for a clean electrostatic field
    curl_ratio_other_flip: float  #: the same for the best angle with the other flip; far above curl_ratio if the flip is clear
    polarity: float             #: in [0, 1]: how one-sided the strongest divergence is; near 0: a+180 not resolved
    positions: int              #: positions with a full stencil that the calibration used


def _fit_angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles (radians, in [0, pi)) minimising ``J``, and the minimum ``sum curl**2``, for sums A, B, C."""
    half = (a - b) / 2
    amp = np.hypot(half, c)
    angle = np.mod((np.arctan2(c, half) + np.pi) / 2, np.pi)
    return angle, (a + b) / 2 - amp


def _row_sums(com_x: np.ndarray, com_y: np.ndarray) -> tuple[dict[bool, np.ndarray], np.ndarray, dict]:
    """Per scan row, for each flip, the sums ``A, B, C`` of ``e = F @ (com_x, com_y)`` over the positions with
    a full stencil: ``{flip: (3, ny)}``; that ``ok`` mask; and ``{flip: (curl_e, div_e)}`` with 0 off it.

    Mirroring the rows turns ``com_y`` into ``-com_y``, which only changes the sign of its two derivatives:
    the four derivative maps are taken once and serve both flips. The row sums add up to the fit's sums and
    are what the bootstrap resamples."""
    dxx, dyx, dxy, dyy = d_dx(com_x), d_dy(com_x), d_dx(com_y), d_dy(com_y)
    ok = np.isfinite(dxx) & np.isfinite(dyx) & np.isfinite(dxy) & np.isfinite(dyy)
    dxx, dyx, dxy, dyy = (np.where(ok, d, 0.0) for d in (dxx, dyx, dxy, dyy))
    terms = {False: (dxy - dyx, dxx + dyy), True: (-dxy - dyx, dxx - dyy)}
    sums = {flip: np.stack([(ce * ce).sum(1), (de * de).sum(1), (ce * de).sum(1)]) for flip, (ce, de) in terms.items()}
    return sums, ok, terms


def _angle_spread(per_row: np.ndarray, rows: np.ndarray, best: float, seed: int) -> float:
    """Std (radians) of the best angle over bootstrap resamples of the ``rows`` (those with positions) of the
    (3, ny) row sums; NaN with fewer than 2 rows."""
    if rows.sum() < 2:
        return float("nan")
    per_row, n = per_row[:, rows], int(rows.sum())
    drawn = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))  # rows, with replacement
    counts = np.bincount((drawn + n * np.arange(BOOTSTRAP_SAMPLES)[:, None]).ravel(),
                         minlength=BOOTSTRAP_SAMPLES * n).reshape(BOOTSTRAP_SAMPLES, n)  # times each is drawn
    sums = counts @ per_row.T  # (samples, 3)
    angles, _ = _fit_angle(sums[:, 0], sums[:, 1], sums[:, 2])
    off = np.mod(angles - best + np.pi / 2, np.pi) - np.pi / 2  # the angle is defined modulo pi here
    return float(np.sqrt(np.mean(off**2)))


def calibrate(com_x: np.ndarray, com_y: np.ndarray, *, descan_order: int | None = 1,
              reference: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> Calibration:
    """The rotation angle and flip that turn the COM field ``(com_x, com_y)`` into the scan's frame.

    ``com_x``, ``com_y``: ``(ny, nx)`` maps of the COM in the detector's frame (any unit; NaN where
    unknown). The descan is taken away first (``field.remove_descan``: ``reference`` maps subtracted,
    a polynomial of ``descan_order`` fitted and subtracted) since a plane in position adds a constant
    curl. Raises ``NotEnoughData`` when fewer than 3 positions have all four neighbours known.
    """
    fx, fy = remove_descan(com_x, com_y, descan_order, reference)
    if fx.ndim != 2:
        raise ValueError(f"COM maps must be 2D (ny, nx), not {fx.shape}")
    row_sums, ok, terms = _row_sums(fx, fy)  # the same positions for both flips
    if ok.sum() < 3:
        raise NotEnoughData(f"{ok.sum()} positions have all four neighbours; "
                            "the calibration needs at least 3 scanned rows and 3 columns")
    best = {}
    for flip, per_row in row_sums.items():
        angle, min_sum = _fit_angle(*per_row.sum(1))
        best[flip] = (float(min_sum), float(angle))
    flip = best[True][0] < best[False][0]
    min_sum, angle = best[flip]
    ce, de = terms[flip]
    div = np.cos(angle) * de[ok] - np.sin(angle) * ce[ok]  # divergence of the corrected field
    top = min(div.size, max(3, int(POLARITY_FRACTION * div.size)))
    strongest = np.argpartition(np.abs(div), div.size - top)[div.size - top:]
    polarity = -div[strongest].sum() / max(np.abs(div[strongest]).sum(), np.finfo(float).tiny)
    if polarity < 0:  # the field points away from the scatterers: the other of the two angles
        angle, polarity = angle + np.pi, -polarity
    div_rms = np.sqrt(np.mean(div**2))

    def ratio(s):
        return float(np.sqrt(max(s, 0.0) / ok.sum()) / div_rms) if div_rms > 0 else float("nan")
    # the other flip's ratio is taken against this divergence too, so the two compare on one scale
    return Calibration(
        angle_deg=float(np.rad2deg(angle) % 360.0), flip=bool(flip),
        angle_uncertainty_deg=float(np.rad2deg(_angle_spread(row_sums[flip], ok.any(1), best[flip][1], seed))),
        curl_ratio=ratio(min_sum), curl_ratio_other_flip=ratio(best[not flip][0]),
        polarity=float(polarity), positions=int(ok.sum()))
