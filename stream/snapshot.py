"""Snapshots: the service's current maps and state, published on a PUB socket.

A snapshot is a multipart message. Part 0 is a msgpack map validated by
``SnapshotHeader``; its ``arrays`` list names the arrays that follow, one
part each, in order. Subscribers (dashboards, steering clients) keep only the
newest snapshot by draining the socket and decoding the last message.
(``zmq.CONFLATE`` cannot be used: it breaks multipart messages.)

The schema is declared once, here: the array names (``Arrays``, taken from
the declarations of the reductions, the defect map and the model), the
training histories (``history_key`` over ``model.interface.HISTORIES``), the
scan states (``STATES``) and the counters (``COUNTERS``). The service, the
dashboard and the tests use these names, and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rrstem.model import interface as model_names
from rrstem.stream import defects
from rrstem.stream.protocol import PROTOCOL, ProtocolError
from rrstem.stream.reductions import MapSpec, com, dpc, mean, virtual

_SNAPSHOT_DTYPES = ("float32", "float64", "uint8", "int32", "int64", "uint16", "uint32")

#: Per-scan counters, as in the snapshot header and the results file. ``missing`` is known
#: only once the scan has ended.
COUNTERS = ("received", "missing", "duplicate", "invalid", "stale", "dropped")

#: Scan states: ``idle`` before the first scan; ``acquiring`` until its end; ``finishing`` while the
#: results are made (``consolidating`` while the rrVAE consolidates); ``done`` once they are written.
ScanState = Literal["idle", "acquiring", "finishing", "consolidating", "done"]
#: Why a scan ended, as its results' ``end_reason`` and the ``scan_ended`` event say: the sender's ``end`` (or
#: a detector's announced frame count), no message for the idle timeout, a stop, a newer start, a failure;
#: ``running`` in a checkpoint of a scan that has not ended.
EndReason = Literal["end", "idle", "stopped", "superseded", "failed", "running"]
END_REASONS: tuple[str, ...] = get_args(EndReason)
STATES: tuple[str, ...] = get_args(ScanState)


#: which positions hold a frame: published and written beside every scan's maps
FILLED_MAP = MapSpec("filled", "", "positions that hold a frame", panel=False)
#: the maps the rrVAE makes, once it has encoded the scan
MODEL_SPECS = {m.name: m for m in (
    MapSpec(model_names.ROTATION, "rad", "rrVAE rotation (rad)"),
    MapSpec(model_names.LATENT, "", "rrVAE content latents (d, ny, nx)", panel=False),  # a panel per latent
    MapSpec(model_names.RECON_ERROR, "", "reconstruction error"),
    MapSpec(model_names.RECON_SIGMA, "poisson_sigma", "reconstruction error in Poisson-noise units", panel=False),
    MapSpec(model_names.RRVAE_ANOMALY, "", "the rrVAE's own outlier score", panel=False))}


class Arrays:
    """Names of the arrays a snapshot carries (float32 unless noted): the maps come from their declarations
    (``stream/reductions/``, ``defects.DEFECT_SPECS``, ``MODEL_SPECS``); any registered reduction adds its own."""

    VBF = virtual.VBF.name  #: (ny, nx) virtual bright field; NaN where no frame has arrived (so are all maps)
    VADF = virtual.VADF.name  #: (ny, nx) virtual annular dark field
    COM_X = com.COM_X.name  #: (ny, nx) centre of mass relative to the mean pattern's, in ``com_unit``
    COM_Y = com.COM_Y.name  #: (ny, nx)
    COM_MAGNITUDE = com.COM_MAGNITUDE.name  #: (ny, nx) hypot(com_x, com_y)
    COM_ANGLE = com.COM_ANGLE.name  #: (ny, nx) atan2(com_y, com_x), rad
    DPC_X = dpc.DPC_X.name  #: (ny, nx) deflection along scan x: the COM turned into the scan's frame, descan removed
    DPC_Y = dpc.DPC_Y.name  #: (ny, nx) along scan y
    IDPC = dpc.IDPC.name  #: (ny, nx) integrated DPC, in ``maps``' unit of it
    DDPC = dpc.DDPC.name  #: (ny, nx) divergence of (dpc_x, dpc_y)
    FILLED = FILLED_MAP.name  #: (ny, nx) bool where a frame has arrived (sent as uint8)
    MEAN_PATTERN = mean.MEAN_PATTERN.name  #: (h, w) running mean of the binned frames
    ROTATION = model_names.ROTATION  #: (ny, nx) rrVAE angle, rad; present once the model has encoded the scan
    LATENT = model_names.LATENT  #: (d, ny, nx) rrVAE content latents
    RECON_ERROR = model_names.RECON_ERROR  #: (ny, nx) rrVAE reconstruction error
    RECON_SIGMA = model_names.RECON_SIGMA  #: (ny, nx) reconstruction error in Poisson-noise units (1 = noise)
    RRVAE_ANOMALY = model_names.RRVAE_ANOMALY  #: (ny, nx) the rrVAE's own outlier score (model/anomaly.py)
    ANOMALY = defects.ANOMALY  #: (ny, nx) THE defect map: VADF lattice residual, robust noise units (stream/defects.py)
    ALARMS = defects.ALARMS  #: (k, 2) int32 [y, x] of positions with ``anomaly`` above the threshold, highest first
    ALARM_THRESHOLD = defects.ALARM_THRESHOLD  #: () float32 the alarm threshold on ``anomaly`` (inf: none yet)

    #: the maps over the scan that the built-in reductions derive from their sums
    SCAN_MAPS = tuple(m.name for m in (virtual.VBF, virtual.VADF, *com.CentreOfMass.maps,
                                       *dpc.DifferentialPhaseContrast.maps))
    #: the defect map and its alarms, which the scan derives from its VADF map
    DEFECT_MAPS = tuple(m.name for m in defects.DEFECT_SPECS)
    MODEL_MAPS = model_names.MAPS
    #: everything the model sends
    MODEL_OUTPUTS = model_names.OUTPUTS


#: Prefix of the 1-D training histories: ``training/<name>`` for each name in
#: ``model.interface.HISTORIES``; ``model.interface.HISTORY_AXIS`` names each curve's x axis.
HISTORY_PREFIX = "training/"
HISTORIES = model_names.HISTORIES
HISTORY_AXIS = model_names.HISTORY_AXIS
HISTORY_AXES = model_names.HISTORY_AXES
LOSS_HISTORIES = model_names.LOSS_HISTORIES


def history_key(name: str) -> str:
    """The snapshot array name of training history ``name``."""
    return HISTORY_PREFIX + name


class ArraySpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="An Arrays name, or history_key(name) of a training history.")
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
    state: str = Field("idle", description="One of STATES: idle | acquiring | finishing | consolidating | done.")
    scan_shape: list[int] | None = Field(None, description="(ny, nx).")
    frame_shape: list[int] | None = Field(None, description="(h, w) of the raw frames.")
    binned_shape: list[int] | None = Field(None, description="(h, w) after binning and crop.")
    expected: int = Field(0, description="Number of scan positions.")
    counters: dict[str, int] = Field(default_factory=dict, description="The COUNTERS of the current scan.")
    latest_index: list[int] | None = Field(None, description="(y, x) of the newest frame taken, for the inspector.")
    frames_per_s: float = Field(0.0, description="Ingest rate over the last 2 s.")
    calibration: dict[str, Any] = Field(default_factory=dict, description="Start message calibration.")
    geometry: dict[str, Any] = Field(default_factory=dict, description="Disc centre/radius, bin, crop.")
    com_unit: str = Field("px", description="Unit of com_x, com_y, com_magnitude.")
    maps: list[dict[str, Any]] = Field(
        default_factory=list, description="The declaration of each map the service makes of the current scan: "
        "name, unit, description, panel (whether a dashboard shows it as a panel of its own), per_position "
        "(ny, nx) or (d, ny, nx) over the scan, else another shape. A map is present in arrays once it has data.")
    map_attrs: dict[str, Any] = Field(
        default_factory=dict, description="What the reductions say of the maps in this snapshot, as the results "
        "file's maps group attributes: dpc_rotation_deg, dpc_flip, dpc_calibration (source given | loaded | "
        "found, uncertainty_deg, curl_ratio, settled, carried_over, ...), dpc_descan.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="state, step, latest loss and metrics of the trainer."
    )
    error: str | None = Field(None, description="A worker failure, if any; shown as a banner.")
    control: str | None = Field(None, description="The service's control endpoint, for dashboards.")
    orphans: dict[str, int] = Field(
        default_factory=dict, description="Rejected input that belongs to no scan, by reason."
    )
    rescans: list[dict[str, Any]] = Field(
        default_factory=list, description="Rescan requests on the current scan: request_id, scan_id (the "
        "subscan's), region (y0, y1, x0, x1), state (stream/steering.py STATES, or done).")
    subscan: dict[str, Any] | None = Field(None, description="Where the current scan lies on its parent "
                                           "(events.Subscan fields), if it is a subscan.")
    arrays: list[ArraySpec] = Field(default_factory=list, description="Arrays in parts 1..n.")


@dataclass
class Snapshot:
    header: SnapshotHeader
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def encode(self) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = []
        specs = []
        for name, arr in self.arrays.items():
            shape = list(np.shape(arr))  # before ascontiguousarray, which makes a 0-d array 1-d
            arr = np.ascontiguousarray(arr)
            if arr.dtype == bool:
                arr = arr.view(np.uint8)
            specs.append(ArraySpec(name=name, dtype=arr.dtype.str.lstrip("<|="), shape=shape))
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
            try:
                dtype = np.dtype(spec.dtype).newbyteorder("<")
            except (TypeError, ValueError):
                dtype = None
            if dtype is None or dtype.name not in _SNAPSHOT_DTYPES:
                raise ProtocolError(f"snapshot array {spec.name!r} has unsupported dtype {spec.dtype!r}")
            buf = memoryview(part.buffer if hasattr(part, "buffer") else part).cast("B")
            if any(n < 0 for n in spec.shape) or buf.nbytes != int(np.prod(spec.shape)) * dtype.itemsize:
                raise ProtocolError(f"snapshot array {spec.name!r} has {buf.nbytes} bytes, shape {spec.shape} "
                                    f"{spec.dtype} needs {int(np.prod(spec.shape)) * dtype.itemsize}")
            arrays[spec.name] = np.frombuffer(buf, dtype=dtype).reshape(spec.shape)
        return cls(header=header, arrays=arrays)
