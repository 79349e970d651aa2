"""Recorded 4D-STEM scans as replay sources: ``.npy``, ``.npz``, HDF5 and Nion Swift ``.ndata1``.

``open_file(path, key=None)`` returns a ``Source`` over a ``(ny, nx, h, w)``
array in the file's own dtype. ``.npy`` and uncompressed ``.ndata1`` are
memory-mapped and HDF5 datasets are read a few scan rows at a time, so a
replay never holds the whole scan in memory; ``.npz`` members are loaded.
Calibration comes from the file where it has one: HDF5 attributes named like
the ``Calibration`` fields, or the Nion dimensional calibrations and
high tension.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np

from rrstem.simulators.optics import wavelength_angstrom
from rrstem.simulators.source import ArraySource
from rrstem.stream.protocol import DTYPES, Calibration, Start

SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".ndata1", ".mib", ".hdr")
_CAL_FIELDS = ("energy_kev", "convergence_mrad", "detector_pixel_mrad", "scan_step_nm")


def _check_array(shape, dtype, what: str) -> np.dtype:
    if len(shape) != 4:
        raise ValueError(f"{what} has shape {tuple(shape)}, not 4D; replay needs (scan_y, scan_x, det_y, det_x)")
    dtype = np.dtype(dtype)
    if dtype.name not in DTYPES:
        raise ValueError(
            f"{what} has dtype {dtype}, which rrstem/1 does not carry; "
            f"convert it to one of {', '.join(DTYPES)} (e.g. arr.astype('float32'))"
        )
    return dtype


def _scan_id(path: Path, key: str | None) -> str:
    name = path.stem + (f"-{key}" if key else "")
    return re.sub(r"[^A-Za-z0-9_.:+-]+", "_", name)[:128] or "replay"


def _pick(candidates: dict[str, tuple], key: str | None, what: str, path: Path) -> str:
    """The 4D entry named ``key``, or the only 4D entry; clear errors otherwise."""
    four_d = [k for k, shape in candidates.items() if len(shape) == 4]
    listing = ", ".join(f"{k} {tuple(s)}" for k, s in candidates.items()) or "none"
    if key is not None:
        if key not in candidates:
            raise ValueError(f"{path.name} has no {what} {key!r}; it holds: {listing}")
        return key
    if len(four_d) == 1:
        return four_d[0]
    if not four_d:
        raise ValueError(f"{path.name} holds no 4D {what}; it holds: {listing}")
    raise ValueError(f"{path.name} holds several 4D {what}s ({', '.join(four_d)}); choose one with key= / --key")


def _npy_header(fh) -> tuple[tuple, np.dtype, bool, int]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    return shape, dtype, fortran, fh.tell()


def _load_npy(path: Path, key: str | None):
    if key is not None:
        raise ValueError(f"{path.name} is a .npy file with one array; drop key={key!r}")
    arr = np.load(path, mmap_mode="r")
    return arr, Calibration(), {}, None


def _load_npz(path: Path, key: str | None):
    with zipfile.ZipFile(path) as zf:
        shapes = {}
        for name in zf.namelist():
            if name.endswith(".npy"):
                with zf.open(name) as fh:
                    shapes[name[:-4]] = _npy_header(fh)[0]
    if key is not None and key.endswith(".npy"):
        key = key[:-4]
    name = _pick(shapes, key, "array", path)
    with np.load(path, allow_pickle=False) as npz:
        arr = npz[name]
    return arr, Calibration(), {"key": name}, None


def _h5_datasets(f: h5py.File) -> dict[str, tuple]:
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset) else None)
    return found


def _h5_calibration(ds: h5py.Dataset) -> Calibration:
    """Calibration fields from attributes of the dataset, or else of its parent group."""
    values = {}
    for holder in (ds.parent, ds):
        for field in _CAL_FIELDS:
            if field in holder.attrs:
                values[field] = float(holder.attrs[field])
    return Calibration(**values)


def _load_h5(path: Path, key: str | None):
    f = h5py.File(path, "r")
    try:
        name = _pick(_h5_datasets(f), key.lstrip("/") if key else None, "dataset", path)
        ds = f[name]
        meta = {"key": name, **{k: _plain(v) for k, v in ds.attrs.items() if k not in _CAL_FIELDS}}
        return ds, _h5_calibration(ds), meta, f.close
    except Exception:
        f.close()
        raise


def _plain(value):
    """HDF5 attribute values as JSON/msgpack-friendly Python values."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _zip_member_memmap(path: Path, zf: zipfile.ZipFile, member: str):
    """Memory-map an uncompressed .npy inside a zip; None if it is compressed."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        shape, dtype, fortran, offset = _npy_header(fh)
    if fortran:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _find_number(tree, names: tuple[str, ...]):
    """First numeric value stored under any of ``names`` anywhere in a nested dict."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in names and isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        for v in tree.values():
            found = _find_number(v, names)
            if found is not None:
                return found
    return None


