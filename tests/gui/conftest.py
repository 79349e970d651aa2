"""Fixtures for the dashboard tests: offscreen Qt, a real PUB publisher and a real REP control server."""

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before any Qt import

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from rrstem.stream.control import pack, pack_array, unpack

sys.path.insert(0, str(Path(__file__).parent))  # demo_data: the synthetic snapshots, for tests and bench/


def bind(sock, endpoint: str) -> str:
    """Bind ``sock``; a tcp endpoint without a port gets one from the system (port 0). Returns the bound endpoint."""
    if endpoint.startswith("tcp://") and endpoint.count(":") == 1:
        endpoint += ":0"
    sock.bind(endpoint)
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


class Publisher:
    """PUB socket on a free 127.0.0.1 port."""

    def __init__(self, ctx):
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = bind(self.sock, "tcp://127.0.0.1")

    def send(self, snapshot):
        self.sock.send_multipart(snapshot.encode())  # copied: no zero-copy buffers outlive the test's context


def known_frame(y, x, shape=(16, 16)):
    """The frame the test control server returns for position (y, x)."""
    return (np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape) + 1000 * y + x)


class ControlServer:
    """REP socket on a thread; records requests, answers from ``replies`` or with a known frame."""

    def __init__(self, ctx, endpoint="tcp://127.0.0.1"):
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = bind(self.sock, endpoint)
        self.requests = []
        self.replies = {
            "status": {"ok": True, "status": {"state": "acquiring"}},
            "save": {"ok": True, "path": "/data/results-test.h5"},
            "pause_training": {"ok": True, "training": {"state": "paused", "step": 7}},
            "resume_training": {"ok": True, "training": {"state": "running", "step": 7}},
            "reset_model": {"ok": True, "training": {"state": "running", "step": 0}},
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _answer(self, req):
        if req["cmd"] == "frame":
            y, x = req["index"]
            frame = known_frame(y, x)
            return {"ok": True, "frame": pack_array(frame), "mean": pack_array(frame * 0 + 1),
                    "recon": pack_array(frame * 0.5), "residual": pack_array(frame * 0.5 - 1)}
        return self.replies.get(req["cmd"], {"ok": False, "error": f"unknown command {req['cmd']!r}"})

    def _run(self):
        while not self._stop.is_set():
            if self.sock.poll(50):
                req = unpack(self.sock.recv())
                self.requests.append(req)
                self.sock.send(pack(self._answer(req)))
        self.sock.close()

    def close(self):
        self._stop.set()
        self._thread.join(2.0)


@pytest.fixture(scope="session")
def zctx():
    """One context for the dashboard tests; each test closes its own sockets. It is not terminated at a test's
    teardown: ``ctx.term()`` there aborted the process once in a fresh-clone CI run (SIGABRT inside libzmq, no
    message, with only the main thread left), and a context ends with the process anyway."""
    return zmq.Context()


@pytest.fixture(scope="session")
def retired_publishers():
    """The PUB sockets of finished tests, closed when the session ends.

    A test's PUB is not closed at its teardown: pytest tears the publisher down just before the test's dashboard
    (whose SUB is still connected), and a PUB closing with multipart snapshots in flight while its subscriber
    disconnects trips an assertion inside libzmq 4.3.5 (``Resource temporarily unavailable
    (src/session_base.cpp:233)``, libzmq issue 3442) that aborts the process: caught under gdb in 2 of 6 runs
    of this file, the SIGABRT in a fresh-clone CI run. By the session's end every dashboard is closed.
    """
    socks = []
    yield socks
    for sock in socks:
        sock.close()


@pytest.fixture
def publisher(zctx, retired_publishers):
    pub = Publisher(zctx)
    yield pub
    retired_publishers.append(pub.sock)


@pytest.fixture
def make_control_server(zctx):
    """Factory: a control server on ``endpoint`` (default: a free tcp port)."""
    servers = []

    def make(endpoint="tcp://127.0.0.1"):
        servers.append(ControlServer(zctx, endpoint))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def control_server(make_control_server):
    return make_control_server()


@pytest.fixture
def frame_for():
    return known_frame
