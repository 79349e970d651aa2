"""Quantum Detectors Merlin over real TCP sockets: maps equal a NumPy reduction; damage is counted, never fatal."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from support import disc_frames, reference, wait_results
from rrstem.simulators.merlin import MerlinFormat, acquisition_order, mpx, serve_merlin
from rrstem.simulators.source import ArraySource
from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.detectors import Item
from rrstem.stream.detectors.merlin import MerlinDecoder
from rrstem.stream.protocol import Start
from rrstem.stream.results import read_scan

NY, NX = 4, 5


def scan(dtype=np.uint16, shape=(32, 32), seed=0, level=1000.0):
    frames = disc_frames(NY, NX, *shape, seed=seed, dtype=dtype, level=level)
    start = Start(scan_id="truth", scan_shape=(NY, NX), frame_shape=shape, dtype=np.dtype(dtype).name)
    return frames, ArraySource(frames, start)


def assert_maps(res, frames, filled=None):
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"), filled=filled)
    np.testing.assert_array_equal(res["maps"]["filled"], np.ones((NY, NX), bool) if filled is None else filled)
    where = slice(None) if filled is None else filled
    for name in ("vbf", "vadf"):
        np.testing.assert_array_equal(res["maps"][name][where], ref[name][where])
    for name in ("com_x", "com_y"):
        np.testing.assert_allclose(res["maps"][name][where], ref[name][where], rtol=0,
                                   atol=1e-9 + 1e-6 * np.abs(ref[name]).max())


class MerlinPC(threading.Thread):
    """``serve_merlin`` in a thread on port 0; ``endpoint`` once bound, ``error`` if it failed."""

    def __init__(self, source, **kw):
        super().__init__(daemon=True)
        self.source, self.kw = source, kw
        self.bound = threading.Event()
        self.endpoint = self.error = self.stats = None
        self.start()
        assert self.bound.wait(10), "the Merlin sender did not bind"

    def run(self):
        def on_endpoint(ep):
            self.endpoint = ep
            self.bound.set()
        try:
            self.stats = serve_merlin(self.source, "tcp://127.0.0.1:0", progress=False, on_endpoint=on_endpoint,
                                      timeout=20, **self.kw)
        except BaseException as exc:
            self.error = exc
            self.bound.set()


def merlin_service(make_service, endpoint, **kw):
    return make_service(protocol="merlin", listen=endpoint, bind=False, **kw)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("layout", ["1x1", "2x2"])
def test_acquisition_streamed_as_a_merlin_gives_the_numpy_maps(make_service, dtype, layout):
    frames, source = scan(dtype, level=100.0 if dtype == np.uint8 else 1000.0)
    pc = MerlinPC(source, layout=layout)
    svc = merlin_service(make_service, pc.endpoint)  # scan shape from ScanX/ScanY
    res = read_scan(wait_results(svc))
    pc.join(10)
    assert pc.error is None and pc.stats.frames == NY * NX
    assert res["scan_id"].startswith("merlin-")
    assert res["attrs"]["dtype"] == np.dtype(dtype).name and res["attrs"]["scan_shape"].tolist() == [NY, NX]
    assert res["attrs"]["counters"] == {"received": 20, "missing": 0, "duplicate": 0, "invalid": 0, "stale": 0,
                                        "dropped": 0}
    assert res["attrs"]["complete"] and res["attrs"]["end_reason"] == "end"
    meta = res["attrs"]["metadata"]
    assert meta["frame_header"]["layout"] == layout and meta["frame_header"]["chips"] == (4 if layout == "2x2" else 1)
    assert meta["acquisition_header"]["Frames in Acquisition (Number)"] == "20"
    assert_maps(res, frames)


def test_a_quad_512x512_frame_is_assembled_as_sent(make_service):
    frames, source = scan(np.uint16, shape=(512, 512))
    frames, source = frames[:2], ArraySource(frames[:2], source.start.model_copy(update={"scan_shape": (2, NX)}))
    pc = MerlinPC(source, layout="2x2")
    svc = merlin_service(make_service, pc.endpoint, preprocess={"bin": 8})
    res = read_scan(wait_results(svc))
    assert res["attrs"]["frame_shape"].tolist() == [512, 512] and res["attrs"]["counters"]["received"] == 10
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"))
    np.testing.assert_array_equal(res["maps"]["vbf"], ref["vbf"])


@pytest.mark.parametrize("sync_offset, flyback", [(3, 2), (-2, 1), (0, 3), (4, 0)])
def test_sync_offset_and_flyback_land_on_the_right_positions(make_service, sync_offset, flyback):
    frames, source = scan(seed=2)
    pc = MerlinPC(source, sync_offset=sync_offset, flyback=flyback)
    svc = merlin_service(make_service, pc.endpoint, sync_offset=sync_offset, flyback=flyback)
    res = read_scan(wait_results(svc))
    filled = np.ones((NY, NX), bool)
    filled.flat[:max(0, -sync_offset)] = False  # a late start: the first positions never came
    c = res["attrs"]["counters"]
    assert c["received"] == filled.sum() and c["missing"] == NY * NX - filled.sum()
    expect = {k: v for k, v in (("sync_offset", max(0, sync_offset)), ("flyback", flyback * NY)) if v}
    assert res["attrs"]["invalid_reasons"] == expect
    assert_maps(res, frames, None if filled.all() else filled)


def test_sync_offset_and_flyback_apply_to_rrstem_1_too(make_service):
    from rrstem.simulators.source import stream

    frames, _ = scan(seed=3)
    order = acquisition_order((NY, NX), 3, 2)  # 31 frames: 3 early, then lines of 5 + 2 flyback
    acq = frames.reshape(-1, 32, 32)[order]
    src = ArraySource(acq.reshape(1, len(order), 32, 32),
                      Start(scan_id="misaligned", scan_shape=(1, len(order)), frame_shape=(32, 32), dtype="uint16"))
    svc = make_service(scan_shape=(NY, NX), sync_offset=3, flyback=2)
    stream(src, svc.listen_endpoint, bind=False, progress=False, frames_per_message=4)
    res = read_scan(wait_results(svc))
    assert res["attrs"]["invalid_reasons"] == {"sync_offset": 3, "flyback": 8}
    assert res["attrs"]["counters"]["received"] == 20 and res["attrs"]["counters"]["missing"] == 0
    assert_maps(res, frames)


def test_acquisition_map_known_answers():
    m = AcquisitionMap((2, 3), sync_offset=2, flyback=1)
    assert (m.frames_per_scan, m.frames_in_acquisition) == (8, 10)
    kept, index, discarded = m.positions(0, 10)
    assert kept.tolist() == [2, 3, 4, 6, 7, 8] and index.tolist() == [0, 1, 2, 3, 4, 5]
    assert discarded == {"sync_offset": 2, "flyback": 2}
    runs, _ = m.place(0, np.arange(10))
    assert [(first, f.tolist()) for first, f in runs] == [(0, [2, 3, 4]), (3, [6, 7, 8])]
    late = AcquisitionMap((2, 3), sync_offset=-2)
    assert late.positions(0, 4)[1].tolist() == [2, 3, 4, 5] and late.frames_in_acquisition == 4
    with pytest.raises(ValueError, match="flyback must be >= 0"):
        AcquisitionMap((2, 3), flyback=-1)


class RawMerlin:
    """A Merlin PC that sends whatever bytes a test gives it, on port 0."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(20)
        self.endpoint = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.conn = None

    def accept(self):
        self.conn, _ = self.server.accept()
        return self

    def send(self, *chunks: bytes):
        for c in chunks:
            self.conn.sendall(c)

    def hang_up(self):
        self.conn.close()

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def message(payload: bytes) -> bytes:
    return mpx(len(payload)) + payload


