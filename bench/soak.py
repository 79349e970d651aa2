"""Floods: a producer offering twice what the service can take, for minutes, against a real ``rrstem serve``.

What is measured, in one run (issue 9, item 4):

1. ``capacity_fps``: a ``rrstem serve`` process (PULL, real loopback sockets) is
   flooded with ``--capacity-scans`` scans as fast as it takes them
   (back-pressure); the capacity is the rate from the moment the service's
   control ``status`` shows the second scan to the moment it shows every frame
   of the last one received (the first scan is the warm-up).
2. For each mode, a fresh ``rrstem serve`` and a producer process that sends
   scan after scan for ``--seconds``, paced at ``--factor`` x capacity
   (2x by default; one schedule for the whole run, so after a pause the producer
   catches up at full speed):

   - ``pull``: PUSH -> PULL. The producer blocks when the service is behind
     (back-pressure). No frame may be lost: in the results file every scan has
     ``received == sent``, and nothing is missing, dropped or orphaned.
   - ``sub``: PUB -> SUB. The publisher drops whole messages when the service is
     behind. Every lost frame must be counted: for every scan ``received +
     missing == sent`` exactly (every scan sends all its positions; ``dropped``,
     the losses the tap saw as gaps, is a part of ``missing``). A scan whose *start* is lost cannot be counted
     (nothing says how large it was), so the producer sends each start on a
     drained stream, as a detector does after the idle gap between scans: it
     waits, on the service's control ``status``, until the previous scan has
     ended or its counters stopped moving. The frames and the end messages are
     flooded. ``duty_cycle`` is the fraction of the time spent sending frames.

   Memory: the service's resident set (``VmRSS`` of ``/proc/PID/status``) is
   sampled every ``--rss-every`` seconds: at the start of the flood, the middle
   and the end, the peak, and the slope (least squares, MB per minute) over
   the second half of the flood.

Scans: ``--scan`` x ``--scan`` positions (256x256 by default) of 64x64 uint16
Poisson discs (64 distinct frames, cycled; fixed seed), ``--frames-per-message``
32, served at ``--bin 2``, without training (``--train`` turns the rrVAE on).
The service writes every scan to its results file; the bench moves the file
every ``--rotate-seconds`` with control ``save path=...`` (as an operator
would between sessions), reads the counters of each scan from the files it
no longer writes to, and deletes them, so a 10-minute flood leaves no GBs
behind (the files are in ``/dev/shm`` when there is one). Each results write copies the scans already in the file
(``stream/results.py``), so one file for 10 minutes of back-to-back scans would
measure that copy, not the flood.

Prints one JSON object. Run it under the bench lock:
    flock /tmp/rrstem-bench.lock python bench/soak.py --mode both
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import zmq

from ingest import make_frames  # bench/ingest.py: the same Poisson discs
from rrstem.stream import protocol as P
from rrstem.stream.control import ControlClient, ControlError

FRAME = (64, 64)
ANNOUNCE = re.compile(r"frames from (\S+), snapshots on (\S+), control on (\S+),")


# --- the producer (a separate process) ---------------------------------------------------------


def drained(control: ControlClient, scan_id: str, timeout: float, still: float = 0.2) -> bool:
    """Wait until scan ``scan_id`` has ended in the service, or its counters have not moved for ``still`` s
    (its end was dropped): the stream is empty, so the next start cannot be dropped."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            h = control.request("status")["status"]
        except ControlError:
            continue
        if h["scan_id"] == scan_id and h["state"] != "acquiring":
            return True
        key = (h["scan_id"], sum(h["counters"].values()))
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= still:
            return True
        time.sleep(0.01)
    return False


