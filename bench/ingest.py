"""Ingest throughput of the rrstem service over TCP loopback, against raw ZeroMQ.

``--service process`` (the default) measures ``rrstem serve`` as users run
it: its own process, started by the ``rrstem`` console script with
``serve --bind --listen tcp://127.0.0.1:0 --bin B --no-train`` and its
snapshot, control, events and steering sockets on port 0
(``serve_process.py``), everything else at serve's defaults (checkpoints,
progress bar, logging, the events thread), after its warm-up (the frame
pass compiled). Each case runs one serve process: a first scan
(``first_scan_fps``: its frame store's pages are mapped then), then
``--repeats`` scans, one after another as at the microscope, each waited on
until its results are written. ``serve_peak_rss_GB`` is that process's peak
memory over the repeats. Merlin runs a fresh ``serve --protocol merlin`` per
scan (it connects to the sender's port). ``--service in-process`` runs a
``Service`` inside this process instead, a new one per scan (the figures
before issue 28; it hides what only the separate process does).

Measured, in one run, for each case:
- ``raw_zmq_fps``: a separate sender process PUSHes the same rrstem/1 frames
  messages to a bare PULL socket that only receives them (zero-copy) and
  decodes their headers, timed from the moment the sender sends its first
  frames message to the moment the last one is received — the loopback
  ceiling for these messages on this machine.
- ``rrstem_fps``: the same sender, the same messages, into the full service
  (receiver, validation, binning, pixel masking, mean pattern, COM, VBF/VADF,
  frame store, snapshots), timed as the user sees it: from the moment the
  sender sends its first frames message to the moment a snapshot on the
  service's PUB socket reports every frame received (a subscriber here
  decodes the snapshot headers). ``rrstem_pipeline_fps``: the service's own
  clock, from its first frame to its last, for comparison.
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

The DECTRIS stream2 case (``stream2_96x96_uint16_bin1``): 96x96 uint16
frames, one image per message, in the CBOR messages of ``simulators/dectris.py``
(``Stream2Encoder``); the sender builds the whole series in RAM before it
starts, so it is not what is measured. ``raw_zmq_fps`` is a bare PULL socket
that receives the same messages (zero-copy, nothing parsed); ``rrstem_fps``
the service with ``protocol="stream2"`` (as ``serve --protocol stream2``:
CBOR decoding, then the same pipeline). Both are timed as above: from the
sender's first image message to the last one received (raw) or to the
snapshot that reports every image (rrstem). The Merlin case is timed the
same way, from the first frame's bytes sent.

The training case (``training_256x256_uint16_bin4``): the 256x256 uint16
bin-4 case with the rrVAE trainer off and on, alternating;
``ratio`` is rate_with_training / rate_without (issue 3: >= 0.6), and
``trainer_at_last_frame`` (the trainer's state, step and images seen at the
last frame of each run with training) says how far training had got by then.

``--cases`` picks the cases (comma-separated, default all):
``256x256_uint16_bin4``, ``96x96_uint16_bin1``, ``merlin``, ``stream2``,
``training``; merlin, stream2 and training run at the first scan edge.

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

import msgpack
import numpy as np
import zmq

from rrstem.stream import protocol as P
from serve_process import ServeProcess, subscribe, wait_reported


def make_frames(h: int, w: int, n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 5) ** 2) * 200.0 + 2.0
    return rng.poisson(disc, (n, h, w)).astype(np.uint16)


def connected_push(endpoint: str, hwm: int, ready, go):
    """A PUSH socket connected to ``endpoint``; says ``ready``, then waits for ``go``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.connect(endpoint)
    ready.set()
    go.wait(30)
    return ctx, sock


