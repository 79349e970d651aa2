"""Never lose a scan, over real processes: a dead sender, SIGTERM and control stop mid-scan, kill -9
during checkpoints, an unwritable results path, and a full disk at scan end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from processes import RRSTEM, serve, wait_received
from support import Sender, disc_frames, fill_disk, wait_results
from rrstem.stream.control import ControlClient
from rrstem.stream.results import read_scan

SENDER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from support import Sender, disc_frames
s = Sender(sys.argv[1])
f = disc_frames(4, 5, seed=1).reshape(20, 32, 32)
s.start("dead", (4, 5), (32, 32))
s.frames("dead", 0, f[:12])
s.sock.close(linger=5000)
print("sent", flush=True)
import time; time.sleep(60)  # alive until killed: the scan has no end
"""


def test_a_sender_killed_mid_scan_leaves_an_incomplete_idle_scan_with_exactly_its_frames(tmp_path):
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out), "--idle-timeout", "1", "--once")
    sender = subprocess.Popen([sys.executable, "-c", SENDER.format(tests=str(Path(__file__).parents[1])), frames_ep],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert sender.stdout.readline().strip() == "sent"
        wait_received(control_ep, 12)
        sender.kill()
        assert proc.wait(30) == 0  # --once: the idle scan's results end the service
    finally:
        sender.kill()
        proc.kill()
    res = read_scan(out)
    a = res["attrs"]
    assert a["complete"] == 0 and a["end_reason"] == "idle"
    assert a["counters"]["received"] == 12 and a["counters"]["missing"] == 8
    assert a["incomplete_detail"] == ("it ended when no frames came for the idle timeout (the sender died, or the "
                                      "acquisition was aborted); 8 of 20 positions have no frame")
    assert res["maps"]["filled"].sum() == 12


@pytest.mark.parametrize("how", ["SIGTERM", "control stop"])
def test_a_stop_mid_scan_writes_the_partial_scan_and_exits_0_within_15_s(tmp_path, how):
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out))
    s = Sender(frames_ep)
    try:
        s.start("partial", (4, 5), (32, 32))
        s.frames("partial", 0, disc_frames(4, 5, seed=2).reshape(20, 32, 32)[:9])
        wait_received(control_ep, 9)
        t0 = time.monotonic()
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            with ControlClient(control_ep, timeout=5) as ctl:
                ctl.request("stop")
        assert proc.wait(15) == 0, proc.stdout.read()
        assert time.monotonic() - t0 < 15
    finally:
        s.close()
        proc.kill()
    a = read_scan(out)["attrs"]
    assert a["end_reason"] == "stopped" and a["complete"] == 0 and a["counters"]["received"] == 9
    assert a["incomplete_detail"] == "the service was stopped before the scan's end; 11 of 20 positions have no frame"


def test_kill_9_at_random_moments_never_leaves_a_broken_file(tmp_path):
    """20 runs of several scans each, every one killed at a random moment: the file always opens, every
    scan written before the kill is whole, and a running scan is there as its last checkpoint."""
    out = tmp_path / "r.h5"
    rng = random.Random(7)
    frames = disc_frames(4, 5, seed=3).reshape(20, 32, 32)
    done_before: set[str] = set()
    for run in range(20):
        proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out), "--checkpoint-seconds", "0.1")
        s = Sender(frames_ep)
        try:
            for k in range(3):
                sid = f"r{run}s{k}"
                s.start(sid, (4, 5), (32, 32))
                for i in range(0, 20, 4):
                    s.frames(sid, i, frames[i:i + 4])
                    time.sleep(rng.uniform(0, 0.03))
                if k < 2:
                    s.end(sid, 20)
            wait_received(control_ep, 20)
            time.sleep(rng.uniform(0, 0.4))  # checkpoints and scan ends are being written now
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            s.close()
            proc.kill()
        with h5py.File(out, "r") as f:  # it opens, whatever the moment
            scans = dict(f["scans"])
            for sid in done_before:  # what was finished before this run is still whole
                assert scans[sid].attrs["end_reason"] == "end" and scans[sid]["maps/filled"][()].sum() == 20
            for sid, g in scans.items():
                if g.attrs["end_reason"] == "end":
                    done_before.add(sid)
                else:  # a checkpoint of the running scan: incomplete, as far as it got
                    assert g.attrs["end_reason"] == "running" and g.attrs["complete"] == 0
    assert len(done_before) >= 20  # most runs got their first scans written before the kill
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 20  # a kill during a write leaves at most its temporary file


