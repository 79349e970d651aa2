"""The service over real sockets: streamed maps equal a NumPy reduction of the whole array."""

import time

import msgpack
import numpy as np
import pytest
import zmq

from support import disc_frames, reference, wait_results
from rrstem.stream import protocol as P
from rrstem.stream.control import ControlClient, ControlError, unpack_array
from rrstem.stream.results import read_scan
from rrstem.stream.snapshot import Snapshot


def assert_maps_match(res, frames, filled=None, com_scale=1.0):
    """Results maps == NumPy reference of the frames; sums exact, COM within 1e-6 relative.

    ``com_scale`` converts the reference COM (binned pixels) to the results' unit.
    """
    f = np.ones(frames.shape[:2], bool) if filled is None else filled
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"), filled=f)
    maps = res["maps"]
    np.testing.assert_array_equal(maps["filled"], f)
    for name in ("vbf", "vadf"):
        if frames.dtype.kind in "ui":  # integer counts sum exactly
            np.testing.assert_array_equal(maps[name][f], ref[name][f])
        else:  # float frames are binned in float32
            np.testing.assert_allclose(maps[name][f], ref[name][f], rtol=1e-6)
        assert np.isnan(maps[name][~f]).all()
    scale = np.nanmax(np.abs(ref["com_x"])) + np.nanmax(np.abs(ref["com_y"]))  # (an empty frame's COM is NaN)
    for name in ("com_x", "com_y"):
        np.testing.assert_allclose(maps[name][f], com_scale * ref[name][f], rtol=0, atol=1e-6 * scale * com_scale)


def test_streamed_maps_equal_numpy_reduction_out_of_order(make_service, sender_for):
    frames = disc_frames(6, 7)
    svc = make_service(preprocess={"bin": 2})
    s = sender_for(svc)
    s.start("a", (6, 7), (32, 32), calibration={"detector_pixel_mrad": 0.25})
    flat = frames.reshape(42, 32, 32)
    order = np.random.default_rng(3).permutation(42)
    for i in order[:20]:  # single frames in random order
        s.frames("a", int(i), flat[i:i + 1])
    rest = np.sort(order[20:])
    for i in rest:  # then the rest, runs of consecutive frames where possible
        s.frames("a", int(i), flat[i:i + 1])
    s.end("a", 42)
    res = read_scan(wait_results(svc))
    assert res["attrs"]["counters"] == {"received": 42, "missing": 0, "duplicate": 0, "invalid": 0, "stale": 0,
                                        "dropped": 0}
    assert_maps_match(res, frames, com_scale=0.25 * 2)
    np.testing.assert_allclose(res["mean_pattern"], reference(frames, res["attrs"]["geometry"])["mean_pattern"],
                               rtol=1e-6)
    assert res["attrs"]["complete"] == 1 and res["attrs"]["end_reason"] == "end"
    assert res["units"]["com_x"] == "mrad"  # 0.25 mrad per raw pixel, bin 2
    assert res["maps"]["com_magnitude"].max() > 0.05  # the disc moves: a real signal


def test_multi_frame_messages_and_missing_positions(make_service, sender_for):
    frames = disc_frames(5, 8, seed=1)
    svc = make_service()
    s = sender_for(svc)
    s.start("m", (5, 8), (32, 32))
    flat = frames.reshape(40, 32, 32)
    s.frames("m", 0, flat[0:16])
    s.frames("m", 20, flat[20:40])  # 16..19 never sent
    s.end("m", 36)
    res = read_scan(wait_results(svc))
    filled = np.ones(40, bool)
    filled[16:20] = False
    assert res["attrs"]["counters"]["missing"] == 4 and res["attrs"]["counters"]["received"] == 36
    assert_maps_match(res, frames, filled.reshape(5, 8))
    assert res["attrs"]["frames_sent"] == 36
    assert res["attrs"]["end_reason"] == "end" and res["attrs"]["complete"] == 0  # ended, but 4 positions missing


