"""Property-based tests (hypothesis) of the Merlin decoder and its TCP transport (``MPX`` framing).

The companion of ``test_fuzz.py`` (rrstem/1, SIMPLON, stream2, control, snapshots). Random payloads and
valid ones mutated (the acquisition header's counts, the ``MQ1`` frame header's fields, the pixel type,
wrong sizes, truncation) never raise out of ``MerlinDecoder``, never allocate more than the message they
came in, and every one of them is counted. Over a real TCP socket into the real ``TcpReceiver``: random
garbage, then a valid acquisition, delivers every valid frame and counts every byte of the garbage.
"""

from __future__ import annotations

import queue
import socket
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rrstem.simulators.merlin import MerlinFormat, mpx
from rrstem.stream.detectors import Item
from rrstem.stream.detectors.merlin import FRAMES_KEY, PER_TRIGGER_KEY, MerlinDecoder, MpxFraming
from rrstem.stream.receiver import TcpReceiver

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SOCKETS = settings(FUZZ, max_examples=25)  # each example is a real connection: fewer of them
NY, NX = 2, 3
FRAMES = np.arange(NY * NX * 64, dtype=np.uint16).reshape(NY * NX, 8, 8) * 7
FMT = MerlinFormat((8, 8), "uint16", frames=NY * NX, frames_per_trigger=NX, scan_xy=(NX, NY))
HEADER = FMT.acquisition_header()
RECORDS = [FMT.record(i + 1, FRAMES[i]) for i in range(NY * NX)]
FRAME_REASONS = {"bad_frame_header", "bad_size", "unsupported_pixel_type", "bad_shape", "beyond_acquisition",
                 "no_start"}


def message(payload: bytes) -> bytes:
    return mpx(len(payload)) + payload


def decoder() -> MerlinDecoder:
    """A decoder that has seen the acquisition header, so mutated frames reach the frame code."""
    dec = MerlinDecoder()
    assert dec.decode([memoryview(HEADER)]) == []
    return dec


def decode_checked(dec: MerlinDecoder, payload: bytes) -> list[Item]:
    """Decode one payload and check the invariants: no exception, bounded allocation, frames no larger than
    the payload and viewing it, and the message counted (an item, or a header that parsed)."""
    acquisitions = dec._acquisitions
    buf = memoryview(bytearray(payload))
    tracemalloc.start()
    try:
        items = dec.decode([buf])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the header is parsed as text (a few copies of the message); pixels are never copied
    assert peak < 8 * len(payload) + (64 << 10), f"decoding {len(payload)} bytes allocated {peak} bytes"
    assert items or dec._acquisitions == acquisitions + 1, "a message that left no trace"
    for item in items:
        assert item.kind in ("start", "frames", "end", "bad")
        assert item.reason != "undecodable", item.detail  # a BadMessage for every malformed message, not a crash
        if item.kind == "bad":
            assert item.reason and item.detail.startswith("merlin: ")
            assert item.count == (1 if item.reason in FRAME_REASONS else 0), item
        if item.kind == "frames":
            assert item.frames.shape == (item.message.count, *dec.acq.start.frame_shape) and item.count == 1
            assert item.frames.nbytes <= len(payload) and np.shares_memory(item.frames, np.frombuffer(buf, np.uint8))
    return items


@st.composite
def mutated_header(draw) -> bytes:
    """The acquisition header with one line's value replaced, a line dropped, or cut off."""
    lines = HEADER.decode("latin-1").split("\n")
    k = draw(st.integers(1, len(lines) - 1))
    how = draw(st.sampled_from(["value", "drop", "cut"]))
    if how == "value":
        key = draw(st.sampled_from([FRAMES_KEY, PER_TRIGGER_KEY, "ScanX", "ScanY", lines[k].partition(":")[0]]))
        value = draw(st.one_of(st.integers(-5, 10**12).map(str), st.text(max_size=8)))
        lines = [f"{key}:\t{value}" if ln.startswith(key + ":") else ln for ln in lines]
    elif how == "drop":
        del lines[k]
    else:
        return HEADER[:draw(st.integers(0, len(HEADER)))]
    return "\n".join(lines).encode("latin-1", errors="replace")


FIELD_VALUES = st.one_of(st.integers(-3, 10**7).map(str), st.sampled_from(["U08", "U16", "U32", "R64", "U1", ""]),
                         st.text(alphabet=st.characters(max_codepoint=127), max_size=6))


