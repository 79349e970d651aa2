"""Events, rescan requests and the bridge, over real sockets and processes (docs/steering.md).

The loop of issue 12's done-when: a synthetic vacancy scan streams in from
``rrstem simulate --steer``, an ``anomaly`` event names a position within
1 A of the vacancy, ``examples/steer_on_defects.py`` asks for a subscan, the
simulator streams it, and the results file holds both scans, the subscan
with its parent, region, step and dose. A pristine scan fires no anomaly;
bad requests get clear error replies and nothing is sent; a bridge that
never answers is reported and the service goes on.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from rrstem.client import Client, ClientError, ClientTimeout
from rrstem.simulators.bridge import Bridge, RegionSource, replay_subscans
from rrstem.simulators.graphene import GrapheneSource
from rrstem.simulators.source import ArraySource, stream
from rrstem.stream.results import read_scan
from rrstem.stream.steering import RescanRequest
from support import disc_frames, wait_results

RRSTEM = [sys.executable, "-m", "rrstem.cli"]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "steer_on_defects.py"
ANY = "tcp://127.0.0.1:0"
#: the scan of the loop: 64x64 positions of 0.2 A (the lattice residual needs a few unit cells), 64 px frames
SCAN = ["--scan", "64", "--detector", "64", "--dose", "1e6"]


def _events_until(client: Client, kind: str, scan_id: str | None = None, timeout: float = 30.0) -> list:
    """Every event up to and including the first ``kind`` (of ``scan_id``, if given)."""
    seen = []
    for event in client.events(timeout=timeout):
        seen.append(event)
        if event.type == kind and (scan_id is None or getattr(event, "scan_id", None) == scan_id):
            return seen
    raise AssertionError(seen)


def test_the_loop_vacancy_anomaly_example_subscan_results(tmp_path):
    out = tmp_path / "steer.h5"
    serve = subprocess.Popen([*RRSTEM, "serve", "--bind", "--listen", ANY, "--publish", ANY, "--control", ANY,
                              "--events", ANY, "--steering", ANY, "--no-train", "--no-progress", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [serve]
    try:
        for line in serve.stdout:
            if line.startswith("rrstem serve: frames from"):
                break
        ep = {k: line.split(f"{k} ")[1].split(",")[0] for k in ("from", "control on", "events on", "steering on")}
        client = Client(events=ep["events on"], control=ep["control on"], timeout=30.0)
        example = subprocess.Popen([sys.executable, str(EXAMPLE), "--events", ep["events on"], "--control",
                                    ep["control on"], "--max-subscans", "1", "--exit-after", "60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(example)
        assert example.stdout.readline().startswith("watching")  # subscribed
        sim = subprocess.Popen([*RRSTEM, "simulate", *SCAN, "--defect", "vacancy", "--to", ep["from"], "--connect",
                                "--steer", ep["steering on"], "--steer-idle", "5", "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(sim)
        seen = _events_until(client, "scan_ended", timeout=60)  # the parent's end...
        seen += _events_until(client, "scan_ended", timeout=60)  # ...and the subscan's
        assert sim.wait(60) == 0, sim.stdout.read()
        assert example.wait(10) == 0
        ex_out = example.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        serve.wait(20)
    parent_id = seen[0].scan_id
    anomalies = [e for e in seen if e.type == "anomaly" and e.scan_id == parent_id]
    assert anomalies, seen
    vacancy_px = (32, 32)  # GrapheneSource puts the defect on the centre position; step 0.02 nm
    a = anomalies[0]
    assert math.dist(a.position, vacancy_px) * 0.02 <= 0.1, a  # within 1 Angstrom
    assert a.position_nm == pytest.approx((a.position[0] * 0.02, a.position[1] * 0.02))
    assert a.score > a.threshold and a.scan_shape == (64, 64)
    assert len(anomalies) == 1, anomalies  # once: its cluster is not reported again
    started = [e for e in seen if e.type == "scan_started"]
    assert [e.subscan is None for e in started] == [True, False]
    sub = started[1].subscan
    assert f"requested {started[1].scan_id}" in ex_out, ex_out
    # the example asked for the anomaly's box plus 3 positions, twice as fine at 4x the dose
    y0, y1, x0, x1 = a.bbox
    assert sub.region == (y0 - 3, y1 + 3, x0 - 3, x1 + 3) and sub.parent_scan_id == parent_id
    assert (sub.step_factor, sub.dose_factor) == (0.5, 4.0)
    parent, child = read_scan(out, parent_id), read_scan(out, started[1].scan_id)
    assert parent["attrs"]["complete"], {k: parent["attrs"][k] for k in ("end_reason", "counters") if k in parent["attrs"]}
    assert "parent_scan_id" not in parent["attrs"]
    attrs = child["attrs"]
    assert attrs["parent_scan_id"] == parent_id and list(attrs["region"]) == list(sub.region)
    assert attrs["step_factor"] == 0.5 and attrs["step_nm"] == pytest.approx(0.01)
    assert attrs["dose"] == pytest.approx(4e6) and attrs["dose_factor"] == 4.0
    assert tuple(child["attrs"]["scan_shape"]) == (2 * (y1 - y0 + 6), 2 * (x1 - x0 + 6))
    assert child["attrs"]["complete"] and child["maps"]["filled"].all()
    # the subscan's frames were computed at the finer step: its start says so, and its vadf map differs from
    # the parent's region sampled at every other position only by noise and the finer positions in between
    assert child["attrs"]["metadata"]["rescan"]["request_id"] == sub.request_id


def test_a_pristine_scan_fires_no_anomaly(make_service):
    svc = make_service(events=ANY, steering=ANY)
    with Client(events=svc.events.endpoint, timeout=30.0) as client:
        time.sleep(0.3)  # the subscription reaches the service
        src = GrapheneSource((64, 64), 64, dose=1e6, defect="none", seed=7)
        stream(src, svc.listen_endpoint, bind=False, progress=False)
        seen = _events_until(client, "scan_ended", timeout=60)
    assert [e.type for e in seen] == ["scan_started", "scan_ended"], seen
    assert seen[1].complete and seen[1].results_path


@pytest.fixture
def scanned(make_service, sender_for):
    """A service (events, steering on port 0) that has taken one complete 8x6 scan 'first'."""
    svc = make_service(events=ANY, steering=ANY, steer_timeout=0.5)
    s = sender_for(svc)
    frames = disc_frames(8, 6)
    s.start("first", (8, 6), frames.shape[2:], calibration={"scan_step_nm": 0.05}, metadata={"dose": 1000.0})
    s.frames("first", 0, frames.reshape(48, *frames.shape[2:]))
    s.end("first", 48)
    wait_results(svc)
    return svc


BAD_REQUESTS = [
    ([0, 9, 0, 6], {}, "outside scan first of 8x6 positions"),
    ([-1, 4, 0, 6], {}, "outside scan first"),
    ([4, 4, 0, 6], {}, "is empty"),
    ([5, 2, 0, 6], {}, "is empty"),
    ("2:4", {}, "region must be Y0:Y1,X0:X1"),
    ([0, 4.5, 0, 6], {}, "region must be four integers"),
    ([0, 4, 0, 6], {"step_factor": 0.0}, "step_factor must be a number from 0.03125 to 4"),
    ([0, 4, 0, 6], {"step_factor": float("nan")}, "step_factor must be a number"),
    ([0, 4, 0, 6], {"dose_factor": 1e6}, "dose_factor must be a number from 0.01 to 100"),
    ([0, 4, 0, 6], {"dwell_factor": -2}, "dwell_factor must be a number"),
    ([0, 4, 0, 6], {"scan_id": "nope"}, "no scan 'nope' in this service .scans it knows: first"),
]


def test_bad_rescan_requests_get_clear_errors_and_nothing_is_sent(scanned):
    ctx = zmq.Context.instance()
    bridge = ctx.socket(zmq.SUB)
    bridge.setsockopt(zmq.SUBSCRIBE, b"")
    bridge.connect(scanned.steering.endpoint)
    time.sleep(0.2)
    with Client(control=scanned.control_endpoint, timeout=5) as client:
        for region, kw, message in BAD_REQUESTS:
            with pytest.raises(ClientError, match=message):
                client.request("rescan", region=region, **kw)
        assert client.status()["scan_id"] == "first"  # the service goes on
    assert not bridge.poll(300) and scanned.steering.requests() == []
    bridge.close(linger=0)


def test_a_request_no_bridge_answers_times_out_is_reported_and_the_service_goes_on(scanned, sender_for):
    with Client(events=scanned.events.endpoint, control=scanned.control_endpoint, timeout=10) as client:
        time.sleep(0.3)
        req = client.rescan((2, 6, 1, 5), step_factor=0.5, dose_factor=4)
        assert req["parent_scan_id"] == "first" and req["scan_shape"] == [8, 8] and req["dose"] == 4000.0
        assert req["step_nm"] == pytest.approx(0.025)
        (error,) = [e for e in _events_until(client, "error", timeout=10) if e.type == "error"]
    assert error.where == "steering" and "did not answer rescan request " + req["request_id"] in error.message
    assert [r["state"] for r in scanned.steering.requests()] == ["timed_out"]
    with Client(snapshots=scanned.publish_endpoint, control=scanned.control_endpoint, timeout=10) as client:
        snap = client.snapshot()  # the newest: it lists the request, for the dashboard's outline
        assert snap.header.scan_id == "first" and snap.arrays["vbf"].shape == (8, 6)
        assert [(r["region"], r["state"]) for r in snap.header.rescans] == [([2, 6, 1, 5], "timed_out")]
        assert client.save() == str(scanned.cfg.out)
    s = sender_for(scanned)  # the service takes the next scan as usual
    frames = disc_frames(4, 4, seed=2)
    s.start("next", (4, 4), frames.shape[2:])
    s.frames("next", 0, frames.reshape(16, *frames.shape[2:]))
    s.end("next", 16)
    assert read_scan(wait_results(scanned, 2), "next")["attrs"]["complete"]


def test_a_replay_bridge_refuses_to_refine_and_resends_a_region(scanned):
    frames = disc_frames(8, 6)
    parent = ArraySource(frames, _start_like("first", frames))
    with Bridge(scanned.steering.endpoint, replay_subscans(parent)) as bridge:
        time.sleep(0.3)
        finer = scanned.rescan([2, 6, 1, 5], step_factor=0.5)
        same = scanned.rescan([2, 6, 1, 5])
        sub = bridge.next_subscan(5)
        deadline = time.monotonic() + 5
        while len(bridge.answered) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    states = {r["request_id"]: r for r in scanned.steering.requests()}
    assert states[finer["request_id"]]["state"] == "refused"
    assert "a recorded scan cannot be refined (step_factor 0.5" in states[finer["request_id"]]["reason"]
    assert states[same["request_id"]]["state"] == "accepted"
    assert isinstance(sub, RegionSource) and sub.start.scan_id == same["scan_id"]
    np.testing.assert_array_equal(sub.array(), frames[2:6, 1:5])  # the region's recorded frames, in order


def _start_like(scan_id, frames):
    from rrstem.stream.protocol import Start

    return Start(scan_id=scan_id, scan_shape=frames.shape[:2], frame_shape=frames.shape[2:], dtype="uint16")


def test_a_graphene_subscan_at_the_same_step_is_the_parents_region():
    """Known answer for the subscan geometry: at step factor 1, noise-free, the subscan's frames are the
    parent's frames of the region, to rounding; at step factor 0.5 every other frame is."""
    parent = GrapheneSource((12, 12), 64, defect="vacancy", threads=1)
    whole = parent.array()
    same = parent.subscan((3, 9, 4, 10), 1.0, 1.0, "same")
    np.testing.assert_allclose(same.array().astype(float), whole[3:9, 4:10].astype(float), atol=1)
    fine = parent.subscan((3, 9, 4, 10), 0.5, 1.0, "fine")
    assert fine.start.scan_shape == (12, 12) and fine.start.calibration.scan_step_nm == pytest.approx(0.01)
    np.testing.assert_allclose(fine.array()[::2, ::2].astype(float), whole[3:9, 4:10].astype(float), atol=1)
    assert fine.defect_px == pytest.approx([2 * (6 - 3), 2 * (6 - 4)])  # the vacancy, in the subscan's positions
    far = parent.subscan((0, 2, 0, 2), 1.0, 1.0, "far")
    assert far.defect_px == pytest.approx([6, 6])  # off its 2x2 field, and still missing from the lattice


