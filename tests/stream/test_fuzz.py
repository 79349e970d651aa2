"""Property-based tests (hypothesis): random and mutated messages never raise out of a decoder, never
allocate more than the sizes they declare allow, and are always counted.

Every decoder (rrstem/1, SIMPLON stream v1, stream2) gets random bytes and valid messages with bytes
flipped, cut off or inserted; the control socket's handler and the snapshot decoder get the same. The
Merlin decoder and its TCP framing are fuzzed in ``test_fuzz_merlin.py``. The examples are derandomized,
so CI runs the same cases every time.
"""

from __future__ import annotations

import functools

import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rrstem.simulators.dectris import SimplonEncoder, Stream2Encoder
from rrstem.stream import control
from rrstem.stream import protocol as P
from rrstem.stream.detectors import Item, decoder_for
from rrstem.stream.protocol import ProtocolError
from rrstem.stream.snapshot import Snapshot, SnapshotHeader

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCAN = (2, 3)
START = P.Start(scan_id="f", scan_shape=SCAN, frame_shape=(8, 8), dtype="uint16")
FRAMES = np.arange(6 * 64, dtype=np.uint16).reshape(6, 8, 8)


def rrstem_messages() -> list[list[bytes]]:
    return [[START.encode()],
            [P.Frames(scan_id="f", first=0, count=2).encode(), FRAMES[:2].tobytes()],
            [P.End(scan_id="f", frames_sent=6).encode()]]


def dectris_messages(encoder) -> list[list[bytes]]:
    return [list(encoder.header()), *[list(encoder.image(i, FRAMES[i])) for i in range(2)], list(encoder.end(2))]


VALID = {
    "rrstem": rrstem_messages(),
    "simplon": dectris_messages(SimplonEncoder(START, compression="bslz4", header_detail="all")),
    "stream2": dectris_messages(Stream2Encoder(START, compression="bslz4")),
}


@functools.cache
def warm(protocol: str) -> None:
    """Run each decoder's paths once before anything is traced: the first call into a numba function loads
    numba's entry points (importing whole packages, tens of MB), which is no message's cost."""
    dec = decoder_for(protocol, SCAN)
    for parts in [*VALID[protocol], [b""], [b"\xff" * 16]]:
        dec.decode([zmq.Frame(p) for p in parts])


def decoder(protocol: str):
    """A decoder that has seen its protocol's header, so mutated images reach the image code."""
    warm(protocol)
    dec = decoder_for(protocol, SCAN)
    dec.decode([zmq.Frame(p) for p in VALID[protocol][0]])
    return dec


@st.composite
def mutated(draw, protocol: str) -> list[bytes]:
    """A valid message of ``protocol`` with one part flipped, cut, extended or dropped."""
    parts = [bytearray(p) for p in draw(st.sampled_from(VALID[protocol]))]
    k = draw(st.integers(0, len(parts) - 1))
    how = draw(st.sampled_from(["flip", "cut", "insert", "drop", "extra"]))
    if how == "flip" and parts[k]:
        for _ in range(draw(st.integers(1, 8))):
            parts[k][draw(st.integers(0, len(parts[k]) - 1))] = draw(st.integers(0, 255))
    elif how == "cut":
        parts[k] = parts[k][:draw(st.integers(0, max(0, len(parts[k]) - 1)))]
    elif how == "insert":
        at = draw(st.integers(0, len(parts[k])))
        parts[k][at:at] = draw(st.binary(min_size=1, max_size=64))
    elif how == "drop" and len(parts) > 1:
        del parts[k]
    else:
        parts.append(bytearray(draw(st.binary(max_size=64))))
    return [bytes(p) for p in parts]


def decode_checked(dec, parts: list[bytes]) -> list[Item]:
    """Decode and check the invariants: no exception, bounded allocation, every frame the declared size."""
    total = sum(len(p) for p in parts)
    tracemalloc.start()
    try:
        out = dec.decode([zmq.Frame(p) for p in parts])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    items = out if isinstance(out, list) else [out]
    # what a message may cost: its own bytes a few times (a decompressed frame is at most the frame
    # size it declares, 8x8 here) plus the decoder's bookkeeping; never a declared count x shape
    assert peak < 8 * total + (256 << 10), f"decoding {total} bytes allocated {peak} bytes"
    for item in items:
        assert item.kind in ("start", "frames", "end", "bad")
        if item.kind == "bad":
            assert item.reason and isinstance(item.detail, str)
        if item.kind == "frames":
            start = getattr(dec, "_starts", {}).get(item.scan_id) if hasattr(dec, "_starts") else dec.series.start
            h, w = start.frame_shape
            assert item.frames.shape == (item.message.count, h, w)
    return items


