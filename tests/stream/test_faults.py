"""Never lose a scan, part two, over real ``rrstem serve`` processes: a full disk, a stalled service, a re-sent
start, one bad Merlin length, stale stream2 images, a scan too large for memory, and a flood of bad messages.
Every test checks the frames that reached the results file against a NumPy reference."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import msgpack
import numpy as np
import pytest
import zmq

from processes import RRSTEM, serve, wait_received
from support import Sender, disc_frames, fill_disk, reference
from rrstem.simulators.dectris import Stream2Encoder
from rrstem.simulators.merlin import MerlinFormat, mpx
from rrstem.stream.control import ControlClient
from rrstem.stream.protocol import Start
from rrstem.stream.results import read_scan


def assert_frames(res, frames, filled):
    """The results' VBF, VADF and filled mask equal NumPy's on the (ny, nx, h, w) ``frames``."""
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"), filled=filled)
    np.testing.assert_array_equal(res["maps"]["filled"], filled)
    for name in ("vbf", "vadf"):
        np.testing.assert_array_equal(res["maps"][name][filled], ref[name][filled])


def stop(proc: subprocess.Popen, control_ep: str) -> str:
    with ControlClient(control_ep, timeout=5) as ctl:
        ctl.request("stop")
    assert proc.wait(30) == 0
    return proc.stdout.read()


def orphans_then_stop(proc: subprocess.Popen, control_ep: str) -> tuple[dict, str]:
    """The service's orphan counters (``status``), then its log once stopped."""
    with ControlClient(control_ep, timeout=5) as ctl:
        orphans = ctl.request("status")["status"]["orphans"]
    return orphans, stop(proc, control_ep)


def test_a_full_disk_neither_kills_serve_nor_loses_the_scan(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "r.h5"
        proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out), "--checkpoint-seconds", "0.2")
        fill_disk(disk / "ballast")  # after serve's start-up check
        s = Sender(frames_ep)
        frames = disc_frames(6, 6, seed=21)
        s.start("full", (6, 6), (32, 32))
        s.frames("full", 0, frames.reshape(36, 32, 32)[:20])
        wait_received(control_ep, 20)
        time.sleep(0.6)  # checkpoints due, onto the full disk
        s.frames("full", 20, frames.reshape(36, 32, 32)[20:])
        s.end("full", 36)
        with ControlClient(control_ep, timeout=5) as ctl:
            deadline = time.monotonic() + 20
            while "results failed on scan full" not in (ctl.request("status")["status"].get("error") or ""):
                assert time.monotonic() < deadline, "the full disk was not reported"
                time.sleep(0.05)
        assert proc.poll() is None  # alive
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
        (disk / "ballast").unlink()  # space returns: the kept results are written at the next retry
        deadline = time.monotonic() + 20
        while not (out.exists() and read_scan(out, "full")["attrs"]["end_reason"] == "end"):
            assert time.monotonic() < deadline, "the kept results were never written"
            time.sleep(0.1)
        res = read_scan(out, "full")
        log = stop(proc, control_ep)
        s.close()
    finally:
        proc.kill()
        subprocess.run(["umount", "-l", str(disk)])
    assert "No space left on device" in log
    assert res["attrs"]["counters"]["received"] == 36 and res["attrs"]["complete"] == 1
    assert_frames(res, frames, np.ones((6, 6), bool))


def test_a_stalled_service_keeps_every_frame_that_was_delivered(tmp_path):
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out), "--idle-timeout", "1")
    frames = disc_frames(16, 16, seed=22)
    flat = frames.reshape(256, 32, 32)
    s = Sender(frames_ep)
    try:
        s.start("stall", (16, 16), (32, 32))
        s.frames("stall", 0, flat[:64])
        wait_received(control_ep, 64)
        proc.send_signal(signal.SIGSTOP)  # the service stops; the sender goes on: its frames wait in the queues
        try:
            for i in range(64, 128, 8):
                s.frames("stall", i, flat[i:i + 8])
            time.sleep(3)  # three times the idle timeout
        finally:
            proc.send_signal(signal.SIGCONT)
        wait_received(control_ep, 128)
        proc.send_signal(signal.SIGSTOP)  # again, with nothing sent meanwhile ...
        try:
            time.sleep(3)
        finally:
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # ... and nothing for a while after: still only half the idle timeout of running time
        for i in range(128, 256, 8):
            s.frames("stall", i, flat[i:i + 8])
        s.end("stall", 256)
        wait_received(control_ep, 256)
        log = stop(proc, control_ep)
    finally:
        s.close()
        proc.kill()
    res = read_scan(out, "stall")
    assert res["attrs"]["end_reason"] == "end" and res["attrs"]["complete"] == 1, log
    assert res["attrs"]["counters"]["received"] == 256 and res["attrs"]["counters"]["stale"] == 0
    assert_frames(res, frames, np.ones((16, 16), bool))
    assert "did not run for" in log