def sender(endpoint: str, scan_id: str, scan: tuple[int, int], frame: tuple[int, int], per_msg: int,
           ready, go, sent) -> None:
    """Child process: connect a PUSH socket and send one whole scan as fast as the receiver takes it."""
    frames = make_frames(*frame, n=max(64, per_msg))
    ctx, sock = connected_push(endpoint, 8, ready, go)
    n = scan[0] * scan[1]
    P.send_start(sock, P.Start(scan_id=scan_id, scan_shape=scan, frame_shape=frame, dtype="uint16"))
    chunks = [frames[k:k + per_msg] for k in range(0, len(frames) - per_msg + 1, per_msg)]
    sent.value = time.monotonic()
    for i, first in enumerate(range(0, n, per_msg)):
        count = min(per_msg, n - first)
        P.send_frames(sock, scan_id, first, chunks[i % len(chunks)][:count], copy=False)
    P.send_end(sock, scan_id, n)
    sock.close(linger=30000)
    ctx.term()


def spawn(target, *args, **kw):
    """Start ``target(*args, ready, go, sent, **kw)`` in a spawned process; return it, ``go`` and ``sent`` once
    it is ``ready``. The sender sets ``sent.value`` to ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in
    every process) as it sends its first frame."""
    mpc = mp.get_context("spawn")
    ready, go, sent = mpc.Event(), mpc.Event(), mpc.Value("d", 0.0)
    proc = mpc.Process(target=target, args=(*args, ready, go, sent), kwargs=kw, daemon=True)
    proc.start()
    if not ready.wait(120):
        raise RuntimeError("sender process did not start")
    return proc, go, sent


def spawn_sender(endpoint, scan_id, scan, frame, per_msg):
    return spawn(sender, endpoint, scan_id, scan, frame, per_msg)


def wait_all(svc, total: int) -> float:
    """Wait until the service has taken ``total`` frames of its current scan; return its first-to-last frame time."""
    deadline = time.monotonic() + 300
    while svc.current is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the scan never started")
        svc.check()
        time.sleep(0.01)
    cur = svc.current
    while cur.counters["received"] + cur.counters["invalid"] < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"service received only {cur.counters['received']} of {total}")
        svc.check()
        time.sleep(0.01)  # the service times itself: poll gently so we don't compete for the GIL
    svc.check()
    assert cur.counters["received"] == total, cur.counter_dict()
    return cur.last_frame_at - cur.first_frame_at


def run_raw(scan, frame, per_msg) -> float:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 64)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc, go, sent = spawn_sender(f"tcp://127.0.0.1:{port}", "raw", scan, frame, per_msg)
    go.set()
    n = 0
    total = scan[0] * scan[1]
    while True:
        if not sock.poll(30000):
            raise RuntimeError("raw receiver timed out")
        parts = sock.recv_multipart(copy=False)
        head = P.decode_header(parts[0].buffer)
        if head.type == "frames":
            n += head.count
            t1 = time.monotonic()
        elif head.type == "end":
            break
    dt = t1 - sent.value
    proc.join(30)
    sock.close()
    assert n == total, (n, total)
    return n / dt


def service_config(tmp: str, bin_: int, train: bool, **kw):
    from rrstem.stream.preprocess import PreprocessConfig
    from rrstem.stream.service import ServiceConfig

    return ServiceConfig(publish="tcp://127.0.0.1:0", control=None, out=os.path.join(tmp, "bench.h5"), train=train,
                         trainer={"consolidate_seconds": 0.0} if train else {},
                         preprocess=PreprocessConfig(bin=bin_), **kw)


def run_service(scan, frame, per_msg, bin_, train: bool, tmp: str, status: dict | None = None,
                pipeline: list | None = None) -> float:
    """One scan into the in-process service, frames/s as the user sees it; ``status`` (if given) gets the
    encoder's status at the last frame, ``pipeline`` the service's own first-to-last frames/s."""
    from rrstem.stream.service import Service

    total = scan[0] * scan[1]
    with Service(service_config(tmp, bin_, train, listen="tcp://127.0.0.1:0", bind=True)) as svc:
        sub = subscribe(svc.publish_endpoint)
        proc, go, sent = spawn_sender(svc.listen_endpoint, "bench", scan, frame, per_msg)
        go.set()
        reported = wait_reported(sub, total)
        dt = wait_all(svc, total)
        if status is not None and svc.encoder is not None:
            status.update(svc.encoder.status())
        proc.join(30)
    if pipeline is not None:
        pipeline.append(total / dt)
    return total / (reported - sent.value)


