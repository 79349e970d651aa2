"""EMPAD ``.raw`` with its ``.xml``: little-endian float32 frames of 128x130 pixels, 2 metadata rows dropped.

The ``.raw`` file is frames back to back in scan order, each 130 rows of 128
pixels, of which the last two rows are the detector's per-frame metadata. It
is memory-mapped; each chunk reads its frames' first 128 rows, in the file's
row order (as RosettaSciIO, LiberTEM and py4DSTEM read them).

The scan shape, in the order RosettaSciIO takes it, so every EMPAD software
version whose ``.xml`` RosettaSciIO reads is read the same:

1. ``scan_parameters`` ``series_count`` (a series of images, ``<type>series``):
   a 1 x count scan;
2. ``pix_x`` / ``pix_y`` (EMPAD software before 1.2): the acquired scan. The
   ``scan_parameters mode="acquire"`` of those files keeps the last setting
   of the dialog, not the scan that was acquired (a 4x4 map says 128x128);
3. the raw file's name, ``scan_x<NX>_y<NY>.raw`` (EMPAD 1.2 and later);
4. else ``scan_parameters mode="acquire"`` ``scan_resolution_x`` / ``_y``.

Calibration: the beam energy from ``high_voltage`` or (older files)
``source.get_voltage`` (V); the scan step from ``full_scan_field_of_view``
``x`` (m) / ``scale_factor`` / the larger scan edge, or (older files)
``optics.get_full_scan_field_of_view`` ``[x, y]`` (m) / the scan's width; a
detector pixel from ``calibrated_pixelsize`` x 1e9 in 1/nm (older files), as
RosettaSciIO reads it. A file cut short streams its whole frames; the rest of
the scan is missing.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from rrstem.simulators.formats.common import Loaded, calibration, length_nm, pixel_mrad

log = logging.getLogger("rrstem.files")

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


def _int(text) -> int | None:
    value = _float(text)
    return int(value) if value else None


def _xml_shape(root: ET.Element, raw_name: str | None) -> tuple[tuple[int, int] | None, str]:
    """The scan shape (ny, nx) an EMPAD ``.xml`` gives, and where it came from (module docstring)."""
    count = _int(_first(root, "series_count"))
    if count:
        return (1, count), "series_count"
    nx, ny = _int(_first(root, "pix_x")), _int(_first(root, "pix_y"))
    if nx and ny:
        return (ny, nx), "pix_x/pix_y"
    m = _NAME_SHAPE.search(Path(raw_name or "").stem)
    if m:
        return (int(m.group(2)), int(m.group(1))), "raw file name"
    acquire = root.find(".//scan_parameters[@mode='acquire']")
    if acquire is not None:
        nx, ny = _int(_first(acquire, "scan_resolution_x")), _int(_first(acquire, "scan_resolution_y"))
        if nx and ny:
            return (ny, nx), "scan_parameters acquire"
    return None, ""


def _xml_info(xml: Path) -> tuple[str | None, tuple[int, int] | None, dict]:
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{xml.name} (an EMPAD .xml) cannot be read: {exc}; fix it, or move it away and analyze "
                         "the .raw with --scan-shape NYxNX") from None
    raw_el = root.find(".//raw_file")
    raw_name = raw_el.get("filename") if raw_el is not None else None
    shape, source = _xml_shape(root, raw_name)
    meta = {"scan_shape_from": source} if shape else {}
    for name in ("high_voltage", "source.get_voltage", "nominal_camera_length", "optics.get_cameralength",
                 "convergence_angle", "software_version", "calibrated_pixelsize", "calibrated_diffraction_angle",
                 "optics.get_full_scan_field_of_view"):
        value = _first(root, name)
        if value is not None:
            meta[name] = value
    fov = root.find(".//full_scan_field_of_view")
    if fov is not None:
        meta["fov_x_m"], meta["fov_scale_factor"] = _first(fov, "x"), _first(fov, "scale_factor")
    return raw_name, shape, meta


def _scan_step_m(meta: dict, shape: tuple[int, int] | None) -> float | None:
    """The scan step in m: EMPAD 1.2's field of view of the larger scan edge, or older files' [x, y] one."""
    if not shape:
        return None
    fov, factor = _float(meta.get("fov_x_m")), _float(meta.get("fov_scale_factor"))
    if fov and factor:
        return fov / factor / max(shape)
    old = str(meta.get("optics.get_full_scan_field_of_view", "")).strip("[] ").split(",")
    return _float(old[0]) / shape[1] if _float(old[0]) else None


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
    extra = size % FRAME_BYTES
    if expected is not None and whole < expected or expected is None and extra:
        of = f"of the {expected} " if expected else ""
        problem = (f"{raw.name} is truncated: {size} bytes hold {whole} whole {of}frames of 128x130 float32 "
                   f"({FRAME_BYTES} bytes each); the rest of the scan is missing")
    elif extra:  # every frame of the scan is there; what follows them is not a frame
        log.warning("%s: %d byte(s) after its %d whole frames (%d bytes each) are not a frame; ignored", raw.name,
                    extra, whole, FRAME_BYTES)
    if whole == 0:
        raise ValueError(f"{raw.name} holds no whole EMPAD frame ({size} bytes; a frame is {FRAME_BYTES} bytes)")
    frames = np.memmap(raw, dtype="<f4", mode="r", shape=(whole, RAW_HEIGHT, WIDTH))[:, :HEIGHT, :]
    hv = _float(meta.get("high_voltage") or meta.get("source.get_voltage"))
    energy_kev = hv / 1e3 if hv else None
    inverse_nm = _float(meta.get("calibrated_pixelsize"))
    cal = calibration(energy_kev=energy_kev, convergence_mrad=_float(meta.get("convergence_angle")),
                      scan_step_nm=length_nm(_scan_step_m(meta, shape), "m"),
                      detector_pixel_mrad=pixel_mrad(inverse_nm * 1e9, "1/nm", energy_kev) if inverse_nm else None)
    info = {"format": "empad", "raw_file": raw.name, **({"xml_file": xml.name} if xml else {}),
            "empad": {k: v for k, v in meta.items()}}
    # the frames the file holds, or, cut short, those its scan shape says it should
    n_frames = max(whole, expected or 0)
    return Loaded(frames, cal, info, None, flat=True, scan_shape=shape, problem=problem, n_frames=n_frames)
