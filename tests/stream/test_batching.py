"""One image per message, taken in batches: the batched decode, the receiver's merged runs and the service's maps
are exactly what the messages one by one give; bad messages in the middle of a batch are counted, and the valid
ones around them all land. Plus the CPU budget that bounds whole-scan work."""

import queue
import threading
import time

import cbor2
import numpy as np
import pytest
import zmq

from support import disc_frames, reference, wait_results
from rrstem.simulators.dectris import Stream2Encoder
from rrstem.stream.detectors.stream2 import Stream2Decoder
from rrstem.stream.protocol import Start
from rrstem.stream.receiver import Receiver
from rrstem.stream.results import read_scan
from rrstem.stream.workers import Budget

NY, NX = 6, 8
N = NY * NX


def series(seed=0):
    frames = disc_frames(NY, NX, seed=seed).reshape(N, 32, 32)
    start = Start(scan_id="batched", scan_shape=(NY, NX), frame_shape=(32, 32), dtype="uint16")
    return frames, Stream2Encoder(start, series=9)


def damaged_messages(enc, frames):
    """A whole series with, in the middle of its images: undecodable bytes, an image of the wrong shape, one
    with a uint32 tag, a compressed image (not the fast way), a repeated image and an image of another series."""
    images = [enc.image(i, frames[i])[0] for i in range(N)]
    msg = cbor2.loads(images[11][3:])
    dims, typed = msg["data"]["threshold_1"].value
    wrong_shape = cbor2.dumps({**msg, "data": {"threshold_1": cbor2.CBORTag(40, [[16, 64], typed])}})
    wrong_dtype = cbor2.dumps({**msg, "data": {"threshold_1": cbor2.CBORTag(40, [dims, cbor2.CBORTag(70, typed.value)])}})
    other_series = cbor2.dumps({**cbor2.loads(images[12][3:]), "series_id": 99})
    lz4 = Stream2Encoder(enc.start, series=9, compression="lz4").image(13, frames[13])[0]
    middle = [b"\xff\xff not cbor", wrong_shape, wrong_dtype, other_series]
    return enc.header() + images[:11] + middle + [lz4] + images[14:30] + [images[20]] + images[30:] + enc.end()


def per_frame(items):
    """(index -> pixels, bad reasons, kinds of the other items) of a list of items."""
    got, bad, other = {}, [], []
    for item in items:
        if item.kind == "frames":
            for k in range(item.count):
                got.setdefault(item.message.first + k, []).append(np.array(item.frames[k]))
        elif item.kind == "bad":
            bad.append(item.reason)
        else:
            other.append(item.kind)
    return got, bad, other


def test_decode_many_gives_what_decode_gives_one_by_one_with_runs_merged():
    frames, enc = series()
    messages = damaged_messages(enc, frames)
    one, many = Stream2Decoder((NY, NX)), Stream2Decoder((NY, NX))
    singly = []
    for m in messages:
        out = one.decode([m])
        singly += out if isinstance(out, list) else [out]
    batched = []
    for lo in range(0, len(messages), 17):  # batches cut across the damage and the runs
        batched += many.decode_many([[m] for m in messages[lo:lo + 17]])
    assert per_frame(batched)[1:] == per_frame(singly)[1:]
    assert sorted(per_frame(batched)[1]) == ["bad_shape", "bad_shape", "no_start", "undecodable"]
    got, want = per_frame(batched)[0], per_frame(singly)[0]
    assert sorted(got) == sorted(want) == list(range(11)) + list(range(13, N))  # 11, 12: damaged; 13 lz4
    for index, pixels in want.items():
        assert len(got[index]) == len(pixels) == (2 if index == 20 else 1)  # the repeat is kept, for the scan
        for a, b in zip(got[index], pixels):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, frames[index])
    assert len([i for i in batched if i.kind == "frames"]) < len(want) / 4  # runs are merged
    # frames_sent counts every image message of the series, valid or not: N, less position 12's (sent as
    # another series'), plus a second image 11 (both 11s damaged) and the repeat of 20
    ends = [[i.message.frames_sent for i in items if i.kind == "end"] for items in (batched, singly)]
    assert ends == [[N + 1], [N + 1]]


def test_the_receiver_takes_waiting_messages_in_batches_and_merges_their_runs():
    frames, enc = series(seed=1)
    messages = damaged_messages(enc, frames)
    ctx = zmq.Context.instance()
    out, stop = queue.Queue(), threading.Event()
    receiver = Receiver(ctx, "tcp://127.0.0.1:0", out, stop, bind=True, hwm=1000, decoder=Stream2Decoder((NY, NX)))
    push = ctx.socket(zmq.PUSH)
    push.connect(receiver.endpoint)
    for m in messages:
        push.send(m)
    time.sleep(0.5)  # all waiting at the receiver before it reads: one batch
    receiver.start()
    items = []
    while not any(i.kind == "end" for i in items):
        items.append(out.get(timeout=10))
    stop.set()
    receiver.join(5)
    push.close(linger=0)
    got, bad, other = per_frame(items)
    assert receiver.messages == len(messages) and other == ["start", "end"]
    assert sorted(bad) == ["bad_shape", "bad_shape", "no_start", "undecodable"]
    assert sorted(got) == list(range(11)) + list(range(13, N))
    for index, pixels in got.items():
        for a in pixels:
            np.testing.assert_array_equal(a, frames[index])
    kinds = [i.kind for i in items]
    assert kinds.index("bad") > kinds.index("frames")  # the damage came after the first run, in order
    assert len([i for i in items if i.kind == "frames"]) <= 6  # 0-10, lz4 13, 14-29, 20, 30-47 (+ no split)