def test_a_start_sent_again_continues_the_scan_and_another_scan_of_the_same_id_is_stored_beside(tmp_path):
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out))
    frames = disc_frames(8, 8, seed=23)
    flat = frames.reshape(64, 32, 32)
    other = disc_frames(4, 4, seed=24)
    s = Sender(frames_ep)
    try:
        s.start("again", (8, 8), (32, 32))
        s.frames("again", 0, flat[:32])
        s.start("again", (8, 8), (32, 32))  # the same start, sent again
        s.frames("again", 32, flat[32:])
        s.end("again", 64)
        wait_received(control_ep, 64)
        s.start("again", (4, 4), (32, 32))  # another scan under the same id
        s.frames("again", 0, other.reshape(16, 32, 32))
        s.end("again", 16)
        with ControlClient(control_ep, timeout=5) as ctl:
            deadline = time.monotonic() + 20
            while ctl.request("status")["status"].get("state") != "done" or \
                    ctl.request("status")["status"]["expected"] != 16:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        stop(proc, control_ep)
    finally:
        s.close()
        proc.kill()
    first, second = read_scan(out, "again"), read_scan(out, "again.2")
    assert first["attrs"]["counters"]["received"] == 64 and first["attrs"]["complete"] == 1
    assert_frames(first, frames, np.ones((8, 8), bool))
    assert second["attrs"]["scan_id"] == "again" and second["attrs"]["counters"]["received"] == 16
    assert_frames(second, other, np.ones((4, 4), bool))


def test_one_absurd_merlin_length_costs_no_frame(tmp_path):
    ny, nx = 8, 8
    frames = disc_frames(ny, nx, seed=25)
    flat = frames.reshape(-1, 32, 32)
    fmt = MerlinFormat((32, 32), "uint16", frames=ny * nx, frames_per_trigger=nx, scan_xy=(nx, ny))
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(20)
    port = server.getsockname()[1]
    out = tmp_path / "r.h5"
    proc = subprocess.Popen([*RRSTEM, "serve", "--protocol", "merlin", "--listen", f"tcp://127.0.0.1:{port}",
                             "--publish", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--events",
                             "tcp://127.0.0.1:0", "--steering", "tcp://127.0.0.1:0", "--no-train", "--no-progress",
                             "--calibration-frames", "4", "--once", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        conn, _ = server.accept()
        header = fmt.acquisition_header()
        conn.sendall(mpx(len(header)) + header)
        for i in range(ny * nx):
            record = fmt.record(i + 1, flat[i])
            length = 100_000_000 if i == 20 else len(record)  # inside 2 B..256 MiB, and wrong
            conn.sendall(mpx(length) + record)
        assert proc.wait(30) == 0
        conn.close()
    finally:
        server.close()
        proc.kill()
    log = proc.stdout.read()
    res = read_scan(out)
    assert res["attrs"]["counters"]["received"] == ny * nx, log
    assert_frames(res, frames, np.ones((ny, nx), bool))
    assert "disagrees with its MQ1 frame header" in log


def test_late_images_of_an_earlier_stream2_series_are_stale(tmp_path):
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out), "--protocol", "stream2", "--scan-shape", "4x4")
    a, b = disc_frames(4, 4, seed=26).reshape(16, 32, 32), disc_frames(4, 4, seed=27).reshape(16, 32, 32)
    enc_a = Stream2Encoder(Start(scan_id="series-a", scan_shape=(4, 4), frame_shape=(32, 32), dtype="uint16"), 1)
    enc_b = Stream2Encoder(Start(scan_id="series-b", scan_shape=(4, 4), frame_shape=(32, 32), dtype="uint16"), 2)
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(frames_ep)
    try:
        sock.send_multipart(enc_a.header())
        for i in range(8):
            sock.send_multipart(enc_a.image(i, a[i]))
        sock.send_multipart(enc_b.header())  # a restart: series b begins, a never ended
        for i in range(8, 12):
            sock.send_multipart(enc_a.image(i, a[i]))  # late images of series a
        for i in range(16):
            sock.send_multipart(enc_b.image(i, b[i]))
        sock.send_multipart(enc_b.end())
        wait_received(control_ep, 16)
        with ControlClient(control_ep, timeout=5) as ctl:
            status = ctl.request("status")["status"]
        stop(proc, control_ep)
    finally:
        sock.close(linger=0)
        proc.kill()
    assert status["orphans"].get("no_start", 0) == 0
    res_a, res_b = read_scan(out, "series-a"), read_scan(out, "series-b")
    assert res_b["attrs"]["counters"]["stale"] == 4 and res_b["attrs"]["counters"]["received"] == 16
    assert res_a["attrs"]["end_reason"] == "superseded" and res_a["attrs"]["counters"]["received"] == 8
    filled = np.zeros(16, bool)
    filled[:8] = True
    assert_frames(res_a, a.reshape(4, 4, 32, 32), filled.reshape(4, 4))
    assert_frames(res_b, b.reshape(4, 4, 32, 32), np.ones((4, 4), bool))


