"""EMPAD ``.raw`` with its ``.xml``: little-endian float32 frames of 128x130 pixels, 2 metadata rows dropped.

The ``.raw`` file is frames back to back in scan order, each 130 rows of 128
pixels, of which the last two rows are the detector's per-frame metadata. It
is memory-mapped; each chunk reads its frames' first 128 rows. The scan shape
comes from the ``.xml`` (``scan_parameters mode="acquire"``
``scan_resolution_x``/``_y``; older files ``pix_x``/``pix_y``), else from the
raw file's name (``scan_x256_y256.raw``). Calibration: ``iom_measurements``
``high_voltage`` (V), and the scan step from ``full_scan_field_of_view`` ``x``
(m) / ``scale_factor`` / the larger scan edge, as RosettaSciIO reads it. A
file cut short streams its whole frames; the rest of the scan is missing.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from rrstem.simulators.formats.common import Loaded, calibration, length_nm

WIDTH, HEIGHT, RAW_HEIGHT = 128, 128, 130
FRAME_BYTES = RAW_HEIGHT * WIDTH * 4
_NAME_SHAPE = re.compile(r"_x(\d+)_y(\d+)", re.IGNORECASE)


def _find_xml(raw: Path) -> Path | None:
    """The ``.xml`` beside ``raw`` that names it (or shares its stem)."""
    same = raw.with_suffix(".xml")
    if same.is_file():
        return same
    for xml in sorted(raw.parent.glob("*.xml")):
        try:
            if raw.name in xml.read_text(errors="replace"):
                return xml
        except OSError:
            continue
    return None


def _first(root: ET.Element, *names: str) -> str | None:
    """Text (or ``value`` attribute) of the first element named any of ``names``, anywhere."""
    for name in names:
        for el in root.iter(name):
            value = el.get("value") or (el.text or "").strip()
            if value:
                return value
    return None


def _xml_info(xml: Path) -> tuple[str | None, tuple[int, int] | None, dict]:
    root = ET.parse(xml).getroot()
    raw_el = root.find(".//raw_file")
    raw_name = raw_el.get("filename") if raw_el is not None else None
    shape = None
    acquire = root.find(".//scan_parameters[@mode='acquire']")
    for holder, x, y in ((acquire, "scan_resolution_x", "scan_resolution_y"), (root, "pix_x", "pix_y")):
        nx, ny = (_first(holder, x), _first(holder, y)) if holder is not None else (None, None)
        if nx and ny:
            shape = (int(float(ny)), int(float(nx)))
            break
    meta = {}
    for name in ("high_voltage", "nominal_camera_length", "convergence_angle", "software_version"):
        value = _first(root, name)
        if value is not None:
            meta[name] = value
    fov = root.find(".//full_scan_field_of_view")
    if fov is not None:
        meta["fov_x_m"], meta["fov_scale_factor"] = _first(fov, "x"), _first(fov, "scale_factor")
    return raw_name, shape, meta


def _float(text) -> float | None:
    try:
        return float(str(text).split()[0])
    except (TypeError, ValueError, IndexError):
        return None


def load(path: Path, key: str | None) -> Loaded:
    """The frames of an EMPAD scan, given its ``.raw`` or its ``.xml``."""
    if key is not None:
        raise ValueError(f"{path.name} is an EMPAD scan with one array; drop key={key!r}")
    xml = path if path.suffix.lower() == ".xml" else _find_xml(path)
    raw_name, shape, meta = _xml_info(xml) if xml is not None else (None, None, {})
    raw = path
    if path.suffix.lower() == ".xml":
        if raw_name is None:
            raise ValueError(f"{path.name} is not an EMPAD .xml: it names no <raw_file filename=...>")
        raw = path.parent / raw_name
        if not raw.is_file():
            raise ValueError(f"{path.name} names the raw file {raw_name}, which is missing from {path.parent}")
    if shape is None:
        m = _NAME_SHAPE.search(raw.stem)
        shape = (int(m.group(2)), int(m.group(1))) if m else None
    size = raw.stat().st_size
    whole = size // FRAME_BYTES
    problem = None
    expected = shape[0] * shape[1] if shape else None
    if size % FRAME_BYTES or (expected is not None and whole < expected):
        of = f"of the {expected} " if expected else ""
        problem = (f"{raw.name} is truncated: {size} bytes hold {whole} whole {of}frames of 128x130 float32 "
                   f"({FRAME_BYTES} bytes each); the rest of the scan is missing")
    if whole == 0:
        raise ValueError(f"{raw.name} holds no whole EMPAD frame ({size} bytes; a frame is {FRAME_BYTES} bytes)")
    frames = np.memmap(raw, dtype="<f4", mode="r", shape=(whole, RAW_HEIGHT, WIDTH))[:, :HEIGHT, :]
    hv = _float(meta.get("high_voltage"))
    fov, factor = _float(meta.get("fov_x_m")), _float(meta.get("fov_scale_factor"))
    step = fov / factor / max(shape) if fov and factor and shape else None
    cal = calibration(energy_kev=hv / 1e3 if hv else None, convergence_mrad=_float(meta.get("convergence_angle")),
                      scan_step_nm=length_nm(step, "m"))
    info = {"format": "empad", "raw_file": raw.name, **({"xml_file": xml.name} if xml else {}),
            "empad": {k: v for k, v in meta.items()}}
    return Loaded(frames, cal, info, None, flat=True, scan_shape=shape, problem=problem, n_frames=expected)
