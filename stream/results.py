"""The HDF5 results file, laid out as ``docs/results.md`` describes, written atomically.

Writing goes to a temporary file in the same folder, which then replaces the
target (``os.replace``), so a reader never sees a half-written file. Scans
already in the target file are carried over, so one file holds a session's
scans.
"""

from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import rrstem
from rrstem.stream import emd
from rrstem.stream.badpixels import REASONS
from rrstem.stream.incomplete import incomplete_detail
from rrstem.stream.reductions import MapSpec
from rrstem.stream.snapshot import Arrays

FORMAT = "rrstem-results"
FORMAT_VERSION = 2  #: 2: also an EMD 1.0 file (``stream/emd.py``); no empty datasets
_lock = threading.Lock()  # one writer at a time (scan end and "save now" may race)


def _json(obj: Any) -> str:
    return json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))


@dataclass
class ScanResults:
    """One scan's group of the results file, made by ``scan_results(scan)``.

    ``attrs`` are the group's attributes (lists and dicts are stored as JSON); ``specs`` declares the maps
    (name -> ``MapSpec``: each dataset gets its ``unit``, where it has one, and its ``description``);
    ``maps`` holds ``mean_pattern`` and the (ny, nx) maps (``latent`` is (d, ny, nx); ``alarms`` is (k, 2)
    [y, x]; ``anomaly_threshold``, a 0-d array, is written as the ``threshold`` attribute of ``anomaly``
    and ``alarms`` and read back into ``maps``);
    ``model`` is the encoder's ``export()``: ``training`` histories, ``metrics``,
    ``config`` (JSON-able), ``state`` (name -> array) and ``step``.
    """

    scan_id: str
    attrs: dict[str, Any]
    maps: dict[str, np.ndarray]
    specs: dict[str, MapSpec] = field(default_factory=dict)
    pixel_mask: np.ndarray | None = None  # (h, w) uint8 reasons of the masked raw pixels (``badpixels.REASONS``)
    model: dict[str, Any] | None = None
    map_attrs: dict[str, Any] = field(default_factory=dict)  #: attributes of ``maps`` (the DPC calibration)


def scan_results(scan) -> ScanResults:
    """Everything the results file keeps of ``scan`` (a ``stream.scan.Scan``), but the model and the service's
    config, which the finisher adds."""
    g, s = scan.geometry, scan.start
    mask = g.mask_reasons_image() if g is not None else None
    attrs = {
        "scan_shape": list(s.scan_shape),
        "frame_shape": list(s.frame_shape),
        "binned_shape": list(g.binned_shape) if g else [0, 0],
        "dtype": s.dtype,
        "counters": scan.counter_dict(),
        "invalid_reasons": dict(scan.reasons),
        "frames_sent": -1 if scan.frames_sent is None else scan.frames_sent,
        "orphans": dict(scan.orphans),
        "complete": scan.complete,
        "end_reason": scan.end_reason or "running",
        "geometry": g.to_json() if g else {},
        "calibration": s.calibration.model_dump(mode="json"),
        "metadata": s.metadata,
    }
    detail = incomplete_detail(scan)
    if detail is not None:
        attrs["incomplete_detail"] = detail
    if "skipped_frames" in s.metadata:  # frames of a damaged file its reader skipped: frame, offset, reason
        attrs["skipped_frames"] = s.metadata["skipped_frames"]
    if scan.zero_counts:
        attrs["zero_counts"] = scan.zero_counts
    if scan.unaccounted is not None:
        attrs["frames_unaccounted"] = scan.unaccounted
    if scan.failure is not None:
        attrs["error"] = f"{type(scan.failure).__name__}: {scan.failure}"
    if scan.results_name != scan.scan_id:
        attrs["scan_id"] = scan.scan_id  # the id it came with
    maps = scan.maps(score_defects=True)  # first: the map attributes are those of these maps
    return ScanResults(scan.results_name, attrs, maps, scan.map_specs(), mask, map_attrs=scan.map_attrs())


