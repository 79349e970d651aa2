"""The table of detector weights: every per-frame quantity the common reductions need, built in one place.

The fused pass (``stream/framepass.py``) always computes ``INTENSITY`` (the
frame's total, which also decides whether a frame is valid) and then one
dot product per further weight of the scan's table, in the loop it generates
for that many weights.
"""

from __future__ import annotations

import numpy as np

from rrstem.stream.preprocess import Geometry
from rrstem.stream.reductions.base import Reduction, Weight


def _radius(g: Geometry) -> np.ndarray:
    """(h, w) distance of each binned pixel from the disc centre, binned pixels."""
    h, w = g.binned_shape
    ky, kx = np.mgrid[0:h, 0:w]
    return np.hypot(ky - g.center[0], kx - g.center[1])


def _columns(g: Geometry) -> np.ndarray:
    return np.broadcast_to(np.arange(g.binned_shape[1], dtype=np.float64), g.binned_shape)


def _rows(g: Geometry) -> np.ndarray:
    return np.broadcast_to(np.arange(g.binned_shape[0], dtype=np.float64)[:, None], g.binned_shape)


INTENSITY = Weight("intensity", lambda g: np.ones(g.binned_shape))  #: the frame's total counts
MOMENT_X = Weight("moment_x", _columns)  #: first moment along the detector's x (columns)
MOMENT_Y = Weight("moment_y", _rows)  #: first moment along the detector's y (rows)
BRIGHT_FIELD = Weight("bright_field", lambda g: (_radius(g) <= g.radius).astype(np.float64))  #: inside the disc
ANNULAR_DARK_FIELD = Weight(  #: the annulus from ``adf_inner`` to ``adf_outer``
    "annular_dark_field", lambda g: ((_radius(g) >= g.adf_inner) & (_radius(g) <= g.adf_outer)).astype(np.float64))

#: the weights of the built-in reductions, in the order of their columns
BUILT_IN = (INTENSITY, MOMENT_X, MOMENT_Y, BRIGHT_FIELD, ANNULAR_DARK_FIELD)


def weight_table(reductions: tuple[type[Reduction], ...]) -> tuple[Weight, ...]:
    """The scan's weights: ``INTENSITY`` first, then every other weight the reductions declare, once each,
    in declaration order. Two different weights under one name are refused."""
    table: dict[str, Weight] = {INTENSITY.name: INTENSITY}
    for r in reductions:
        for w in r.weights:
            known = table.setdefault(w.name, w)
            if known is not w and known.build is not w.build:
                raise ValueError(f"two reductions declare different weights named {w.name!r}; rename one")
    return tuple(table.values())


def weight_images(table: tuple[Weight, ...], geometry: Geometry) -> np.ndarray:
    """(k, h, w) float64: each weight of ``table`` built for ``geometry``."""
    out = np.empty((len(table), *geometry.binned_shape), dtype=np.float64)
    for i, w in enumerate(table):
        img = np.asarray(w.build(geometry), dtype=np.float64)
        if img.shape != geometry.binned_shape:
            raise ValueError(f"weight {w.name!r} is {img.shape}, the binned frame {geometry.binned_shape}")
        out[i] = img
    return out
