"""The EMD 1.0 view of a results file: what py4DSTEM, emdfile and HyperSpy / RosettaSciIO open.

EMD 1.0 (https://emdatasets.com/format/, as py4DSTEM's ``emdfile`` writes it)
marks the file (``emd_group_type = "file"``, ``version_major`` 1,
``version_minor`` 0) and holds trees under top-level ``root`` groups. Each scan
of a results file gets one root, ``/<scan_id>``, beside rrstem's own
``/scans/<scan_id>``:

- every per-position map is an ``array`` group ``/<scan_id>/<map>/`` of class
  ``RealSlice``: its values in ``data`` and one dim vector per axis,
  ``dim0`` (``y``, rows) and ``dim1`` (``x``), ``[0, step]`` with the scan step in
  ``nm`` (``px`` when the step is unknown). ``latent`` (d, ny, nx) is a
  RealSlice stack, stored (ny, nx, d) with labels ``latent_0 ..`` in ``dim2``;
- the mean pattern is the ``DiffractionSlice`` ``/<scan_id>/mean_pattern/``,
  ``dim0`` ``ky``, ``dim1`` ``kx``, one binned pixel in ``mrad`` (``px`` when the
  detector's pixel is unknown);
- the root's ``metadatabundle/calibration`` is py4DSTEM's ``Calibration``
  (``R_pixel_size``/``R_pixel_units``, ``Q_pixel_size``/``Q_pixel_units``), from
  which py4DSTEM calibrates what it reads.

The data are written once: rrstem's ``maps/<map>`` and ``mean_pattern`` are
soft links to these ``data`` datasets (readers that walk the file, such as
RosettaSciIO's, follow hard links only, so the EMD side holds the data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import rrstem

FILE_ATTRS = {"emd_group_type": "file", "version_major": 1, "version_minor": 0}
LENGTH_UNKNOWN = ANGLE_UNKNOWN = "px"  #: dim vector units where the calibration does not say


def mark_file(f: h5py.File) -> None:
    """The EMD 1.0 file header on ``f``'s root attributes."""
    f.attrs.update(FILE_ATTRS, authoring_program=f"rrstem {rrstem.__version__}")


def root_name(scan_id: str) -> str:
    """The top-level EMD root of a scan: its id, but ``scans_`` for a scan called ``scans`` (rrstem's group)."""
    return "scans_" if scan_id == "scans" else scan_id


def scales(attrs: dict[str, Any]) -> tuple[tuple[float, str], tuple[float, str]]:
    """((scan step, unit), (one binned detector pixel, unit)) of a scan, from its results attributes."""
    cal, geometry = attrs.get("calibration") or {}, attrs.get("geometry") or {}
    step, pixel = cal.get("scan_step_nm"), cal.get("detector_pixel_mrad")
    real = (float(step), "nm") if step else (1.0, LENGTH_UNKNOWN)
    diffraction = (float(pixel) * int(geometry.get("bin", 1)), "mrad") if pixel else (1.0, ANGLE_UNKNOWN)
    return real, diffraction