@st.composite
def mutated_frame(draw) -> bytes:
    """A valid ``MQ1`` record with one header field replaced (sequence, offset, chips, width, height, pixel type,
    layout, ...), its pixels cut or extended, bytes flipped, or the record cut off."""
    record = bytearray(draw(st.sampled_from(RECORDS)))
    how = draw(st.sampled_from(["field", "pixels", "flip", "cut"]))
    if how == "field":
        fields = bytes(record[:FMT.data_offset]).split(b",")
        k = draw(st.integers(1, 9))
        fields[k] = draw(FIELD_VALUES).encode()
        return b",".join(fields) + bytes(record[FMT.data_offset:])
    if how == "pixels":  # a wrong size: bytes missing or extra after the header
        delta = draw(st.integers(-len(record) + FMT.data_offset, 4096))
        return bytes(record[:len(record) + delta]) if delta < 0 else bytes(record) + bytes(delta)
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            record[draw(st.integers(0, FMT.data_offset - 1))] = draw(st.integers(0, 255))
        return bytes(record)
    return bytes(record[:draw(st.integers(0, len(record) - 1))])


@FUZZ
@given(payload=st.one_of(st.binary(max_size=1024),
                         st.tuples(st.sampled_from([b"MQ1,", b"HDR,", b"MQ1,000001,", b"MQ1,000001,00384,"]),
                                   st.binary(max_size=1024)).map(b"".join)))
def test_random_payloads_are_counted_as_bad(payload):
    items = decode_checked(decoder(), payload)
    assert [i.kind for i in items] == ["bad"]  # random bytes are never silently dropped, nor taken as frames


@FUZZ
@given(payload=st.one_of(mutated_header(), mutated_frame()))
def test_mutated_messages_never_raise_and_never_over_allocate(payload):
    dec = decoder()
    decode_checked(dec, payload)
    # the decoder is not left broken: the next acquisition decodes whole
    decode_checked(dec, HEADER)
    frames = [i for r in RECORDS for i in decode_checked(dec, r) if i.kind == "frames"]
    np.testing.assert_array_equal(np.concatenate([i.frames for i in frames]), FRAMES)


def test_a_message_in_several_parts_is_counted_once():
    items = decoder().decode([memoryview(RECORDS[0]), memoryview(RECORDS[1])])
    assert [(i.kind, i.reason) for i in items] == [("bad", "extra_part")]


def test_a_header_with_a_scan_beyond_the_protocol_limits_is_refused_clearly():
    """(Found by the fuzzing above: ScanX 16385 used to fail later, inside the start message, as 'undecodable'.)"""
    dec = MerlinDecoder()
    items = dec.decode([memoryview(HEADER.replace(b"ScanX:\t3", b"ScanX:\t16385"))])
    assert [(i.kind, i.reason) for i in items] == [("bad", "bad_header")]
    assert "scan shape 2x16385 exceeds 16384 positions per edge" in items[0].detail
    assert [(i.kind, i.reason) for i in dec.decode([memoryview(RECORDS[0])])] == [("bad", "no_start")]


def test_the_valid_messages_decode():
    """The base of the mutations: unmutated, the records decode to the frames sent, in one scan."""
    dec = decoder()
    items = [i for r in RECORDS for i in decode_checked(dec, r)]
    assert [i.kind for i in items if i.kind != "frames"] == ["start", "end"]
    np.testing.assert_array_equal(np.concatenate([i.frames for i in items if i.kind == "frames"]), FRAMES)
    assert items[0].message.scan_shape == (NY, NX)


# --- over a real TCP socket, into the real TcpReceiver -----------------------------------------


class Connection:
    """A Merlin PC on port 0 and a ``TcpReceiver`` connected to it; ``items()`` drains its queue."""

    def __init__(self, max_message: int = 1 << 28, **kw):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(10)
        self.out: queue.Queue[Item] = queue.Queue(1000)
        self.stop = threading.Event()
        self.receiver = TcpReceiver(f"tcp://127.0.0.1:{self.server.getsockname()[1]}", self.out, self.stop,
                                    MerlinDecoder(), MpxFraming(max_message), backoff=(0.01, 0.05), **kw)
        self.receiver.start()
        self.conn, _ = self.server.accept()

    def send_and_hang_up(self, data: bytes, chunk: int) -> list[Item]:
        """Send ``data`` in ``chunk``-byte writes, close, and return the items up to the lost connection."""
        for lo in range(0, len(data), chunk):
            self.conn.sendall(data[lo:lo + chunk])
        self.conn.close()
        items = []
        while not items or items[-1].reason != "connection_lost":
            items.append(self.out.get(timeout=10))
        return items

    def close(self):
        self.stop.set()
        self.receiver.join(5)
        self.server.close()
        assert self.receiver.error is None and not self.receiver.is_alive()


GARBAGE = st.binary(min_size=1, max_size=400).map(lambda b: b.replace(b"MPX", b"MPx"))  # no message in it


