"""DECTRIS SIMPLON stream adapters: legacy stream (v1, JSON multipart) and stream2 (CBOR).

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

stream2 (``stream2``): one CBOR map per message, self-described (tag 55799,
which a DCU sends and DECTRIS's parser requires; taken with or without),
``type`` start / image / end. Image data is ``data: {channel: tag 40 [[h, w],
typed array]}`` (RFC 8746); the typed array's bytes may be a DECTRIS tag
56500 ``[algorithm, elem_size, bytes]``, algorithm ``bslz4`` or ``lz4``, both
in the HDF5 filters' framing (the 12-byte header included). The start
message's ``image_size_x``/``_y`` and ``image_dtype`` start the scan; where
``image_dtype`` is missing (the EIGER2 capture we checked has none) the scan
starts at the first image, whose typed-array tag gives it. Only the first
channel (threshold) of the start message's ``channels`` is used.
``docs/protocol.md`` says what this was checked against.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from rrstem.stream.detectors.base import BadMessage, BlockPool, DetectorDecoder, Item, Series
from rrstem.stream.detectors.cborscan import ImageWalk
from rrstem.stream.detectors.codecs import decompress
from rrstem.stream.protocol import DTYPES, Frames

#: Rows of a pooled frame block (``decode_many``): the receiver's largest batch, ``receiver.BATCH_MESSAGES``.
BATCH_ROWS = 256
#: Batches of at least this many messages take a pooled block; fewer, a block of their own size.
POOLED = 16
#: RFC 8746 typed-array tags for the pixel types rrstem takes (little-endian, plus uint8).
TYPED_ARRAY_TAGS = {64: "uint8", 69: "uint16", 70: "uint32", 77: "int16", 78: "int32", 85: "float32", 86: "float64"}
MULTIDIM_ROW_MAJOR, DECTRIS_COMPRESSION = 40, 56500
#: RFC 8949 section 3.4.6 "self-described CBOR" (tag 55799): a DCU starts every stream2 message with it.
SELF_DESCRIBED_CBOR = b"\xd9\xd9\xf7"
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


def _scalars(d: dict) -> dict[str, Any]:
    """The JSON scalar fields of a header, for the results file's metadata."""
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))
            and not (isinstance(v, float) and not math.isfinite(v))}