def write_scan(path: str | os.PathLike, results: ScanResults) -> Path:
    """Write (or replace) one scan group in the results file at ``path``.

    The new file is built in memory by HDF5 and written with plain file I/O (then fsync, then ``os.replace``):
    a full disk or an I/O error is an ``OSError`` here, never a crash inside libhdf5 (which a full disk
    can cause while HDF5 itself writes a file), and the target is never left half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with _lock:
        image = _file_image(path, results)
        try:
            with open(tmp, "wb") as fh:
                fh.write(image)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _file_image(path: Path, results: ScanResults) -> bytes:
    """The bytes of the results file ``path`` with ``results``' scan group added (or replaced)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, rrstem_version=rrstem.__version__)
        emd.mark_file(f)
        scans = f.create_group("scans")
        if path.exists():
            with h5py.File(path, "r") as old:
                for name in old.get("scans", {}):
                    if name != results.scan_id:
                        old.copy(old["scans"][name], scans, name=name)
                        if emd.root_name(name) in old:  # its EMD root (files of format_version 1 have none)
                            old.copy(old[emd.root_name(name)], f, name=emd.root_name(name))
        _fill_scan(scans.create_group(results.scan_id), results, emd.Root(f, results.scan_id, results.attrs))
    return buf.getvalue()


def _dataset(g: h5py.Group, name: str, data: np.ndarray, **kw) -> h5py.Dataset | None:
    """``g[name] = data``, but an empty array is only listed in ``g``'s ``empty_datasets`` attribute (JSON
    name -> [shape, dtype]): some HDF5 readers (RosettaSciIO's NeXus reader) fail on an empty dataset."""
    data = np.asarray(data)
    if data.size:
        return g.create_dataset(name, data=data, **kw)
    empty = json.loads(g.attrs.get("empty_datasets", "{}"))
    empty[name] = [list(data.shape), data.dtype.str]
    g.attrs["empty_datasets"] = json.dumps(empty)
    return None


def _empty_datasets(g: h5py.Group) -> dict[str, np.ndarray]:
    """The empty arrays ``_dataset`` listed on ``g``."""
    return {name: np.zeros(shape, dtype) for name, (shape, dtype) in json.loads(g.attrs.get("empty_datasets",
                                                                                            "{}")).items()}


def _map_dataset(m: h5py.Group, root: emd.Root, name: str, arr: np.ndarray, spec: MapSpec | None,
                 scan_shape: tuple[int, ...]) -> h5py.Dataset | None:
    """``maps/<name>``: a (ny, nx) map is written into the EMD root and linked here (a (d, ny, nx) stack is
    copied there too); others are written here only."""
    per_position, unit = (spec.per_position, spec.unit) if spec is not None else (True, "")
    if per_position and arr.shape == scan_shape:
        ds = root.map(name, arr, unit)
        m[name] = h5py.SoftLink(ds.name)
        return ds
    if per_position and arr.ndim == 3 and arr.shape[1:] == scan_shape and arr.size:
        root.stack(name, arr, unit)
    return _dataset(m, name, arr)


def _fill_scan(g: h5py.Group, r: ScanResults, root: emd.Root) -> None:
    maps, model = r.maps, r.model
    for key, value in r.attrs.items():
        g.attrs[key] = _json(value) if isinstance(value, (dict, list)) and key not in ("scan_shape", "frame_shape",
                                                                                       "binned_shape") else value
    if Arrays.MEAN_PATTERN in maps:
        g[Arrays.MEAN_PATTERN] = h5py.SoftLink(root.pattern(Arrays.MEAN_PATTERN,
                                                            maps[Arrays.MEAN_PATTERN].astype(np.float32)).name)
    if r.pixel_mask is not None:
        g.create_dataset("pixel_mask", data=r.pixel_mask != 0, compression="gzip")
        why = g.create_dataset("pixel_mask_reason", data=r.pixel_mask.astype(np.uint8), compression="gzip")
        why.attrs["legend"] = _json({str(bit): text for bit, text in REASONS.items()})
    m = g.create_group("maps")
    for key, value in r.map_attrs.items():
        m.attrs[key] = _json(value) if isinstance(value, (dict, list)) else value
    for name, arr in maps.items():
        if name in (Arrays.MEAN_PATTERN, Arrays.ALARM_THRESHOLD):
            continue
        spec = r.specs.get(name)
        ds = _map_dataset(m, root, name, arr.astype(bool) if name == Arrays.FILLED else arr, spec,
                          tuple(r.attrs["scan_shape"]))
        if ds is None:  # empty (no alarms)
            continue
        if spec is not None:
            if spec.unit:
                ds.attrs["unit"] = spec.unit
            ds.attrs["description"] = spec.description
        if name in (Arrays.ANOMALY, Arrays.ALARMS) and Arrays.ALARM_THRESHOLD in maps:
            ds.attrs["threshold"] = float(maps[Arrays.ALARM_THRESHOLD])
    if model is None:
        return
    t = g.create_group("training")
    for name, arr in model.get("training", {}).items():
        _dataset(t, name, arr)
    t.attrs["metrics"] = _json(model.get("metrics", {}))
    mg = g.create_group("model")
    mg.attrs["config"] = _json(model.get("config", {}))
    mg.attrs["step"] = int(model.get("step", 0))
    for name, arr in model.get("state", {}).items():
        mg.create_dataset(f"state/{name}", data=np.asarray(arr))