@pytest.mark.parametrize("protocol", sorted(VALID))
@FUZZ
@given(data=st.data())
def test_random_bytes_are_counted_as_bad(protocol, data):
    parts = data.draw(st.lists(st.binary(max_size=512), min_size=1, max_size=4))
    items = decode_checked(decoder(protocol), parts)
    assert any(i.kind == "bad" for i in items)  # random bytes are never silently dropped


@pytest.mark.parametrize("protocol", sorted(VALID))
@FUZZ
@given(data=st.data())
def test_mutated_messages_never_raise_and_never_over_allocate(protocol, data):
    decode_checked(decoder(protocol), data.draw(mutated(protocol)))


@pytest.mark.parametrize("protocol", sorted(VALID))
def test_the_valid_messages_decode(protocol):
    """The base of the mutations: unmutated, every message decodes to the frames sent."""
    dec = decoder_for(protocol, SCAN)
    items = [i for parts in VALID[protocol] for i in decode_checked(dec, parts)]
    frames = [i for i in items if i.kind == "frames"]
    assert [i.kind for i in items if i.kind != "frames"] == ["start", "end"]
    np.testing.assert_array_equal(np.concatenate([f.frames for f in frames]), FRAMES[:2])


@FUZZ
@given(raw=st.one_of(st.binary(max_size=256),
                     st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=8),
                                                                     st.lists(st.integers(0, 9), max_size=3)),
                                     max_size=4).map(lambda d: msgpack.packb(d)),
                     st.sampled_from(["status", "frame", "dance", "save"]).map(
                         lambda c: msgpack.packb({"cmd": c, "index": [0, 99]}))))
def test_control_requests_always_get_a_reply(idle_service, raw):
    reply = control.handle(idle_service, raw)
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"]
    control.pack(reply)  # and it can be sent


@FUZZ
@given(parts=st.lists(st.binary(max_size=256), min_size=1, max_size=4))
def test_random_snapshots_raise_only_protocol_errors(parts):
    with pytest.raises(ProtocolError):
        Snapshot.decode(parts)


@FUZZ
@given(data=st.data())
def test_mutated_snapshots_raise_only_protocol_errors_or_decode(data):
    arrays = {"vbf": np.ones((2, 3), np.float32), "filled": np.ones((2, 3), bool)}
    parts = [bytes(p) for p in Snapshot(SnapshotHeader(scan_id="s"), arrays).encode()]
    k = data.draw(st.integers(0, len(parts) - 1))
    cut = data.draw(st.integers(0, len(parts[k])))
    parts[k] = parts[k][:cut] + data.draw(st.binary(max_size=16))
    try:
        snap = Snapshot.decode(parts)
    except ProtocolError:
        return
    for spec in snap.header.arrays:  # what decoded is what the header says
        assert snap.arrays[spec.name].shape == tuple(spec.shape)


@pytest.fixture(scope="module")
def idle_service(tmp_path_factory):
    """A real service, never started: the control handler's target (``stop`` only sets its flag)."""
    from rrstem.stream.service import Service, ServiceConfig

    svc = Service(ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish=None, control=None, train=False,
                                out=tmp_path_factory.mktemp("fuzz") / "r.h5"))
    yield svc
    svc.close()


def test_garbage_over_a_real_socket_is_counted_once_per_message(make_service, sender_for):
    """Every message the receiver takes is counted: orphans add up to the garbage sent, and a scan
    interleaved with it arrives whole."""
    rng = np.random.default_rng(0)
    svc = make_service()
    s = sender_for(svc)
    garbage = [rng.integers(0, 256, rng.integers(1, 300), dtype=np.uint8).tobytes() for _ in range(60)]
    s.start("g", (2, 3), (32, 32))
    frames = rng.poisson(100, (6, 32, 32)).astype(np.uint16)
    for i, g in enumerate(garbage):
        s.raw([g])
        if i < 6:
            s.frames("g", i, frames[i:i + 1])
    s.end("g", 6)
    deadline = time.monotonic() + 20
    while sum(svc.orphans.values()) < len(garbage) or not svc.results_written:
        assert time.monotonic() < deadline, dict(svc.orphans)
        time.sleep(0.02)
    assert sum(svc.orphans.values()) == len(garbage)
    from rrstem.stream.results import read_scan

    res = read_scan(svc.results_written[0][1])
    assert res["attrs"]["counters"]["received"] == 6 and res["attrs"]["counters"]["invalid"] == 0
