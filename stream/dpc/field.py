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


def _monomials(shape: tuple[int, int], order: int) -> np.ndarray:
    """The 2D polynomial terms ``x**i * y**j`` (i + j <= order) on the grid, coordinates scaled to [-1, 1]."""
    ny, nx = shape
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    return np.stack([x**i * y**j for n in range(order + 1) for j in range(n + 1) for i in [n - j]], axis=-1)


def fit_descan(com_x: np.ndarray, com_y: np.ndarray, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares polynomial of ``order`` (0: a constant, 1: a plane, ...) fitted to each component.

    The fit uses the positions where both components are finite (one set, so the fit commutes with
    turning the field: fitting, then rotating, equals rotating, then fitting) and is evaluated on the
    whole grid. Descan (the beam moving on the detector as it scans) is slow and smooth in position,
    so a plane usually models it; the fit also takes away any real field that is a plane in position.
    """
    if order < 0:
        raise ValueError(f"descan order must be 0 (constant), 1 (plane) or higher, not {order}")
    com_x, com_y = np.asarray(com_x, float), np.asarray(com_y, float)
    terms = _monomials(com_x.shape, order)
    known = np.isfinite(com_x) & np.isfinite(com_y)
    if not known.any():
        return np.zeros(com_x.shape), np.zeros(com_x.shape)
    coef, *_ = np.linalg.lstsq(terms[known], np.stack([com_x[known], com_y[known]], axis=-1), rcond=None)
    fit = terms @ coef  # (ny, nx, 2)
    return fit[..., 0], fit[..., 1]


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
