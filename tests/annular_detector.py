"""A reduction added in one module, as a facility would add one: a virtual annular detector with its own radii.

Nothing else in rrstem is edited for it: ``@register`` makes every scan that
starts afterwards compute it in the fused pass, publish it in snapshots,
write it (with its unit) to the results file, show it on the dashboard and
merge it across shards. (``tests/gui/test_add_a_reduction.py`` checks all of that.)
"""

import numpy as np

from rrstem.stream.reductions import MapSpec, Reduction, Weight, register

INNER, OUTER = 1.5, 3.0  #: in units of the bright-field disc's radius

MAP = MapSpec("annular_1p5_3", "counts", "annular detector, 1.5-3 disc radii")


def annulus(g) -> np.ndarray:
    """(h, w) 0/1: binned pixels from INNER to OUTER disc radii off the disc centre."""
    ky, kx = np.mgrid[0:g.binned_shape[0], 0:g.binned_shape[1]]
    r = np.hypot(ky - g.center[0], kx - g.center[1]) / g.radius
    return ((r >= INNER) & (r < OUTER)).astype(np.float64)


ANNULUS = Weight("annulus_1p5_3", annulus)


@register
class AnnularDetector(Reduction):
    name = "annular_1p5_3"
    weights = (ANNULUS,)
    maps = (MAP,)

    def derive(self, view):
        return {MAP.name: view.scatter(view.column(ANNULUS))}
