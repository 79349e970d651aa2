"""DECTRIS SIMPLON stream2: one CBOR map per message, self-described (tag 55799,
which a DCU sends and DECTRIS's parser requires; taken with or without),
``type`` start / image / end. Image data is ``data: {channel: tag 40 [[h, w],
typed array]}`` (RFC 8746); the typed array's bytes may be a DECTRIS tag
56500 ``[algorithm, elem_size, bytes]``, algorithm ``bslz4`` or ``lz4``, both
in the HDF5 filters' framing (the 12-byte header included). The start
message's ``image_size_x``/``_y`` and ``image_dtype`` start the scan; where
``image_dtype`` is missing (the EIGER2 capture we checked has none) the scan
starts at the first image, whose typed-array tag gives it. Only the first
channel (threshold) of the start message's ``channels`` is used; that
channel's ``pixel_mask`` (an array as an image's, non-zero = bad), where the
start message has one, becomes the scan's ``bad_pixels``.

The series bookkeeping is ``DetectorDecoder`` (``base.py``); the fields shared with the legacy stream, the
DECTRIS tags and the pixels' decompression are in ``dectris.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from rrstem.stream.detectors.base import BadMessage, BlockPool, DetectorDecoder, Item, Series
from rrstem.stream.detectors.cborscan import ImageWalk
from rrstem.stream.detectors.dectris import as_list, calibration, lazy_pixels, scalars, scan_id_for, uint_field
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
                out += as_list(msg if isinstance(msg, Item) else self._guard(self._message, msg))
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
        series = uint_field(msg, "series_id", f"stream2 {kind} message")
        key = (series, msg.get("series_unique_id"))
        if kind == "start":
            return self._start_msg(msg, key)
        if kind == "end":
            return self._end(key, scan_id_for(*key))
        index = uint_field(msg, "image_id", "stream2 image message")
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
        meta = {**scalars(msg), "detector_protocol": "stream2"}
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
        try:
            series.bad_pixels = self._pixel_mask(msg.get("pixel_mask"), channel, shape)
        except BadMessage as exc:  # the scan still starts, unmasked; the results say why
            meta["pixel_mask_problem"] = str(exc)
        return self._begin(series)

    def _pixel_mask(self, masks, channel, shape) -> tuple:
        """[row, col] of the non-zero pixels of the start message's ``pixel_mask`` for ``channel``
        (``{channel: tag 40 [[h, w], typed array]}``, as an image's data), where it has the frame's shape."""
        if not isinstance(masks, Mapping) or not masks or shape is None:
            return ()
        value = masks.get(channel) if channel in masks else next(iter(masks.values()))
        dims, dtype, pixels = self._parse_image({"data": {"mask": value}}, channel="mask")
        if dims != shape:
            raise BadMessage("bad_shape", f"pixel_mask is {dims[0]}x{dims[1]}, the images {shape[0]}x{shape[1]}")
        return tuple((int(r), int(c)) for r, c in np.argwhere(pixels().reshape(dims) != 0))

    def _parse_image(self, msg: Mapping, channel: str | None = None):
        data = msg.get("data")
        if not isinstance(data, Mapping) or not data:
            raise BadMessage("bad_data", "image message has no data map")
        channel = channel or (self.series.channel if self.series.channel in data else next(iter(data)))
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
        return shape, dtype, lazy_pixels(payload, dtype, "<", shape, algorithm, elem)
