"""EMD 1.0 and py4DSTEM HDF5 (``.emd``, ``.h5``): a 4D ``data`` dataset in an ``emd_group_type`` group.

EMD 1.0 (NCEM) marks a data group with ``emd_group_type = 1`` and describes
its axes with datasets ``dim1 .. dimN`` (attrs ``name``, ``units``);
py4DSTEM (emdfile) marks it ``emd_group_type = "array"`` with ``dim0 .. dimN-1``
and may add a ``calibration`` metadata group (``R_pixel_size``/``units``,
``Q_pixel_size``/``units``). py4DSTEM's datacube is ``(scan, scan, det, det)``
in C order, which is how rrstem sends it. EMD 1.0 files written by HyperSpy
/ RosettaSciIO store the array reversed, ``(det_x, det_y, scan_x, scan_y)``
with ``dim1`` describing the first axis: a file whose ``dim1``/``dim2`` are
angles or reciprocal lengths and ``dim3``/``dim4`` lengths, or whose dims
say neither, is read reversed (lazily, a scan row at a time); one whose
``dim1``/``dim2`` are lengths is read as stored. The step of a dim vector is
its second value minus its first.

Velox (Thermo Fisher) also writes ``.emd`` files, of another layout: a
``Version`` dataset of JSON ``{"format": "Velox", ...}`` and ``Data/Image``,
``Data/Spectrum``, ``Data/SpectrumImage``, ... groups of one ``Data`` each
per uuid. Its images are (h, w, frames) and its spectra 1D; none is a 4D-STEM
scan, so such a file is refused with what it holds (``velox_refusal``).
"""

from __future__ import annotations

from pathlib import Path

import json

import h5py
import numpy as np

from rrstem.simulators.formats.common import Loaded, pick, calibration, length_nm, pixel_mrad, text

ARRAY_TYPES = ("1", "array")


def _is_array_group(obj) -> bool:
    return (isinstance(obj, h5py.Group) and text(obj.attrs.get("emd_group_type", "")) in ARRAY_TYPES
            and isinstance(obj.get("data"), h5py.Dataset))


def is_emd(f: h5py.File) -> bool:
    """Whether an open HDF5 file holds EMD data groups."""
    found = []
    f.visititems(lambda name, obj: found.append(name) if _is_array_group(obj) else None)
    return bool(found)


def _groups(f: h5py.File) -> dict[str, tuple]:
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj["data"].shape) if _is_array_group(obj) else None)
    return found


def _dim(group: h5py.Group, axis: int, zero_based: bool):
    """(step, units) of one axis from its dim vector, or (None, '')."""
    ds = group.get(f"dim{axis if zero_based else axis + 1}")
    if not isinstance(ds, h5py.Dataset) or ds.size < 2:
        return None, ""
    values = np.asarray(ds[:2], dtype=np.float64)
    return float(values[1] - values[0]), text(ds.attrs.get("units", ""))


class Reversed:
    """A 4D h5py dataset stored ``(a3, a2, a1, a0)`` read as ``(a0, a1, a2, a3)``, sliced on the first axis."""

    def __init__(self, ds):
        self.ds = ds
        self.shape = tuple(ds.shape[::-1])
        self.dtype = ds.dtype

    def __getitem__(self, index: slice) -> np.ndarray:
        return np.transpose(self.ds[..., index], (3, 2, 1, 0))


def _kind(step, units) -> str:
    """'length', 'angle' (or reciprocal length) or '' for an axis whose units say neither."""
    if length_nm(step or 1.0, units):
        return "length"
    return "angle" if pixel_mrad(step or 1.0, units, 100.0) else ""


def _py4dstem_calibration(group: h5py.Group) -> dict:
    """py4DSTEM's calibration metadata (R/Q pixel sizes and units) under the array group, if any."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] in ("R_pixel_size", "R_pixel_units",
                                                                          "Q_pixel_size", "Q_pixel_units"):
            v = obj[()]
            out[name.rsplit("/", 1)[-1]] = text(v) if "units" in name else float(np.asarray(v).reshape(-1)[0])
    group.visititems(visit)
    return out


def load(path: Path, key: str | None, f: h5py.File | None = None) -> Loaded:
    """The 4D data group named ``key`` (its path), or the only 4D one."""
    f = f or h5py.File(path, "r")
    try:
        name = pick(_groups(f), key.strip("/") if key else None, "EMD data group", path)
        group = f[name]
        ds = group["data"]
        zero_based = "dim0" in group
        dims = [_dim(group, a, zero_based) for a in range(4)]
        kinds = [_kind(*d) for d in dims]
        reverse = (ds.ndim == 4 and not zero_based and name.rsplit("/", 1)[-1] != "datacube"
                   and kinds[0] != "length" and kinds[2] != "angle")
        if reverse:
            ds, dims = Reversed(ds), dims[::-1]
        (sy, uy), (sx, ux), (qy, uq), (qx, _) = dims
        p4 = _py4dstem_calibration(group)
        energy = None
        for holder in (group, f):
            for attr in ("beam_energy_kev", "energy_kev", "beam_energy"):
                if attr in holder.attrs and energy is None:
                    energy = float(holder.attrs[attr])
        step = length_nm(sx or sy, ux or uy) or length_nm(p4.get("R_pixel_size"), p4.get("R_pixel_units"))
        pixel = (pixel_mrad(qx or qy, uq, energy)
                 or pixel_mrad(p4.get("Q_pixel_size"), p4.get("Q_pixel_units"), energy))
        cal = calibration(energy_kev=energy, detector_pixel_mrad=pixel, scan_step_nm=step)
        meta = {"format": "emd", "key": name, "stored_reversed": reverse, "emd_version": [int(np.asarray(f.attrs[k]).item())
                                                            for k in ("version_major", "version_minor")
                                                            if k in f.attrs]}
        return Loaded(ds, cal, meta, f.close)
    except Exception:
        f.close()
        raise


def velox_version(f: h5py.File) -> str | None:
    """"Velox <version>" if the file is a Velox (or DevelopersKit) EMD file, else None."""
    ds = f.get("Version")
    if not isinstance(ds, h5py.Dataset) or ds.size != 1:
        return None
    try:
        info = json.loads(text(np.asarray(ds[()]).reshape(-1)[0]))
    except (ValueError, TypeError):
        return None
    if not isinstance(info, dict) or info.get("format") not in ("Velox", "DevelopersKit"):
        return None
    return f"{info['format']} {info.get('version', '')}".strip()


def velox_refusal(path: Path, f: h5py.File, version: str) -> str:
    """Why a Velox file without a 4D dataset cannot be analyzed: what it is, and what it holds instead."""
    data = f.get("Data")
    held = []
    for kind in (sorted(data) if isinstance(data, h5py.Group) else []):
        shapes = [g["Data"].shape for g in data[kind].values() if isinstance(g, h5py.Group) and "Data" in g]
        if shapes:
            kinds = sorted({"x".join(map(str, s)) for s in shapes})
            held.append(f"{len(shapes)} {kind} ({', '.join(kinds[:3])}{', ...' if len(kinds) > 3 else ''})")
    return (f"{path.name} holds no 4D data: this looks like a Velox (Thermo Fisher) EMD file ({version}); it holds "
            f"{'; '.join(held) or 'no data'}. rrstem reads a 4D-STEM scan from a 4D dataset (scan y, scan x, detector "
            f"y, detector x), which this file does not have; analyze the camera's own recording of the scan instead "
            f"(.mib, EMPAD .xml, DECTRIS master .h5, ...)")
