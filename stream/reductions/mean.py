"""The mean pattern: the running mean of the valid binned frames."""

from __future__ import annotations

import numpy as np

from rrstem.stream.reductions.base import MapSpec, Reduction, register

MEAN_PATTERN = MapSpec("mean_pattern", "", "mean of the binned frames (h, w)", panel=False, per_position=False)


@register
class MeanPattern(Reduction):
    name = "mean_pattern"
    needs_frame_sum = True
    maps = (MEAN_PATTERN,)

    def derive(self, view):
        mean = view.frame_sum / max(view.count, 1)
        return {MEAN_PATTERN.name: mean.astype(np.float32)}
