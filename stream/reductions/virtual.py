"""Virtual detectors: bright field (inside the disc) and annular dark field, summed per position."""

from __future__ import annotations

from rrstem.stream.reductions.base import MapSpec, Reduction, register
from rrstem.stream.reductions.weights import ANNULAR_DARK_FIELD, BRIGHT_FIELD

VBF = MapSpec("vbf", "", "virtual bright field")
VADF = MapSpec("vadf", "", "virtual annular dark field")


@register
class VirtualBrightField(Reduction):
    name = "vbf"
    weights = (BRIGHT_FIELD,)
    maps = (VBF,)

    def derive(self, view):
        return {VBF.name: view.scatter(view.column(BRIGHT_FIELD))}


@register
class VirtualAnnularDarkField(Reduction):
    name = "vadf"
    weights = (ANNULAR_DARK_FIELD,)
    maps = (VADF,)

    def derive(self, view):
        return {VADF.name: view.scatter(view.column(ANNULAR_DARK_FIELD))}
