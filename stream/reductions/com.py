"""Centre of mass (COM) of each frame, relative to the COM of the mean pattern.

The sums (intensity and the two first moments) are kept raw; the COM is
formed only when the maps are derived, relative to the COM of the mean of the
filled positions' frames, so nothing goes stale as that mean changes. In
binned pixels, or in mrad when the start message gives the detector's pixel
size. A frame with no counts has no COM: NaN there.
"""

from __future__ import annotations

import numpy as np

from rrstem.stream.reductions.base import MapSpec, Reduction, register
from rrstem.stream.reductions.weights import INTENSITY, MOMENT_X, MOMENT_Y

COM_X = MapSpec("com_x", "px", "centre of mass along x, relative to the mean pattern's", panel=False)
COM_Y = MapSpec("com_y", "px", "centre of mass along y, relative to the mean pattern's", panel=False)
COM_MAGNITUDE = MapSpec("com_magnitude", "px", "COM magnitude")
COM_ANGLE = MapSpec("com_angle", "rad", "COM direction, atan2(com_y, com_x)", panel=False)


def com_at(view, pixel_mrad: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(n_filled,) COM x and y at the filled positions, relative to the mean pattern's, in mrad (binned detector
    pixels of ``pixel_mrad``) or in binned pixels; NaN for a frame with no counts. The one COM computation,
    done once per view (``View.once``): the caller must not change the arrays."""
    return view.once(("com", pixel_mrad), lambda: _com(view, pixel_mrad))


def _com(view, pixel_mrad: float | None) -> tuple[np.ndarray, np.ndarray]:
    i, mx, my = view.column(INTENSITY), view.column(MOMENT_X), view.column(MOMENT_Y)
    if not len(i):
        return i, i
    scale = pixel_mrad or 1.0
    with np.errstate(invalid="ignore", divide="ignore"):  # a frame (or a scan) with no counts has no COM: NaN
        total = i.sum()
        ref_x = mx.sum() / total  # the COM of the mean pattern
        ref_y = my.sum() / total
        return (mx / i - ref_x) * scale, (my / i - ref_y) * scale


@register
class CentreOfMass(Reduction):
    name = "com"
    weights = (INTENSITY, MOMENT_X, MOMENT_Y)
    maps = (COM_X, COM_Y, COM_MAGNITUDE, COM_ANGLE)

    @property
    def unit(self) -> str:
        return "mrad" if self.info.pixel_mrad else "px"

    def specs(self):
        return tuple(m if m is COM_ANGLE else MapSpec(m.name, self.unit, m.description, m.panel) for m in self.maps)

    def derive(self, view):
        com_x, com_y = com_at(view, self.info.pixel_mrad)
        return {COM_X.name: view.scatter(com_x), COM_Y.name: view.scatter(com_y),
                COM_MAGNITUDE.name: view.scatter(np.hypot(com_x, com_y)),
                COM_ANGLE.name: view.scatter(np.arctan2(com_y, com_x))}
