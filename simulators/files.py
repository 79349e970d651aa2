"""Recorded 4D-STEM scans as replay sources, one reader per format, picked by suffix or first bytes.

``open_file(path, key=None, scan_shape=None)`` returns a ``Source`` over the
scan in the file's own dtype. The readers live here (``.npy``, ``.npz``,
generic HDF5, Nion Swift ``.ndata1``) and in ``simulators/formats/``
(DECTRIS master, EMPAD, EMD/py4DSTEM, HyperSpy, DigitalMicrograph, Merlin
``.mib``, stempy's electron-counted HDF5). To add a format, register its
reader ``reader(path, key) -> Loaded`` in ``OPENERS``
under its suffix, and in ``MAGIC`` under its first bytes if it has any.

Everything is read lazily, a chunk of frames at a time (memory maps, h5py
and zarr slices), so a replay never holds the whole scan in memory; only
``.npz`` members are loaded. A flat series of frames (a DECTRIS master file)
needs ``scan_shape``. Calibration comes from the file where it has one.
Frames against the scan: one rule for every reader (``formats.common.fit_frames``):
more frames than the acquisition of the scan takes (``sync_offset``,
``flyback``) are refused (``rrstem replay`` sends them: ``extra_ok``), fewer
are sent as far as they go. A damaged file
(truncated, a data file missing) whose first frames are good gives a source
that sends those; its ``problem`` says what is wrong.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np

from rrstem.simulators.formats import dectris, dm, emd, empad, hyperspy, stempy
from rrstem.simulators.formats.common import ANGLE_MRAD as _ANGLE_MRAD
from rrstem.simulators.formats.common import LENGTH_NM as _LENGTH_NM
from rrstem.simulators.formats.common import RECIPROCAL_PER_NM as _RECIPROCAL_PER_NM
from rrstem.simulators.formats.common import Loaded, fit_frames, pick
from rrstem.simulators.optics import wavelength_angstrom
from rrstem.simulators.source import ArraySource, SeriesSource, Source
from rrstem.stream.protocol import DTYPES, Calibration, Start

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


def _npy_header(fh) -> tuple[tuple, np.dtype, bool, int]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    return shape, dtype, fortran, fh.tell()


def _load_npy(path: Path, key: str | None):
    if key is not None:
        raise ValueError(f"{path.name} is a .npy file with one array; drop key={key!r}")
    try:
        arr = np.load(path, mmap_mode="r")
    except ValueError as exc:  # numpy: "mmap length is greater than file size"
        return _truncated_npy(path, exc)
    return Loaded(arr, Calibration(), {})


def _load_npz(path: Path, key: str | None):
    with zipfile.ZipFile(path) as zf:
        shapes = {}
        for name in zf.namelist():
            if name.endswith(".npy"):
                with zf.open(name) as fh:
                    shapes[name[:-4]] = _npy_header(fh)[0]
    if key is not None and key.endswith(".npy"):
        key = key[:-4]
    name = pick(shapes, key, "array", path)
    with np.load(path, allow_pickle=False) as npz:
        arr = npz[name]
    return Loaded(arr, Calibration(), {"key": name})


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


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path.name} cannot be opened as HDF5 (truncated or damaged?): {exc}") from None


def _load_h5(path: Path, key: str | None):
    """Any HDF5 file: a DECTRIS master, stempy events, EMD/py4DSTEM, HyperSpy, else the one 4D dataset (or
    ``key``)."""
    f = _open_h5(path)
    try:
        if dectris.is_master(f):
            return dectris.load_master(path, key, f)
        if stempy.is_stempy(f, key):
            return stempy.load(path, key, f)
        if hyperspy.is_hyperspy(f):
            return hyperspy.load_hspy(path, key, f)
        if emd.is_emd(f) and (key is None or isinstance(f.get(key.strip("/")), h5py.Group)):
            return emd.load(path, key, f)
        datasets = _h5_datasets(f)
        velox = emd.velox_version(f)
        if velox and key is None and not any(len(shape) == 4 for shape in datasets.values()):
            raise ValueError(emd.velox_refusal(path, f, velox))
        name = pick(datasets, key.lstrip("/") if key else None, "dataset", path)
        ds = f[name]
        meta = {"key": name, **{k: _plain(v) for k, v in ds.attrs.items() if k not in _CAL_FIELDS}}
        return Loaded(ds, _h5_calibration(ds), meta, f.close)
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
    return Loaded(arr, nion_calibration(meta), {"nion": keep})


def _truncated_npy(path: Path, exc: Exception) -> Loaded:
    """A ``.npy`` cut short: its whole frames as a flat series of the scan its header announces."""
    try:
        with open(path, "rb") as fh:
            shape, dtype, fortran, offset = _npy_header(fh)
    except ValueError as header:  # cut inside its header: nothing to read
        raise ValueError(f"{path.name} is not a readable .npy file: {header}") from None
    if len(shape) != 4 or fortran:
        raise ValueError(f"{path.name} cannot be memory-mapped: {exc}") from None
    frame = int(np.prod(shape[2:])) * dtype.itemsize
    whole = (path.stat().st_size - offset) // frame
    if whole == 0:
        raise ValueError(f"{path.name} is truncated: it holds no whole frame of the {shape} array its header "
                         "announces") from None
    frames = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(whole, *shape[2:]))
    problem = (f"{path.name} is truncated: it holds {whole} whole frames of the {shape[0] * shape[1]} its header "
               f"announces ({tuple(shape)}); the rest of the scan is missing")
    return Loaded(frames, Calibration(), {}, flat=True, scan_shape=tuple(shape[:2]), problem=problem,
                  n_frames=shape[0] * shape[1])


#: The reader of each suffix: ``reader(path, key) -> Loaded``. Register a new format here.
OPENERS = {
    ".npy": _load_npy, ".npz": _load_npz, ".ndata1": _load_ndata1,
    ".h5": _load_h5, ".hdf5": _load_h5, ".nxs": _load_h5, ".emd": _load_h5, ".hspy": _load_h5,
    ".zspy": hyperspy.load_zspy,
    ".raw": empad.load, ".xml": empad.load,
    ".dm3": dm.load, ".dm4": dm.load,
}
#: The reader of a file whose suffix is not in ``OPENERS``, by its first bytes.
MAGIC = [
    (b"\x89HDF\r\n\x1a\n", _load_h5),
    (b"\x93NUMPY", _load_npy),
    (b"\x00\x00\x00\x03", dm.load),
    (b"\x00\x00\x00\x04", dm.load),
]
SUFFIXES = (*OPENERS, ".mib", ".hdr")  # .mib/.hdr: MibSource, by suffix or first bytes (open_file)


def _reader(path: Path):
    suffix = path.suffix.lower()
    if path.is_dir() and ((path / ".zgroup").is_file() or (path / "zarr.json").is_file()):
        return hyperspy.load_zspy
    if suffix in OPENERS:
        return OPENERS[suffix]
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(16)
        for magic, reader in MAGIC:
            if head.startswith(magic):
                return reader
    raise ValueError(f"cannot read {path.name!r}: unknown format (suffix {suffix or '(none)'}, and its first "
                     f"bytes match none of the known ones); use one of {', '.join(SUFFIXES)}")


def open_file(path, key: str | None = None, *, scan_id: str | None = None,
              calibration: Calibration | None = None, scan_shape: tuple[int, int] | None = None,
              sync_offset: int = 0, flyback: int = 0, extra_ok: bool = False) -> Source:
    """A replay ``Source`` over the 4D scan in ``path``; ``key`` picks the array, dataset or signal.

    ``scan_shape`` (ny, nx) gives a flat series of frames its scan shape (and
    may re-shape a 4D file of as many frames). ``sync_offset`` and ``flyback``
    say how many more frames than positions the acquisition holds
    (``fit_frames``); ``extra_ok`` sends more frames than that, whole (replay: the receiver places
    them). ``calibration`` fields given here override those read
    from the file. Close the source (or use it as a context manager) to
    release the file.
    """
    path = Path(path)
    from rrstem.simulators.formats.mib import MibSource, is_mib  # Merlin .mib/.hdr, by suffix or first bytes

    if path.is_file() and is_mib(path):
        return MibSource(path, scan_shape=scan_shape, scan_id=scan_id, sync_offset=sync_offset, flyback=flyback,
                         extra_ok=extra_ok)
    if not path.exists():
        raise ValueError(f"cannot read {str(path)!r}: no such file")
    loaded = _reader(path)(path, key)
    try:
        what = f"{path.name}" + (f" [{loaded.metadata['key']}]" if "key" in loaded.metadata else "")
        data = loaded.data
        shape = tuple(data.shape)
        if loaded.flat:
            if len(shape) != 3:
                raise ValueError(f"{what} has shape {shape}, not a (n, h, w) series of frames")
            frame_shape = shape[1:]
        else:
            frame_shape = shape[2:]
        dtype = _check_array((1, 1, *frame_shape) if len(frame_shape) == 2 else shape, data.dtype, what)
        grid = _grid(loaded, shape, scan_shape, what, placed=bool(sync_offset or flyback))
        held = shape[0] if loaded.flat else shape[0] * shape[1]
        n_frames, short = fit_frames(held, grid, what, sync_offset, flyback, extra_ok)
        problem = loaded.problem or short
        if calibration is not None:
            cal = Calibration(**{**loaded.calibration.model_dump(), **calibration.model_dump(exclude_none=True)})
        else:
            cal = loaded.calibration
        meta = {"source_file": str(path.resolve()), **_jsonable(loaded.metadata)}
        if problem:
            meta["source_problem"] = problem
        start = Start(scan_id=scan_id or _scan_id(path, loaded.metadata.get("key")), scan_shape=grid,
                      frame_shape=tuple(frame_shape), dtype=dtype.name, calibration=cal, metadata=meta,
                      bad_pixels=loaded.bad_pixels)
        if not loaded.flat and grid == shape[:2] and not (sync_offset or flyback):
            return ArraySource(data, start, loaded.closer)
        frames = data if loaded.flat else _Rows(data)
        return SeriesSource(frames, start, loaded.closer, problem=problem, n_frames=n_frames)
    except Exception:
        loaded.close()
        raise


def _grid(loaded: Loaded, shape: tuple, scan_shape, what: str, placed: bool = False) -> tuple[int, int]:
    """The scan shape: the caller's, else the file's; a flat series without one is refused, and so is a 4D
    file re-shaped to another number of positions, unless ``placed`` (a sync offset or flyback places its
    frames). Its frames against the scan: ``fit_frames``."""
    own = loaded.scan_shape if loaded.flat else shape[:2]
    n = loaded.n_frames or (shape[0] if loaded.flat else shape[0] * shape[1])
    if scan_shape is None:
        if own is None:
            raise ValueError(f"{what} stores a flat series of {n} frames without the scan shape; give it with "
                             f"--scan-shape NYxNX (scan_shape=(ny, nx)), NY*NX = {n} for the whole series")
        return tuple(own)
    scan_shape = tuple(int(v) for v in scan_shape)
    if not loaded.flat and not placed and scan_shape[0] * scan_shape[1] != n:
        raise ValueError(f"{what} stores a {own[0]}x{own[1]} scan ({n} frames); --scan-shape "
                         f"{scan_shape[0]}x{scan_shape[1]} holds {scan_shape[0] * scan_shape[1]}: drop it")
    return scan_shape


class _Rows:
    """A 4D ``(ny, nx, h, w)`` array-like seen as a flat ``(ny*nx, h, w)`` series, read by scan rows."""

    def __init__(self, data):
        self.data = data
        self.nx = data.shape[1]
        self.shape = (data.shape[0] * data.shape[1], *data.shape[2:])
        self.dtype = data.dtype

    def __getitem__(self, index: slice) -> np.ndarray:
        first, stop, _ = index.indices(self.shape[0])
        y0, y1 = first // self.nx, -(-stop // self.nx)
        rows = np.asarray(self.data[y0:y1]).reshape(-1, *self.shape[1:])
        return rows[first - y0 * self.nx:stop - y0 * self.nx]


def _jsonable(meta: dict) -> dict:
    """Drop what msgpack / JSON cannot carry (NaN stays; objects become strings)."""
    return json.loads(json.dumps(meta, default=str, allow_nan=True))


def load_array(path, key: str | None = None) -> np.ndarray:
    """The whole 4D array of ``path`` in memory, in its own dtype."""
    with open_file(path, key) as src:
        return src.array()