_LENGTH_NM = {"nm": 1.0, "Å": 0.1, "A": 0.1, "angstrom": 0.1, "pm": 1e-3, "um": 1e3, "µm": 1e3, "m": 1e9}
_ANGLE_MRAD = {"mrad": 1.0, "rad": 1e3, "urad": 1e-3, "µrad": 1e-3}
_RECIPROCAL_PER_NM = {"1/nm": 1.0, "1/Å": 10.0, "1/A": 10.0, "1/m": 1e-9}


def nion_calibration(meta: dict) -> Calibration:
    """Scan step, detector pixel angle and energy from a Nion Swift ``metadata.json``."""
    cals = meta.get("dimensional_calibrations") or []
    hv = _find_number(meta.get("metadata", {}), ("high_tension", "high_tension_v"))
    energy = hv / 1e3 if hv else None
    conv = _find_number(meta.get("metadata", {}), ("convergence_angle_mrad", "convergence_mrad"))
    step = pixel = None
    if len(cals) == 4:
        s_unit, s_scale = cals[0].get("units", ""), cals[0].get("scale")
        d_unit, d_scale = cals[2].get("units", ""), cals[2].get("scale")
        if s_scale and s_unit in _LENGTH_NM:
            step = abs(s_scale) * _LENGTH_NM[s_unit]
        if d_scale and d_unit in _ANGLE_MRAD:
            pixel = abs(d_scale) * _ANGLE_MRAD[d_unit]
        elif d_scale and d_unit in _RECIPROCAL_PER_NM and energy:
            lam_nm = wavelength_angstrom(energy) / 10
            pixel = abs(d_scale) * _RECIPROCAL_PER_NM[d_unit] * lam_nm * 1e3
    return Calibration(energy_kev=energy, convergence_mrad=conv, detector_pixel_mrad=pixel, scan_step_nm=step)


def _load_ndata1(path: Path, key: str | None):
    if key is not None:
        raise ValueError(f"{path.name} is a Nion .ndata1 file with one array; drop key={key!r}")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if not {"data.npy", "metadata.json"} <= names:
            raise ValueError(f"{path.name} is not a Nion .ndata1 file: it needs data.npy and metadata.json, has {sorted(names)}")
        meta = json.loads(zf.read("metadata.json"))
        arr = _zip_member_memmap(path, zf, "data.npy")
        if arr is None:
            with zf.open("data.npy") as fh:
                arr = np.load(fh, allow_pickle=False)
    keep = {k: meta[k] for k in ("title", "uuid", "created", "metadata") if k in meta}
    return arr, nion_calibration(meta), {"nion": keep}, None


_LOADERS = {".npy": _load_npy, ".npz": _load_npz, ".h5": _load_h5, ".hdf5": _load_h5, ".ndata1": _load_ndata1}


def open_file(path, key: str | None = None, *, scan_id: str | None = None,
              calibration: Calibration | None = None, scan_shape: tuple[int, int] | None = None) -> ArraySource:
    """A replay ``Source`` over the 4D scan in ``path``; ``key`` picks the array or dataset.

    ``calibration`` fields given here override those read from the file.
    ``scan_shape`` is the scan shape of a flat series of frames (``.mib``).
    Close the source (or use it as a context manager) to release the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    from rrstem.simulators.mib import MibSource, is_mib  # Merlin .mib/.hdr, by suffix or first bytes

    if path.is_file() and is_mib(path):
        return MibSource(path, scan_shape=scan_shape, scan_id=scan_id)
    if suffix not in _LOADERS:
        raise ValueError(f"cannot replay {path.name!r}: unsupported suffix {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"cannot replay {str(path)!r}: no such file")
    data, cal, meta, closer = _LOADERS[suffix](path, key)
    try:
        dtype = _check_array(data.shape, data.dtype, f"{path.name}" + (f" [{meta['key']}]" if "key" in meta else ""))
        if calibration is not None:
            cal = Calibration(**{**cal.model_dump(), **calibration.model_dump(exclude_none=True)})
        start = Start(
            scan_id=scan_id or _scan_id(path, meta.get("key")),
            scan_shape=tuple(data.shape[:2]), frame_shape=tuple(data.shape[2:]), dtype=dtype.name,
            calibration=cal, metadata={"source_file": str(path.resolve()), **_jsonable(meta)},
        )
        return ArraySource(data, start, closer)
    except Exception:
        if closer is not None:
            closer()
        raise


def _jsonable(meta: dict) -> dict:
    """Drop what msgpack / JSON cannot carry (NaN stays; objects become strings)."""
    return json.loads(json.dumps(meta, default=str, allow_nan=True))


def load_array(path, key: str | None = None) -> np.ndarray:
    """The whole 4D array of ``path`` in memory, in its own dtype."""
    with open_file(path, key) as src:
        return np.asarray(src.data[()] if isinstance(src.data, h5py.Dataset) else src.data).copy()