def test_every_bad_input_is_counted_and_valid_frames_are_untouched(make_service, sender_for):
    rng = np.random.default_rng(5)
    frames = (disc_frames(4, 6, seed=2).astype(np.float32) + rng.random((4, 6, 32, 32), dtype=np.float32))
    flat = frames.reshape(24, 32, 32)
    svc = make_service()
    s = sender_for(svc)
    head = lambda **kw: msgpack.packb({"type": "frames", "scan_id": "b", **kw})
    s.frames("nostart", 0, flat[:2])  # frames before any start (scan unknown)
    s.end("never", 3)  # end without start
    s.start("old", (4, 6), (32, 32), dtype="float32")
    s.start("b", (4, 6), (32, 32), dtype="float32")  # "old" ends without an end message
    s.frames("b", 0, flat[0:10])
    s.raw([b"\xc1 not msgpack"])  # undecodable
    s.raw([head(first=10, count=1)])  # missing part
    s.raw([head(first=10, count=1), flat[10].tobytes(), b"x"])  # extra part
    s.raw([head(first=10, count=1), flat[10].tobytes()[:-4]])  # size mismatch
    s.frames("b", 22, flat[[10, 11, 12]])  # 22, 23 fine... 24 out of range
    s.frames("b", 3, flat[3:4])  # duplicate
    s.frames("old", 0, flat[0:2])  # stale: earlier scan
    nan = flat[10:12].copy()
    nan[0, 5, 5] = np.nan
    nan[1, 0, 0] = np.inf
    s.frames("b", 10, nan)  # NaN and Inf
    s.frames("b", 12, np.zeros((1, 32, 32), np.float32))  # no counts: a measurement, filled, with no COM
    s.frames("b", 13, flat[13:22])
    s.end("b", 24)
    path = wait_results(svc, n=2)
    res = read_scan(path, "b")
    c = res["attrs"]["counters"]
    reasons = res["attrs"]["invalid_reasons"]
    assert reasons == {"missing_part": 1, "extra_part": 1, "bad_size": 1, "out_of_range": 1, "nan_or_inf": 2}
    assert c == {"received": 22, "missing": 2, "duplicate": 1, "invalid": 6, "stale": 2, "dropped": 0}
    assert res["attrs"]["zero_counts"] == 1
    # positions 10, 11 got only invalid frames: missing (received + missing = 24); 22, 23 got frames 10, 11
    expected = frames.reshape(24, 32, 32).copy()
    expected[22], expected[23] = flat[10], flat[11]
    expected[12] = 0
    filled = np.ones(24, bool)
    filled[[10, 11]] = False
    with np.errstate(invalid="ignore"):  # the empty frame's COM is 0/0 in the reference too: NaN, as in the maps
        assert_maps_match(res, expected.reshape(4, 6, 32, 32), filled.reshape(4, 6))
    assert res["maps"]["vbf"][2, 0] == 0 and np.isnan(res["maps"]["com_x"][2, 0])  # position 12
    assert svc.orphans["no_start"] == 2 and svc.orphans["end_without_start"] == 1
    assert svc.orphans["undecodable"] == 1
    assert read_scan(path, "old")["attrs"]["counters"]["missing"] == 24  # superseded scan kept, counted


def test_sub_mode_counts_gaps_as_dropped(make_service):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    svc = make_service(bind=False, listen=f"tcp://127.0.0.1:{port}", mode="sub")
    frames = disc_frames(4, 4, seed=4).reshape(16, 32, 32)
    deadline = time.monotonic() + 10
    start = P.Start(scan_id="t", scan_shape=(4, 4), frame_shape=(32, 32), dtype="uint16")
    while svc.current is None:  # PUB drops until the subscription is through: resend start until it lands
        assert time.monotonic() < deadline
        P.send_start(pub, start)
        time.sleep(0.02)
    P.send_frames(pub, "t", 0, frames[0:5])
    P.send_frames(pub, "t", 9, frames[9:16])  # 5..8 lost in transit
    P.send_end(pub, "t", 16)
    res = read_scan(wait_results(svc))
    assert res["attrs"]["counters"]["dropped"] == 4 and res["attrs"]["counters"]["received"] == 12
    assert res["attrs"]["counters"]["missing"] == 4  # the dropped are among the missing: received + missing = 16
    assert res["attrs"]["complete"] == 0
    pub.close()


