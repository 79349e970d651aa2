"""NCEM 4D Camera electron-counted data: stempy's sparse HDF5 layout, read lazily as dense count frames.

A counted scan stores, for every detector frame, the flat pixel indices
(``row * width + col``) where an electron struck, not the frame itself; a
576x576 frame with a few hundred electrons is a few hundred numbers. The
layout (stempy ``SparseArray.write_to_hdf5`` / ``from_hdf5``, and its
``docs/source/StempyH5Format.rst``):

- ``/electron_events/frames``: a 1D dataset of variable-length ``uint32``
  arrays, one row per detector frame, holding its events. Attributes ``Nx``,
  ``Ny``: the frame shape, read as stempy does, ``(Nx, Ny)`` rows by columns
  (the 4D Camera's frames are square; without them, 576x576).
- ``/electron_events/scan_positions``: integers; attributes ``Nx`` (scan
  width, the fast axis) and ``Ny`` (scan height): the scan is ``(Ny, Nx)``.
- the file attribute ``version`` (absent: 1). Version 3 stores
  ``n_positions * frames_per_position`` rows, position by position (row
  ``r`` belongs to position ``r // frames_per_position``). Versions 1 and 2
  store one row per frame and ``scan_positions[r]`` says whose it is; in
  version 2 several rows may share a position (several frames per position).
- ``/metadata``: a group of attributes (and nested groups) stempy writes
  from the array's metadata dict; kept in the scan's metadata, and any
  attribute named as a ``Calibration`` field (``energy_kev``,
  ``convergence_mrad``, ``detector_pixel_mrad``, ``scan_step_nm``) calibrates.

A chunk of positions reads only the rows of those positions (an h5py slice
of the variable-length dataset) and builds only those frames densely: each
event is one electron, and a position's frames are summed. Counts come in
the smallest unsigned dtype that holds the most a pixel can receive at a
position: one electron per pixel per frame (as stempy counts them) times the
frames per position; a version-1 file, whose rows may repeat a pixel, gets
uint16. A count above the dtype's maximum (a malformed file) saturates.
A position with no events is a valid frame of zeros.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from rrstem.simulators.formats.common import Loaded, calibration, text

log = logging.getLogger("rrstem.files")

GROUP = "electron_events"
#: The 4D Camera's frame shape, for files whose ``frames`` dataset does not say.
CAMERA_FRAME = (576, 576)
_CAL_FIELDS = ("energy_kev", "convergence_mrad", "detector_pixel_mrad", "scan_step_nm")


def is_stempy(f: h5py.File, key: str | None = None) -> bool:
    """Whether an open HDF5 file holds stempy electron events (and ``key``, if given, names them)."""
    group = f.get(GROUP)
    found = (isinstance(group, h5py.Group) and isinstance(group.get("frames"), h5py.Dataset)
             and isinstance(group.get("scan_positions"), h5py.Dataset))
    return found and (key is None or key.strip("/") == GROUP)


def _counts_dtype(most: int) -> np.dtype:
    """The smallest unsigned dtype that holds ``most``."""
    for name in ("u1", "u2", "u4"):
        if most <= np.iinfo(name).max:
            return np.dtype(name)
    return np.dtype("u8")


def _attrs_tree(group: h5py.Group) -> dict:
    """A group's attributes and its subgroups' as a nested dict of plain values."""
    tree = {}
    for k, v in group.attrs.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, (bytes, np.bytes_)):
            v = text(v)
        elif isinstance(v, np.generic):
            v = v.item()
        tree[k] = v
    for k, v in group.items():
        if isinstance(v, h5py.Group):
            tree[k] = _attrs_tree(v)
    return tree


def _find_calibration(tree: dict) -> dict:
    found = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            found = {**_find_calibration(v), **found}
        elif k in _CAL_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool):
            found[k] = v
    return found


class ElectronEvents:
    """A stempy file's events seen as a flat ``(n_positions, h, w)`` series of dense count frames.

    ``events[a:b]`` reads the rows of positions ``a .. b-1`` only and returns
    their frames, a position's frames summed.
    """

    def __init__(self, path: Path, f: h5py.File):
        self.name = path.name
        group = f[GROUP]
        self.rows = group["frames"]
        positions = group["scan_positions"]
        try:
            self.scan_shape = (int(positions.attrs["Ny"]), int(positions.attrs["Nx"]))
        except KeyError:
            raise ValueError(f"{self.name}: /{GROUP}/scan_positions has no Nx/Ny attributes, so the scan shape "
                             "is unknown") from None
        attrs = self.rows.attrs
        h, w = (int(attrs["Nx"]), int(attrs["Ny"])) if "Nx" in attrs and "Ny" in attrs else CAMERA_FRAME
        self.version = int(f.attrs.get("version", 1))
        n = self.scan_shape[0] * self.scan_shape[1]
        n_rows = self.rows.shape[0]
        if self.version >= 3:
            if n == 0 or n_rows % n:
                raise ValueError(f"{self.name}: {n_rows} frames of events are not a whole number per position "
                                 f"of the {self.scan_shape[0]}x{self.scan_shape[1]} scan (stempy version "
                                 f"{self.version} stores the same number of frames at every position)")
            self.position_of_row = np.arange(n_rows) // (n_rows // n)
        else:
            self.position_of_row = np.asarray(positions[()], dtype=np.int64).reshape(-1)
            if len(self.position_of_row) != n_rows:
                raise ValueError(f"{self.name}: {n_rows} frames of events but {len(self.position_of_row)} scan "
                                 f"positions; stempy version {self.version} gives every frame its position")
            if n_rows and (self.position_of_row.min() < 0 or self.position_of_row.max() >= n):
                raise ValueError(f"{self.name}: scan_positions reach {self.position_of_row.max()}, outside the "
                                 f"{self.scan_shape[0]}x{self.scan_shape[1]} scan")
        self.order = np.argsort(self.position_of_row, kind="stable")
        self.in_order = bool(np.all(self.order == np.arange(n_rows)))
        self.first_row = np.searchsorted(self.position_of_row[self.order], np.arange(n + 1))
        self.frames_per_position = int(np.diff(self.first_row).max()) if n else 0
        most = self.frames_per_position if self.version >= 2 else np.iinfo("u2").max
        self.dtype = _counts_dtype(max(1, most))
        self.shape = (n, h, w)

    def __len__(self) -> int:
        return self.shape[0]

    def _events(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(position of each event, its flat pixel index) for positions ``a .. b-1``."""
        r0, r1 = int(self.first_row[a]), int(self.first_row[b])
        if r0 == r1:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if self.in_order:
            wanted, rows = np.arange(r0, r1), self.rows[r0:r1]
        else:  # h5py reads a list of rows in increasing order
            wanted = np.sort(self.order[r0:r1])
            rows = self.rows[wanted]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        pixels = np.concatenate(list(rows)).astype(np.int64) if lengths.sum() else np.empty(0, np.int64)
        return np.repeat(self.position_of_row[wanted], lengths), pixels

    def __getitem__(self, index: slice) -> np.ndarray:
        a, b, step = index.indices(self.shape[0])
        if step != 1:
            raise ValueError("electron events are read in runs of consecutive positions")
        b = max(a, b)
        n_pixels = self.shape[1] * self.shape[2]
        where, pixels = self._events(a, b)
        if pixels.size and (pixels.min() < 0 or pixels.max() >= n_pixels):
            bad = int(np.argmax((pixels < 0) | (pixels >= n_pixels)))
            raise ValueError(f"{self.name}: position {where[bad]} has an event at pixel {pixels[bad]}, outside "
                             f"its {self.shape[1]}x{self.shape[2]} frame")
        counts = np.bincount((where - a) * n_pixels + pixels, minlength=(b - a) * n_pixels)
        top = np.iinfo(self.dtype).max
        if counts.size and counts.max() > top:  # only a malformed file: say so, once per chunk
            log.warning("%s: %d pixel(s) of positions %d..%d hold more than %d events; counted as %d (saturated)",
                        self.name, int((counts > top).sum()), a, b - 1, top, top)
            np.minimum(counts, top, out=counts)
        return counts.astype(self.dtype).reshape(b - a, *self.shape[1:])


def load(path: Path, key: str | None, f: h5py.File) -> Loaded:
    """A stempy file's electron events as a flat series of count frames in the file's own scan shape."""
    events = ElectronEvents(path, f)
    meta = {"format": "stempy electron events", "stempy_version": events.version,
            "frames_per_position": events.frames_per_position}
    cal = {}
    if isinstance(f.get("metadata"), h5py.Group):
        meta["metadata"] = _attrs_tree(f["metadata"])
        cal = _find_calibration(meta["metadata"])
    return Loaded(events, calibration(**cal), meta, f.close, flat=True, scan_shape=events.scan_shape)
