"""Stream any ``Source`` as a DECTRIS detector: SIMPLON stream v1 ("legacy") or stream2 (CBOR).

An encoder turns one scan into the messages of one detector series (header,
one message per image, series end); ``stream_detector`` sends them from a
PUSH socket that binds by default, like the detector's data port, with the
pacing, progress and timeouts of ``simulators.source.stream``. The image
number (v1 ``frame``, stream2 ``image_id``) is the 0-based row-major scan
index. Pixel data can be sent raw or compressed as the detectors do (``lz4``,
``bslz4``); the codecs are the ones the decoders use
(``stream/detectors/codecs.py``). The messages follow DECTRIS's stream2
documentation (self-described CBOR, ``type`` first, the start message's
documented fields) and what LiberTEM-rs' DECTRIS receiver requires of a v1
detector config (``trigger_mode`` ``exte`` with one trigger per position);
``docs/protocol.md`` says what was checked against what.

What a detector cannot say about the scan is not sent: the scan shape (the
receiver is told it with ``--scan-shape``), the scan id of the legacy stream
(the series number stands for it), the convergence angle and scan step. The
calibration goes out the way the detector reports it: the beam energy in eV
and the pixel size and detector distance in metres (a pixel of
``PIXEL_SIZE_M`` at the distance that gives the source's mrad per pixel).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from typing import Callable, Sequence

import cbor2
import numpy as np
import zmq

from rrstem.simulators.source import Source, StreamStats, stream
from rrstem.stream.detectors.codecs import compress
from rrstem.stream.detectors.stream2 import (DECTRIS_COMPRESSION, MULTIDIM_ROW_MAJOR, SELF_DESCRIBED_CBOR,
                                            TYPED_ARRAY_TAGS)
from rrstem.stream.protocol import Start

COMPRESSIONS = ("none", "lz4", "bslz4")
HEADER_DETAILS = ("all", "basic", "none")
#: Physical pixel size the simulators report (an ARINA-like 100 um pixel).
PIXEL_SIZE_M = 100e-6
_TAG_OF = {dtype: tag for tag, dtype in TYPED_ARRAY_TAGS.items()}


def electron_wavelength_angstrom(energy_ev: float) -> float:
    """The relativistic de Broglie wavelength of an electron of kinetic energy ``energy_ev``, in angstroms."""
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    ev = e * energy_ev
    return 1e10 * h / math.sqrt(2 * m * ev * (1 + ev / (2 * m * c * c)))


def _detector_geometry(start: Start) -> dict[str, float]:
    cal, out = start.calibration, {}
    if cal.energy_kev:
        out["incident_energy"] = cal.energy_kev * 1000.0
        out["incident_wavelength"] = electron_wavelength_angstrom(out["incident_energy"])
    if cal.detector_pixel_mrad:
        out["pixel_size"] = PIXEL_SIZE_M
        out["detector_distance"] = PIXEL_SIZE_M / math.tan(cal.detector_pixel_mrad / 1000.0)
    return out


def _check(compression: str, header_detail: str = "basic") -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    if header_detail not in HEADER_DETAILS:
        raise ValueError(f"header detail must be one of {', '.join(HEADER_DETAILS)}, not {header_detail!r}")


class _PerFrame:
    """A detector protocol sends one message per image (see ``simulators.source.stream``)."""

    per_frame = True

    @property
    def label(self) -> str:
        return f"{type(self).__name__.removesuffix('Encoder').lower()} series {self.series}"

    def messages(self, first: int, frames: np.ndarray):
        for k, frame in enumerate(frames):
            yield self.image(first + k, frame), 1


class SimplonEncoder(_PerFrame):
    """The legacy SIMPLON stream (v1) messages of one series, as lists of parts."""

    def __init__(self, start: Start, series: int = 1, compression: str = "none", header_detail: str = "basic"):
        _check(compression, header_detail)
        self.start, self.series, self.compression, self.detail = start, series, compression, header_detail
        self.dtype = np.dtype(start.dtype).newbyteorder("<")
        bits = 8 * self.dtype.itemsize
        self.encoding = {"none": "<", "lz4": "lz4<", "bslz4": f"bs{bits}-lz4<"}[compression]

    def header(self) -> list[bytes]:
        h, w = self.start.frame_shape
        parts = [_dumps(htype="dheader-1.0", series=self.series, header_detail=self.detail)]
        if self.detail == "none":
            return parts
        geo = _detector_geometry(self.start)
        # one image per probe position, each on an external trigger (trigger_mode exte: ntrigger images),
        # as a DCU reports a 4D-STEM scan and as LiberTEM-live's DECTRIS receiver requires the fields
        config = {"description": "rrstem DECTRIS simulator", "detector_number": "SIM-0001",
                  "x_pixels_in_detector": w, "y_pixels_in_detector": h, "trigger_mode": "exte",
                  "ntrigger": self.start.n_positions, "nimages": 1, "beam_center_x": w / 2, "beam_center_y": h / 2,
                  "count_time": 1e-3, "frame_time": 1e-3, "compression": self.compression,
                  "software_version": "1.8.0"}
        if self.dtype.kind == "u":  # the detector's bit depth only says which unsigned type it sends
            config["bit_depth_image"] = config["bit_depth_readout"] = 8 * self.dtype.itemsize
        if "incident_energy" in geo:
            config.update(incident_energy=geo["incident_energy"], wavelength=geo["incident_wavelength"])
        if "pixel_size" in geo:
            config.update(x_pixel_size=geo["pixel_size"], y_pixel_size=geo["pixel_size"],
                          detector_distance=geo["detector_distance"])
        parts.append(json.dumps(config).encode())
        if self.detail == "all":  # flatfield, pixel mask, count rate table: [x, y] shapes, JSON then data
            for htype, dtype, array in (("dflatfield-1.0", "float32", np.ones((h, w), "<f4")),
                                        ("dpixelmask-1.0", "uint32", np.zeros((h, w), "<u4")),
                                        ("dcountrate_table-1.0", "float32", np.zeros((2, 16), "<f4"))):
                parts += [_dumps(htype=htype, shape=[array.shape[1], array.shape[0]], type=dtype), array.tobytes()]
        return parts

    def image(self, index: int, frame: np.ndarray) -> list[bytes]:
        frame = np.ascontiguousarray(frame, dtype=self.dtype)
        blob = frame.tobytes() if self.compression == "none" else compress(
            frame, "lz4-block" if self.compression == "lz4" else "bslz4")
        t = int(index * 1e6)  # ns
        return [_dumps(htype="dimage-1.0", series=self.series, frame=index, hash=hashlib.md5(blob).hexdigest()),
                _dumps(htype="dimage_d-1.0", shape=[frame.shape[1], frame.shape[0]], type=self.start.dtype,
                       encoding=self.encoding, size=len(blob)),
                blob,
                _dumps(htype="dconfig-1.0", start_time=t, stop_time=t + 1_000_000, real_time=1_000_000)]

    def end(self, sent: int | None = None) -> list[bytes]:
        return [_dumps(htype="dseries_end-1.0", series=self.series)]


class Stream2Encoder(_PerFrame):
    """The SIMPLON stream2 (CBOR) messages of one series, each a one-part list."""

    channel = "threshold_1"

    def __init__(self, start: Start, series: int = 1, compression: str = "none", header_detail: str = "basic"):
        _check(compression)
        self.start, self.series, self.compression = start, series, compression
        self.dtype = np.dtype(start.dtype).newbyteorder("<")
        self.date = datetime.datetime.now(datetime.timezone.utc)

    def _ids(self, kind: str) -> dict:  # "type" first: DECTRIS's parser reads it as the map's first key
        return {"type": kind, "series_id": self.series, "series_unique_id": self.start.scan_id}

    def header(self) -> list[bytes]:
        h, w = self.start.frame_shape
        geo = _detector_geometry(self.start)
        msg = {**self._ids("start"), "arm_date": self.date, "beam_center_x": w / 2, "beam_center_y": h / 2,
               "channels": [self.channel], "count_time": 1e-3, "countrate_correction_enabled": False,
               "detector_description": "rrstem DECTRIS simulator", "detector_serial_number": "SIM-0001",
               "flatfield_enabled": False, "frame_time": 1e-3, "image_dtype": self.start.dtype,
               "image_size_x": w, "image_size_y": h, "number_of_images": self.start.n_positions,
               "pixel_mask_enabled": False, "virtual_pixel_interpolation_enabled": False}
        if self.dtype.kind == "u":
            msg["saturation_value"] = int(np.iinfo(self.dtype).max) - 1  # the top value is NODATA
        if "incident_energy" in geo:
            msg.update(incident_energy=geo["incident_energy"], incident_wavelength=geo["incident_wavelength"],
                       threshold_energy={self.channel: geo["incident_energy"] / 2})
        if "pixel_size" in geo:
            msg.update(pixel_size_x=geo["pixel_size"], pixel_size_y=geo["pixel_size"],
                       detector_translation=[0.0, 0.0, geo["detector_distance"]])
        return [_cbor(msg)]

    def image(self, index: int, frame: np.ndarray) -> list[bytes]:
        frame = np.ascontiguousarray(frame, dtype=self.dtype)
        payload = frame.tobytes()
        if self.compression != "none":
            modifier = self.dtype.itemsize if self.compression == "bslz4" else 0
            payload = cbor2.CBORTag(DECTRIS_COMPRESSION, [self.compression, modifier,
                                                          compress(frame, self.compression)])
        data = cbor2.CBORTag(MULTIDIM_ROW_MAJOR, [list(frame.shape), cbor2.CBORTag(_TAG_OF[self.start.dtype], payload)])
        t = index * 1000
        msg = {**self._ids("image"), "image_id": index, "series_date": self.date, "start_time": [t, 1_000_000],
               "stop_time": [t + 1000, 1_000_000], "real_time": [1000, 1_000_000], "data": {self.channel: data}}
        return [_cbor(msg)]

    def end(self, sent: int | None = None) -> list[bytes]:
        return [_cbor(self._ids("end"))]


ENCODERS = {"simplon": SimplonEncoder, "stream2": Stream2Encoder}


def _dumps(**fields) -> bytes:
    return json.dumps(fields).encode()


def _cbor(msg: dict) -> bytes:
    """One stream2 message as a DCU sends it: self-described CBOR (tag 55799), which DECTRIS's parser requires."""
    return SELF_DESCRIBED_CBOR + cbor2.dumps(msg)