def test_malformed_bytes_are_counted_and_the_receiver_resynchronises(make_service):
    frames, _ = scan(seed=4)
    flat = frames.reshape(-1, 32, 32)
    fmt = MerlinFormat((32, 32), "uint16", frames=20, frames_per_trigger=NX, scan_xy=(NX, NY))
    pc = RawMerlin()
    svc = merlin_service(make_service, pc.endpoint)
    pc.accept()
    pc.send(b"GARBAGE" * 300, message(b"XYZ,not a merlin message"), message(fmt.acquisition_header()))
    for i in range(20):
        seq = i + 1
        record = fmt.record(seq, flat[i])
        if seq == 5:  # the length says 100 bytes less: the frame header's own geometry wins, the frame is kept
            pc.send(mpx(len(record) - 100) + record)
        elif seq == 8:  # a header that does not parse
            pc.send(message(b"MQ1,000008,00384,xx," + record[20:]))
        elif seq == 12:  # raw pixels, not supported
            pc.send(message(record.replace(b"U16", b"R64", 1)))
        elif seq == 15:  # never sent: a sequence gap
            continue
        else:
            pc.send(message(record))
        if seq == 3:
            pc.send(message(record))  # a repeat
    res = read_scan(wait_results(svc))
    orphans, skipped = dict(svc.orphans), svc.receiver.skipped_bytes
    pc.close()
    assert res["attrs"]["invalid_reasons"] == {"bad_frame_header": 1, "unsupported_pixel_type": 1}
    c = res["attrs"]["counters"]
    assert (c["received"], c["missing"], c["duplicate"], c["invalid"]) == (17, 3, 1, 2)
    assert orphans["unknown_message"] == 1 and orphans["resync"] == 2  # the garbage, and frame 5's wrong length
    assert skipped == 2100
    filled = np.ones((NY, NX), bool)
    filled.flat[[7, 11, 14]] = False
    assert_maps(res, frames, filled)


