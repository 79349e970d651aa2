"""DECTRIS SIMPLON stream adapters: legacy stream (v1, JSON multipart) here, stream2 (CBOR) in ``stream2.py``.

Both turn a detector series into one rrstem scan: the series header becomes a
``start`` item (scan id from the series id, frame shape and dtype from the
header, calibration where the header has it), every image a one-frame
``frames`` item at the image number's scan index, and the series end an
``end`` item. The scan shape is not part of either protocol; the decoder is
given it (``rrstem serve --scan-shape``). Every malformed message becomes a
``bad`` item with a reason; ``decode`` never raises. The series bookkeeping is
``DetectorDecoder`` (``base.py``); decompression is ``codecs.py``.

Legacy (``simplon``): ``dheader-1.0`` (header detail ``none``: one part;
``basic``: + detector config JSON; ``all``: + flatfield, pixel mask and count
rate table, each a JSON part and a data part; a DCU sends them as one
multipart message, LiberTEM's simulators one part per message, and both are
taken), ``dimage-1.0`` (``dimage`` JSON with the 0-based ``frame``,
``dimage_d`` JSON with ``shape`` [x, y], ``type``, ``encoding``, ``size``,
the data, ``dconfig`` JSON) and ``dseries_end-1.0``. Encodings
``[bs<BITS>][[-]lz4](<|>)``: ``<`` / ``>`` (raw), ``lz4<`` (one bare LZ4
block), ``bs8|16|32-lz4<`` (bitshuffle + LZ4 in the HDF5 filter's framing; a
12-byte header left zero, as LiberTEM-rs' mock DCU sends it, means the
frame's size and bitshuffle's default block).

stream2 (``stream2``, CBOR): ``stream2.py``, with the helpers here.
``docs/protocol.md`` says what this was checked against.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from rrstem.stream.detectors.base import BadMessage, DetectorDecoder, Item, Series
from rrstem.stream.detectors.codecs import decompress
from rrstem.stream.protocol import DTYPES

_SCAN_ID_CHARS = re.compile(r"[^A-Za-z0-9_.:+-]")
#: The legacy encoding string, ``[bs<BITS>][[-]lz4](<|>)``: bitshuffle element bits, LZ4, byte order.
_ENCODING = re.compile(r"(?:bs(?P<bits>8|16|32|64))?(?P<lz4>-?lz4)?(?P<order>[<>])")
#: htypes that begin a legacy message (anything else in part 0 continues a header sent part by part).
_V1_MESSAGES = ("dheader-1.0", "dimage-1.0", "dseries_end-1.0")


# --- shared by both protocols: scan ids, calibration, header fields, pixels ------------------


def scan_id_for(series_id: int, unique_id: Any = None) -> str:
    """The rrstem scan id of a series: its unique id where it has one (made safe), else ``series-N``."""
    if isinstance(unique_id, str):
        safe = _SCAN_ID_CHARS.sub("_", unique_id)[:128]
        if safe.strip("_"):
            return safe
    return f"series-{series_id}"


def calibration(energy_ev: Any, pixel_m: Any, distance_m: Any) -> dict[str, float]:
    """Beam energy (eV) -> keV; pixel size and detector distance (m) -> mrad per pixel, where both are known."""
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    cal = {}
    if ok(energy_ev):
        cal["energy_kev"] = energy_ev / 1000.0
    if ok(pixel_m) and ok(distance_m):
        cal["detector_pixel_mrad"] = 1000.0 * math.atan(pixel_m / distance_m)
    return cal


def scalars(d: dict) -> dict[str, Any]:
    """The JSON scalar fields of a header, for the results file's metadata."""
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))
            and not (isinstance(v, float) and not math.isfinite(v))}