def test_control_socket_and_snapshots(make_service, sender_for):
    frames = disc_frames(4, 5, seed=6)
    svc = make_service()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(svc.publish_endpoint)
    s = sender_for(svc)
    s.start("c", (4, 5), (32, 32))
    s.frames("c", 0, frames.reshape(20, 32, 32)[:12])
    with ControlClient(svc.control_endpoint, timeout=5) as ctl:
        deadline = time.monotonic() + 10
        while ctl.request("status")["status"]["counters"].get("received") != 12:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        reply = ctl.request("frame", index=[1, 2])
        ref = reference(frames, svc.current.geometry.to_json())
        np.testing.assert_array_equal(unpack_array(reply["frame"]), ref["binned"][1, 2])
        with pytest.raises(ControlError, match=r"no frame at \(3, 4\)"):
            ctl.request("frame", index=[3, 4])
        with pytest.raises(ControlError, match="outside the 4x5 scan"):
            ctl.request("frame", index=[4, 0])
        with pytest.raises(ControlError, match="unknown command 'dance'"):
            ctl.request("dance")
        with pytest.raises(ControlError, match="training is disabled"):
            ctl.request("pause_training")
        path = ctl.request("save")["path"]
        partial = read_scan(path)
        assert partial["attrs"]["complete"] is False or partial["attrs"]["complete"] == 0
        assert partial["maps"]["filled"].sum() == 12
        # newest snapshot: the same maps as the partial results
        snap = None
        deadline = time.monotonic() + 5
        while snap is None or snap.header.counters.get("received") != 12:
            assert time.monotonic() < deadline
            if sub.poll(200):
                snap = Snapshot.decode(sub.recv_multipart())
        assert snap.header.scan_id == "c" and snap.header.state == "acquiring" and snap.header.expected == 20
        np.testing.assert_array_equal(snap.arrays["vbf"], partial["maps"]["vbf"].astype(np.float32))
        np.testing.assert_array_equal(snap.arrays["filled"].astype(bool), partial["maps"]["filled"])
        ctl.request("stop")
    assert svc.wait(5)
    sub.close()


def test_scan_after_scan_in_one_file(make_service, sender_for):
    svc = make_service()
    s = sender_for(svc)
    for k, seed in enumerate((7, 8)):
        frames = disc_frames(3, 3, seed=seed)
        s.start(f"scan{k}", (3, 3), (32, 32))
        s.frames(f"scan{k}", 0, frames.reshape(9, 32, 32))
        s.end(f"scan{k}", 9)
        path = wait_results(svc, n=k + 1)
        assert_maps_match(read_scan(path, f"scan{k}"), frames)
    import h5py

    with h5py.File(path) as f:
        assert sorted(f["scans"]) == ["scan0", "scan1"]
        assert f.attrs["format"] == "rrstem-results"


def test_a_scan_too_large_for_memory_is_refused_and_the_next_one_runs(make_service, sender_for):
    svc = make_service()
    s = sender_for(svc)
    s.start("huge", (16384, 16384), (256, 256))  # 4 TiB of binned frames
    s.frames("huge", 0, np.zeros((2, 256, 256), np.uint16))
    frames = disc_frames(3, 3, seed=9)
    with ControlClient(svc.control_endpoint, timeout=5) as ctl:
        deadline = time.monotonic() + 10
        while svc.orphans["rejected_scan"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        error = ctl.request("status")["status"]["error"]  # what the dashboard's banner shows
    assert "huge" in error and "--bin" in error and "GiB" in error
    assert svc.orphans["rejected_start"] == 1
    s.start("ok", (3, 3), (32, 32))
    s.frames("ok", 0, frames.reshape(9, 32, 32))
    s.end("ok", 9)
    res = read_scan(wait_results(svc))
    assert res["scan_id"] == "ok" and res["attrs"]["counters"]["received"] == 9
    assert svc.last_error() is None  # cleared by the accepted scan


def test_start_twice_is_harmless(tmp_path):
    from rrstem.stream.service import Service, ServiceConfig

    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish=None, control=None, train=False,
                        out=tmp_path / "r.h5")
    with Service(cfg).start() as svc:
        assert svc.start() is svc and svc.receiver.is_alive()