@SOCKETS
@given(garbage=st.lists(st.tuples(st.integers(0, NY * NX + 1), GARBAGE), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(1, len(RECORDS[0]) + 14)), chunk=st.sampled_from([1 << 16, 700, 97]))
def test_garbage_then_a_valid_scan_over_tcp_every_frame_arrives_and_every_byte_is_counted(garbage, cut, chunk):
    """Garbage before the header, between frames and after the last; optionally a message cut off by the
    hang-up. The scan's frames arrive whole and in order; the skipped bytes are exactly the garbage (and
    the cut message); each run of garbage is one ``resync``."""
    slots = [b""] * (NY * NX + 2)  # slot 0: before the header, k: after message k
    for at, g in garbage:
        slots[at] += g
    slots = [s.replace(b"MPX", b"MPx") for s in slots]  # pieces run together may spell one
    messages = [message(HEADER), *(message(r) for r in RECORDS)]
    data = b"".join(s + m for s, m in zip(slots, messages)) + slots[-1]
    tail = message(RECORDS[0])[:cut] if cut else b""
    link = Connection(block=4096)
    try:
        items = link.send_and_hang_up(data + tail, chunk)
    finally:
        link.close()
    frames = [i for i in items if i.kind == "frames"]
    np.testing.assert_array_equal(np.concatenate([i.frames for i in frames]), FRAMES)
    assert [i.message.first for i in frames] == np.cumsum([0] + [i.count for i in frames[:-1]]).tolist()
    assert [i.kind for i in items if i.kind in ("start", "end")] == ["start", "end"]
    resyncs = [i for i in items if i.reason == "resync"]
    # trailing garbage is reported at the hang-up, with the cut message; or at the cut message's prefix, if whole
    expect = sum(map(bool, slots[:-1])) + (1 + bool(tail) if slots[-1] and len(tail) >= 15 else bool(slots[-1] + tail))
    assert len(resyncs) == link.receiver.resyncs == expect
    assert link.receiver.skipped_bytes == sum(map(len, slots)) + len(tail)
    assert link.receiver.messages == len(messages)


@SOCKETS
@given(stream=st.lists(st.one_of(mutated_frame().map(message), mutated_header().map(message), GARBAGE,
                                 st.sampled_from(RECORDS).map(message)), min_size=1, max_size=8),
       prefix=st.one_of(st.none(), st.integers(0, 10**10 - 1).map(lambda n: b"MPX,%010d," % n)))
def test_a_damaged_connection_never_kills_the_receiver_and_the_next_one_is_clean(stream, prefix):
    """Any bytes on one connection (mutated messages, garbage, a prefix with any length): the receiver
    survives, allocates no more than the longest message it may take, and after the reconnect a clean
    acquisition arrives whole."""
    link = Connection(block=4096, max_message=1 << 16)
    try:
        tracemalloc.start()
        try:
            damaged = link.send_and_hang_up(b"".join(stream) + (prefix or b""), 4096)
            link.conn, _ = link.server.accept()  # the receiver reconnects ...
            clean = link.send_and_hang_up(message(HEADER) + b"".join(message(r) for r in RECORDS), 4096)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        link.close()
    assert peak < 4 * ((1 << 16) + 4096) + (1 << 20), peak  # a few blocks, never a declared 10 GB
    for item in damaged + clean:
        assert item.kind != "bad" or item.reason != "undecodable", item.detail
    frames = [i for i in clean if i.kind == "frames"]
    np.testing.assert_array_equal(np.concatenate([i.frames for i in frames]), FRAMES)
    assert link.receiver.connections >= 2  # (a third may be on its way: the server still listens)


def test_a_huge_declared_length_is_refused_before_anything_is_allocated():
    link = Connection(block=4096)
    try:
        tracemalloc.start()
        try:
            items = link.send_and_hang_up(b"MPX,9999999999," + bytes(64) + message(HEADER) + message(RECORDS[0]), 4096)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        link.close()
    assert peak < 1 << 20
    assert [i.reason for i in items if i.kind == "bad"] == ["resync", "resync", "connection_lost"]
    assert [i.kind for i in items if i.kind != "bad"] == ["start", "frames"]
    assert link.receiver.skipped_bytes == 15 + 64


@pytest.mark.parametrize("cut", [1, 15, 200, len(RECORDS[0]) + 14])
def test_a_message_cut_off_by_the_hang_up_is_counted(cut):
    link = Connection()
    try:
        items = link.send_and_hang_up(message(HEADER) + message(RECORDS[0]) + message(RECORDS[1])[:cut], 4096)
    finally:
        link.close()
    assert [(i.kind, i.reason) for i in items] == [("start", ""), ("frames", ""), ("bad", "resync"),
                                                   ("bad", "connection_lost")]
    assert link.receiver.skipped_bytes == cut
