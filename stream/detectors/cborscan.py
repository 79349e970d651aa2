"""The fast way through a stream2 image message: its few fields read in one compiled walk over its bytes.

One image per message is how a DECTRIS detector sends, so the cost of each
message decides the rate. ``cbor2.loads`` builds every object of a message
(a datetime, lists, the pixel byte string, copied twice). ``ImageWalk.take``
walks the CBOR bytes instead (RFC 8949 heads, nothing built), reads the five
fields a frame needs (type, series_id, series_unique_id, image_id, data),
checks them against the running series and copies the pixels once, into a
row of the batch's frame block (the figures: ``bench/README.md``).

It takes only the plain shape a DCU sends: a definite-length map (under tag
55799 or not), each of those keys at most once, data a map of channels, the
chosen one ``tag 40 [[h, w], tag T bytes]``, uncompressed. Anything else (an
indefinite length, a compressed image, another series, a truncated or
damaged message) it leaves to the caller, which decodes that message with
cbor2, with every check and counter of the slow path. The walk checks every
head against the end of the buffer, every text string for valid UTF-8, and
that the message ends exactly where its map does. It does not interpret
tags in the fields it skips: a date cbor2 cannot parse does not stop an
image whose own fields are sound.
"""

from __future__ import annotations

import numba
import numpy as np


def _utf8(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8).copy()


# the field names the walk reads, and the type it takes (constants of the compiled code)
_K0, _K1, _K2, _K3, _K4, _IMAGE = (_utf8(k) for k in ("type", "series_id", "series_unique_id", "image_id", "data",
                                                      "image"))


@numba.njit(cache=True, nogil=True)
def _head(buf, pos, end):
    """(major type, additional info, argument, position after the head); position -1 if it does not fit, is
    indefinite (info 31) or reserved (28..30)."""
    if pos >= end:
        return 0, 0, 0, -1
    ib = buf[pos]
    major, info = ib >> 5, ib & 31
    pos += 1
    if info < 24:
        return major, info, np.int64(info), pos
    if info > 27:
        return major, info, 0, -1
    size = 1 << (info - 24)  # 1, 2, 4 or 8 bytes, big-endian
    if pos + size > end:
        return major, info, 0, -1
    if size == 8 and buf[pos] >= 128:  # beyond int64: no length or id this walk takes
        return major, info, 0, -1
    arg = np.int64(0)
    for k in range(size):
        arg = (arg << 8) | np.int64(buf[pos + k])
    return major, info, arg, pos + size


@numba.njit(cache=True, nogil=True)
def _utf8_ok(buf, pos, n):
    """Are ``buf[pos:pos + n]`` valid UTF-8 (RFC 3629: no overlong forms, surrogates or code points past
    U+10FFFF), as cbor2 requires of every text string?"""
    end = pos + n
    while pos < end:
        c = buf[pos]
        if c < 0x80:
            pos += 1
            continue
        if 0xC2 <= c <= 0xDF:
            size, lo, hi = 2, 0x80, 0xBF
        elif 0xE0 <= c <= 0xEF:
            size = 3
            lo = 0xA0 if c == 0xE0 else 0x80
            hi = 0x9F if c == 0xED else 0xBF
        elif 0xF0 <= c <= 0xF4:
            size = 4
            lo = 0x90 if c == 0xF0 else 0x80
            hi = 0x8F if c == 0xF4 else 0xBF
        else:
            return False
        if pos + size > end or not lo <= buf[pos + 1] <= hi:
            return False
        for k in range(2, size):
            if not 0x80 <= buf[pos + k] <= 0xBF:
                return False
        pos += size
    return True


@numba.njit(cache=True, nogil=True)
def _skip(buf, pos, end):
    """The position after the data item at ``pos`` (with everything nested in it); -1 if malformed."""
    pending = np.int64(1)
    while pending > 0:
        major, info, arg, pos = _head(buf, pos, end)
        if pos < 0:
            return -1
        pending -= 1
        if major == 2 or major == 3:
            if arg > end - pos or major == 3 and not _utf8_ok(buf, pos, arg):
                return -1
            pos += arg
        elif major == 4 or major == 5:
            items = arg if major == 4 else 2 * arg
            if items > end - pos:  # every item takes at least one byte
                return -1
            pending += items
        elif major == 6:
            pending += 1
        # 0, 1: integers; 7: simple values and floats, their bytes already in the head
    return pos


@numba.njit(cache=True, nogil=True)
def _text_is(buf, pos, n, want):
    if n != want.shape[0]:
        return False
    for k in range(n):
        if buf[pos + k] != want[k]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _key_id(buf, pos, n, k0, k1, k2, k3, k4):
    if _text_is(buf, pos, n, k0):
        return 0
    if _text_is(buf, pos, n, k1):
        return 1
    if _text_is(buf, pos, n, k2):
        return 2
    if _text_is(buf, pos, n, k3):
        return 3
    if _text_is(buf, pos, n, k4):
        return 4
    return -1


@numba.njit(cache=True, nogil=True)
def _array_value(buf, pos, end, out):
    """Is the item at ``pos`` ``tag 40 [[h, w], tag T bytes]``? Returns (the position after the item, -1 if it
    is malformed; whether it has that shape), and if it has, out[0..4] = h, w, T, payload offset and length."""
    after = _skip(buf, pos, end)
    if after < 0:
        return -1, False
    major, info, arg, p = _head(buf, pos, end)
    if major != 6 or arg != 40:
        return after, False
    major, info, arg, p = _head(buf, p, end)
    if major != 4 or arg != 2:
        return after, False
    major, info, arg, p = _head(buf, p, end)
    if major != 4 or arg != 2:
        return after, False
    major, info, h, p = _head(buf, p, end)
    if major != 0:
        return after, False
    major, info, w, p = _head(buf, p, end)
    if major != 0:
        return after, False
    major, info, tag, p = _head(buf, p, end)
    if major != 6:
        return after, False
    major, info, n, p = _head(buf, p, end)
    if major != 2 or p + n != after:
        return after, False
    out[0], out[1], out[2], out[3], out[4] = h, w, tag, p, n
    return after, True


