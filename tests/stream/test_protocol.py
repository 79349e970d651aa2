import queue
import re
import threading

import msgpack
import numpy as np
import pytest
import zmq

from rrstem.stream import protocol as P
from rrstem.stream.receiver import EndpointInUse, Receiver


def test_start_round_trip_keeps_every_field():
    start = P.Start(scan_id="scan-1", scan_shape=(3, 4), frame_shape=(16, 8), dtype="float32",
                    calibration=P.Calibration(energy_kev=60, convergence_mrad=31, detector_pixel_mrad=0.5),
                    metadata={"sample": "graphene"})
    back = P.decode_header(start.encode())
    assert back == start
    assert back.n_positions == 12 and back.frame_nbytes == 16 * 8 * 4


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
def test_frames_buffer_viewed_without_copy(dtype):
    start = P.Start(scan_id="s", scan_shape=(2, 2), frame_shape=(3, 5), dtype=dtype)
    data = (np.arange(2 * 15) % 200).astype(dtype).reshape(2, 3, 5)
    view = P.frames_array(start, P.Frames(scan_id="s", first=1, count=2), memoryview(data.reshape(-1)))
    assert np.shares_memory(view, data)
    np.testing.assert_array_equal(view, data)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\xc1\x00", "not msgpack"),
        (msgpack.packb([1, 2]), "map with a 'type'"),
        (msgpack.packb({"type": "frames", "scan_id": "s", "first": -1, "count": 1}), "first"),
        (msgpack.packb({"type": "start", "scan_id": "s", "scan_shape": [2, 2], "frame_shape": [4, 4],
                        "dtype": "complex64"}), "dtype"),
        (msgpack.packb({"type": "start", "scan_id": "a/b", "scan_shape": [2, 2], "frame_shape": [4, 4],
                        "dtype": "uint8"}), "scan_id"),
        (msgpack.packb({"type": "end", "scan_id": "s", "frames_sent": 1, "extra": 1}), "extra"),
        (msgpack.packb({"type": "bogus"}), "bogus|type"),
    ],
)
def test_bad_headers_are_rejected_with_the_reason(raw, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode_header(raw)


def test_buffer_size_mismatch_is_rejected_before_allocation():
    start = P.Start(scan_id="s", scan_shape=(2, 2), frame_shape=(4, 4), dtype="uint16")
    with pytest.raises(P.ProtocolError, match=r"has 30 bytes, expected 32"):
        P.frames_array(start, P.Frames(scan_id="s", first=0, count=1), b"\0" * 30)


def test_receiver_bind_on_a_bound_endpoint_says_to_connect():
    """``rrstem serve --bind`` where the sender already binds (as it does by default): the error says what to do."""
    ctx = zmq.Context()
    try:
        with ctx.socket(zmq.PUSH) as sender:
            sender.bind("tcp://127.0.0.1:0")
            endpoint = sender.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port
            with pytest.raises(EndpointInUse, match=rf"cannot bind {re.escape(endpoint)}: address already in use\. "
                               r"Another process is bound to it: perhaps the other side of the stream.*"
                               r"add --connect to `rrstem simulate` or `rrstem replay`, or leave out --bind") as err:
                Receiver(ctx, endpoint, queue.Queue(), threading.Event(), bind=True)
        assert isinstance(err.value, ValueError) and err.value.endpoint == endpoint  # the CLI reports ValueErrors
        with pytest.raises(ValueError, match=r"cannot connect to 'bogus://x'.*use e\.g\. tcp://HOST:PORT"):
            Receiver(ctx, "bogus://x", queue.Queue(), threading.Event())
    finally:
        ctx.destroy(linger=0)
