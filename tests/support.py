"""Shared test helpers (not fixtures): synthetic frames, a NumPy reference, a rrstem/1 sender."""

from __future__ import annotations

import numpy as np
import zmq

from rrstem.stream import protocol as P


def disc_frames(ny, nx, h=32, w=32, seed=0, dtype=np.uint16, level=1000.0):
    """Poisson frames of a bright disc whose centre moves with the scan position: a known COM signal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((ny, nx, h, w), dtype=dtype)
    for y in range(ny):
        for x in range(nx):
            cy, cx = h / 2 - 0.5 + 0.3 * np.sin(y), w / 2 - 0.5 + 0.3 * np.cos(x)
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (h / 4) ** 2) * level + 3
            out[y, x] = rng.poisson(disc)
    return out


def reference(frames: np.ndarray, geometry: dict, mask: np.ndarray | None = None,
              filled: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The maps of a whole (ny, nx, h, w) array, computed directly with NumPy in float64.

    The mean pattern (the COM reference) is over the ``filled`` positions only.
    """
    ny, nx, h, w = frames.shape
    y0, y1, x0, x1 = geometry["crop"]
    b = geometry["bin"]
    f = frames.astype(np.float64)
    if mask is not None:
        f = f * ~mask
    f = f[:, :, y0:y1, x0:x1]
    hb, wb = (y1 - y0) // b, (x1 - x0) // b
    binned = f.reshape(ny, nx, hb, b, wb, b).sum(axis=(3, 5))
    ky, kx = np.mgrid[0:hb, 0:wb]
    r = np.hypot(ky - geometry["center"][0], kx - geometry["center"][1])
    total = binned.sum(axis=(2, 3))
    mean = binned[filled].mean(axis=0) if filled is not None else binned.mean(axis=(0, 1))
    ref_x = (mean * kx).sum() / mean.sum()
    ref_y = (mean * ky).sum() / mean.sum()
    com_x = (binned * kx).sum(axis=(2, 3)) / total - ref_x
    com_y = (binned * ky).sum(axis=(2, 3)) / total - ref_y
    return {
        "binned": binned,
        "mean_pattern": mean,
        "vbf": (binned * (r <= geometry["radius"])).sum(axis=(2, 3)),
        "vadf": (binned * ((r >= geometry["adf_inner"]) & (r <= geometry["adf_outer"]))).sum(axis=(2, 3)),
        "com_x": com_x,
        "com_y": com_y,
    }


class Sender:
    """A PUSH socket connected to the service, speaking rrstem/1."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.connect(endpoint)

    def start(self, scan_id, scan_shape, frame_shape, dtype="uint16", **kw):
        P.send_start(self.sock, P.Start(scan_id=scan_id, scan_shape=scan_shape, frame_shape=frame_shape,
                                        dtype=dtype, **kw))

    def frames(self, scan_id, first, frames):
        P.send_frames(self.sock, scan_id, first, frames)

    def end(self, scan_id, n):
        P.send_end(self.sock, scan_id, n)

    def raw(self, parts):
        self.sock.send_multipart(parts)

    def close(self):
        self.sock.close()


def wait_results(service, n=1, timeout=20.0):
    """Wait until ``n`` scans' results were written; re-raise worker errors."""
    import time

    deadline = time.monotonic() + timeout
    while len(service.results_written) < n:
        assert time.monotonic() < deadline, f"no results after {timeout} s: {[str(f) for f in service.failures]}"
        service.results_event.wait(0.1)
        service.results_event.clear()
    service.check()
    return service.results_written[n - 1][1]


def fill_disk(path) -> None:
    """Write zeros to ``path`` until its file system is full (the tests' full-disk cases)."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
        except OSError:
            pass