def stream2_sender(endpoint: str, scan: tuple[int, int], frame: tuple[int, int], ready, go, sent,
                   scan_id: str = "bench-stream2") -> None:
    """Child process: build a whole DECTRIS stream2 series in RAM (``simulators/dectris.py``), then PUSH it."""
    from rrstem.simulators.dectris import Stream2Encoder

    n = scan[0] * scan[1]
    enc = Stream2Encoder(P.Start(scan_id=scan_id, scan_shape=scan, frame_shape=frame, dtype="uint16"))
    frames = make_frames(*frame)
    head = enc.header()
    messages = head + [enc.image(i, frames[i % len(frames)])[0] for i in range(n)] + enc.end()
    ctx, sock = connected_push(endpoint, 64, ready, go)
    for k, msg in enumerate(messages):
        if k == len(head):
            sent.value = time.monotonic()
        sock.send(msg, copy=False)
    sock.close(linger=30000)
    ctx.term()


def run_raw_stream2(scan, frame) -> float:
    """The stream2 messages into a bare PULL socket (zero-copy, nothing parsed), first to last image message."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 64)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc, go, sent = spawn(stream2_sender, f"tcp://127.0.0.1:{port}", scan, frame)
    n = scan[0] * scan[1]
    go.set()
    got, t1 = 0, None
    while got < n + 2:  # start, n images, end
        if not sock.poll(30000):
            raise RuntimeError("raw stream2 receiver timed out")
        sock.recv(copy=False)
        got += 1
        if got == n + 1:
            t1 = time.monotonic()
    proc.join(30)
    sock.close()
    return n / (t1 - sent.value)


def run_stream2_service(scan, frame, bin_, train: bool, tmp: str) -> float:
    """The same stream2 series into the service with ``protocol="stream2"`` (as ``serve --protocol stream2 --bind``)."""
    from rrstem.stream.service import Service

    total = scan[0] * scan[1]
    cfg = service_config(tmp, bin_, train, listen="tcp://127.0.0.1:0", bind=True, protocol="stream2",
                         scan_shape=scan)
    with Service(cfg) as svc:
        sub = subscribe(svc.publish_endpoint)
        proc, go, sent = spawn(stream2_sender, svc.listen_endpoint, scan, frame)
        go.set()
        reported = wait_reported(sub, total)
        wait_all(svc, total)
        proc.join(30)
    return total / (reported - sent.value)


def merlin_sender(scan: tuple[int, int], frame: tuple[int, int], port_q, go, sent) -> None:
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
    sent.value = time.monotonic()
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
    port_q, go, sent = mpc.Queue(), mpc.Event(), mpc.Value("d", 0.0)
    proc = mpc.Process(target=merlin_sender, args=(scan, frame, port_q, go, sent), daemon=True)
    proc.start()
    return proc, port_q.get(timeout=60), go, sent


def run_raw_tcp(scan, frame) -> float:
    import socket

    n = scan[0] * scan[1]
    proc, port, go, sent = spawn_merlin(scan, frame)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    go.set()
    buf = memoryview(bytearray(4 << 20))
    total = 0
    per_frame = 15 + 384 + frame[0] * frame[1] * 2
    expected = n * per_frame  # plus the acquisition header
    while total < expected:
        got = sock.recv_into(buf)
        if not got:
            raise RuntimeError("raw TCP reader: the sender closed early")
        total += got
    dt = time.monotonic() - sent.value
    sock.close()
    proc.join(30)
    return n / dt


def run_merlin_service(scan, frame, bin_, train: bool, tmp: str) -> float:
    from rrstem.stream.service import Service

    total = scan[0] * scan[1]
    proc, port, go, sent = spawn_merlin(scan, frame)
    with Service(service_config(tmp, bin_, train, listen=f"tcp://127.0.0.1:{port}", protocol="merlin")) as svc:
        sub = subscribe(svc.publish_endpoint)
        go.set()
        reported = wait_reported(sub, total)
        wait_all(svc, total)
    proc.join(30)
    return total / (reported - sent.value)


# --- rrstem serve as its own process, as users start it (``--service process``, the default) ----------------


class ServeRuns:
    """Scans into one ``rrstem serve`` process (``serve_process.ServeProcess``), one after another as at the
    microscope: each timed from the sender's first frames message to the first snapshot of that scan that
    reports every frame, then waited on until its results are written (``done``) before the next."""

    def __init__(self, tmp: str, bin_: int, train: bool = False, extra: tuple[str, ...] = (), name: str = "serve"):
        self.srv = ServeProcess(tmp, "--bin", str(bin_), *extra, name=name, train=train)
        self.runs = 0

    def scan(self, scan, frame, per_msg) -> float:
        """One rrstem/1 scan (the bench's sender); frames/s as the user sees it."""
        self.runs += 1
        scan_id = f"bench-{self.runs}"
        sub = subscribe(self.srv.publish)
        proc, go, sent = spawn_sender(self.srv.frames, scan_id, scan, frame, per_msg)
        return self._timed(sub, proc, go, sent, scan, scan_id)

    def stream2(self, scan, frame) -> float:
        """One DECTRIS stream2 series (serve started with ``--protocol stream2 --scan-shape``)."""
        self.runs += 1
        scan_id = f"bench-stream2-{self.runs}"
        sub = subscribe(self.srv.publish)
        proc, go, sent = spawn(stream2_sender, self.srv.frames, scan, frame, scan_id=scan_id)
        return self._timed(sub, proc, go, sent, scan, scan_id)

    def _timed(self, sub, proc, go, sent, scan, scan_id: str) -> float:
        total = scan[0] * scan[1]
        go.set()
        reported = wait_reported(sub, total, scan_id)
        proc.join(30)
        self.srv.wait_done(scan_id)
        return total / (reported - sent.value)

    def close(self) -> None:
        self.srv.close()


def run_merlin_serve(scan, frame, bin_, train: bool, tmp: str) -> float:
    """A Merlin acquisition into a fresh ``rrstem serve --protocol merlin --listen tcp://127.0.0.1:PORT`` (it
    connects to the sender's port, as to a Merlin PC's): a first scan of that process."""
    total = scan[0] * scan[1]
    proc, port, go, sent = spawn_merlin(scan, frame)
    srv = ServeProcess(tmp, "--bin", str(bin_), "--protocol", "merlin", name="serve-merlin", train=train,
                       listen=f"tcp://127.0.0.1:{port}")
    try:
        sub = subscribe(srv.publish)
        go.set()
        reported = wait_reported(sub, total)
        proc.join(30)
        return total / (reported - sent.value)
    finally:
        srv.close()


def process_case(scan, case, args, tmp) -> dict:
    """One case at one scan size through one ``rrstem serve`` process: its first scan (the store's memory is
    mapped then), then ``repeats`` scans alternating with the raw runs; the serve process's peak RSS."""
    frame, per_msg, bin_ = case["frame"], case["per_msg"], case["bin"]
    runs = ServeRuns(tmp, bin_, args.train)
    try:
        first = runs.scan(scan, frame, per_msg)
        runs.srv.reset_peak_rss()
        out = compare(args.repeats, lambda: run_raw(scan, frame, per_msg), lambda: runs.scan(scan, frame, per_msg),
                      scan, frame, per_msg, bin_)
        rss = runs.srv.peak_rss_gb()
    finally:
        runs.close()
    return {**out, "first_scan_fps": round(first), "serve_peak_rss_GB": round(rss, 2),
            "store_GB": round(store_gb(scan, frame, bin_), 2)}


def process_stream2_case(scan, args, tmp) -> dict:
    frame = (96, 96)
    runs = ServeRuns(tmp, 1, args.train, ("--protocol", "stream2", "--scan-shape", f"{scan[0]}x{scan[1]}"))
    try:
        first = runs.stream2(scan, frame)
        out = compare(args.repeats, lambda: run_raw_stream2(scan, frame), lambda: runs.stream2(scan, frame),
                      scan, frame, 1, 1)
    finally:
        runs.close()
    return {**out, "first_scan_fps": round(first)}


def process_training_case(scan, args, tmp) -> dict:
    """The 256x256 uint16 bin-4 case through two serve processes, one with the rrVAE trainer and one without,
    alternating scans."""
    frame, per_msg, bin_ = (256, 256), 32, 4
    with_training, without = ServeRuns(tmp, bin_, True, name="serve-train"), ServeRuns(tmp, bin_, False)
    try:
        with_training.scan(scan, frame, per_msg)  # warm-up (torch, the trainer's first steps)
        without.scan(scan, frame, per_msg)
        on, off = [], []
        for _ in range(args.repeats):
            off.append(without.scan(scan, frame, per_msg))
            on.append(with_training.scan(scan, frame, per_msg))
    finally:
        with_training.close()
        without.close()
    a, b = statistics.median(on), statistics.median(off)
    return {"scan": list(scan), "frame": list(frame), "frames_per_message": per_msg, "bin": bin_,
            "rate_with_training": round(a), "rate_without": round(b), "ratio": round(a / b, 3),
            "worst_ratio": round(min(on) / max(off), 3),
            "rate_with_training_all": [round(v) for v in on], "rate_without_all": [round(v) for v in off]}


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
    from rrstem.stream.store import FrameStore, narrow_dtype

    binned = (frame[0] // bin_, frame[1] // bin_)
    return FrameStore.nbytes(scan[0] * scan[1], binned, narrow_dtype("uint16", bin_)) / 1e9


def compare(repeats: int, raw_run, our_run, scan, frame, per_msg: int, bin_: int, raw_key: str = "raw_zmq_fps") -> dict:
    """``repeats`` alternating runs of ``raw_run()`` and ``our_run()`` (frames/s): medians, ratio, every run."""
    raw, ours = [], []
    for _ in range(repeats):
        raw.append(raw_run())
        ours.append(our_run())
    r, o = statistics.median(raw), statistics.median(ours)
    return {
        "scan": list(scan), "frames_per_message": per_msg, "bin": bin_,
        "rrstem_fps": round(o), raw_key: round(r), "ratio": round(o / r, 3),
        "worst_ratio": round(min(ours) / max(raw), 3),
        "rrstem_fps_all": [round(v) for v in ours], f"{raw_key}_all": [round(v) for v in raw],
        "rrstem_MBps": round(o * frame[0] * frame[1] * 2 / 1e6),
    }


def run_case(scan, case, args, tmp) -> dict:
    """Warm-up, then ``repeats`` alternating raw and service runs of one case at one scan size."""
    frame, per_msg, bin_ = case["frame"], case["per_msg"], case["bin"]
    run_service(scan, frame, per_msg, bin_, args.train, tmp)  # warm-up
    reset_peak_rss()
    pipeline: list[float] = []
    out = compare(args.repeats, lambda: run_raw(scan, frame, per_msg),
                  lambda: run_service(scan, frame, per_msg, bin_, args.train, tmp, pipeline=pipeline),
                  scan, frame, per_msg, bin_)
    return {**out, "rrstem_pipeline_fps": round(statistics.median(pipeline)), "peak_rss_GB": round(peak_rss_gb(), 2), "store_GB": round(store_gb(scan, frame, bin_), 2)}


CASES = ("256x256_uint16_bin4", "96x96_uint16_bin1", "merlin", "stream2", "training")


def run_stream2_case(scan, args, tmp) -> dict:
    frame = (96, 96)
    run_stream2_service(scan, frame, 1, args.train, tmp)  # warm-up
    return compare(args.repeats, lambda: run_raw_stream2(scan, frame),
                   lambda: run_stream2_service(scan, frame, 1, args.train, tmp), scan, frame, 1, 1)


def run_merlin_case(scan, args, tmp) -> dict:
    frame = (256, 256)
    run = run_merlin_serve if args.service == "process" else run_merlin_service
    run(scan, frame, 4, args.train, tmp)  # warm-up
    return compare(args.repeats, lambda: run_raw_tcp(scan, frame), lambda: run(scan, frame, 4, args.train, tmp),
                   scan, frame, 1, 4, "raw_tcp_fps")


def run_training_case(scan, args, tmp) -> dict:
    """The 256x256 uint16 bin-4 case with the rrVAE trainer on and off, alternating; the ratio of the rates."""
    frame, per_msg, bin_ = (256, 256), 32, 4
    run_service(scan, frame, per_msg, bin_, True, tmp)  # warm-up (torch, the trainer's first steps)
    on, off, steps = [], [], []
    for _ in range(args.repeats):
        off.append(run_service(scan, frame, per_msg, bin_, False, tmp))
        status: dict = {}
        on.append(run_service(scan, frame, per_msg, bin_, True, tmp, status))
        steps.append({k: status.get(k) for k in ("state", "step", "images_seen")})
    a, b = statistics.median(on), statistics.median(off)
    return {
        "scan": list(scan), "frame": list(frame), "frames_per_message": per_msg, "bin": bin_,
        "rate_with_training": round(a), "rate_without": round(b), "ratio": round(a / b, 3),
        "worst_ratio": round(min(on) / max(off), 3),
        "rate_with_training_all": [round(v) for v in on], "rate_without_all": [round(v) for v in off],
        "trainer_at_last_frame": steps,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scan", type=int, default=128, help="scan edge (positions = edge^2)")
    ap.add_argument("--scans", default=None, help="comma-separated scan edges, e.g. 128,256,512 (overrides --scan)")
    ap.add_argument("--train", action="store_true", help="run the rrVAE trainer during the service runs")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated cases to run, of {', '.join(CASES)} (default: all); merlin, stream2 "
                         "and training run at the first scan edge")
    ap.add_argument("--only-merlin", action="store_true", help="run only the Merlin case (--cases merlin)")
    ap.add_argument("--no-merlin", action="store_true", help="skip the Merlin case")
    ap.add_argument("--service", choices=("process", "in-process"), default="process",
                    help="process (default): `rrstem serve` as its own process, as users start it; in-process: a "
                         "Service inside this benchmark's process")
    args = ap.parse_args(argv)
    chosen = ["merlin"] if args.only_merlin else [c for c in args.cases.split(",") if c]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.no_merlin:
        chosen = [c for c in chosen if c != "merlin"]
    cases = [c for c in (
        {"name": "256x256_uint16_bin4", "frame": (256, 256), "bin": 4, "per_msg": 32},
        {"name": "96x96_uint16_bin1", "frame": (96, 96), "bin": 1, "per_msg": 256},
    ) if c["name"] in chosen]
    edges = [int(v) for v in args.scans.split(",")] if args.scans else [args.scan]
    out = {"benchmark": "ingest", "service": args.service, "train": args.train, "scans": edges, "repeats": args.repeats,
           "cpus": os.cpu_count(), "python": platform.python_version(), "zmq": zmq.zmq_version(), "cases": {}}
    process = args.service == "process"
    with tempfile.TemporaryDirectory() as tmp:
        for edge in edges:
            scan = (edge, edge)
            for case in cases:
                name = case["name"] if len(edges) == 1 else f"{case['name']}_scan{edge}"
                out["cases"][name] = (process_case if process else run_case)(scan, case, args, tmp)
        scan = (edges[0], edges[0])
        if "merlin" in chosen:
            out["cases"]["merlin_256x256_U16_bin4"] = run_merlin_case(scan, args, tmp)
        if "stream2" in chosen:
            out["cases"]["stream2_96x96_uint16_bin1"] = (process_stream2_case if process
                                                         else run_stream2_case)(scan, args, tmp)
        if "training" in chosen:
            out["cases"]["training_256x256_uint16_bin4"] = (process_training_case if process
                                                            else run_training_case)(scan, args, tmp)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
