"""Snapshots: the service's current maps and state, published on a PUB socket.

A snapshot is a multipart message. Part 0 is a msgpack map validated by
``SnapshotHeader``; its ``arrays`` list names the arrays that follow, one
part each, in order. Subscribers (dashboards, steering clients) keep only the
newest snapshot: set ``zmq.CONFLATE`` or drain the socket, never queue.

Array names used by the service (all float32 unless noted):

``vbf``, ``vadf``, ``com_x``, ``com_y``, ``com_magnitude``, ``com_angle``
    (ny, nx) maps; NaN where no frame has arrived.
``filled``
    (ny, nx) uint8, 1 where a frame has arrived.
``mean_pattern``
    (h, w) the running mean of the binned frames.
``rotation``, ``recon_error``
    (ny, nx) rrVAE maps, present once the model has encoded the scan.
``latent``
    (d, ny, nx) rrVAE content latents.
``training/<name>``
    1-D training histories. ``step``, ``time`` and ``images_seen`` are per logged
    step, beside ``loss`` and its terms; ``eval_step`` is per evaluation, beside
    ``heldout_elbo``, ``rotation_r`` and ``latent_r_max``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rrstem.stream.protocol import PROTOCOL, ProtocolError

_SNAPSHOT_DTYPES = ("float32", "float64", "uint8", "int32", "int64", "uint16", "uint32")


class ArraySpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Array name, see the module docstring.")
    dtype: str = Field(description="NumPy dtype name, little-endian.")
    shape: list[int] = Field(description="Array shape.")


class SnapshotHeader(BaseModel):
    """Part 0 of a snapshot message."""

    model_config = ConfigDict(extra="allow")

    type: str = Field("snapshot", pattern="^snapshot$")
    protocol: str = Field(PROTOCOL, description="Protocol version.")
    seq: int = Field(0, description="Increases by one per published snapshot.")
    time: float = Field(default_factory=time.time, description="Unix time the snapshot was taken.")
    scan_id: str | None = Field(None, description="Current scan, None before the first start.")
    state: str = Field("idle", description="idle | acquiring | consolidating | done")
    scan_shape: list[int] | None = Field(None, description="(ny, nx).")
    frame_shape: list[int] | None = Field(None, description="(h, w) of the raw frames.")
    binned_shape: list[int] | None = Field(None, description="(h, w) after binning and crop.")
    expected: int = Field(0, description="Number of scan positions.")
    counters: dict[str, int] = Field(default_factory=dict, description="received, missing, duplicate, ...")
    frames_per_s: float = Field(0.0, description="Ingest rate over the last second.")
    calibration: dict[str, Any] = Field(default_factory=dict, description="Start message calibration.")
    geometry: dict[str, Any] = Field(default_factory=dict, description="Disc centre/radius, bin, crop.")
    com_unit: str = Field("px", description="Unit of com_x, com_y, com_magnitude.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="state, step, latest loss and metrics of the trainer."
    )
    error: str | None = Field(None, description="A worker failure, if any; shown as a banner.")
    control: str | None = Field(None, description="The service's control endpoint, for dashboards.")
    orphans: dict[str, int] = Field(
        default_factory=dict, description="Rejected input that belongs to no scan, by reason."
    )
    arrays: list[ArraySpec] = Field(default_factory=list, description="Arrays in parts 1..n.")


@dataclass
class Snapshot:
    header: SnapshotHeader
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def encode(self) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = []
        specs = []
        for name, arr in self.arrays.items():
            arr = np.ascontiguousarray(arr)
            if arr.dtype == bool:
                arr = arr.view(np.uint8)
            specs.append(ArraySpec(name=name, dtype=arr.dtype.str.lstrip("<|="), shape=list(arr.shape)))
            parts.append(memoryview(arr.reshape(-1)).cast("B"))
        self.header.arrays = specs
        head = msgpack.packb(self.header.model_dump(mode="json"), use_bin_type=True)
        return [head, *parts]

    @classmethod
    def decode(cls, parts: list) -> "Snapshot":
        try:
            meta = msgpack.unpackb(bytes(parts[0]), raw=False)
            header = SnapshotHeader.model_validate(meta)
        except Exception as exc:
            raise ProtocolError(f"undecodable snapshot header: {exc}") from None
        if len(parts) != 1 + len(header.arrays):
            raise ProtocolError(f"snapshot has {len(parts) - 1} array parts, header lists {len(header.arrays)}")
        arrays = {}
        for spec, part in zip(header.arrays, parts[1:]):
            dtype = np.dtype(spec.dtype)
            if dtype.name not in _SNAPSHOT_DTYPES:
                raise ProtocolError(f"snapshot array {spec.name!r} has unsupported dtype {spec.dtype}")
            buf = part.buffer if hasattr(part, "buffer") else part
            arr = np.frombuffer(buf, dtype=dtype)
            if arr.size != int(np.prod(spec.shape)):
                raise ProtocolError(f"snapshot array {spec.name!r} has {arr.size} values, shape {spec.shape}")
            arrays[spec.name] = arr.reshape(spec.shape)
        return cls(header=header, arrays=arrays)
