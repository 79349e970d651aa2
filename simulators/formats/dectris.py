"""DECTRIS master/data HDF5 (NeXus): ``X_master.h5`` links ``/entry/data/data_NNNNNN`` to ``X_data_NNNNNN.h5``.

Each data file holds ``/entry/data/data``, a ``(n, h, w)`` block of the
series, usually bitshuffle-LZ4 compressed: ``hdf5plugin`` registers that
filter with h5py. The series is flat (no scan shape), read block by block
across the data files. Calibration: the electron wavelength
(``/entry/instrument/beam/incident_wavelength``, Angstrom) gives the beam
energy, and the pixel size over the detector distance gives the pixel angle.
The detector's own ``pixel_mask`` (non-zero: a gap, dead, hot or noisy pixel)
goes to the start message's ``bad_pixels``, so those pixels are masked.
A data file that is missing or unreadable ends the series there.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 HDF5 filters)
import numpy as np

from rrstem.simulators.formats.common import Loaded, calibration, energy_from_wavelength_kev

_DATA_LINK = re.compile(r"^data_\d{6}$")


class FrameSeries:
    """Several ``(n_i, h, w)`` datasets read as one ``(sum n_i, h, w)`` series, by slices."""

    def __init__(self, blocks: list):
        self.blocks = blocks
        self.starts = np.cumsum([0] + [b.shape[0] for b in blocks])
        self.shape = (int(self.starts[-1]), *blocks[0].shape[1:])
        self.dtype = blocks[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        first, stop, _ = index.indices(self.shape[0])
        parts = []
        for block, b0, b1 in zip(self.blocks, self.starts[:-1], self.starts[1:]):
            lo, hi = max(first, b0), min(stop, b1)
            if lo < hi:
                parts.append(block[lo - b0:hi - b0])
        if not parts:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def is_master(f: h5py.File) -> bool:
    """Whether an open HDF5 file is a DECTRIS master file (data links under /entry/data)."""
    group = f.get("entry/data", getclass=True)
    return group is h5py.Group and any(_DATA_LINK.match(k) for k in f["entry/data"].keys())


def _number(f: h5py.File, path: str) -> float | None:
    try:
        return float(np.asarray(f[path][()]).reshape(-1)[0])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _pixel_mask(f: h5py.File, frame_shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """[row, col] of the pixels the detector's ``pixel_mask`` marks (non-zero: gap, dead, hot, noisy...), where
    the master has one of the frame's shape."""
    mask = f.get("entry/instrument/detector/detectorSpecific/pixel_mask")
    if not isinstance(mask, h5py.Dataset) or mask.shape != tuple(frame_shape):
        return ()
    return tuple((int(r), int(c)) for r, c in np.argwhere(mask[()] != 0))


def load_master(path: Path, key: str | None, f: h5py.File | None = None) -> Loaded:
    """The flat frame series of a DECTRIS master file, across its data files."""
    if key is not None:
        raise ValueError(f"{path.name} is a DECTRIS master file with one series; drop key={key!r}")
    f = f or h5py.File(path, "r")
    try:
        data = f["entry/data"]
        blocks, problem = [], None
        for name in sorted(k for k in data.keys() if _DATA_LINK.match(k)):
            link = data.get(name, getlink=True)
            target = Path(link.filename) if isinstance(link, h5py.ExternalLink) else None
            if target is not None and not (path.parent / target).is_file():
                problem = (f"{path.name}: data file {target} ({name}) is missing from {path.parent}; "
                           "frames from there on are missing")
                break
            try:
                block = data[name]
            except (KeyError, OSError) as exc:
                problem = f"{path.name}: {name} cannot be read ({exc}); frames from there on are missing"
                break
            if block.ndim != 3:
                raise ValueError(f"{path.name}: {name} has shape {block.shape}, not a (n, h, w) series of frames")
            blocks.append(block)
        if not blocks:
            raise ValueError(problem or f"{path.name} is a DECTRIS master file that links no data files")
        det = "entry/instrument/detector/"
        nimages = _number(f, det + "detectorSpecific/nimages")
        ntrigger = _number(f, det + "detectorSpecific/ntrigger") or 1
        wavelength = _number(f, "entry/instrument/beam/incident_wavelength")
        pixel, distance = _number(f, det + "x_pixel_size"), _number(f, det + "detector_distance")
        cal = calibration(energy_kev=energy_from_wavelength_kev(wavelength) if wavelength else None,
                          detector_pixel_mrad=pixel / distance * 1e3 if pixel and distance else None)
        series = FrameSeries(blocks)
        total = int(nimages * ntrigger) if nimages else None
        if problem is None and total is not None and total > len(series):
            problem = f"{path.name}: holds {len(series)} of the {total} frames its header announces"
        meta = {"format": "dectris-master", "data_files": [Path(b.file.filename).name for b in blocks]}
        for field in ("description", "serial_number", "count_time", "frame_time"):
            value = f.get(det + field)
            if isinstance(value, h5py.Dataset) and value.shape in ((), (1,)):
                v = value[()]
                meta[field] = v.decode(errors="replace") if isinstance(v, bytes) else np.asarray(v).item()
        return Loaded(series, cal, meta, f.close, flat=True, problem=problem, n_frames=total,
                      bad_pixels=_pixel_mask(f, series.shape[1:]))
    except Exception:
        f.close()
        raise
