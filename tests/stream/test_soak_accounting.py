"""The rule ``bench/soak.py`` checks over SUB, pinned: every frame a PUB sent is received or counted missing.

A publisher that is flooded drops whole messages: frames anywhere in a scan, and its end message. Over
real PUB -> SUB sockets, a scan that loses frames and its end is closed by the next start
('superseded'), and the last scan, also without its end, by the stop ('stopped'); for both,
received + missing equals the positions (every frame was sent), and dropped counts the losses the tap
saw as gaps in the indices (not those after the last frame that arrived).
"""

from __future__ import annotations

import time

import numpy as np
import zmq

from support import disc_frames
from rrstem.stream import protocol as P
from rrstem.stream.results import read_scan

NY, NX = 4, 6


def test_over_sub_received_plus_missing_is_what_was_sent(make_service):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    svc = make_service(bind=False, listen=f"tcp://127.0.0.1:{port}", mode="sub")
    frames = disc_frames(NY, NX, seed=11).reshape(NY * NX, 32, 32)
    starts = [P.Start(scan_id=s, scan_shape=(NY, NX), frame_shape=(32, 32), dtype="uint16") for s in ("a", "b")]
    deadline = time.monotonic() + 10
    while svc.current is None:  # PUB drops until the subscription is through: resend the start until it lands
        assert time.monotonic() < deadline
        P.send_start(pub, starts[0])
        time.sleep(0.02)
    # what reached the service of the messages sent: (first, count); the rest was lost in transit
    delivered = {"a": [(0, 4), (6, 3), (12, 2), (16, 4)],  # 4..5, 9..11, 14..15 and 20..23 lost, and the end
                 "b": [(2, 5), (9, 1), (18, 6)]}  # 0..1, 7..8, 10..17 lost, and the end
    gaps = {"a": 2 + 3 + 2, "b": 2 + 2 + 8}  # the losses the tap sees: before a frame that arrived
    for k, (scan_id, runs) in enumerate(delivered.items()):
        if k:
            P.send_start(pub, starts[k])  # a start after a lost end: the scan before it ends 'superseded'
        for first, count in runs:
            P.send_frames(pub, scan_id, first, frames[first:first + count])
    deadline = time.monotonic() + 10
    while not (svc.current.scan_id == "b" and svc.current.counters["received"] == 12):
        assert time.monotonic() < deadline, svc.current.counter_dict()
        time.sleep(0.02)
    svc.close()  # the stop writes the running scan, 'stopped'
    pub.close()
    path = svc.results_written[0][1]
    for scan_id, reason in (("a", "superseded"), ("b", "stopped")):
        res = read_scan(path, scan_id)
        c = res["attrs"]["counters"]
        got = sum(n for _, n in delivered[scan_id])
        assert (c["received"], c["dropped"], c["missing"]) == (got, gaps[scan_id], NY * NX - got)
        assert res["attrs"]["end_reason"] == reason and not res["attrs"]["complete"]
        filled = np.zeros(NY * NX, bool)
        for first, count in delivered[scan_id]:
            filled[first:first + count] = True
        np.testing.assert_array_equal(res["maps"]["filled"].ravel(), filled)
    assert not svc.orphans