def test_a_scan_whose_maps_would_not_fit_is_refused_at_its_start_and_the_next_one_runs(tmp_path):
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out))
    frames = disc_frames(3, 3, seed=28)
    s = Sender(frames_ep)
    try:
        s.start("vast", (16384, 16384), (2, 2), dtype="uint8")  # a tiny store, but 2**28 positions of maps
        s.frames("vast", 0, np.ones((4, 2, 2), np.uint8))
        s.start("small", (3, 3), (32, 32))
        s.frames("small", 0, frames.reshape(9, 32, 32))
        s.end("small", 9)
        wait_received(control_ep, 9)
        orphans, log = orphans_then_stop(proc, control_ep)
    finally:
        s.close()
        proc.kill()
    assert orphans["rejected_start"] == 1 and orphans["rejected_scan"] == 4
    assert "GiB for its maps" in log and "vast rejected" in log
    res = read_scan(out, "small")
    assert_frames(res, frames, np.ones((3, 3), bool))


def test_a_flood_of_bad_messages_is_counted_in_full_and_logged_a_line_a_second(tmp_path):
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out))
    s = Sender(frames_ep)
    frames = disc_frames(3, 3, seed=29)
    try:
        t0 = time.monotonic()
        for i in range(10_000):
            s.raw([b"\x93 not msgpack %d" % i])
        s.start("after", (3, 3), (32, 32))
        s.frames("after", 0, frames.reshape(9, 32, 32))
        s.end("after", 9)
        wait_received(control_ep, 9)
        took = time.monotonic() - t0
        orphans, log = orphans_then_stop(proc, control_ep)
    finally:
        s.close()
        proc.kill()
    assert sum(orphans.values()) == 10_000
    lines = [line for line in log.splitlines() if "rejected message" in line]
    assert 1 <= len(lines) <= took + 2, len(lines)  # one a second at most (and one at once)
    assert "more not logged" in lines[-1] or len(lines) == 1
    assert_frames(read_scan(out, "after"), frames, np.ones((3, 3), bool))


def test_the_accounting_identity_and_what_the_results_file_keeps_of_every_loss(tmp_path):
    """received + missing = positions; complete exactly when nothing is missing; the orphans seen while the scan
    was current and the frames its sender says it sent that never arrived, in its results."""
    out = tmp_path / "r.h5"
    proc, frames_ep, control_ep = serve(tmp_path, "--out", str(out))
    frames = disc_frames(4, 5, seed=30)
    flat = frames.reshape(20, 32, 32).copy()
    s = Sender(frames_ep)
    try:
        s.start("counted", (4, 5), (32, 32))
        flat[7] = 0  # an empty frame: a measurement with no counts, filled
        s.frames("counted", 0, flat[:12])
        s.raw([b"\x93 garbage"])  # belongs to no scan
        s.frames("counted", 13, flat[13:15])  # position 12 never sent
        head = msgpack.packb({"type": "frames", "scan_id": "counted", "first": 15, "count": 1})
        s.raw([head, flat[15].tobytes()[:-2]])  # a short buffer: invalid, so position 15 is missing
        s.frames("counted", 16, flat[16:20])
        s.end("counted", 21)  # the sender claims one frame more than it sent
        wait_received(control_ep, 18)
        stop(proc, control_ep)
    finally:
        s.close()
        proc.kill()
    res = read_scan(out, "counted")
    a, c = res["attrs"], res["attrs"]["counters"]
    assert c["received"] + c["missing"] == 20 and (c["received"], c["missing"], c["invalid"]) == (18, 2, 1)
    assert a["complete"] == 0 and a["end_reason"] == "end" and a["zero_counts"] == 1
    assert a["orphans"] == {"undecodable": 1}
    assert a["frames_unaccounted"] == 21 - 19  # 18 received + 1 invalid arrived
    filled = np.ones(20, bool)
    filled[[12, 15]] = False
    with np.errstate(invalid="ignore"):
        assert_frames(res, flat.reshape(4, 5, 32, 32), filled.reshape(4, 5))
    assert res["maps"]["vbf"][1, 2] == 0 and np.isnan(res["maps"]["com_x"][1, 2])  # position 7
