"""Fixtures for the simulator tests: a rrstem/1 receiver on real sockets, the default graphene scan."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from rrstem.simulators.graphene import GrapheneSource
from rrstem.stream import protocol


def receive_scan(sock: zmq.Socket, timeout: float = 10.0) -> dict:
    """Collect one scan (start .. end) from ``sock``, decoded with the service's validators.

    Returns the start and end messages, the (index -> frame) dict, the frames
    messages' (first, count) and the arrival time of each frames message.
    """
    start = end = None
    frames: dict[int, np.ndarray] = {}
    messages, times = [], []
    deadline = time.monotonic() + timeout
    while end is None:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000)):
            raise TimeoutError(f"scan incomplete after {timeout} s: {len(frames)} frames")
        parts = sock.recv_multipart(copy=False)
        msg = protocol.decode_header(parts[0].buffer)
        if isinstance(msg, protocol.Start):
            start = msg
        elif isinstance(msg, protocol.Frames):
            arr = protocol.frames_array(start, msg, parts[1].buffer)
            times.append(time.perf_counter())
            messages.append((msg.first, msg.count))
            for j in range(msg.count):
                frames.setdefault(msg.first + j, []).append(arr[j].copy())
        else:
            end = msg
    return {"start": start, "end": end, "frames": frames, "messages": messages, "times": times}


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def run_in_thread():
    """Run a callable in a thread; ``join()`` returns its result or re-raises its exception."""
    threads = []

    def start(fn, *args, **kwargs):
        box = {}

        def target():
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=target, daemon=True)
        t.start()

        def join(timeout=20.0):
            t.join(timeout)
            assert not t.is_alive(), "worker thread did not finish"
            if "error" in box:
                raise box["error"]
            return box["result"]

        threads.append(t)
        return join

    yield start
    for t in threads:
        t.join(5)


def com_mrad(frames: np.ndarray, pixel_mrad: float) -> tuple[np.ndarray, np.ndarray]:
    """(com_y, com_x) in mrad of (..., d, d) frames, zero angle at pixel d // 2."""
    rows, cols = frames.sum(axis=-1, dtype=np.float64), frames.sum(axis=-2, dtype=np.float64)
    k = (np.arange(frames.shape[-1]) - frames.shape[-1] // 2) * pixel_mrad
    total = rows.sum(axis=-1)
    return (rows @ k) / total, (cols @ k) / total


@pytest.fixture(scope="session")
def graphene_default():
    """The default noise-free 64x64 scan at a 128 px detector, its float patterns and generation time."""
    with GrapheneSource((64, 64), 128) as src:
        t0 = time.perf_counter()
        frames = src.chunk(0, src.n_frames)
        seconds = time.perf_counter() - t0
        yield {"source": src, "frames": frames, "seconds": seconds}


@pytest.fixture
def com():
    return com_mrad


@pytest.fixture
def receive():
    return receive_scan