def stream_detector(
    source: Source,
    endpoint: str,
    *,
    protocol: str = "simplon",
    compression: str = "none",
    header_detail: str = "basic",
    series: int = 1,
    bind: bool = True,
    socket_type: str = "push",
    rate: float | None = None,
    progress: bool = True,
    order: Sequence[int] | None = None,
    timeout: float = 10.0,
    on_endpoint: Callable[[str], None] | None = None,
    context: zmq.Context | None = None,
    grace: float = 0.5,
) -> StreamStats:
    """Send ``source`` as one DECTRIS series: header, one message per image, series end.

    ``protocol`` is ``simplon`` (stream v1) or ``stream2``; ``compression``
    ``none``, ``lz4`` or ``bslz4``; ``header_detail`` (legacy only) ``all``,
    ``basic`` or ``none``. The other options are those of
    ``simulators.source.stream``. Like a detector, which stays up, the
    socket stays open ``grace`` seconds after the series end: a receiver
    under back-pressure still holds the last messages then, and ZeroMQ drops
    a multipart message half taken when its connection closes.
    """
    if protocol not in ENCODERS:
        raise ValueError(f"protocol must be one of {', '.join(ENCODERS)}, not {protocol!r}")
    encoder = ENCODERS[protocol](source.start, series=series, compression=compression, header_detail=header_detail)
    return stream(source, endpoint, bind=bind, socket_type=socket_type, rate=rate, progress=progress, order=order,
                  timeout=timeout, on_endpoint=on_endpoint, context=context, encoder=encoder, grace=grace)