def test_a_scan_whose_processing_fails_is_written_as_failed_and_the_next_one_runs(make_service, sender_for):
    svc = make_service(preprocess={"bin": 4, "calibration_frames": 2})
    s = sender_for(svc)
    s.start("tiny", (2, 2), (2, 2))  # 2x2 frames cannot be binned by 4: calibration raises
    s.frames("tiny", 0, np.ones((4, 2, 2), np.uint16))
    s.frames("tiny", 0, np.ones((1, 2, 2), np.uint16))  # more frames of the failed scan: counted, not processed
    frames = disc_frames(3, 3, seed=10)
    s.start("next", (3, 3), (32, 32))
    s.frames("next", 0, frames.reshape(9, 32, 32))
    s.end("next", 9)
    path = wait_results(svc, n=2)
    failed = read_scan(path, "tiny")["attrs"]
    assert failed["complete"] == 0 and failed["end_reason"] == "failed"
    assert failed["error"] == "ValueError: bin 4 is larger than the 2x2 frame"
    assert svc.orphans["failed_scan"] == 1
    assert str(svc.failures[0]) == "pipeline failed on scan tiny: ValueError: bin 4 is larger than the 2x2 frame"
    assert isinstance(svc.failures[0].error, ValueError) and svc.failures[0].error.__traceback__ is not None
    nxt = read_scan(path, "next")
    assert nxt["attrs"]["complete"] == 1 and nxt["attrs"]["end_reason"] == "end"
    assert nxt["attrs"]["counters"]["received"] == 9
    svc.check()  # a failed scan is not a failed service


def test_a_worker_stores_the_exception_that_ended_it():
    from rrstem.stream.service import Worker

    boom = RuntimeError("broke")
    seen = []

    def body(x):
        raise boom

    w = Worker("w", body, lambda where, exc: seen.append((where, exc)), args=(1,))
    w.start()
    w.join(5)
    assert w.error is boom and seen == [("w", boom)] and boom.__traceback__ is not None


def test_a_failed_scan_is_freed_once_the_next_scan_is_done(make_service, sender_for):
    """The failure keeps the exception (and its traceback), not the frames it ran through."""
    import gc
    import weakref

    svc = make_service(preprocess={"bin": 4, "calibration_frames": 2})
    s = sender_for(svc)
    s.start("tiny", (2, 2), (2, 2))
    deadline = time.monotonic() + 10
    while svc.current is None or svc.current.scan_id != "tiny":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    failed = weakref.ref(svc.current)
    s.frames("tiny", 0, np.ones((4, 2, 2), np.uint16))  # calibration raises: bin 4 > 2x2
    s.start("next", (3, 3), (32, 32))
    s.frames("next", 0, disc_frames(3, 3, seed=11).reshape(9, 32, 32))
    s.end("next", 9)
    wait_results(svc, n=2)
    gc.collect()
    assert failed() is None
    assert svc.failures[0].scan_id == "tiny" and "bin 4 is larger" in str(svc.failures[0])


def test_a_superseded_scan_whose_close_fails_is_written_as_failed_and_the_new_scan_runs(make_service, sender_for):
    svc = make_service(preprocess={"bin": 4, "calibration_frames": 8})
    s = sender_for(svc)
    s.start("tiny", (2, 2), (2, 2))
    s.frames("tiny", 0, np.ones((2, 2, 2), np.uint16))  # too few to calibrate: they wait
    frames = disc_frames(3, 3, seed=12)
    s.start("next", (3, 3), (32, 32))  # closing "tiny" calibrates it, which raises
    s.frames("next", 0, frames.reshape(9, 32, 32))
    s.end("next", 9)
    path = wait_results(svc, n=2)
    tiny = read_scan(path, "tiny")["attrs"]
    assert tiny["end_reason"] == "failed" and tiny["complete"] == 0 and "bin 4 is larger" in tiny["error"]
    nxt = read_scan(path, "next")
    assert nxt["attrs"]["counters"]["received"] == 9 and nxt["attrs"]["end_reason"] == "end"
    assert_maps_match(nxt, frames)


