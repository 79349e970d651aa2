"""Streaming a Source over real ZeroMQ sockets: every frame arrives intact, pacing, timeouts."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import zmq

from rrstem.simulators import source as source_mod
from rrstem.simulators.dectris import stream_detector
from rrstem.simulators.graphene import GrapheneSource
from rrstem.simulators.source import ArraySource, default_frames_per_message, stream
from rrstem.stream.protocol import Calibration, Start
from rrstem.stream.receiver import EndpointInUse


def array_source(ny=6, nx=5, h=16, w=12, dtype="uint16", scan_id="t1") -> ArraySource:
    data = np.random.default_rng(1).integers(0, 60_000, (ny, nx, h, w)).astype(dtype)
    start = Start(scan_id=scan_id, scan_shape=(ny, nx), frame_shape=(h, w), dtype=dtype,
                  calibration=Calibration(energy_kev=60.0), metadata={"note": "test"})
    return ArraySource(data, start)


def assert_complete(got: dict, src) -> None:
    """Every frame exactly once, byte-identical, and the end message counts them."""
    expected = src.chunk(0, src.n_frames)
    assert got["start"] == src.start
    assert sorted(got["frames"]) == list(range(src.n_frames))
    for i, copies in got["frames"].items():
        assert len(copies) == 1 and copies[0].tobytes() == expected[i].tobytes()
    assert got["end"].frames_sent == src.n_frames


def test_push_bind_port0_delivers_every_frame(zctx, run_in_thread, receive):
    src = array_source()
    endpoints = []
    join = run_in_thread(stream, src, "tcp://127.0.0.1:0", progress=False, frames_per_message=4,
                         on_endpoint=endpoints.append)
    deadline = time.monotonic() + 5
    while not endpoints and time.monotonic() < deadline:
        time.sleep(0.005)  # the sender reports its port from its own thread
    pull = zctx.socket(zmq.PULL)
    pull.connect(endpoints[0])
    got = receive(pull)
    stats = join()
    assert_complete(got, src)
    assert endpoints[0].startswith("tcp://127.0.0.1:") and not endpoints[0].endswith(":0")
    assert source_mod.LAST_ENDPOINT == endpoints[0] == stats.endpoint
    assert got["messages"][:2] == [(0, 4), (4, 4)] and got["messages"][-1] == (28, 2)
    assert (stats.frames, stats.messages) == (30, 8 + 2)


def test_connect_mode_to_a_binding_receiver_over_ipc(zctx, run_in_thread, receive, tmp_path):
    src = GrapheneSource((5, 7), 64, dose=1e5, seed=3)
    pull = zctx.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/frames"
    pull.bind(endpoint)
    join = run_in_thread(stream, src, endpoint, bind=False, progress=False)
    got = receive(pull)
    assert join().frames == 35
    assert_complete(got, src)
    assert got["messages"] == [(0, 35)]  # 35 x 8 KB fits one ~2 MB message


def test_order_sends_runs_of_consecutive_frames_and_counts_them(zctx, run_in_thread, receive):
    src = array_source()
    order = [10, 11, 12, 3, 4, 20, 20, 29]  # out of order, a duplicate, gaps
    pull = zctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    join = run_in_thread(stream, src, f"tcp://127.0.0.1:{port}", bind=False, progress=False, order=order)
    got = receive(pull)
    join()
    assert got["messages"] == [(10, 3), (3, 2), (20, 1), (20, 1), (29, 1)]
    assert got["end"].frames_sent == len(order)
    expected = src.chunk(0, 30)
    assert all(np.array_equal(got["frames"][i][0], expected[i]) for i in set(order))
    assert len(got["frames"][20]) == 2
    with pytest.raises(ValueError, match=r"outside 0\.\.29"):
        stream(src, "tcp://127.0.0.1:0", order=[30], progress=False)


def test_pub_waits_for_a_subscriber_then_delivers(zctx, run_in_thread, receive):
    src = array_source(scan_id="pubscan")
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    join = run_in_thread(stream, src, f"tcp://127.0.0.1:{port}", bind=False, socket_type="pub", progress=False)
    got = receive(sub)
    join()
    assert_complete(got, src)


def test_rate_is_paced_by_the_clock(zctx, run_in_thread, receive):
    """Pacing means never faster than asked. A loaded machine may send slower, so only the lower
    bound of the time taken is tight; the upper one only says it did not stall."""
    src = array_source(ny=10, nx=30)  # 300 frames
    pull = zctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    join = run_in_thread(stream, src, f"tcp://127.0.0.1:{port}", bind=False, progress=False, rate=1000.0)
    got = receive(pull)
    stats = join()
    assert len(got["messages"]) == 6  # 1000 frames/s -> 50 frames per message, 20 messages/s
    span = got["times"][-1] - got["times"][0]  # 250 frames after the first message: at least 0.25 s
    assert 0.24 <= span < 5.0
    assert 50.0 < stats.frames_per_s <= 1000.0 * 1.05


def test_no_receiver_raises_timeout_instead_of_hanging():
    src = array_source()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no receiver took frames from tcp://127\.0\.0\.1:\d+ within 0\.3 s"):
        stream(src, "tcp://127.0.0.1:0", progress=False, timeout=0.3)
    assert time.monotonic() - t0 < 10.0  # the 0.3 s timeout, not the default 30 s
    with pytest.raises(TimeoutError, match="no subscriber connected"):
        stream(src, "tcp://127.0.0.1:0", progress=False, timeout=0.2, socket_type="pub")


def test_bad_stream_arguments():
    src = array_source()
    with pytest.raises(ValueError, match="rate must be a positive"):
        stream(src, "tcp://127.0.0.1:0", rate=0)
    with pytest.raises(ValueError, match="socket_type must be 'push' or 'pub'"):
        stream(src, "tcp://127.0.0.1:0", socket_type="req")
    with pytest.raises(ValueError, match=r"cannot bind to 'bogus://x'"):
        stream(src, "bogus://x", progress=False)


def test_bind_on_a_bound_endpoint_says_to_connect(zctx):
    """``rrstem replay --to EP`` (binds by default) while ``rrstem serve --bind`` holds EP: the error says what to do."""
    with zctx.socket(zmq.PULL) as receiver:
        receiver.bind("tcp://127.0.0.1:0")
        endpoint = receiver.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port
        with pytest.raises(EndpointInUse, match=rf"cannot bind {re.escape(endpoint)}: address already in use\. "
                           r"Another process is bound to it: perhaps the other side of the stream.*"
                           r"add --connect to `rrstem simulate` or `rrstem replay`, or leave out --bind on "
                           r"`rrstem serve`"):
            stream(array_source(), endpoint, progress=False, context=zctx)
        with pytest.raises(ValueError, match="address already in use.*--connect"):  # the DECTRIS sender: the same
            stream_detector(array_source(), endpoint, protocol="stream2", progress=False, context=zctx)


def test_default_frames_per_message():
    assert default_frames_per_message(128 * 128 * 2) == 64  # 2 MB messages
    assert default_frames_per_message(256 * 256 * 2) == 16
    assert default_frames_per_message(4096 * 4096 * 4) == 1
    assert default_frames_per_message(128 * 128 * 2, rate=200.0) == 10  # 20 messages/s
    assert default_frames_per_message(128 * 128 * 2, rate=5.0) == 1


def test_array_source_checks_shape_and_range():
    src = array_source()
    with pytest.raises(ValueError, match="does not match the start message"):
        ArraySource(np.zeros((2, 2, 2, 2), np.uint16), src.start)
    with pytest.raises(ValueError, match=r"frames 25\.\.34 are outside the scan of 30 frames"):
        src.chunk(25, 10)
