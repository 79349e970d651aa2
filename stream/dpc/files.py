"""A DPC calibration, or a vacuum scan's COM maps, read from an earlier scan's results or a small JSON file.

``--dpc-calibration FILE`` takes a results file (``.h5``: the ``dpc_rotation_deg`` and ``dpc_flip``
attributes of a scan's ``maps`` group) or JSON (``{"rotation_deg": 12.5, "flip": true}``; the results'
attribute names ``dpc_rotation_deg``/``dpc_flip`` are read too). ``--descan-reference FILE`` takes a
results file and reads its scan's ``com_x``/``com_y`` maps with their unit. A results file that holds
several scans needs one named: ``FILE:SCAN_ID``.

Read with h5py directly (the layout of docs/results.md), so that this package needs nothing of the service.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

#: the attributes of a scan's ``maps`` group that hold its calibration (docs/results.md)
ROTATION_ATTR, FLIP_ATTR, SOURCE_ATTR = "dpc_rotation_deg", "dpc_flip", "dpc_calibration"


def split_name(text: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:SCAN_ID`` -> (path, scan id or None); a path that exists as given is taken whole."""
    path = Path(text)
    if path.exists() or ":" not in text:
        return path, None
    file, scan_id = text.rsplit(":", 1)
    return Path(file), scan_id or None


def _scan_group(f: h5py.File, where: str, scan_id: str | None, needs) -> h5py.Group:
    """The one scan of ``f`` (or ``scan_id``) whose ``maps`` group passes ``needs``; ValueError says which exist."""
    scans = f.get("scans")
    if scans is None:
        raise ValueError(f"{where} is not an rrstem results file (no scans group)")
    if scan_id is not None:
        if scan_id not in scans:
            raise ValueError(f"{where} holds no scan {scan_id!r}; it holds {sorted(scans)}")
        return scans[scan_id]
    fit = [name for name in scans if "maps" in scans[name] and needs(scans[name]["maps"])]
    if len(fit) != 1:
        what = "no scan" if not fit else f"scans {fit}"
        raise ValueError(f"{where} holds {what} with what is needed here; name one as {where}:SCAN_ID")
    return scans[fit[0]]


def load_calibration(text: str) -> tuple[float, bool, dict]:
    """(angle in degrees, flip, what the file says of it: its ``dpc_calibration`` record, if any) from ``text``
    (``FILE``, ``FILE:SCAN_ID`` or a JSON file). ValueError says what is wrong with the file."""
    path, scan_id = split_name(text)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    if path.suffix.lower() == ".json":
        try:
            d = json.loads(path.read_text())
            angle = d.get("rotation_deg", d.get(ROTATION_ATTR))
            flip = d.get("flip", d.get(FLIP_ATTR, False))
            if not isinstance(angle, (int, float)) or not isinstance(flip, bool):
                raise ValueError("needs a number rotation_deg and a true/false flip")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: not a DPC calibration such as {{\"rotation_deg\": 12.5, \"flip\": true}}: "
                             f"{exc}") from None
        return float(angle), flip, {k: v for k, v in d.items() if k not in ("rotation_deg", "flip")}
    try:
        with h5py.File(path, "r") as f:
            g = _scan_group(f, str(path), scan_id, lambda m: ROTATION_ATTR in m.attrs)
            attrs = g["maps"].attrs
            if ROTATION_ATTR not in attrs:
                raise ValueError(f"{path}: scan {g.name} has no DPC calibration ({ROTATION_ATTR})")
            record = attrs.get(SOURCE_ATTR, "{}")
            return float(attrs[ROTATION_ATTR]), bool(attrs[FLIP_ATTR]), json.loads(record)
    except OSError as exc:
        raise ValueError(f"{path}: not a results file or JSON: {exc}") from None


def load_reference(text: str) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(com_x, com_y, their unit, where from) of a vacuum scan's results (``FILE`` or ``FILE:SCAN_ID``)."""
    path, scan_id = split_name(text)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        with h5py.File(path, "r") as f:
            g = _scan_group(f, str(path), scan_id, lambda m: "com_x" in m and "com_y" in m)
            maps = g["maps"]
            if "com_x" not in maps or "com_y" not in maps:
                raise ValueError(f"{path}: scan {g.name} has no com_x/com_y maps")
            unit = maps["com_x"].attrs.get("unit", "px")
            return maps["com_x"][()], maps["com_y"][()], str(unit), f"{path}:{g.name.rsplit('/', 1)[-1]}"
    except OSError as exc:
        raise ValueError(f"{path}: not a results file: {exc}") from None