class Root:
    """One scan's EMD root, filled while the scan's rrstem group is written."""

    def __init__(self, f: h5py.File, scan_id: str, attrs: dict[str, Any], calibrated: tuple[str, ...] = ()):
        self.group = f.create_group(root_name(scan_id))
        self.group.attrs.update(emd_group_type="root", python_class="Root", rrstem_scan=f"/scans/{scan_id}")
        self.real, self.diffraction = scales(attrs)
        self._calibration(calibrated)

    def _calibration(self, calibrated: tuple[str, ...]) -> None:
        """py4DSTEM's Calibration; ``calibrated``: the nodes whose dims py4DSTEM sets from it on reading (a
        DataCube's), as py4DSTEM's own writer lists them."""
        bundle = self.group.create_group("metadatabundle")
        bundle.attrs["emd_group_type"] = "metadatabundle"
        cal = bundle.create_group("calibration")
        cal.attrs.update(emd_group_type="metadata", python_class="Calibration")
        (r, r_unit), (q, q_unit) = self.real, self.diffraction
        values = {"R_pixel_size": r, "R_pixel_units": "pixels" if r_unit == LENGTH_UNKNOWN else r_unit,
                  "Q_pixel_size": q, "Q_pixel_units": "pixels" if q_unit == ANGLE_UNKNOWN else q_unit}
        for key, value in values.items():  # emdfile's Metadata layout: a dataset per value, its type as an attr
            kind = "string" if isinstance(value, str) else "number"
            cal.create_dataset(key, data=value.encode() if kind == "string" else value).attrs["type"] = kind.encode()
        if calibrated:
            cal.create_dataset("_root_treepath", data=b"").attrs["type"] = b"string"
            targets = cal.create_group("_target_paths")
            targets.attrs.update(type=b"list_of_strings", length=len(calibrated))
            for i, name in enumerate(calibrated):
                targets.create_dataset(str(i), data=f"/{name}".encode())

    def map(self, name: str, data: np.ndarray, units: str = "") -> h5py.Dataset:
        """A (ny, nx) map as a RealSlice; returns its ``data`` (for rrstem's soft link and attributes)."""
        return self._array(name, "RealSlice", data, units, [("y", self.real), ("x", self.real)])

    def stack(self, name: str, data: np.ndarray, units: str = "") -> None:
        """A (d, ny, nx) stack of maps as a RealSlice stack, (ny, nx, d) with labels ``<name>_<i>``."""
        g = self.group.create_group(name)
        self._fill(g, "RealSlice", np.moveaxis(data, 0, -1), units, [("y", self.real), ("x", self.real)])
        g.create_dataset("dim2", data=[f"{name}_{i}".encode() for i in range(data.shape[0])]).attrs["name"] = "_labels_"

    def pattern(self, name: str, data: np.ndarray) -> h5py.Dataset:
        """An (h, w) binned diffraction pattern as a DiffractionSlice; returns its ``data``."""
        return self._array(name, "DiffractionSlice", data, "counts", [("ky", self.diffraction),
                                                                      ("kx", self.diffraction)])

    def _array(self, name, python_class, data, units, axes) -> h5py.Dataset:
        return self._fill(self.group.create_group(name), python_class, data, units, axes)

    @staticmethod
    def _fill(g: h5py.Group, python_class: str, data: np.ndarray, units: str, axes) -> h5py.Dataset:
        g.attrs.update(emd_group_type="array", python_class=python_class)
        ds = g.create_dataset("data", data=data)
        ds.attrs["units"] = units
        for i, (axis, (step, unit)) in enumerate(axes):
            dim = g.create_dataset(f"dim{i}", data=np.array([0.0, step]))
            dim.attrs.update(name=axis, units=unit)
        return ds

    def datacube(self, name: str, shape: tuple[int, int, int, int], dtype) -> h5py.Dataset:
        """An empty (ny, nx, h, w) ``DataCube`` of binned frames, chunked a scan row at a time, for the caller
        to fill row by row; its dims are py4DSTEM's ``Rx``, ``Ry`` (scan) and ``Qx``, ``Qy`` (detector)."""
        g = self.group.create_group(name)
        g.attrs.update(emd_group_type="array", python_class="DataCube")
        ds = g.create_dataset("data", shape=shape, dtype=dtype, chunks=(1, *shape[1:]))
        ds.attrs["units"] = "counts"
        axes = [("Rx", self.real), ("Ry", self.real), ("Qx", self.diffraction), ("Qy", self.diffraction)]
        for i, (axis, (step, unit)) in enumerate(axes):
            dim = g.create_dataset(f"dim{i}", data=np.array([0.0, step]))
            dim.attrs.update(name=axis, units=unit)
        return ds


def binned_path(results: Path, scan_name: str) -> Path:
    """Where ``--save-frames`` keeps a scan's binned frames: ``<results stem>.<scan>.binned.emd`` beside it."""
    return results.with_name(f"{results.stem}.{scan_name}.binned.emd")


def write_binned(path: Path, scan_id: str, attrs: dict[str, Any], frames: np.ndarray, filled: np.ndarray) -> Path:
    """The binned frames of a scan as an EMD 1.0 file of one root ``<scan_id>``: the py4DSTEM DataCube
    ``datacube`` (ny, nx, h, w) and the RealSlice ``filled``; frames of positions not filled are 0.

    ``frames`` is (ny * nx, h, w) (a scan's frame store), read a scan row at a time; the file is written
    beside ``path`` and then renamed to it, so a reader never sees half of it.
    """
    ny, nx = filled.shape
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            mark_file(f)
            root = Root(f, scan_id, attrs, calibrated=("datacube",))
            ds = root.datacube("datacube", (ny, nx, *frames.shape[1:]), frames.dtype)
            for row in range(ny):
                block = frames[row * nx:(row + 1) * nx]
                ds[row] = np.where(filled[row][:, None, None], block, 0)
            root.map("filled", filled.astype(bool))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