def uint_field(d: dict, key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadMessage("bad_header", f"{what} has no non-negative integer {key!r} (got {v!r})")
    return v


def lazy_pixels(buffer, dtype: str, order: str, shape: tuple[int, int], algorithm: str | None, elem_size: int):
    """A function returning the (h, w) little-endian pixels of ``buffer``, decompressed if need be."""
    little = np.dtype(dtype).newbyteorder("<")
    nbytes = shape[0] * shape[1] * little.itemsize

    def pixels() -> np.ndarray:
        raw = buffer if algorithm is None else decompress(buffer, algorithm, elem_size, nbytes)
        got = memoryview(raw).nbytes
        if got != nbytes:
            raise BadMessage("bad_size", f"image data has {got} bytes, expected {nbytes} ({shape[0]}x{shape[1]} {dtype})")
        arr = np.frombuffer(raw, dtype=little.newbyteorder(order))
        return arr if order == "<" or little.itemsize == 1 else arr.astype(little)

    return pixels


# --- legacy SIMPLON stream (v1) -----------------------------------------------------------------


def _json(part, what: str) -> dict:
    buf = part.buffer if hasattr(part, "buffer") else part
    try:
        obj = json.loads(bytes(buf))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage("undecodable", f"{what} is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadMessage("undecodable", f"{what} is not a JSON object")
    return obj


def _htype(part) -> Any:
    """The ``htype`` of a JSON part, or None for anything else (a data part, a detector config)."""
    try:
        return _json(part, "part").get("htype")
    except BadMessage:
        return None


def as_list(items) -> list:
    return items if isinstance(items, list) else [items]


class SimplonDecoder(DetectorDecoder):
    """SIMPLON stream v1 ("legacy"): JSON multipart messages, ``htype`` dheader / dimage / dseries_end."""

    protocol = "simplon"
    _PARTS = {"none": 1, "basic": 2, "all": 8}  # least parts of a dheader-1.0 message per header detail

    def __init__(self, scan_shape):
        super().__init__(scan_shape)
        self._pending: list | None = None  # the parts so far of a header sent one part per message

    def _decode(self, parts):
        if self._pending is not None:
            if _htype(parts[0]) not in _V1_MESSAGES:  # the next part(s) of the pending header
                self._pending += list(parts)
                return self._header(_json(self._pending[0], "part 0"), self._pending)
            lost, self._pending = len(self._pending), None
            items = [Item("bad", reason="missing_part", detail=f"{self.protocol}: a dheader-1.0 sent part by "
                          f"part stopped after {lost} part(s)")]
            return items + as_list(self._decode(parts))
        head = _json(parts[0], "part 0")
        htype = head.get("htype")
        if htype == "dheader-1.0":
            return self._header(head, parts)
        if htype == "dimage-1.0":
            series, frame = uint_field(head, "series", "dimage-1.0"), uint_field(head, "frame", "dimage-1.0")
            return self._image(series, frame, lambda: self._parse_image(parts, frame))
        if htype == "dseries_end-1.0":
            series = uint_field(head, "series", "dseries_end-1.0")
            return self._end(series, scan_id_for(series))
        raise BadMessage("unknown_message", f"unknown htype {htype!r}; expected dheader-1.0, dimage-1.0 or "
                         "dseries_end-1.0")

    def _header(self, head: dict, parts) -> list[Item]:
        series = uint_field(head, "series", "dheader-1.0")
        detail = head.get("header_detail", "basic")
        need = self._PARTS.get(detail)
        if need is None:
            raise BadMessage("bad_header", f"header_detail {detail!r} is not one of all, basic, none")
        if len(parts) < need:
            # LiberTEM's DECTRIS simulators (and replays of a capture of the parts) send the header's parts
            # as separate messages; a DCU sends one multipart message. Either way: wait for the rest.
            self._pending = list(parts)
            return []
        self._pending = None
        config = _json(parts[1], "detector config (dheader part 1)") if need > 1 else {}
        w, h = config.get("x_pixels_in_detector"), config.get("y_pixels_in_detector")
        shape = (h, w) if isinstance(w, int) and isinstance(h, int) else None
        dtype = {8: "uint8", 16: "uint16", 32: "uint32"}.get(config.get("bit_depth_image"))
        cal = calibration(config.get("incident_energy", config.get("photon_energy")), config.get("x_pixel_size"),
                          config.get("detector_distance"))
        meta = {**scalars(config), "detector_protocol": "simplon", "series": series, "header_detail": detail}
        return self._begin(Series(series, scan_id_for(series), shape, dtype, cal, meta))

    def _parse_image(self, parts, frame: int):
        if len(parts) < 3:
            raise BadMessage("missing_part", f"dimage-1.0 has {len(parts)} parts, expected 4 (dimage, dimage_d, "
                             "data, dconfig)")
        d = _json(parts[1], "dimage_d part")
        if d.get("htype") != "dimage_d-1.0":
            raise BadMessage("bad_header", f"part 1 of an image is {d.get('htype')!r}, expected dimage_d-1.0")
        shape, dtype, enc = d.get("shape"), d.get("type"), d.get("encoding", "")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise BadMessage("bad_header", f"dimage_d shape {shape!r} is not [x, y]")
        hw = (shape[1], shape[0])  # SIMPLON: shape is [x, y] = [width, height]
        known = self.series.frame_shape if self.series is not None else None
        if known and hw != known and (shape[0], shape[1]) == known:
            hw = known  # a sender that wrote [y, x]: the detector config says which is which
        if dtype not in DTYPES:
            raise BadMessage("bad_dtype", f"pixel type {dtype!r} is not one of {', '.join(DTYPES)}")
        m = _ENCODING.fullmatch(enc) if isinstance(enc, str) else None
        if m is None or (m["bits"] and not m["lz4"]):
            raise BadMessage("unsupported_compression", f"encoding {enc!r} is not <, >, lz4< or bs8/16/32-lz4<")
        buffer = parts[2].buffer if hasattr(parts[2], "buffer") else parts[2]
        size = d.get("size")
        if size is not None and size != memoryview(buffer).nbytes:
            raise BadMessage("bad_size", f"data part has {memoryview(buffer).nbytes} bytes, dimage_d says {size}")
        algorithm = ("bslz4" if m["bits"] else "lz4-block") if m["lz4"] else None
        elem = int(m["bits"]) // 8 if m["bits"] else 1
        return hw, dtype, lazy_pixels(buffer, dtype, m["order"], hw, algorithm, elem)