def _scan_group(f: h5py.File, path, scan_id: str | None) -> tuple[str, h5py.Group]:
    """(name, group) of the only scan of an open results file, or of ``scan_id``."""
    if f.attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rrstem results file")
    names = list(f["scans"])
    if scan_id is None:
        if len(names) != 1:
            raise ValueError(f"{path} holds scans {names}; pass scan_id")
        scan_id = names[0]
    if scan_id not in f["scans"]:
        raise KeyError(f"{path} holds no scan {scan_id!r}: it holds {names}")
    return scan_id, f["scans"][scan_id]


def _decoded(attrs) -> dict[str, Any]:
    return {k: json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v for k, v in attrs.items()}


def read_scan_attrs(path: str | os.PathLike, scan_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """(scan name, its attributes, JSON decoded) of one scan (the only one, or ``scan_id``), without its data."""
    with h5py.File(path, "r") as f:
        scan_id, g = _scan_group(f, path, scan_id)
        return scan_id, _decoded(g.attrs)


def read_scan(path: str | os.PathLike, scan_id: str | None = None) -> dict[str, Any]:
    """Everything of one scan (the only one, or ``scan_id``) as plain Python and NumPy objects."""
    with h5py.File(path, "r") as f:
        scan_id, g = _scan_group(f, path, scan_id)
        out: dict[str, Any] = {"scan_id": scan_id, "attrs": _decoded(g.attrs)}
        out["maps"] = {**_empty_datasets(g["maps"]), **{k: v[()] for k, v in g["maps"].items()}}
        out["map_attrs"] = {k: v for k, v in _decoded(g["maps"].attrs).items() if k != "empty_datasets"}
        if Arrays.ANOMALY in g["maps"] and "threshold" in g["maps"][Arrays.ANOMALY].attrs:
            out["maps"][Arrays.ALARM_THRESHOLD] = np.float32(g["maps"][Arrays.ANOMALY].attrs["threshold"])
        out["units"] = {k: v.attrs["unit"] for k, v in g["maps"].items() if "unit" in v.attrs}
        for key in (Arrays.MEAN_PATTERN, "pixel_mask", "pixel_mask_reason"):
            if key in g:
                out[key] = g[key][()]
        if "training" in g:
            out["training"] = {**_empty_datasets(g["training"]), **{k: v[()] for k, v in g["training"].items()}}
            out["metrics"] = json.loads(g["training"].attrs.get("metrics", "{}"))
        if "model" in g:
            mg = g["model"]
            state: dict[str, np.ndarray] = {}
            mg["state"].visititems(lambda name, obj: state.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            out["model"] = {"config": json.loads(mg.attrs["config"]), "step": int(mg.attrs["step"]), "state": state}
        return out


def read_model(path: str | os.PathLike, scan_id: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], int]:
    """(model config JSON, state dict of arrays, training step) of the rrVAE stored with a scan.

    Raises ValueError naming the file when the scan holds no trained model.
    """
    res = read_scan(path, scan_id)
    if "model" not in res or not res["model"]["state"]:
        raise ValueError(f"{path} holds no trained model (was it written with --no-train?)")
    return res["model"]["config"], res["model"]["state"], res["model"]["step"]
