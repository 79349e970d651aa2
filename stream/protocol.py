"""Wire protocol ``rrstem/1``: typed, versioned messages over ZeroMQ.

Every message is a ZeroMQ multipart message. Part 0 is a msgpack map with a
``type`` key, validated by the pydantic models below (the single source of
truth for the schema). A ``frames`` message has exactly one more part: the
raw pixel buffer of ``count`` consecutive frames in C order, in the dtype and
frame shape announced by the scan's ``start`` message. Buffers are sent and
received without copying. See ``docs/protocol.md`` for a minimal sender.

Frame indices are row-major scan positions: index = y * nx + x.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

PROTOCOL = "rrstem/1"

#: Pixel dtypes a detector may send (little-endian).
DTYPES = ("uint8", "uint16", "uint32", "int16", "int32", "float32", "float64")

#: Largest frame edge and scan edge accepted, to refuse absurd allocations early.
MAX_FRAME_EDGE = 4096
MAX_SCAN_EDGE = 16384

ScanId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:+-]+$")]


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not follow ``rrstem/1``."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def encode(self) -> bytes:
        """The msgpack header (part 0) of this message."""
        return msgpack.packb(self.model_dump(mode="json"), use_bin_type=True)


class Calibration(BaseModel):
    """Physical calibration of a scan. Every field is optional."""

    model_config = ConfigDict(extra="allow", frozen=True)

    energy_kev: float | None = Field(None, gt=0, description="Beam energy in keV.")
    convergence_mrad: float | None = Field(
        None, gt=0, description="Probe convergence semi-angle in mrad."
    )
    detector_pixel_mrad: float | None = Field(
        None, gt=0, description="Angular size of one unbinned detector pixel in mrad."
    )
    scan_step_nm: float | None = Field(None, gt=0, description="Probe step between scan positions in nm.")


class Start(_Message):
    """Begins a scan. A new ``start`` ends whatever scan was running."""

    type: Literal["start"] = "start"
    protocol: Literal["rrstem/1"] = Field(PROTOCOL, description="Protocol version.")
    scan_id: ScanId = Field(description="Unique name of this scan; also its HDF5 group name.")
    scan_shape: tuple[Annotated[int, Field(ge=1, le=MAX_SCAN_EDGE)], Annotated[int, Field(ge=1, le=MAX_SCAN_EDGE)]] = Field(
        description="(ny, nx) probe positions."
    )
    frame_shape: tuple[Annotated[int, Field(ge=1, le=MAX_FRAME_EDGE)], Annotated[int, Field(ge=1, le=MAX_FRAME_EDGE)]] = Field(
        description="(h, w) detector pixels of every frame."
    )
    dtype: Literal[DTYPES] = Field(description="Pixel dtype of every frame buffer, little-endian.")
    calibration: Calibration = Field(default_factory=Calibration, description="Physical calibration.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Free-form metadata kept in the results file."
    )
    bad_pixels: tuple[tuple[int, int], ...] = Field(
        (), description="[row, col] of the detector pixels known to be bad (the detector's pixel mask), in the "
        "raw frame; they are zeroed in every frame. Optional."
    )

    @model_validator(mode="after")
    def _bad_pixels_inside(self) -> "Start":
        h, w = self.frame_shape
        for r, c in self.bad_pixels:
            if not (0 <= r < h and 0 <= c < w):
                raise ValueError(f"bad pixel [{r}, {c}] is outside the {h}x{w} frame")
        return self

    def encode(self) -> bytes:
        d = self.model_dump(mode="json")
        if not d["bad_pixels"]:
            del d["bad_pixels"]  # absent when there are none: what a sender without a mask sends
        return msgpack.packb(d, use_bin_type=True)

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def frame_nbytes(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1] * np.dtype(self.dtype).itemsize


class Frames(_Message):
    """``count`` consecutive frames starting at scan index ``first``; one buffer part follows."""

    type: Literal["frames"] = "frames"
    scan_id: ScanId = Field(description="The scan these frames belong to.")
    first: int = Field(ge=0, description="Row-major scan index of the first frame.")
    count: int = Field(ge=1, le=1 << 20, description="Number of frames in the buffer.")


class End(_Message):
    """Ends a scan: no more frames for it will be sent."""

    type: Literal["end"] = "end"
    scan_id: ScanId = Field(description="The scan that ends.")
    frames_sent: int = Field(ge=0, description="How many frames the sender sent for this scan.")


Message = Annotated[Union[Start, Frames, End], Field(discriminator="type")]
_adapter: TypeAdapter[Start | Frames | End] = TypeAdapter(Message)


def decode_header(raw: bytes | memoryview) -> Start | Frames | End:
    """Decode and validate part 0. Raises ``ProtocolError`` with the reason."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not msgpack ({type(exc).__name__}: {exc or 'no detail'})") from None
    if not isinstance(obj, dict) or "type" not in obj:
        raise ProtocolError("header is not a msgpack map with a 'type' key")
    try:
        return _adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid {obj.get('type')!r} header: {where}: {first['msg']}") from None


def frames_array(start: Start, header: Frames, buffer: memoryview | bytes) -> np.ndarray:
    """View a frames buffer as (count, h, w) without copying.

    Checks the size against the declared shape and dtype before anything is
    allocated; raises ``ProtocolError`` if it does not match.
    """
    expected = header.count * start.frame_nbytes
    got = memoryview(buffer).nbytes
    if got != expected:
        raise ProtocolError(
            f"frames buffer has {got} bytes, expected {expected} "
            f"({header.count} x {start.frame_shape} {start.dtype})"
        )
    arr = np.frombuffer(buffer, dtype=np.dtype(start.dtype).newbyteorder("<"))
    return arr.reshape(header.count, *start.frame_shape)


def send_start(sock, start: Start) -> None:
    sock.send(start.encode())


def send_frames(sock, scan_id: str, first: int, frames: np.ndarray, copy: bool | None = None) -> None:
    """Send (count, h, w) frames as one message. The array must be C-contiguous."""
    frames = np.ascontiguousarray(frames)
    header = Frames(scan_id=scan_id, first=first, count=frames.shape[0]).encode()
    if copy is None:
        copy = frames.nbytes < 65536  # zero-copy only pays off for large buffers
    sock.send_multipart([header, memoryview(frames.reshape(-1))], copy=copy)


def send_end(sock, scan_id: str, frames_sent: int) -> None:
    sock.send(End(scan_id=scan_id, frames_sent=frames_sent).encode())
