"""Ingest throughput of the rrstem service over TCP loopback, against raw ZeroMQ.

Measured, in one run, for each case:
- ``raw_zmq_fps``: a separate sender process PUSHes the same rrstem/1 frames
  messages to a bare PULL socket that only receives them (zero-copy) and
  decodes their headers, timed from the first to the last frames message —
  the loopback ceiling for these messages on this machine.
- ``rrstem_fps``: the same sender, the same messages, into the full service
  (receiver, validation, binning, pixel masking, mean pattern, COM, VBF/VADF,
  frame store, 10 Hz snapshots), timed from the first frame to the moment the
  last frame is in the maps.
- ``ratio``: rrstem_fps / raw_zmq_fps. Both alternate ``--repeats`` times;
  medians are reported, because the machine is shared and noisy.

Cases: 256x256 uint16 frames binned by 4, and 96x96 uint16 frames at bin 1.

The Merlin case (``merlin_256x256_U16_bin4``): a sender process serves a
Merlin acquisition of 256x256 ``U16`` frames (big-endian, one ``MPX`` message
per frame, ``simulators/merlin.py``) on a TCP loopback port, as a Merlin PC
does; ``raw_tcp_fps`` is a plain socket that connects and reads the same bytes
(``recv_into`` a reused buffer, nothing parsed), ``rrstem_fps`` the service
with ``--protocol merlin`` (TCP receiver, MPX/MQ1 decoding, then the same
pipeline as above).
Frames are Poisson-noisy bright-field discs (fixed seed), 64 distinct ones
cycled. ``--train`` runs the rrVAE trainer during the service runs (issue 3:
ingest must keep >= 0.6 of its rate without training).

``--scans 128,256,512`` repeats every case at each scan edge (positions = edge^2),
to show whether the rate holds as the scan grows; ``peak_rss_GB`` is the
peak resident memory of this process (the service runs in it; the senders
are separate processes) over that case's service runs, reset before each
case (``/proc/self/clear_refs``), beside ``store_GB``, the case's frame store.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import zmq

from rrstem.stream import protocol as P


def make_frames(h: int, w: int, n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 5) ** 2) * 200.0 + 2.0
    return rng.poisson(disc, (n, h, w)).astype(np.uint16)


def sender(endpoint: str, scan_id: str, scan: tuple[int, int], frame: tuple[int, int], per_msg: int,
           ready, go) -> None:
    """Child process: connect a PUSH socket and send one whole scan as fast as the receiver takes it."""
    frames = make_frames(*frame, n=max(64, per_msg))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 8)
    sock.connect(endpoint)
    ready.set()
    go.wait(30)
    n = scan[0] * scan[1]
    P.send_start(sock, P.Start(scan_id=scan_id, scan_shape=scan, frame_shape=frame, dtype="uint16"))
    chunks = [frames[k:k + per_msg] for k in range(0, len(frames) - per_msg + 1, per_msg)]
    for i, first in enumerate(range(0, n, per_msg)):
        count = min(per_msg, n - first)
        P.send_frames(sock, scan_id, first, chunks[i % len(chunks)][:count], copy=False)
    P.send_end(sock, scan_id, n)
    sock.close(linger=30000)
    ctx.term()


def spawn_sender(endpoint, scan_id, scan, frame, per_msg):
    mpc = mp.get_context("spawn")
    ready, go = mpc.Event(), mpc.Event()
    proc = mpc.Process(target=sender, args=(endpoint, scan_id, scan, frame, per_msg, ready, go), daemon=True)
    proc.start()
    if not ready.wait(60):
        raise RuntimeError("sender process did not start")
    return proc, go


def run_raw(scan, frame, per_msg) -> float:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 64)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc, go = spawn_sender(f"tcp://127.0.0.1:{port}", "raw", scan, frame, per_msg)
    go.set()
    n, t0 = 0, None
    total = scan[0] * scan[1]
    while True:
        if not sock.poll(30000):
            raise RuntimeError("raw receiver timed out")
        parts = sock.recv_multipart(copy=False)
        head = P.decode_header(parts[0].buffer)
        if head.type == "frames":
            if t0 is None:
                t0 = time.perf_counter()
            n += head.count
            t1 = time.perf_counter()
        elif head.type == "end":
            break
    dt = t1 - t0
    proc.join(30)
    sock.close()
    assert n == total, (n, total)
    return n / dt


def run_service(scan, frame, per_msg, bin_, train: bool, tmp: str) -> float:
    from rrstem.stream.preprocess import PreprocessConfig
    from rrstem.stream.service import Service, ServiceConfig

    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish="tcp://127.0.0.1:0", control=None,
                        out=os.path.join(tmp, "bench.h5"), train=train,
                        trainer={"consolidate_seconds": 0.0} if train else {},
                        preprocess=PreprocessConfig(bin=bin_))
    total = scan[0] * scan[1]
    with Service(cfg) as svc:
        proc, go = spawn_sender(svc.listen_endpoint, "bench", scan, frame, per_msg)
        go.set()
        deadline = time.monotonic() + 300
        while svc.current is None:
            time.sleep(0.01)
        cur = svc.current
        while cur.counters["received"] + cur.counters["invalid"] < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"service received only {cur.counters['received']} of {total}")
            svc.check()
            time.sleep(0.01)  # the service times itself: poll gently so we don't compete for the GIL
        dt = cur.last_frame_at - cur.first_frame_at
        proc.join(30)
        svc.check()
        assert cur.counters["received"] == total, cur.counter_dict()
    return total / dt


def merlin_sender(scan: tuple[int, int], frame: tuple[int, int], port_q, go) -> None:
    """Child process: serve one Merlin acquisition on a loopback port (reported on ``port_q``) as fast as it is read."""
    import socket

    from rrstem.simulators.merlin import MerlinFormat, mpx

    n = scan[0] * scan[1]
    fmt = MerlinFormat(frame, "uint16", frames=n, frames_per_trigger=scan[1], scan_xy=(scan[1], scan[0]))
    frames = make_frames(*frame)
    messages = []
    for k, f in enumerate(frames):  # 64 distinct frames, cycled; sequence numbers patched per frame
        record = fmt.record(k + 1, f)
        messages.append(bytearray(mpx(len(record)) + record))
    header = fmt.acquisition_header()
    server = socket.create_server(("127.0.0.1", 0))
    port_q.put(server.getsockname()[1])
    server.settimeout(60)
    conn, _ = server.accept()
    go.wait(30)
    conn.sendall(mpx(len(header)) + header)
    for i in range(n):
        msg = messages[i % len(messages)]
        msg[19:25] = b"%06d" % ((i + 1) % 1000000)  # MPX,<10>, then MQ1, then the sequence number
        conn.sendall(msg)
    conn.settimeout(30)
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    conn.close()
    server.close()


def spawn_merlin(scan, frame):
    mpc = mp.get_context("spawn")
    port_q, go = mpc.Queue(), mpc.Event()
    proc = mpc.Process(target=merlin_sender, args=(scan, frame, port_q, go), daemon=True)
    proc.start()
    return proc, port_q.get(timeout=60), go


def run_raw_tcp(scan, frame) -> float:
    import socket

    n = scan[0] * scan[1]
    proc, port, go = spawn_merlin(scan, frame)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    go.set()
    buf = memoryview(bytearray(4 << 20))
    total, t0 = 0, None
    per_frame = 15 + 384 + frame[0] * frame[1] * 2
    expected = n * per_frame  # plus the acquisition header
    while total < expected:
        got = sock.recv_into(buf)
        if not got:
            raise RuntimeError("raw TCP reader: the sender closed early")
        if t0 is None:
            t0 = time.perf_counter()
        total += got
    dt = time.perf_counter() - t0
    sock.close()
    proc.join(30)
    return n / dt


def run_merlin_service(scan, frame, bin_, train: bool, tmp: str) -> float:
    from rrstem.stream.preprocess import PreprocessConfig
    from rrstem.stream.service import Service, ServiceConfig

    total = scan[0] * scan[1]
    proc, port, go = spawn_merlin(scan, frame)
    cfg = ServiceConfig(listen=f"tcp://127.0.0.1:{port}", protocol="merlin", publish="tcp://127.0.0.1:0",
                        control=None, out=os.path.join(tmp, "bench-merlin.h5"), train=train,
                        trainer={"consolidate_seconds": 0.0} if train else {}, preprocess=PreprocessConfig(bin=bin_))
    with Service(cfg) as svc:
        go.set()
        deadline = time.monotonic() + 300
        while svc.current is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the Merlin scan never started")
            svc.check()
            time.sleep(0.01)
        cur = svc.current
        while cur.counters["received"] + cur.counters["invalid"] < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"service received only {cur.counters['received']} of {total}")
            svc.check()
            time.sleep(0.01)
        dt = cur.last_frame_at - cur.first_frame_at
        svc.check()
        assert cur.counters["received"] == total, cur.counter_dict()
    proc.join(30)
    return total / dt


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def store_gb(scan, frame, bin_) -> float:
    from rrstem.stream.store import FrameStore, store_dtype

    binned = (frame[0] // bin_, frame[1] // bin_)
    return FrameStore.nbytes(scan[0] * scan[1], binned, store_dtype("uint16", bin_)) / 1e9


def run_case(scan, case, args, tmp) -> dict:
    """Warm-up, then ``repeats`` alternating raw and service runs of one case at one scan size."""
    run_service(scan, case["frame"], case["per_msg"], case["bin"], args.train, tmp)  # warm-up
    reset_peak_rss()
    raw, ours = [], []
    for _ in range(args.repeats):
        raw.append(run_raw(scan, case["frame"], case["per_msg"]))
        ours.append(run_service(scan, case["frame"], case["per_msg"], case["bin"], args.train, tmp))
    r, o = statistics.median(raw), statistics.median(ours)
    return {
        "scan": list(scan), "frames_per_message": case["per_msg"], "bin": case["bin"],
        "rrstem_fps": round(o), "raw_zmq_fps": round(r), "ratio": round(o / r, 3),
        "worst_ratio": round(min(ours) / max(raw), 3),
        "rrstem_fps_all": [round(v) for v in ours], "raw_zmq_fps_all": [round(v) for v in raw],
        "rrstem_MBps": round(o * case["frame"][0] * case["frame"][1] * 2 / 1e6),
        "peak_rss_GB": round(peak_rss_gb(), 2), "store_GB": round(store_gb(scan, case["frame"], case["bin"]), 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scan", type=int, default=128, help="scan edge (positions = edge^2)")
    ap.add_argument("--scans", default=None, help="comma-separated scan edges, e.g. 128,256,512 (overrides --scan)")
    ap.add_argument("--train", action="store_true", help="run the rrVAE trainer during the service runs")
    ap.add_argument("--only-merlin", action="store_true", help="run only the Merlin case")
    ap.add_argument("--no-merlin", action="store_true", help="skip the Merlin case")
    args = ap.parse_args(argv)
    cases = [
        {"name": "256x256_uint16_bin4", "frame": (256, 256), "bin": 4, "per_msg": 32},
        {"name": "96x96_uint16_bin1", "frame": (96, 96), "bin": 1, "per_msg": 256},
    ]
    edges = [int(v) for v in args.scans.split(",")] if args.scans else [args.scan]
    out = {"benchmark": "ingest", "train": args.train, "scans": edges, "repeats": args.repeats,
           "cpus": os.cpu_count(), "python": platform.python_version(), "zmq": zmq.zmq_version(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for edge in edges:
            scan = (edge, edge)
            for case in [] if args.only_merlin else cases:
                name = case["name"] if len(edges) == 1 else f"{case['name']}_scan{edge}"
                out["cases"][name] = run_case(scan, case, args, tmp)
        scan = (edges[0], edges[0])
        if not args.no_merlin:
            frame = (256, 256)
            run_merlin_service(scan, frame, 4, args.train, tmp)  # warm-up
            raw, ours = [], []
            for _ in range(args.repeats):
                raw.append(run_raw_tcp(scan, frame))
                ours.append(run_merlin_service(scan, frame, 4, args.train, tmp))
            r, o = statistics.median(raw), statistics.median(ours)
            out["cases"]["merlin_256x256_U16_bin4"] = {
                "frames_per_message": 1, "bin": 4, "rrstem_fps": round(o), "raw_tcp_fps": round(r),
                "ratio": round(o / r, 3), "rrstem_fps_all": [round(v) for v in ours],
                "raw_tcp_fps_all": [round(v) for v in raw], "rrstem_MBps": round(o * 256 * 256 * 2 / 1e6),
            }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
