"""A Quantum Detectors Merlin PC in software: the data port's bytes, and ``.mib``/``.hdr`` files.

``MerlinFormat`` writes the bytes the Merlin writes, from the format itself:
the acquisition header (``HDR,`` then ``Key:\\tValue`` lines, ``End``), one
``MQ1`` frame header per frame (comma-separated fields ending in a comma, padded
with NUL bytes to the data offset: 384 bytes for one chip, 768 for a quad) and the pixels,
big-endian, assembled (``U08``, ``U16``, ``U32`` for counter depths 6, 12 and
24). On the data port every message is ``MPX,<10-digit length>,<payload>``,
the length counting the payload and the comma before it; a ``.mib`` file is
the frame records without the ``MPX`` prefixes, and its ``.hdr`` is the
acquisition header.

``serve_merlin`` is the Merlin PC's data port: it binds a TCP port (port 0
picks a free one, reported to ``on_endpoint``), waits for the receiver to
connect (``rrstem serve --protocol merlin --listen tcp://HOST:PORT``) and
sends the acquisition. ``acquisition_order`` makes a scan misaligned like a
real one, with a sync offset and flyback frames.
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from rrstem.simulators.source import Source, StreamStats
from rrstem.stream.auth import warn_if_exposed
from rrstem.stream.receiver import tcp_address

#: scan dtype -> (Merlin pixel type, counter depth, big-endian wire dtype)
PIXEL_TYPES = {"uint8": ("U08", 6, ">u1"), "uint16": ("U16", 12, ">u2"), "uint32": ("U32", 24, ">u4")}
LAYOUTS = ("1x1", "2x2")
DATA_PORT = 6342


def mpx(payload_size: int) -> bytes:
    """The ``MPX,<length>,`` prefix of a message whose payload has ``payload_size`` bytes."""
    return b"MPX,%010d," % (payload_size + 1)


def acquisition_order(scan_shape: tuple[int, int], sync_offset: int = 0, flyback: int = 0) -> np.ndarray:
    """Scan index of each frame a misaligned detector sends, in order (the inverse of ``stream.acquisition``).

    A sync offset ``s > 0`` sends ``s`` frames (of position 0) before the scan;
    ``s < 0`` never sends the first ``-s`` positions; each line is followed by
    ``flyback`` frames (repeats of the line's last position).
    """
    ny, nx = scan_shape
    line = nx + flyback
    acq = np.arange(ny * line + sync_offset, dtype=np.int64) - sync_offset
    y, x = np.divmod(np.maximum(acq, 0), line)
    return y * nx + np.minimum(x, nx - 1)


class MerlinFormat:
    """The bytes of one Merlin acquisition of ``(h, w)`` frames of ``dtype`` (uint8, uint16 or uint32)."""

    def __init__(self, frame_shape: tuple[int, int], dtype: str, layout: str = "1x1", frames: int = 0,
                 frames_per_trigger: int = 1, scan_xy: tuple[int, int] | None = None):
        if np.dtype(dtype).name not in PIXEL_TYPES:
            raise ValueError(f"a Merlin sends uint8, uint16 or uint32 pixels (U08, U16, U32), not {dtype}; "
                             "convert the frames (e.g. arr.astype('uint16'))")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.pixel_type, self.depth, self.wire = PIXEL_TYPES[np.dtype(dtype).name]
        self.layout = layout
        self.chips = 4 if layout == "2x2" else 1
        self.data_offset = 768 if self.chips == 4 else 384
        self.frames, self.frames_per_trigger, self.scan_xy = frames, frames_per_trigger, scan_xy
        self.t0 = datetime.datetime(2026, 1, 1, 12, 0, 0)

    def acquisition_header(self) -> bytes:
        """The ``HDR,`` text, as sent on the data port and written to the ``.hdr`` file."""
        assembly = f"{self.layout:>6}"
        lines = [
            "HDR,\t",
            f"Time and Date Stamp (day, mnth, yr, hr, min, s):\t{self.t0:%d/%m/%Y %H:%M:%S}",
            "Chip ID:\t" + ",".join(["W000_A1"] * self.chips + ["-"] * (4 - self.chips)),
            "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX",
            f"Assembly Size (NX1, 2X2):\t{assembly}",
            "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM",
            f"Counter Depth (number):\t{self.depth}",
            "Gain:\tSLGM",
            "Active Counters:\tAlternating",
            f"Frames in Acquisition (Number):\t{self.frames}",
            f"Frames per Trigger (Number):\t{self.frames_per_trigger}",
            "Trigger Start (Positive, Negative, Internal):\tRising Edge LVDS",
            "Readout System:\tMerlin Quad" if self.chips == 4 else "Readout System:\tMerlin",
            "Software Version:\trrstem simulator",
        ]
        if self.scan_xy is not None:
            lines += [f"ScanX:\t{self.scan_xy[0]}", f"ScanY:\t{self.scan_xy[1]}"]
        return ("\n".join(lines) + "\nEnd\t" + " " * 64).encode("latin-1")

    def frame_header(self, sequence: int) -> bytes:
        """The ``MQ1`` header of frame ``sequence`` (from 1), padded to the data offset."""
        h, w = self.frame_shape
        t = self.t0 + datetime.timedelta(milliseconds=sequence)
        thresholds = ",".join(["1.200000E+2", "5.110000E+2"] + ["0.000000E+0"] * 6)
        dacs = ",".join(["3RX", "175", "511"] + ["000"] * 6 + ["125", "255", "125", "125", "100", "100", "082", "100",
                                                                  "087", "030", "128", "004", "255", "129", "128",
                                                                  "176", "168", "511", "511"])
        fields = ["MQ1", f"{sequence:06d}", f"{self.data_offset:05d}", f"{self.chips:02d}", f"{w:04d}", f"{h:04d}",
                  self.pixel_type, f"{self.layout:>6}", "0F" if self.chips == 4 else "01",
                  f"{t:%Y-%m-%d %H:%M:%S.%f}", "0.001000", "0", "0", "0", thresholds,
                  *([dacs] * self.chips), "MQ1A", f"{t:%Y-%m-%dT%H:%M:%S.%f}000Z", "1000000ns", str(self.depth), ""]
        text = ",".join(fields).encode("ascii")
        if len(text) > self.data_offset:
            raise AssertionError(f"frame header of {len(text)} bytes exceeds the data offset {self.data_offset}")
        return text.ljust(self.data_offset, b"\x00")  # NUL padding, as LiberTEM's reader expects of real files

    def pixels(self, frame: np.ndarray) -> np.ndarray:
        """One frame as the wire's big-endian pixels."""
        return np.ascontiguousarray(frame, dtype=self.wire)

    def record(self, sequence: int, frame: np.ndarray) -> bytes:
        """Frame header + pixels: one record of a ``.mib`` file, or one data-port payload."""
        return self.frame_header(sequence) + self.pixels(frame).tobytes()


def write_mib(path, frames: np.ndarray, *, layout: str = "1x1", hdr: bool = True,
              scan_xy: tuple[int, int] | None = None, frames_per_trigger: int | None = None) -> Path:
    """Write ``frames`` (n, h, w) as a ``.mib`` file (and its ``.hdr`` unless ``hdr=False``); returns the ``.mib`` path."""
    path = Path(path)
    frames = np.asarray(frames)
    fmt = MerlinFormat(frames.shape[1:], frames.dtype.name, layout, frames=len(frames),
                       frames_per_trigger=frames_per_trigger or (scan_xy[0] if scan_xy else len(frames)),
                       scan_xy=scan_xy)
    with open(path, "wb") as fh:
        for k, frame in enumerate(frames):
            fh.write(fmt.record(k + 1, frame))
    if hdr:
        path.with_suffix(".hdr").write_bytes(fmt.acquisition_header())
    return path


def serve_merlin(source: Source, endpoint: str = f"tcp://127.0.0.1:{DATA_PORT}", *, layout: str = "1x1",
                 sync_offset: int = 0, flyback: int = 0, continuous: bool = False, scan_xy: bool = True,
                 rate: float | None = None, progress: bool = True, timeout: float = 30.0,
                 on_endpoint: Callable[[str], None] | None = None, grace: float = 0.5,
                 order: np.ndarray | None = None) -> StreamStats:
    """Serve ``source`` as one Merlin acquisition on the data port ``endpoint`` (tcp://HOST:PORT, port 0: any).

    Waits up to ``timeout`` s for the receiver to connect, then sends the
    acquisition header and one message per frame in ``acquisition_order``
    (sync offset, flyback), or in ``order`` (scan indices, e.g. with gaps),
    at ``rate`` frames/s or as fast as the receiver takes them. The header
    says ``ScanX``/``ScanY`` unless ``scan_xy=False``, and a frame count of 0
    when ``continuous``.
    """
    s = source.start
    ny, nx = s.scan_shape
    if order is None:  # a source that holds more frames than positions (a .mib of an acquisition) is sent as it is
        order = (acquisition_order(s.scan_shape, sync_offset, flyback) if sync_offset or flyback
                 or source.n_frames == s.n_positions else np.arange(source.n_frames))
    order = np.asarray(order)
    fmt = MerlinFormat(s.frame_shape, s.dtype, layout, frames=0 if continuous else len(order),
                       frames_per_trigger=nx + flyback, scan_xy=(nx, ny) if scan_xy else None)
    host, port = tcp_address(endpoint)
    server = socket.create_server((host, port))
    try:
        bound = f"tcp://{host}:{server.getsockname()[1]}"
        warn_if_exposed([(bound, "sender")])  # plain TCP, as a Merlin PC serves it: no CURVE
        if on_endpoint is not None:
            on_endpoint(bound)
        server.settimeout(timeout)
        try:
            conn, _ = server.accept()
        except socket.timeout:
            raise TimeoutError(f"no receiver connected to {bound} within {timeout:g} s; start "
                               f"`rrstem serve --protocol merlin --listen {bound}`") from None
        with conn:
            conn.settimeout(timeout)
            return _send_acquisition(conn, source, fmt, order, rate, progress, grace, bound)
    finally:
        server.close()


def _frames(source: Source, order: np.ndarray, block: int = 64) -> Iterator[np.ndarray]:
    for lo in range(0, len(order), block):
        idx = order[lo:lo + block]
        first, last = int(idx.min()), int(idx.max())
        chunk = source.chunk(first, last - first + 1)
        yield from chunk[idx - first]


def _send_acquisition(conn, source, fmt: MerlinFormat, order, rate, progress, grace, bound) -> StreamStats:
    header = fmt.acquisition_header()
    try:
        conn.sendall(mpx(len(header)) + header)
        t0 = time.perf_counter()
        sent = 0
        with tqdm(total=len(order), unit="frame", unit_scale=True, disable=not progress, desc="merlin",
                  mininterval=0.5) as bar:
            for frame in _frames(source, order):
                if rate is not None:
                    delay = t0 + (sent + 1) / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                head = fmt.frame_header(sent + 1)
                pixels = fmt.pixels(frame)
                conn.sendall(mpx(len(head) + pixels.nbytes) + head)
                conn.sendall(memoryview(pixels).cast("B"))
                sent += 1
                bar.update(1)
        seconds = time.perf_counter() - t0
        conn.settimeout(grace)  # like a Merlin PC, stay connected a while: the receiver reads what is queued
        try:
            while conn.recv(4096):  # ends early if the receiver closes its side
                pass
        except (socket.timeout, OSError):
            pass
    except socket.timeout:
        raise TimeoutError(f"the receiver on {bound} took no frames for {conn.gettimeout():g} s") from None
    return StreamStats(endpoint=bound, frames=sent, messages=sent + 1, seconds=seconds)