@numba.njit(cache=True, nogil=True)
def _walk(buf, uid, channel, want):
    """(image id, pixel offset) of the message in ``buf`` if it is an image of the series ``want`` = [series_id,
    h, w, typed-array tag, payload bytes, has a unique id (``uid``), has a channel (``channel``)]; else (-1, -1)."""
    k0, k1, k2, k3, k4, image = _K0, _K1, _K2, _K3, _K4, _IMAGE
    has_uid, has_channel = want[5] != 0, want[6] != 0
    end = buf.shape[0]
    major, info, arg, pos = _head(buf, 0, end)
    if pos < 0:
        return -1, -1
    if major == 6 and arg == 55799:  # self-described CBOR
        major, info, arg, pos = _head(buf, pos, end)
        if pos < 0:
            return -1, -1
    if major != 5:
        return -1, -1
    seen = np.zeros(5, np.int64)
    is_image, series, index, uid_ok, found = False, np.int64(-1), np.int64(-1), not has_uid, False
    first = np.zeros(5, np.int64)
    chosen = np.zeros(5, np.int64)
    for _ in range(arg):
        major, info, n, p = _head(buf, pos, end)
        if p < 0:
            return -1, -1
        if major != 3:  # not a text key: skipped with its value
            key = -1
            pos = _skip(buf, pos, end)
        else:
            if n > end - p:
                return -1, -1
            key = _key_id(buf, p, n, k0, k1, k2, k3, k4)
            if key < 0 and not _utf8_ok(buf, p, n):
                return -1, -1
            pos = p + n
        if pos < 0:
            return -1, -1
        if key >= 0:
            if seen[key]:  # a repeated field: cbor2 keeps the last; leave it to cbor2
                return -1, -1
            seen[key] = 1
        vmajor, vinfo, v, vp = _head(buf, pos, end)
        if vp < 0:
            return -1, -1
        if key == 0:
            is_image = vmajor == 3 and v <= end - vp and _text_is(buf, vp, v, image)
        elif key == 1:
            if vmajor != 0:
                return -1, -1
            series = v
        elif key == 2:
            if has_uid:
                uid_ok = vmajor == 3 and v <= end - vp and _text_is(buf, vp, v, uid)
            else:  # the series has no unique id: the image may send none, or null
                uid_ok = vmajor == 7 and vinfo == 22
        elif key == 3:
            if vmajor != 0:
                return -1, -1
            index = v
        elif key == 4:
            if vmajor != 5:
                return -1, -1
            q, named_found, first_shaped = vp, False, False
            for c in range(v):
                cmaj, cinfo, cn, cp = _head(buf, q, end)
                if cp < 0:
                    return -1, -1
                named = has_channel and cmaj == 3 and cn <= end - cp and _text_is(buf, cp, cn, channel)
                q = _skip(buf, q, end)
                if q < 0:
                    return -1, -1
                if named:
                    if named_found:  # the channel twice: cbor2 keeps the last; leave it to cbor2
                        return -1, -1
                    q, shaped = _array_value(buf, q, end, chosen)
                    if q < 0 or not shaped:
                        return -1, -1
                    named_found = True
                elif c == 0:
                    q, first_shaped = _array_value(buf, q, end, first)
                else:
                    q = _skip(buf, q, end)
                if q < 0:
                    return -1, -1
            if not named_found:  # the slow path takes the first channel; only the plain case here
                if v != 1 or not first_shaped:
                    return -1, -1
                chosen[:] = first
            found = True
            pos = q
            continue
        pos = _skip(buf, pos, end)
        if pos < 0:
            return -1, -1
    if pos != end or not (is_image and uid_ok and found and index >= 0 and series == want[0]):
        return -1, -1
    if chosen[0] != want[1] or chosen[1] != want[2] or chosen[2] != want[3] or chosen[4] != want[4]:
        return -1, -1
    return index, chosen[3]


class ImageWalk:
    """The fast way for the images of one series: ``take(message, block, row)`` -> the image id, its pixels
    copied into ``block[row]`` (a (rows, frame bytes) uint8 array); or None, nothing copied.

    ``series_id``, ``unique_id`` (None: the series has none), ``channel`` (None: the first), the frame
    ``shape``, the typed-array ``tag`` of its dtype and its size in bytes are the series'."""

    def __init__(self, series_id: int, unique_id: str | None, channel: str | None, shape: tuple[int, int],
                 tag: int, nbytes: int):
        has_uid, has_channel = isinstance(unique_id, str), isinstance(channel, str)
        self._uid = _utf8(unique_id) if has_uid else np.zeros(0, np.uint8)
        self._channel = _utf8(channel) if has_channel else np.zeros(0, np.uint8)
        self._want = np.array([series_id, shape[0], shape[1], tag, nbytes, has_uid, has_channel], dtype=np.int64)
        self.nbytes = nbytes

    def take(self, message, block: np.ndarray, row: int) -> int | None:
        buf = np.frombuffer(message, dtype=np.uint8)
        index, at = _walk(buf, self._uid, self._channel, self._want)
        if index < 0:
            return None
        block[row] = buf[at:at + self.nbytes]  # NumPy's copy: faster than a compiled byte loop
        return int(index)
