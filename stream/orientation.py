"""Detector orientation: which pixel of a frame is row 0, the one place where frames are flipped or transposed.

Every reader and detector adapter hands frames over in the pixel order of the
file or the wire (README, "Detector orientation"). Tools disagree on that
order: RosettaSciIO (so HyperSpy) flips the rows of a Merlin ``.mib`` frame,
LiberTEM keeps them. ``--flip-rows`` and ``--transpose`` (``PreprocessConfig``)
let a user match another tool's convention. They are the first step on every
raw frame, so everything downstream (disc detection, bad pixels, crop,
binning, the maps, the mean pattern, the rrVAE) sees the oriented frame:

- ``flip_rows``: row 0 becomes the last row, ``frame[::-1, :]``;
- ``transpose``: then rows and columns swap, ``frame.T``.

``orient`` returns a view (no copy), which the fused pass reads as it is.
A detector mask given in the file's pixel order takes the same function.
"""

from __future__ import annotations

import numpy as np


def orient(frames: np.ndarray, flip_rows: bool = False, transpose: bool = False) -> np.ndarray:
    """A view of ``frames`` (one (h, w) image or a stack (..., h, w)) with its rows flipped, then transposed.

    Flipping first, then transposing: pixel (i, j) of the result is pixel (h - 1 - j, i) of the file's
    frame when both are set, (j, i) for ``transpose`` alone and (h - 1 - i, j) for ``flip_rows`` alone.
    """
    if frames.ndim < 2:
        raise ValueError(f"orient needs an image (h, w) or a stack of them, got shape {frames.shape}")
    if flip_rows:
        frames = frames[..., ::-1, :]
    if transpose:
        frames = np.swapaxes(frames, -1, -2)
    return frames