def test_the_client_says_when_nothing_answers():
    with Client(control="tcp://127.0.0.1:9", events="tcp://127.0.0.1:9", snapshots="tcp://127.0.0.1:9",
                timeout=0.2) as client:
        with pytest.raises(ClientTimeout, match="no reply from tcp://127.0.0.1:9 within 0.2 s .* rrstem serve"):
            client.status()
        with pytest.raises(ClientTimeout, match="no event from tcp://127.0.0.1:9 within 0.2 s"):
            client.next_event()
        with pytest.raises(ClientTimeout, match="no snapshot from tcp://127.0.0.1:9"):
            client.snapshot()
    with pytest.raises(ClientError, match="no control endpoint"):
        Client(events="tcp://127.0.0.1:9").save()


def test_rescan_and_events_commands(scanned):
    ctx = zmq.Context.instance()
    bridge = ctx.socket(zmq.SUB)
    bridge.setsockopt(zmq.SUBSCRIBE, b"rescan")
    bridge.connect(scanned.steering.endpoint)
    time.sleep(0.2)
    ok = subprocess.run([*RRSTEM, "rescan", "--control", scanned.control_endpoint, "--region", "1:3,2:4",
                         "--step-factor", "0.5", "--dose-factor", "4"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert bridge.poll(2000)
    req = RescanRequest.decode(bridge.recv_multipart())
    assert (req.region, req.scan_shape, req.dose_factor, req.parent_scan_id) == ((1, 3, 2, 4), (4, 4), 4.0, "first")
    bad = subprocess.run([*RRSTEM, "rescan", "--control", scanned.control_endpoint, "--region", "1:3,2:40"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "outside scan first of 8x6 positions" in bad.stderr
    events = subprocess.Popen([*RRSTEM, "events", "--connect", scanned.events.endpoint, "--count", "1",
                               "--timeout", "20"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    scanned.report("test", RuntimeError("a known failure"))
    out, _ = events.communicate(timeout=30)
    import json

    (line,) = out.splitlines()
    assert json.loads(line)["type"] == "error" and json.loads(line)["message"] == "RuntimeError: a known failure"
    bridge.close(linger=0)