def producer(endpoint: str, mode: str, control_ep: str, scan: int, per_msg: int, rate: float | None,
             seconds: float | None, n_scans: int | None, prefix: str, out, go) -> None:
    """Send scans of ``scan`` x ``scan`` positions, back to back, at ``rate`` frames/s (None: as fast as
    the socket takes them), until ``seconds`` have passed or ``n_scans`` were sent; put the figures on ``out``."""
    frames = make_frames(*FRAME, n=max(64, per_msg))
    chunks = [np.ascontiguousarray(frames[k:k + per_msg]) for k in range(0, len(frames) - per_msg + 1, per_msg)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH if mode == "pull" else zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 4)  # a detector's own buffer is small: back-pressure or drops, not RAM
    sock.connect(endpoint)
    control = ControlClient(control_ep, timeout=5.0)
    n = scan * scan
    if mode == "sub":  # a SUB misses what is published before it is connected: wait until it hears us
        probe = P.Start(scan_id=f"{prefix}-probe", scan_shape=(1, 1), frame_shape=FRAME, dtype="uint16")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            P.send_start(sock, probe)
            time.sleep(0.1)
            if control.request("status")["status"]["scan_id"] == probe.scan_id:
                break
        P.send_frames(sock, probe.scan_id, 0, chunks[0][:1], copy=True)
        P.send_end(sock, probe.scan_id, 1)
    go.wait(120)
    sent: list[tuple[str, int]] = []
    t_start = time.perf_counter()
    sending = blocked = waiting = 0.0
    prev = f"{prefix}-probe" if mode == "sub" else None
    undrained = 0
    while (seconds is None or time.perf_counter() - t_start < seconds) and (n_scans is None or len(sent) < n_scans):
        scan_id = f"{prefix}-{len(sent):05d}"
        if mode == "sub" and prev is not None:
            t = time.perf_counter()
            undrained += not drained(control, prev, timeout=30)
            waiting += time.perf_counter() - t
        t0 = time.perf_counter()
        P.send_start(sock, P.Start(scan_id=scan_id, scan_shape=(scan, scan), frame_shape=FRAME, dtype="uint16"))
        done = len(sent) * n
        for i, first in enumerate(range(0, n, per_msg)):
            if rate is not None:  # one schedule for the whole run: after a drain wait, catch up at full speed
                delay = t_start + (done + first) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            count = min(per_msg, n - first)
            tb = time.perf_counter()
            P.send_frames(sock, scan_id, first, chunks[i % len(chunks)][:count], copy=False)
            blocked += time.perf_counter() - tb
        P.send_end(sock, scan_id, n)
        sending += time.perf_counter() - t0
        sent.append((scan_id, n))
        prev = scan_id
    total = time.perf_counter() - t_start
    control.close()
    sock.close(linger=30000)
    ctx.term()
    out.put({"scans": sent, "seconds": total, "sending_seconds": sending, "blocked_in_send_seconds": blocked,
             "drain_wait_seconds": waiting, "undrained_starts": undrained})


# --- the service (a real `rrstem serve` process) ------------------------------------------------


class Served:
    """``rrstem serve`` in a child process on port-0 endpoints; its output goes to files in ``tmp``."""

    def __init__(self, tmp: Path, name: str, mode: str, bin_: int, train: bool):
        self.tmp, self.name = tmp, name
        self.log = open(tmp / f"{name}.log", "w")
        self.results = [tmp / f"{name}-000.h5"]
        cmd = [sys.executable, "-m", "rrstem.cli", "serve", "--listen", "tcp://127.0.0.1:0", "--bind",
               "--publish", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--out", str(self.results[0]),
               "--bin", str(bin_), "--no-progress"] + ([] if train else ["--no-train"]) + (
               ["--sub"] if mode == "sub" else [])
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            m = ANNOUNCE.search((tmp / f"{name}.log").read_text())
            if m:
                self.listen, self.publish, self.control_ep = m.groups()
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rrstem serve did not start:\n{(tmp / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.1)
        self.control = ControlClient(self.control_ep, timeout=10.0)

    def status(self) -> dict:
        return self.control.request("status")["status"]

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def rotate(self) -> None:
        """Results from now on to a new file (control ``save path=``)."""
        path = self.tmp / f"{self.name}-{len(self.results):03d}.h5"
        self.control.request("save", path=str(path))
        self.results.append(path)

    def stop(self, timeout: float = 120) -> int:
        self.control.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)
        finally:
            self.log.close()


def read_counters(path: Path, into: dict[str, dict]) -> None:
    """Each scan's counters and end reason in ``path`` -> ``into[scan_id]``; a finished write wins over a
    checkpoint of the running scan (end_reason 'running') or a save mid-scan."""
    if not path.exists():
        return
    with h5py.File(path, "r") as f:
        for scan_id, g in f.get("scans", {}).items():
            reason = str(g.attrs.get("end_reason", ""))
            if scan_id in into and (reason == "running" or "checkpoint_time" in g.attrs):
                continue
            into[scan_id] = {"counters": json.loads(g.attrs["counters"]), "end_reason": reason,
                             "partial": reason == "running" or "checkpoint_time" in g.attrs}


def fit_slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 3:
        return float("nan")
    t, mb = np.array(samples).T
    return float(np.polyfit(t / 60.0, mb, 1)[0])


