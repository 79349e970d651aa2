"""Bad pixels of a detector: those named by the user or by the detector, and those a scan's first frames show.

Every masked pixel carries its reasons, bits of a ``uint8`` (``REASONS``):
given by the user (``--mask FILE``), named by the detector or its file (the
start message's ``bad_pixels``: a DECTRIS master's ``pixel_mask``, a stream2
start's), stuck at the dtype maximum, hot, or dead.

Hot and dead pixels are found from their counts summed over the calibration
frames, against their 8 neighbours'. The rules hold for sparse counted frames
(most pixels 0, a few counts each) as for dense ones:

- hot: far above the *brightest* of its neighbours (``factor`` times its
  counts, plus 5 Poisson sigma), steadily: its median frame times the number
  of frames must be that far above too, and it counts in most frames
  (``PERSISTENT``). A stroke or a spot of signal has a bright neighbour along
  it, so it is never isolated; a single counted event, however large, is in
  one frame only, so it is not steady. (The median of the neighbours, as used
  before, called every pixel of a one-pixel-wide stroke hot.) Two hot pixels
  side by side hide each other.
- dead: no counts at all in any frame, where each of its neighbours (but
  masked ones) counted at least ``DEAD_COUNTS``: the chance of that by
  Poisson noise is below ``exp(-DEAD_COUNTS)``; a dark pixel between strokes
  of signal has dark neighbours too. Masking a dead pixel changes no sum (it holds
  no counts); it is reported.

With fewer than ``MIN_FRAMES`` calibration frames, no pixel is called hot or
dead (one frame cannot tell a hot pixel from a sharp spot, nor a few frames
persistence from chance); the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("rrstem.badpixels")

GIVEN, DETECTOR, SATURATED, HOT, DEAD = 1, 2, 4, 8, 16
#: Bit -> what it means; the ``legend`` attribute of ``pixel_mask_reason`` in the results file.
REASONS = {
    GIVEN: "given by the user (--mask FILE)",
    DETECTOR: "named by the detector or its file (the start message's bad_pixels)",
    SATURATED: "at the dtype maximum in every calibration frame (stuck)",
    HOT: "hot: far above its brightest neighbour, counting in most calibration frames",
    DEAD: "dead: no counts in any calibration frame, where each of its neighbours counted",
}
#: Fewest calibration frames from which hot and dead pixels are judged.
MIN_FRAMES = 8
#: A hot pixel counts in at least this fraction of the calibration frames.
PERSISTENT = 0.75
#: Each of a dead pixel's neighbours counted at least this many over the calibration frames.
DEAD_COUNTS = 20.0


def _neighbours(img: np.ndarray) -> np.ndarray:
    """(8, h, w): the 8 neighbours of every pixel (edges mirrored, never the pixel itself)."""
    p = np.pad(img, 1, mode="reflect")
    h, w = img.shape
    return np.stack([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])


def find_outliers(frames: np.ndarray, known: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """(hot, dead): boolean (h, w) masks of the raw calibration frames (n, h, w); ``known`` pixels (already
    masked) are neither, and count as dark neighbours. ``factor``: how many times its brightest neighbour's
    counts a hot pixel has, beyond 5 Poisson sigma."""
    n, h, w = frames.shape
    none = np.zeros((h, w), dtype=bool)
    if n < MIN_FRAMES or h < 3 or w < 3:
        log.info("hot and dead pixels not looked for: %d calibration frame(s) of %dx%d pixels; they are judged from "
                 "%d frames or more (--calibration-frames)", n, h, w, MIN_FRAMES)
        return none, none
    total = frames.sum(axis=0, dtype=np.float64)
    total[known] = 0
    brightest = np.maximum(_neighbours(total).max(axis=0), 0)
    expected = factor * brightest
    limit = expected + 5 * np.sqrt(expected + 1)
    hot = np.zeros((h, w), dtype=bool)
    rows, cols = np.nonzero((total > limit) & ~known)  # candidates (few): then the per-frame test, robustly
    if len(rows):
        steady = n * np.median(frames[:, rows, cols], axis=0)  # its sum without the odd frame's single event
        counting = np.count_nonzero(frames[:, rows, cols] > 0, axis=0)
        hot[rows, cols] = (steady > limit[rows, cols]) & (counting >= PERSISTENT * n)
    lit = np.where(known | hot, np.inf, total)  # a masked neighbour neither lights nor darkens a pixel
    dead = (total == 0) & (_neighbours(lit).min(axis=0) >= DEAD_COUNTS) & ~known & ~hot
    return hot, dead


def reasons_of(frames: np.ndarray, known: np.ndarray, mask_saturated: bool, mask_outliers: bool,
               factor: float) -> np.ndarray:
    """The (h, w) uint8 reasons of every pixel: ``known`` (the given and detector bits) plus what the raw
    calibration frames (n, h, w) show."""
    reasons = known.astype(np.uint8, copy=True)
    if mask_saturated and frames.dtype.kind in "ui":
        reasons[(frames == np.iinfo(frames.dtype).max).all(axis=0)] |= SATURATED
    if mask_outliers:
        hot, dead = find_outliers(frames, reasons != 0, factor)
        reasons[hot] |= HOT
        reasons[dead] |= DEAD
    return reasons


def load_mask(spec: str) -> np.ndarray:
    """The boolean detector mask in ``spec``: ``FILE.npy``, or an HDF5 ``FILE`` with one 2D dataset, or
    ``FILE:DATASET``. Non-zero (True) is masked, as in DECTRIS' ``pixel_mask``."""
    path, _, key = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"mask file {path!r} not found")
    if p.suffix.lower() == ".npy":
        if key:
            raise ValueError(f"mask {spec!r}: a .npy file holds one array; drop ':{key}'")
        arr = np.load(p, allow_pickle=False)
    else:
        arr = _h5_mask(p, key)
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.dtype.kind not in "biuf":
        raise ValueError(f"mask {spec!r} is a {arr.dtype} array of shape {arr.shape}; it must be a 2D array of "
                         "numbers or booleans (non-zero = masked)")
    return arr != 0


def _h5_mask(path: Path, key: str) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"mask file {path.name} is neither .npy nor HDF5") from None
    with f:
        if key:
            if not isinstance(f.get(key), h5py.Dataset):
                raise ValueError(f"mask file {path.name} has no dataset {key!r}")
            return f[key][()]
        found = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim == 2 else None)
        if len(found) != 1:
            raise ValueError(f"mask file {path.name} has {len(found)} 2D datasets ({', '.join(found[:5])}); "
                             f"name one: --mask {path.name}:DATASET")
        return f[found[0]][()]


def known_reasons(frame_shape: tuple[int, int], given: np.ndarray | None,
                  bad_pixels: list | tuple = ()) -> np.ndarray:
    """The (h, w) uint8 reasons known before any frame: ``given`` (the user's mask, checked against the frame
    shape) and ``bad_pixels`` ([row, col] the detector named)."""
    reasons = np.zeros(frame_shape, dtype=np.uint8)
    if given is not None:
        if given.shape != tuple(frame_shape):
            raise ValueError(f"the detector mask is {given.shape[0]}x{given.shape[1]} pixels, the frames are "
                             f"{frame_shape[0]}x{frame_shape[1]}: give a mask of the raw frame's shape (--mask)")
        reasons[given] |= GIVEN
    if len(bad_pixels):
        rc = np.asarray(bad_pixels, dtype=np.int64).reshape(-1, 2)
        reasons[rc[:, 0], rc[:, 1]] |= DETECTOR
    return reasons