def test_a_batched_stream2_scan_gives_the_numpy_maps_and_counts_the_damage(make_service):
    frames, enc = series(seed=2)
    svc = make_service(protocol="stream2", scan_shape=(NY, NX))
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(svc.listen_endpoint)
    for m in damaged_messages(enc, frames):
        sock.send(m)
    res = read_scan(wait_results(svc))
    sock.close()
    counters = res["attrs"]["counters"]
    assert res["attrs"]["invalid_reasons"] == {"bad_shape": 2}  # the wrong shape, and the wrong dtype
    assert counters["received"] == N - 2 and counters["duplicate"] == 1 and counters["invalid"] == 2
    assert counters["missing"] == 2  # 11: both its images were damaged; 12: its only one came as another series'
    assert svc.orphans["undecodable"] == 1 and svc.orphans["no_start"] == 1
    filled = res["maps"]["filled"].reshape(-1)
    assert filled.sum() == N - 2 and not filled[11] and not filled[12]
    assert svc.receiver.messages == len(damaged_messages(enc, frames))
    ref = reference(frames.reshape(NY, NX, 32, 32), res["attrs"]["geometry"], res.get("pixel_mask"))
    for name in ("vbf", "vadf"):  # integer counts: exact, at every position that got its frame
        np.testing.assert_array_equal(res["maps"][name].reshape(-1)[filled], ref[name].reshape(-1)[filled])


def test_a_budget_keeps_work_to_its_share_of_a_core():
    budget = Budget(share=0.1, floor=0.5)
    assert budget.due(0.0)
    budget.spent(10.0, 0.2)  # 0.2 s of work: the next is due 2 s after it began
    assert not budget.due(11.9) and budget.due(12.0)
    budget.spent(20.0, 0.01)  # cheap work: the floor
    assert not budget.due(20.49) and budget.due(20.5)
    assert budget.run(lambda a, b: a + b, 2, 3) == 5 and budget.last_seconds >= 0
    with pytest.raises(ValueError):
        Budget(share=0)


def test_a_budget_takes_its_fast_share_while_frames_arrive_fast():
    budget = Budget(share=0.1, floor=0.0, fast_share=0.01, fast_fps=5000)
    budget.spent(10.0, 0.2, rate=4000)  # slow enough: 0.2 / 0.1
    assert not budget.due(11.9) and budget.due(12.0)
    budget.spent(20.0, 0.2, rate=6000)  # fast: 0.2 / 0.01
    assert not budget.due(39.9) and budget.due(40.0)
    assert Budget(share=0.1).fast_share == 0.1  # none given: the same share at any rate
    with pytest.raises(ValueError):
        Budget(share=0.1, fast_share=0)


def test_a_cpu_budget_charges_the_threads_cpu_time_not_its_waits():
    """A run that waits 0.3 s (for a core, the GIL, a lock) costs its thread no CPU: a wall-time budget pauses
    for it, a CPU-time one does not."""
    wall, cpu = Budget(share=0.1), Budget(share=0.1, cpu=True)
    for budget in (wall, cpu):
        budget.run(time.sleep, 0.3)
    assert wall.last_seconds >= 0.3 and cpu.last_seconds < 0.05
    started = time.monotonic()
    cpu.run(lambda: sum(i * i for i in range(300_000)))  # busy: its CPU time is charged
    assert cpu.last_seconds > 0.005
    assert cpu.next == pytest.approx(started + cpu.last_seconds / 0.1, abs=0.05)


def test_a_pooled_frame_block_is_used_again_only_when_nothing_views_it():
    frames, enc = series(seed=2)
    images = [[enc.image(i, frames[i])[0]] for i in range(N)]
    dec = Stream2Decoder((NY, NX))
    dec.decode(enc.header())
    first = dec.decode_many(images[:20])  # >= POOLED messages: a pooled block
    second = dec.decode_many(images[20:40])
    assert not np.shares_memory(first[0].frames, second[0].frames)  # the first is still held
    kept = second[0].frames
    del first
    third = dec.decode_many(images[:20])  # the first block is free again: used, the second untouched
    assert len(dec._blocks._blocks) == 2 and not np.shares_memory(third[0].frames, kept)
    np.testing.assert_array_equal(kept, frames[20:40])
    np.testing.assert_array_equal(third[0].frames, frames[:20])