def per_minute_peak(samples: list[tuple[float, float]]) -> list[float]:
    """The highest of the (seconds, MB) samples in each minute."""
    peaks: dict[int, float] = {}
    for t, mb in samples:
        peaks[int(t // 60)] = max(mb, peaks.get(int(t // 60), 0.0))
    return [round(v, 1) for _, v in sorted(peaks.items())]


# --- the runs ----------------------------------------------------------------------------------


def spawn_producer(svc: Served, mode: str, args, rate, seconds, n_scans, prefix):
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=producer, daemon=True,
                       args=(svc.listen, mode, svc.control_ep, args.scan, args.frames_per_message, rate, seconds,
                             n_scans, prefix, out, go))
    proc.start()
    return proc, out, go


def measure_capacity(tmp: Path, args) -> float:
    """Frames/s the service takes over PULL as fast as a producer can send: from the start of the second
    scan to the last frame of the last one (the first scan is the warm-up)."""
    svc = Served(tmp, "capacity", "pull", args.bin, args.train)
    n = args.scan * args.scan
    try:
        proc, out, go = spawn_producer(svc, "pull", args, None, None, args.capacity_scans, "capacity")
        go.set()
        second, last = "capacity-00001", f"capacity-{args.capacity_scans - 1:05d}"
        t_a = received_a = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            h = svc.status()
            got = h["counters"].get("received", 0)
            if h["scan_id"] == second and t_a is None:
                t_a, received_a = time.perf_counter(), got
            if h["scan_id"] == last and t_a is not None:
                if got >= n:
                    t_b = time.perf_counter()
                    break
            time.sleep(0.02)
        else:
            raise RuntimeError("the capacity run did not finish")
        out.get(timeout=120)
        proc.join(30)
    finally:
        svc.stop()
    return ((args.capacity_scans - 1) * n - received_a) / (t_b - t_a)


def soak(tmp: Path, mode: str, capacity: float, args) -> dict:
    svc = Served(tmp, f"soak-{mode}", mode, args.bin, args.train)
    rate = args.factor * capacity
    rss: list[tuple[float, float]] = [(0.0, svc.rss_mb())]  # before the first frame
    scans: dict[str, dict] = {}
    try:
        proc, out, go = spawn_producer(svc, mode, args, rate, args.seconds, None, f"{mode}")
        t0 = time.perf_counter()
        go.set()
        next_rss, next_rotate = 0.0, args.rotate_seconds
        while proc.is_alive():
            now = time.perf_counter() - t0
            if now >= next_rss:
                rss.append((now, svc.rss_mb()))
                next_rss += args.rss_every
            if now >= next_rotate:
                svc.rotate()
                next_rotate += args.rotate_seconds
                for path in svc.results[:-2]:  # no write goes there any more: read it and free the disk
                    if path.exists():
                        read_counters(path, scans)
                        path.unlink()
            proc.join(0.2)
        flood_seconds = time.perf_counter() - t0
        stats = out.get(timeout=60)
        # the last scan in the maps and written (over SUB its end may have been dropped: then it is written,
        # 'stopped', when the service stops)
        if not drained(svc.control, stats["scans"][-1][0], timeout=120, still=2.0):
            raise RuntimeError(f"the service is still busy with {stats['scans'][-1][0]} 120 s after the flood")
        rss.append((time.perf_counter() - t0, svc.rss_mb()))
        orphans = svc.status()["orphans"]
    finally:
        code = svc.stop()
    for path in svc.results:
        read_counters(path, scans)
        path.unlink(missing_ok=True)
    return summarize(mode, stats, scans, orphans, rss, flood_seconds, capacity, rate, code, len(svc.results))


def summarize(mode, stats, scans, orphans, rss, flood_seconds, capacity, rate, code, rotations) -> dict:
    n_sent = sum(n for _, n in stats["scans"])
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    wrong = []
    for scan_id, n in stats["scans"]:
        got = scans.get(scan_id)
        if got is None or got["partial"]:
            wrong.append({"scan_id": scan_id, "sent": n, "results": "missing" if got is None else "partial only"})
            continue
        c = got["counters"]
        totals.update(c)
        reasons[got["end_reason"]] += 1
        others = {k: v for k, v in c.items() if k not in ("received", "dropped", "missing") and v}
        ok = (c["received"] == n and not c["dropped"] and not c["missing"] if mode == "pull"
              else c["received"] + c["missing"] == n and c["dropped"] <= c["missing"])
        if not ok or others:
            wrong.append({"scan_id": scan_id, "sent": n, **c})
    half = [(t, mb) for t, mb in rss if t >= flood_seconds / 2]
    mid = min(rss, key=lambda s: abs(s[0] - flood_seconds / 2))
    warm = min(30.0, flood_seconds / 10)  # "start": once the first scans are in (their stores are allocated)
    start = next(mb for t, mb in rss if t >= warm)
    return {
        "mode": mode,
        "seconds": round(flood_seconds, 1),
        "scans": len(stats["scans"]),
        "frames_sent": n_sent,
        "received": totals["received"],
        "dropped": totals["dropped"],
        "missing": totals["missing"],
        "invalid": totals["invalid"], "duplicate": totals["duplicate"], "stale": totals["stale"],
        "orphans": orphans,
        "exact": not wrong and not orphans and (totals["received"] == n_sent if mode == "pull" else
                                                totals["received"] + totals["missing"] == n_sent),
        "rule": "received == sent" if mode == "pull" else "received + missing == sent",
        "wrong_scans": wrong[:10], "n_wrong_scans": len(wrong),
        "end_reasons": dict(reasons),
        "capacity_fps": round(capacity),
        "target_fps": round(rate),  # the pace the producer tries to keep while it sends a scan's frames
        "sent_fps": round(n_sent / stats["sending_seconds"]),  # achieved while sending (PULL: held back)
        "sent_over_capacity": round(n_sent / stats["sending_seconds"] / capacity, 2),
        "overall_sent_fps": round(n_sent / stats["seconds"]),  # including the SUB drain waits
        "overall_sent_over_capacity": round(n_sent / stats["seconds"] / capacity, 2),
        "service_fps": round(totals["received"] / flood_seconds),
        "duty_cycle": round(stats["sending_seconds"] / stats["seconds"], 3),
        "blocked_in_send_fraction": round(stats["blocked_in_send_seconds"] / stats["sending_seconds"], 3),
        "drain_wait_seconds": round(stats["drain_wait_seconds"], 1),
        "undrained_starts": stats["undrained_starts"],
        "rss_mb": {
            "idle": round(rss[0][1], 1),
            "start": round(start, 1), "start_at_s": round(warm, 1), "middle": round(mid[1], 1), "end": round(rss[-1][1], 1),
            "peak": round(max(mb for _, mb in rss), 1),
            "slope_second_half_mb_per_min": round(fit_slope(half), 2),
            "samples": len(rss),
            "peak_per_minute": per_minute_peak(rss),
        },
        "results_files": rotations,
        "service_exit_code": code,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="flood duration per mode (default 600)")
    ap.add_argument("--mode", choices=("pull", "sub", "both"), default="both")
    ap.add_argument("--factor", type=float, default=2.0, help="offered rate / measured capacity (default 2)")
    ap.add_argument("--scan", type=int, default=256, help="scan edge (positions = edge^2; default 256)")
    ap.add_argument("--bin", type=int, default=2, help="service --bin (default 2)")
    ap.add_argument("--frames-per-message", type=int, default=32)
    ap.add_argument("--capacity-scans", type=int, default=4,
                    help="scans of the capacity run (all but the first are timed; default 4)")
    ap.add_argument("--rotate-seconds", type=float, default=5.0, help="move the results file this often")
    ap.add_argument("--rss-every", type=float, default=2.0, help="RSS sample interval, s")
    ap.add_argument("--train", action="store_true", help="serve with the rrVAE trainer on")
    args = ap.parse_args(argv)
    if args.capacity_scans < 2:
        ap.error("--capacity-scans must be >= 2 (the first is the warm-up)")
    modes = ("pull", "sub") if args.mode == "both" else (args.mode,)
    result = {"benchmark": "soak", "seconds_per_mode": args.seconds, "factor": args.factor,
              "scan": [args.scan, args.scan], "frame": [*FRAME, "uint16"], "bin": args.bin,
              "frames_per_message": args.frames_per_message, "train": args.train, "cpus": os.cpu_count(),
              "python": platform.python_version(), "zmq": zmq.zmq_version()}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the results files in RAM: no GBs on the disk
    result["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="rrstem-soak-", dir=shm) as tmp:
        capacity = measure_capacity(Path(tmp), args)
        result["capacity_fps"] = round(capacity)
        result["modes"] = {mode: soak(Path(tmp), mode, capacity, args) for mode in modes}
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)  # the machine is shared
    result["exact"] = all(m["exact"] for m in result["modes"].values())
    print(json.dumps(result, indent=2))
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
