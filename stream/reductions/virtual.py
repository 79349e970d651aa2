"""Virtual detectors: bright field (inside the disc) and annular dark field, summed per position."""

from __future__ import annotations

from rrstem.stream.reductions.base import MapSpec, WeightMap, register
from rrstem.stream.reductions.weights import ANNULAR_DARK_FIELD, BRIGHT_FIELD

VBF = MapSpec("vbf", "", "virtual bright field")
VADF = MapSpec("vadf", "", "virtual annular dark field")


@register
class VirtualBrightField(WeightMap):
    name = "vbf"
    weights = (BRIGHT_FIELD,)
    maps = (VBF,)


@register
class VirtualAnnularDarkField(WeightMap):
    name = "vadf"
    weights = (ANNULAR_DARK_FIELD,)
    maps = (VADF,)
