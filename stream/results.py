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
from rrstem.stream.badpixels import REASONS
from rrstem.stream.incomplete import incomplete_detail
from rrstem.stream.reductions import MapSpec
from rrstem.stream.snapshot import Arrays

FORMAT = "rrstem-results"
FORMAT_VERSION = 1
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
        scans = f.create_group("scans")
        if path.exists():
            with h5py.File(path, "r") as old:
                for name in old.get("scans", {}):
                    if name != results.scan_id:
                        old.copy(old["scans"][name], scans, name=name)
        _fill_scan(scans.create_group(results.scan_id), results)
    return buf.getvalue()


def _fill_scan(g: h5py.Group, r: ScanResults) -> None:
    maps, model = r.maps, r.model
    for key, value in r.attrs.items():
        g.attrs[key] = _json(value) if isinstance(value, (dict, list)) and key not in ("scan_shape", "frame_shape",
                                                                                       "binned_shape") else value
    if Arrays.MEAN_PATTERN in maps:
        g.create_dataset(Arrays.MEAN_PATTERN, data=maps[Arrays.MEAN_PATTERN].astype(np.float32))
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
        ds = m.create_dataset(name, data=arr.astype(bool) if name == Arrays.FILLED else arr)
        spec = r.specs.get(name)
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
        t.create_dataset(name, data=np.asarray(arr))
    t.attrs["metrics"] = _json(model.get("metrics", {}))
    mg = g.create_group("model")
    mg.attrs["config"] = _json(model.get("config", {}))
    mg.attrs["step"] = int(model.get("step", 0))
    for name, arr in model.get("state", {}).items():
        mg.create_dataset(f"state/{name}", data=np.asarray(arr))


def read_scan(path: str | os.PathLike, scan_id: str | None = None) -> dict[str, Any]:
    """Everything of one scan (the only one, or ``scan_id``) as plain Python and NumPy objects."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path} is not an rrstem results file")
        names = list(f["scans"])
        if scan_id is None:
            if len(names) != 1:
                raise ValueError(f"{path} holds scans {names}; pass scan_id")
            scan_id = names[0]
        g = f["scans"][scan_id]
        out: dict[str, Any] = {"scan_id": scan_id, "attrs": {}}
        for key, value in g.attrs.items():
            if isinstance(value, str) and value[:1] in "{[":
                value = json.loads(value)
            out["attrs"][key] = value
        out["maps"] = {k: v[()] for k, v in g["maps"].items()}
        out["map_attrs"] = {k: json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
                            for k, v in g["maps"].attrs.items()}
        if Arrays.ANOMALY in g["maps"] and "threshold" in g["maps"][Arrays.ANOMALY].attrs:
            out["maps"][Arrays.ALARM_THRESHOLD] = np.float32(g["maps"][Arrays.ANOMALY].attrs["threshold"])
        out["units"] = {k: v.attrs["unit"] for k, v in g["maps"].items() if "unit" in v.attrs}
        for key in (Arrays.MEAN_PATTERN, "pixel_mask", "pixel_mask_reason"):
            if key in g:
                out[key] = g[key][()]
        if "training" in g:
            out["training"] = {k: v[()] for k, v in g["training"].items()}
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
