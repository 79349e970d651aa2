"""The COM field on the scan grid: turning it into the scan frame, its curl and divergence, and descan.

Conventions, used by every module of this package:

- A map is a 2D array ``(ny, nx)``: axis 0 is y (scan rows, top to bottom), axis 1 is x (scan columns,
  left to right). The detector's x is its columns and its y its rows, in the same way.
- A field is a pair of maps ``(fx, fy)``: its component along x (columns) and along y (rows).
- NaN marks a position with no value (not yet scanned, or a frame with no counts). Every function here
  keeps NaN where it has no data and never lets it spread further than its stencil needs.
- ``angle_deg`` turns a vector from the detector's frame into the scan's:
  ``scan = R(angle) @ F @ detector`` on ``(x, y)`` column vectors, with
  ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` (from +x towards +y: clockwise on a screen that shows
  row 0 at the top) and ``F = diag(1, -1)`` when ``flip`` is set, else the identity. ``flip`` is the
  mirror of the detector's rows (its y axis: row r becomes row ny-1-r), applied before the rotation.
  ``flip`` with 180 degrees is the mirror of the detector's columns.
"""

from __future__ import annotations

import numpy as np


def to_scan_frame(com_x: np.ndarray, com_y: np.ndarray, angle_deg: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """The detector-frame field ``(com_x, com_y)`` in the scan's frame: ``R(angle) @ F @ (com_x, com_y)``."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    ex, ey = np.asarray(com_x, float), (-1.0 if flip else 1.0) * np.asarray(com_y, float)
    return c * ex - s * ey, s * ex + c * ey


def d_dx(f: np.ndarray) -> np.ndarray:
    """Central difference along x (columns), per scan step; NaN in the first and last column and beside NaN."""
    out = np.full(f.shape, np.nan)
    out[:, 1:-1] = (f[:, 2:] - f[:, :-2]) / 2
    return out


def d_dy(f: np.ndarray) -> np.ndarray:
    """Central difference along y (rows), per scan step; NaN in the first and last row and beside NaN."""
    out = np.full(f.shape, np.nan)
    out[1:-1] = (f[2:] - f[:-2]) / 2
    return out


def curl(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """``dfy/dx - dfx/dy`` by central differences, per scan step; NaN unless all four neighbours are finite."""
    return d_dx(fy) - d_dy(fx)


def divergence(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """``dfx/dx + dfy/dy`` by central differences, per scan step; NaN unless all four neighbours are finite."""
    return d_dx(fx) + d_dy(fy)


def _powers(order: int) -> list[tuple[int, int]]:
    """The exponents ``(i, j)`` of the 2D polynomial terms ``x**i * y**j`` with ``i + j <= order``."""
    return [(n - j, j) for n in range(order + 1) for j in range(n + 1)]


def fit_descan(com_x: np.ndarray, com_y: np.ndarray, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares polynomial of ``order`` (0: a constant, 1: a plane, ...) fitted to each component.

    The fit uses the positions where both components are finite (one set, so the fit commutes with
    turning the field: fitting, then rotating, equals rotating, then fitting) and is evaluated on the
    whole grid, with coordinates scaled to [-1, 1]. Descan (the beam moving on the detector as it scans)
    is slow and smooth in position, so a plane usually models it; the fit also takes away any real
    field that is a plane in position.

    The terms are products of a power of x and a power of y, so the normal equations' sums over the
    known positions are matrix products of the known mask with the powers of each axis: a few passes
    over the maps, not a design matrix per position (a 512x512 plane fit in a few ms).
    """
    if order < 0:
        raise ValueError(f"descan order must be 0 (constant), 1 (plane) or higher, not {order}")
    com_x, com_y = np.asarray(com_x, float), np.asarray(com_y, float)
    known = np.isfinite(com_x) & np.isfinite(com_y)
    if not known.any():
        return np.zeros(com_x.shape), np.zeros(com_x.shape)
    ny, nx = com_x.shape
    xp = np.linspace(-1, 1, nx)[:, None] ** np.arange(2 * order + 1)  # (nx, 2 order + 1): x**i
    yp = np.linspace(-1, 1, ny)[:, None] ** np.arange(2 * order + 1)  # (ny, 2 order + 1): y**j
    moments = yp.T @ known.astype(float) @ xp  # [j, i]: sum of y**j x**i over the known positions
    powers = _powers(order)
    gram = np.array([[moments[j + jj, i + ii] for ii, jj in powers] for i, j in powers])
    sums = [yp[:, :order + 1].T @ np.where(known, f, 0.0) @ xp[:, :order + 1] for f in (com_x, com_y)]
    rhs = np.array([[m[j, i] for m in sums] for i, j in powers])  # (terms, 2)
    coef = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    fits = []
    for c in coef.T:
        table = np.zeros((order + 1, order + 1))  # [j, i]: the coefficient of y**j x**i
        for (i, j), value in zip(powers, c):
            table[j, i] = value
        fits.append(yp[:, :order + 1] @ table @ xp[:, :order + 1].T)
    return fits[0], fits[1]


def remove_descan(com_x: np.ndarray, com_y: np.ndarray, order: int | None = 1,
                  reference: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The field less its descan: first ``reference`` subtracted (a vacuum scan's ``(com_x, com_y)``, same
    grid and units), then a polynomial of ``order`` fitted and subtracted (None: no fit). NaN stays NaN."""
    fx, fy = np.asarray(com_x, float), np.asarray(com_y, float)
    if reference is not None:
        rx, ry = (np.asarray(r, float) for r in reference)
        if rx.shape != fx.shape or ry.shape != fy.shape:
            raise ValueError(f"the reference COM maps are {rx.shape} and {ry.shape}; "
                             f"they must be on the scan's grid, {fx.shape}")
        fx, fy = fx - rx, fy - ry
    if order is not None:
        px, py = fit_descan(fx, fy, order)
        fx, fy = fx - px, fy - py
    return fx, fy
