"""Decompression of detector frames: LZ4 and bitshuffle+LZ4, in the HDF5 filters' framing.

The codecs are the ``lz4`` and ``bitshuffle`` libraries; only the framing
(sizes and block lengths) is read here, and checked against the buffer before
a library trusts it. Used by the DECTRIS adapters (``stream/detectors/dectris.py``)
and their simulators (``simulators/dectris.py``).
"""

from __future__ import annotations

import struct

import bitshuffle
import lz4.block
import numpy as np

from rrstem.stream.detectors.base import BadMessage

#: HDF5 LZ4 / bitshuffle filter framing: uncompressed bytes (u64) and block bytes (u32), big-endian.
H5_HEADER = struct.Struct(">QI")
_BLOCK_SIZE = struct.Struct(">I")


def decompress(data, algorithm: str, elem_size: int, nbytes: int) -> bytes | np.ndarray:
    """Decompress ``data`` to exactly ``nbytes`` bytes.

    ``algorithm``: ``lz4-block`` (one bare LZ4 block), ``lz4`` or ``bslz4``
    (HDF5 framing). The framing is checked against ``nbytes`` before anything
    is allocated, and the bitshuffle block sizes against the buffer before the
    library reads it (it trusts them). Raises ``BadMessage``.
    """
    data = memoryview(data).cast("B")
    try:
        if algorithm == "lz4-block":
            out = lz4.block.decompress(data, uncompressed_size=nbytes)
        elif algorithm in ("lz4", "bslz4"):
            if data.nbytes < H5_HEADER.size:
                raise BadMessage("bad_compression", f"{algorithm} data of {data.nbytes} bytes has no 12-byte header")
            total, block = H5_HEADER.unpack_from(data)
            if algorithm == "bslz4" and total == 0 and block == 0 and nbytes:
                # a header left zero, as LiberTEM-rs' mock DECTRIS simulator sends it (its decoder skips the
                # 12 bytes): the frame's size and bitshuffle's default block
                total, block = nbytes, default_block(elem_size) * elem_size
            if total != nbytes:
                raise BadMessage("bad_size", f"{algorithm} data holds {total} bytes, expected {nbytes}")
            if algorithm == "lz4":
                out = _lz4_blocks(data[H5_HEADER.size:], total, block)
            else:
                out = _bslz4(data[H5_HEADER.size:], total, block, elem_size)
        else:
            raise BadMessage("unsupported_compression", f"compression {algorithm!r} is not supported; "
                             "use none, lz4 or bslz4")
    except BadMessage:
        raise
    except Exception as exc:  # the codecs raise several types on corrupt input
        raise BadMessage("bad_compression", f"{algorithm} data does not decompress ({type(exc).__name__}: {exc})")
    got = out.nbytes if isinstance(out, np.ndarray) else len(out)
    if got != nbytes:
        raise BadMessage("bad_size", f"{algorithm} data decompressed to {got} bytes, expected {nbytes}")
    return out


def default_block(elem_size: int) -> int:
    """bitshuffle's default block, in elements: 8 kB, a multiple of 8 elements, at least 128 (its HDF5 filter's)."""
    return max(128, 8192 // elem_size // 8 * 8)


def _lz4_blocks(data: memoryview, total: int, block: int) -> bytes:
    if block == 0:
        raise BadMessage("bad_compression", "lz4 block size is 0")
    out, pos = [], 0
    for start in range(0, total, block):
        size = min(block, total - start)
        (csize,) = _BLOCK_SIZE.unpack_from(data, pos)
        chunk = data[pos + 4:pos + 4 + csize]
        pos += 4 + csize
        out.append(bytes(chunk) if csize == size else lz4.block.decompress(chunk, uncompressed_size=size))
    return b"".join(out)


def _bslz4(data: memoryview, total: int, block: int, elem_size: int) -> np.ndarray:
    if elem_size not in (1, 2, 4, 8) or total % elem_size or block == 0 or block % (8 * elem_size):
        raise BadMessage("bad_compression", f"bslz4 element size {elem_size} / block of {block} bytes "
                         f"do not fit {total} bytes")
    n, per_block = total // elem_size, block // elem_size
    blocks = n // per_block + (n % per_block >= 8)
    pos = 0
    for _ in range(blocks):  # every block is a big-endian size and that many LZ4 bytes
        if pos + 4 > data.nbytes:
            raise BadMessage("bad_compression", "bslz4 data is truncated")
        pos += 4 + _BLOCK_SIZE.unpack_from(data, pos)[0]
    if pos + (n % 8) * elem_size != data.nbytes:
        raise BadMessage("bad_compression", f"bslz4 blocks hold {data.nbytes} bytes, expected "
                         f"{pos + (n % 8) * elem_size}")
    return bitshuffle.decompress_lz4(np.frombuffer(data, np.uint8), (n,), np.dtype(f"u{elem_size}"), per_block)


def compress(frame: np.ndarray, algorithm: str) -> bytes:
    """The inverse of ``decompress`` for one C-contiguous array (used by the simulators)."""
    raw = np.ascontiguousarray(frame).reshape(-1)
    if algorithm == "lz4-block":
        return lz4.block.compress(raw.tobytes(), store_size=False)
    if algorithm == "lz4":
        block, parts = 1 << 16, []
        buf = raw.tobytes()
        for start in range(0, len(buf), block):
            packed = lz4.block.compress(buf[start:start + block], store_size=False)
            plain = buf[start:start + block]
            packed = packed if len(packed) < len(plain) else plain  # stored as is when LZ4 does not help
            parts += [_BLOCK_SIZE.pack(len(packed)), packed]
        return H5_HEADER.pack(len(buf), block) + b"".join(parts)
    if algorithm == "bslz4":
        per_block = default_block(raw.itemsize)  # the HDF5 filter's 8 kB default
        payload = bitshuffle.compress_lz4(raw, per_block)
        return H5_HEADER.pack(raw.nbytes, per_block * raw.itemsize) + payload.tobytes()
    raise ValueError(f"compression {algorithm!r} is not supported; use lz4-block, lz4 or bslz4")