def test_a_dropped_connection_is_retried_and_the_scan_goes_on(make_service):
    frames, _ = scan(seed=5)
    flat = frames.reshape(-1, 32, 32)
    fmt = MerlinFormat((32, 32), "uint16", frames=20, frames_per_trigger=NX, scan_xy=(NX, NY))
    pc = RawMerlin()
    svc = merlin_service(make_service, pc.endpoint)
    pc.accept().send(message(fmt.acquisition_header()), *(message(fmt.record(i + 1, flat[i])) for i in range(10)))
    pc.hang_up()  # the Merlin PC drops the connection mid-scan ...
    pc.accept().send(*(message(fmt.record(i + 1, flat[i])) for i in range(10, 20)))  # ... and carries on
    res = read_scan(wait_results(svc))
    lost, orphaned = svc.receiver.disconnects, svc.orphans["connection_lost"]  # before our own close adds one
    pc.close()
    assert res["attrs"]["complete"] and res["attrs"]["counters"]["received"] == 20
    assert lost == 1 and orphaned == 1
    assert_maps(res, frames)


def test_a_new_acquisition_header_after_a_restart_ends_the_old_scan_incomplete(make_service):
    frames, _ = scan(seed=6)
    flat = frames.reshape(-1, 32, 32)
    fmt = MerlinFormat((32, 32), "uint16", frames=20, frames_per_trigger=NX, scan_xy=(NX, NY))
    pc = RawMerlin()
    svc = merlin_service(make_service, pc.endpoint)
    pc.accept().send(message(fmt.acquisition_header()), *(message(fmt.record(i + 1, flat[i])) for i in range(7)))
    pc.hang_up()  # the Merlin PC restarts and begins a new acquisition
    pc.accept().send(message(fmt.acquisition_header()), *(message(fmt.record(i + 1, flat[i])) for i in range(20)))
    path = wait_results(svc, n=2)
    first, second = (read_scan(path, scan_id) for scan_id, _ in svc.results_written)
    pc.close()
    assert first["attrs"]["end_reason"] == "superseded" and not first["attrs"]["complete"]
    assert first["attrs"]["counters"]["received"] == 7 and first["attrs"]["counters"]["missing"] == 13
    assert second["attrs"]["complete"] and second["scan_id"] != first["scan_id"]
    assert_maps(second, frames)