def test_repeats_before_calibration_do_not_count_towards_it(make_service, sender_for):
    frames = disc_frames(2, 4, seed=13).reshape(8, 32, 32)
    svc = make_service(preprocess={"calibration_frames": 8})
    s = sender_for(svc)
    s.start("r", (2, 4), (32, 32))
    s.frames("r", 0, frames[:4])
    s.frames("r", 0, frames[:4])  # 8 frames, 4 positions
    s.raw([b"\xc1 barrier"])  # processed after the frames: once it is counted, so are they
    deadline = time.monotonic() + 10
    while svc.orphans["undecodable"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not svc.current.ready  # 4 distinct frames of the 8 needed
    s.frames("r", 4, frames[4:])
    s.end("r", 12)
    res = read_scan(wait_results(svc))
    assert res["attrs"]["counters"]["received"] == 8 and res["attrs"]["counters"]["duplicate"] == 4
    assert_maps_match(res, frames.reshape(2, 4, 32, 32))


def test_the_snapshot_with_every_frame_is_published_at_once_outside_the_rate_limit(make_service, sender_for):
    """At one snapshot per 10 s (snapshot_hz 0.1), the snapshot that reports the last frame still comes
    within a second of it, and its maps are the whole scan's."""
    frames = disc_frames(4, 5, seed=7)
    svc = make_service(snapshot_hz=0.1)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(svc.publish_endpoint)
    s = sender_for(svc)
    time.sleep(0.3)  # the subscription is in place
    s.start("m", (4, 5), (32, 32))
    s.frames("m", 0, frames.reshape(20, 32, 32)[:12])
    first = None  # the first snapshot: the scan's start, also a milestone
    deadline = time.monotonic() + 5
    while first is None or first.header.scan_id != "m":
        assert time.monotonic() < deadline, "no snapshot of the new scan"
        if sub.poll(100):
            first = Snapshot.decode(sub.recv_multipart())
    time.sleep(0.5)
    s.frames("m", 12, frames.reshape(20, 32, 32)[12:])
    sent = time.monotonic()
    snap = None
    while snap is None or snap.header.counters.get("received") != 20:
        assert time.monotonic() - sent < 1.0, "the snapshot with every frame waited for the rate limit"
        if sub.poll(50):
            snap = Snapshot.decode(sub.recv_multipart())
    ref = reference(frames, svc.current.geometry.to_json())
    np.testing.assert_array_equal(snap.arrays["vbf"], ref["vbf"].astype(np.float32))
    sub.close()


def test_counts_that_outgrow_the_uint16_store_midway_are_kept_exactly(make_service, sender_for):
    """Binned 4x4, uint16 frames start in a uint16 store; from row 3 on a bin holds 16 x 9000 counts, past
    65535: the service moves the store to uint32 and every map and frame still equals NumPy, bit for bit."""
    frames = disc_frames(6, 6, seed=8, level=200.0)
    frames[3:, :, 12:16, 12:16] = 9000  # 144000 in one binned pixel
    svc = make_service(preprocess={"bin": 4, "calibration_frames": 8, "mask_outliers": False})  # no hot pixels
    s = sender_for(svc)
    s.start("bright", (6, 6), (32, 32))
    flat = frames.reshape(36, 32, 32)
    for lo in range(0, 36, 5):  # a message straddles the first bright frame (18)
        s.frames("bright", lo, flat[lo:lo + 5])
    with ControlClient(svc.control_endpoint, timeout=5) as ctl:
        deadline = time.monotonic() + 10
        while ctl.request("status")["status"]["counters"].get("received") != 36:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ref = reference(frames, svc.current.geometry.to_json())
        for y, x in ((0, 1), (2, 5), (3, 0), (5, 5)):  # before and after the move
            got = unpack_array(ctl.request("frame", index=[y, x])["frame"])
            np.testing.assert_array_equal(got, ref["binned"][y, x])
        assert ref["binned"][3, 0].max() == 16 * 9000
    assert svc.current.frames.dtype == np.uint32
    s.end("bright", 36)
    res = read_scan(wait_results(svc))
    assert res["attrs"]["counters"]["received"] == 36 and res["attrs"]["complete"] == 1
    assert_maps_match(res, frames)


def test_a_closed_service_frees_its_scans_without_the_garbage_collector(tmp_path):
    """Nothing the service builds refers back to it, so a scan's frame store goes as soon as the service does:
    a benchmark or session that runs service after service never holds several stores at once."""
    import gc
    import weakref

    from rrstem.stream.preprocess import PreprocessConfig
    from rrstem.stream.service import Service, ServiceConfig
    from support import Sender

    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish="tcp://127.0.0.1:0",
                        control="tcp://127.0.0.1:0", out=tmp_path / "r.h5", train=False,
                        preprocess=PreprocessConfig(calibration_frames=8))
    gc.disable()
    try:
        svc = Service(cfg).start()
        s = Sender(svc.listen_endpoint)
        s.start("gone", (3, 3), (32, 32))
        s.frames("gone", 0, disc_frames(3, 3, seed=30).reshape(9, 32, 32))
        s.end("gone", 9)
        wait_results(svc)
        scan, service = weakref.ref(svc.current), weakref.ref(svc)
        s.close()
        svc.close()
        del svc
        assert service() is None and scan() is None
    finally:
        gc.enable()