def _uint(d: dict, key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadMessage("bad_header", f"{what} has no non-negative integer {key!r} (got {v!r})")
    return v


def _pixels(buffer, dtype: str, order: str, shape: tuple[int, int], algorithm: str | None, elem_size: int):
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


def _as_list(items) -> list:
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
            return items + _as_list(self._decode(parts))
        head = _json(parts[0], "part 0")
        htype = head.get("htype")
        if htype == "dheader-1.0":
            return self._header(head, parts)
        if htype == "dimage-1.0":
            series, frame = _uint(head, "series", "dimage-1.0"), _uint(head, "frame", "dimage-1.0")
            return self._image(series, frame, lambda: self._parse_image(parts, frame))
        if htype == "dseries_end-1.0":
            series = _uint(head, "series", "dseries_end-1.0")
            return self._end(series, scan_id_for(series))
        raise BadMessage("unknown_message", f"unknown htype {htype!r}; expected dheader-1.0, dimage-1.0 or "
                         "dseries_end-1.0")

    def _header(self, head: dict, parts) -> list[Item]:
        series = _uint(head, "series", "dheader-1.0")
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
        meta = {**_scalars(config), "detector_protocol": "simplon", "series": series, "header_detail": detail}
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
        return hw, dtype, _pixels(buffer, dtype, m["order"], hw, algorithm, elem)


# --- SIMPLON stream2 (CBOR) ---------------------------------------------------------------------


def _buffer(part):
    """The bytes of a message part: a ZeroMQ frame's buffer, or the bytes themselves."""
    return part.buffer if hasattr(part, "buffer") else part


def _tag(obj: Any, number: int, what: str):
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != number:
        got = f"tag {obj.tag}" if isinstance(obj, cbor2.CBORTag) else type(obj).__name__
        raise BadMessage("bad_data", f"{what} is {got}, expected CBOR tag {number}")
    return obj.value


class Stream2Decoder(DetectorDecoder):
    """SIMPLON stream2: one CBOR map per message, ``type`` start / image / end."""

    protocol = "stream2"

    def __init__(self, scan_shape):
        super().__init__(scan_shape)
        self._walk: tuple | None = None  # (the series' Start, its ImageWalk)
        self._blocks = BlockPool()

    def decode(self, parts):
        """One message: the same way as in a batch (``decode_many``), so an image is taken or refused alike."""
        return self.decode_many([parts])

    def _decode(self, parts):
        return self._message(self._loads(parts))

    @staticmethod
    def _loads(parts) -> Mapping:
        if len(parts) != 1:
            raise BadMessage("extra_part", f"stream2 messages have one part, this one has {len(parts)}")
        buf = memoryview(_buffer(parts[0])).cast("B")
        if buf[:3] == SELF_DESCRIBED_CBOR:  # decoded without it, cbor2 gives plain dicts and lists
            buf = buf[3:]
        try:
            msg = cbor2.loads(buf)
        except Exception as exc:  # cbor2 raises several types
            raise BadMessage("undecodable", f"message is not CBOR ({type(exc).__name__}: {exc})") from None
        if not isinstance(msg, Mapping):
            raise BadMessage("undecodable", "message is not a CBOR map")
        return msg

    def decode_many(self, messages: list) -> list[Item]:
        """The items of several messages, the same as ``decode`` gives one by one, except that each run of
        images with consecutive ids is one item (its pixels copied into one block of frames).

        An image goes the fast way when it is uncompressed and of the running series, shape and dtype: first
        the compiled walk (``cborscan.ImageWalk``), which reads the bytes without decoding them, then, for a
        message it does not take, cbor2 and ``_fast_image``. Every other message goes through the checks and
        counters of ``_message``. The walk reads only an image's own fields: an image whose other fields
        cbor2 would not decode (a malformed date) is taken all the same, its pixels and id intact.
        """
        out: list[Item] = []
        start, walk, block = None, None, None
        lo = hi = first = 0  # the open run: block rows lo..hi, image ids first..

        def flush():
            nonlocal lo
            if hi > lo:
                frames = block[lo:hi].view(np.dtype(start.dtype).newbyteorder("<"))
                out.append(Item("frames", Frames.model_construct(scan_id=start.scan_id, first=first, count=hi - lo),
                                frames=frames.reshape(hi - lo, *start.frame_shape), scan_id=start.scan_id,
                                count=hi - lo))
            lo = hi

        for parts in messages:
            s = self.series
            if (s.start if s is not None else None) is not start:  # a series began or ended: a new block
                flush()
                start, block, lo, hi = s.start if s is not None else None, None, 0, 0
                walk = self._walk_of(s) if start is not None else None
            if block is None and start is not None:  # pooled for a batch; exact for a few messages
                block = (self._blocks.get(BATCH_ROWS, start.frame_nbytes)[:len(messages)]
                         if POOLED <= len(messages) <= BATCH_ROWS else np.empty((len(messages), start.frame_nbytes), np.uint8))
            index = walk.take(_buffer(parts[0]), block, hi) if walk is not None and len(parts) == 1 else None
            msg = None
            if index is None:
                msg = self._guard(self._loads, parts)
                hit = None if isinstance(msg, Item) or start is None else self._fast_image(msg)
                if hit is not None:
                    index = hit[0]
                    block[hi] = np.frombuffer(hit[1], np.uint8)
            if index is None:
                flush()
                out += _as_list(msg if isinstance(msg, Item) else self._guard(self._message, msg))
                continue
            s.images += 1
            if hi > lo and index != first + (hi - lo):
                flush()
            if hi == lo:
                first = index
            hi += 1
        flush()
        return out

    def _walk_of(self, s: Series) -> ImageWalk | None:
        """The compiled walk for the images of series ``s`` (kept while the series runs)."""
        if self._walk is not None and self._walk[0] is s.start:
            return self._walk[1]
        tag = next((t for t, name in TYPED_ARRAY_TAGS.items() if name == s.start.dtype), None)
        series_id, unique_id = s.key
        walk = None if tag is None else ImageWalk(series_id, unique_id, s.channel, s.start.frame_shape, tag,
                                                  s.start.frame_nbytes)
        self._walk = (s.start, walk)
        return walk

    def _fast_image(self, msg: Mapping) -> tuple[int, bytes] | None:
        """(image id, pixel bytes) of an uncompressed image of the running series in its frame shape and
        dtype; None for anything else."""
        s = self.series
        if s is None or s.start is None or msg.get("type") != "image":
            return None
        series, index, data = msg.get("series_id"), msg.get("image_id"), msg.get("data")
        if not (type(series) is int and type(index) is int and index >= 0 and isinstance(data, Mapping) and data):
            return None
        if (series, msg.get("series_unique_id")) != s.key:
            return None
        value = data.get(s.channel) if s.channel in data else next(iter(data.values()))
        if not (isinstance(value, cbor2.CBORTag) and value.tag == MULTIDIM_ROW_MAJOR):
            return None
        value = value.value
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            return None
        dims, typed = value
        st = s.start
        if not (isinstance(dims, (list, tuple)) and len(dims) == 2 and type(dims[0]) is int and type(dims[1]) is int
                and (dims[0], dims[1]) == st.frame_shape):
            return None
        if not (isinstance(typed, cbor2.CBORTag) and TYPED_ARRAY_TAGS.get(typed.tag) == st.dtype):
            return None
        payload = typed.value
        if type(payload) is not bytes or len(payload) != st.frame_nbytes:
            return None
        return index, payload

    def _message(self, msg: Mapping):
        kind = msg.get("type")
        if kind not in ("start", "image", "end"):
            raise BadMessage("unknown_message", f"unknown message type {kind!r}; expected start, image or end")
        series = _uint(msg, "series_id", f"stream2 {kind} message")
        key = (series, msg.get("series_unique_id"))
        if kind == "start":
            return self._start_msg(msg, key)
        if kind == "end":
            return self._end(key, scan_id_for(*key))
        index = _uint(msg, "image_id", "stream2 image message")
        return self._image(key, index, lambda: self._parse_image(msg))

    def _start_msg(self, msg: Mapping, key) -> list[Item]:
        w, h = msg.get("image_size_x"), msg.get("image_size_y")
        shape = (h, w) if isinstance(w, int) and isinstance(h, int) else None
        dtype = msg.get("image_dtype")  # DECTRIS: uint8, uint16 or uint32; a real EIGER2 capture lacks it
        dtype = dtype if dtype in DTYPES else None  # unknown: taken from the first image's typed-array tag
        translation = msg.get("detector_translation")
        distance = msg.get("detector_distance")  # not a stream2 field; a bridge may add it
        if distance is None and isinstance(translation, (list, tuple)) and len(translation) == 3:
            # along the beam: sample to detector. A real EIGER2 reports a negative z here, so only the size
            # of the component is used (stream2 does not document the sign convention).
            distance = abs(translation[2]) if isinstance(translation[2], (int, float)) else None
        cal = calibration(msg.get("incident_energy"), msg.get("pixel_size_x"), distance)
        channels = msg.get("channels")
        channel = channels[0] if isinstance(channels, (list, tuple)) and channels else None
        meta = {**_scalars(msg), "detector_protocol": "stream2"}
        meta.pop("type", None)
        for field in ("arm_date",):  # tag 0 date/time -> ISO 8601 text
            if hasattr(msg.get(field), "isoformat"):
                meta[field] = msg[field].isoformat()
        energies = msg.get("threshold_energy")
        if isinstance(channel, str):
            meta["channel"] = channel
            if isinstance(energies, Mapping) and isinstance(energies.get(channel), (int, float)):
                meta["threshold_energy"] = float(energies[channel])
        series = Series(key, scan_id_for(*key), shape, dtype, cal, meta)
        series.channel = channel
        return self._begin(series)

    def _parse_image(self, msg: Mapping):
        data = msg.get("data")
        if not isinstance(data, Mapping) or not data:
            raise BadMessage("bad_data", "image message has no data map")
        channel = self.series.channel if self.series.channel in data else next(iter(data))
        value = _tag(data[channel], MULTIDIM_ROW_MAJOR, f"data[{channel!r}]")
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise BadMessage("bad_data", "multi-dimensional array is not [dimensions, array]")
        dims, typed = value
        if not (isinstance(dims, (list, tuple)) and len(dims) == 2 and all(isinstance(v, int) and v > 0 for v in dims)):
            raise BadMessage("bad_data", f"image dimensions {dims!r} are not [height, width]")
        if not isinstance(typed, cbor2.CBORTag) or typed.tag not in TYPED_ARRAY_TAGS:
            got = typed.tag if isinstance(typed, cbor2.CBORTag) else type(typed).__name__
            raise BadMessage("bad_dtype", f"typed array {got} is not one of the tags {sorted(TYPED_ARRAY_TAGS)}")
        dtype, payload = TYPED_ARRAY_TAGS[typed.tag], typed.value
        algorithm, elem = None, np.dtype(dtype).itemsize
        if isinstance(payload, cbor2.CBORTag):
            comp = _tag(payload, DECTRIS_COMPRESSION, "typed array data")
            if not (isinstance(comp, (list, tuple)) and len(comp) == 3 and isinstance(comp[2], bytes)):
                raise BadMessage("bad_data", "compressed data is not [algorithm, modifier, bytes]")
            algorithm, modifier, payload = comp
            if algorithm not in ("lz4", "bslz4"):
                raise BadMessage("unsupported_compression", f"compression {algorithm!r} is not lz4 or bslz4")
            elem = modifier if algorithm == "bslz4" else elem
        elif not isinstance(payload, bytes):
            raise BadMessage("bad_data", f"typed array holds {type(payload).__name__}, expected bytes")
        shape = (int(dims[0]), int(dims[1]))
        return shape, dtype, _pixels(payload, dtype, "<", shape, algorithm, elem)