def test_continuous_mode_ends_a_scan_every_scan_shape_frames(make_service):
    frames, source = scan(seed=7)
    pc = MerlinPC(source, continuous=True, order=np.r_[np.arange(20), np.arange(20)])
    svc = merlin_service(make_service, pc.endpoint)
    path = wait_results(svc, n=2)
    a, b = (read_scan(path, scan_id) for scan_id, _ in svc.results_written)
    assert a["scan_id"].endswith("-s1") and b["scan_id"].endswith("-s2")
    for res in (a, b):
        assert res["attrs"]["complete"] and res["attrs"]["counters"]["received"] == 20
        assert_maps(res, frames)


def test_without_a_scan_shape_the_acquisition_is_refused_clearly(make_service, caplog):
    _, source = scan(seed=8)
    pc = MerlinPC(source, continuous=True, scan_xy=False)
    svc = merlin_service(make_service, pc.endpoint)
    pc.join(20)
    assert svc.orphans["no_scan_shape"] == 1 and svc.orphans["no_start"] == 20
    assert "pass the scan shape with --scan-shape NYxNX" in caplog.text
    assert svc.current is None


def test_frames_per_trigger_gives_the_scan_shape_without_scan_xy(make_service):
    frames, source = scan(seed=9)
    pc = MerlinPC(source, scan_xy=False)  # 20 frames, 5 per trigger: 4x5
    svc = merlin_service(make_service, pc.endpoint)
    res = read_scan(wait_results(svc))
    assert res["attrs"]["scan_shape"].tolist() == [NY, NX]
    assert_maps(res, frames)


def test_decode_never_raises_on_damaged_messages():
    frames, _ = scan(seed=10)
    fmt = MerlinFormat((32, 32), "uint16", frames=20, frames_per_trigger=NX, scan_xy=(NX, NY))
    good = [fmt.acquisition_header(), fmt.record(1, frames[0, 0]), fmt.record(2, frames[0, 1])]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        msg = bytearray(good[rng.integers(len(good))])
        if rng.random() < 0.5:
            msg = msg[:rng.integers(len(msg) + 1)]
        else:
            for j in rng.integers(0, 400, size=3):
                if j < len(msg):
                    msg[j] = rng.integers(256)
        dec = MerlinDecoder()
        dec.decode([memoryview(bytearray(good[0]))])
        for item in dec.decode([memoryview(msg)]):
            assert isinstance(item, Item) and item.kind in ("start", "frames", "end", "bad")
            assert item.kind != "bad" or item.reason
            if item.kind == "frames":
                assert item.frames.shape == (1, 32, 32)
            seen.add(item.reason or item.kind)
    assert {"bad_frame_header", "bad_size", "bad_header"} <= seen


def test_merlin_refuses_bind_and_sub(make_service):
    with pytest.raises(ValueError, match="rrstem connects to it: drop --bind"):
        make_service(protocol="merlin", listen="tcp://127.0.0.1:6342", bind=True)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        make_service(protocol="merlin", listen="ipc:///tmp/x", bind=False)


def test_frames_read_in_one_block_become_one_strided_batch_without_a_copy():
    from rrstem.stream.receiver import coalesce

    frames, _ = scan(seed=12)
    flat = frames.reshape(-1, 32, 32)
    fmt = MerlinFormat((32, 32), "uint16", frames=20, frames_per_trigger=NX, scan_xy=(NX, NY))
    records = [fmt.record(i + 1, flat[i]) for i in range(20)]
    block = np.frombuffer(bytearray(b"".join(records)), np.uint8)
    dec = MerlinDecoder()
    dec.decode([memoryview(fmt.acquisition_header())])
    size = len(records[0])
    items = []
    for i in range(20):
        items += dec.decode([memoryview(block)[i * size:(i + 1) * size]])
    items.insert(10, Item("bad", reason="resync"))  # after the start and 9 frames:  # anything else between frames splits the batch
    out = coalesce(items, block)
    assert [(it.kind, it.count) for it in out] == [("start", 0), ("frames", 9), ("bad", 0), ("frames", 11), ("end", 0)]
    assert (out[1].message.first, out[3].message.first) == (0, 9)
    np.testing.assert_array_equal(np.concatenate([out[1].frames, out[3].frames]), flat)
    assert np.shares_memory(out[3].frames, block) and out[3].frames.strides[0] == size