def test_the_next_scan_of_a_size_takes_the_done_scans_frame_memory(make_service, sender_for):
    """Scan after scan of one size, as at the microscope: once a scan is done and the next starts, no thread
    keeps the done scan, and the next scan's store is the same memory (no new pages to map, seconds at a large
    scan, and never two stores at once), holding the new frames exactly."""
    import gc
    import weakref

    svc = make_service()
    s = sender_for(svc)

    def wait(ok, what):
        deadline = time.monotonic() + 10
        while not ok():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    first = disc_frames(3, 3, seed=40).reshape(9, 32, 32)
    s.start("one", (3, 3), (32, 32))
    s.frames("one", 0, first)
    s.end("one", 9)
    wait(lambda: svc.current is not None and svc.current.done, "scan one never done")
    one = svc.current
    address = one.frames.__array_interface__["data"][0]
    assert np.array_equal(one.frames, first)
    gone = weakref.ref(one)
    del one
    gc.disable()  # freed by reference counts alone: nothing holds it, not even in a cycle
    try:
        second = disc_frames(3, 3, seed=41).reshape(9, 32, 32)
        s.start("two", (3, 3), (32, 32))
        s.frames("two", 0, second)
        wait(lambda: svc.current.scan_id == "two" and svc.current.n_filled() == 9, "scan two never filled")
        wait(lambda: gone() is None, "a thread still holds the done scan one")
    finally:
        gc.enable()
    two = svc.current
    assert two.frames.__array_interface__["data"][0] == address
    assert np.array_equal(two.frames, second)
    s.end("two", 9)
    wait_results(svc, n=2)


def test_a_done_scans_frames_are_released_for_the_next_scan_and_say_so():
    from rrstem.stream.preprocess import PreprocessConfig
    from rrstem.stream.protocol import Start
    from rrstem.stream.scan import Scan

    scan = Scan(Start(scan_id="a", scan_shape=(3, 3), frame_shape=(32, 32), dtype="uint16"),
                PreprocessConfig(calibration_frames=4))
    scan.add(0, disc_frames(3, 3, seed=42).reshape(9, 32, 32))
    with pytest.raises(ValueError, match="not done"):
        scan.release_frames()
    scan.finish(9)
    scan.done_with()
    scan.release_frames()
    with pytest.raises(ValueError, match="released when a newer scan started"):
        scan.frames