def test_an_unwritable_results_path_fails_at_start_up_naming_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for out, says in ((tmp_path / "no" / "such" / "r.h5", "does not exist"),
                      (tmp_path / "not-results.h5", "not an rrstem results file")):
        if out.parent == tmp_path:
            out.write_bytes(b"something else")
        run = subprocess.run([*RRSTEM, "serve", "--out", str(out), "--no-train"], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode != 0 and str(out) in run.stderr and says in run.stderr


def test_a_full_disk_at_scan_end_keeps_the_scan_and_writes_it_once_space_returns(make_service, sender_for, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        ballast = disk / "ballast"
        svc = make_service(out=disk / "r.h5", retry_seconds=0.2)
        fill_disk(ballast)  # after the start-up check
        s = sender_for(svc)
        frames = disc_frames(6, 6, seed=4)
        s.start("full", (6, 6), (32, 32))
        s.frames("full", 0, frames.reshape(36, 32, 32))
        s.end("full", 36)
        deadline = time.monotonic() + 20
        while not any(f.where == "results" for f in svc.failures):
            assert time.monotonic() < deadline, "the write did not fail on a full disk"
            time.sleep(0.02)
        assert svc.writer.pending == ["full"] and "full" in svc.last_error()
        ballast.unlink()  # space returns
        path = wait_results(svc, timeout=20)
        res = read_scan(path, "full")
        assert res["attrs"]["counters"]["received"] == 36 and res["maps"]["filled"].all()
        assert svc.writer.pending == []
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_control_save_can_name_another_path(make_service, sender_for, tmp_path):
    svc = make_service()
    s = sender_for(svc)
    s.start("moved", (3, 3), (32, 32))
    s.frames("moved", 0, disc_frames(3, 3, seed=5).reshape(9, 32, 32))
    other = tmp_path / "other.h5"
    with ControlClient(svc.control_endpoint, timeout=5) as ctl:
        deadline = time.monotonic() + 10
        while ctl.request("status")["status"]["counters"].get("received") != 9:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ctl.request("save", path=str(other))["path"] == str(other)
    s.end("moved", 9)
    assert wait_results(svc) == other  # the scan's end goes to the new path too
    assert read_scan(other)["attrs"]["counters"]["received"] == 9


#: ``rrstem serve`` whose receiver raises at frame 12 of a scan: the real command, with one fault put in
FAULTY_RECEIVER = """
import sys
from rrstem.stream.receiver import Receiver
batch = Receiver._batch

def faulty(self):
    items = batch(self)
    if any(item.kind == "frames" and item.message.first == 12 for item in items):
        raise RuntimeError("injected receiver fault at frame 12")
    return items

Receiver._batch = faulty
from rrstem.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_receiver_that_raises_inside_serve_ends_the_scan_failed_publishes_an_error_and_exits_1(tmp_path):
    import zmq

    from rrstem.stream.events import decode_event

    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out), "--events", "tcp://127.0.0.1:0",
                                        command=[sys.executable, "-c", FAULTY_RECEIVER])
    events_ep = proc.banner.split("events on ")[1].split(",")[0]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(events_ep)
    s = Sender(frames_ep)
    frames = disc_frames(4, 5, seed=9).reshape(20, 32, 32)
    try:
        seen = []
        deadline = time.monotonic() + 20
        while not any(e.type == "scan_started" for e in seen):  # resend the start until the SUB is through
            assert time.monotonic() < deadline, "no scan_started event"
            s.start("faulty", (4, 5), (32, 32))
            if sub.poll(300):
                seen.append(decode_event(sub.recv_multipart()))
        for i in range(12):
            s.frames("faulty", i, frames[i:i + 1])
        wait_received(control_ep, 12)
        t0 = time.monotonic()
        s.frames("faulty", 12, frames[12:13])  # the receiver raises on this one
        code = proc.wait(15)
        took = time.monotonic() - t0
        while sub.poll(1000):
            seen.append(decode_event(sub.recv_multipart()))
    finally:
        s.close()
        sub.close(linger=0)
        proc.kill()
    log = proc.stdout.read()
    assert code == 1, log
    assert took < 5, took  # it stops within a second once it sees the failure; the rest is process start-up
    assert "injected receiver fault at frame 12" in log
    errors = [e for e in seen if e.type == "error"]
    assert errors and errors[0].where == "rrstem-receiver" and "injected receiver fault" in errors[0].message
    assert errors[0].scan_id == "faulty"
    res = read_scan(out, "faulty")
    a = res["attrs"]
    assert a["complete"] == 0 and a["end_reason"] == "failed" and "injected receiver fault" in a["error"]
    assert a["counters"]["received"] == 12 and res["maps"]["filled"].sum() == 12
