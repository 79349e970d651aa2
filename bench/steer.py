"""The steering loop's latencies: the defect's frames -> the anomaly event -> the subscan's first frame.

The service runs in this process (so the bench can see when frames land in
the scan: it polls the scan's filled mask every millisecond); the simulator
as the bridge (``rrstem simulate --steer``) and ``examples/steer_on_defects.py``
run as their own processes, over TCP loopback, as in the done-when test.
Per seed it reports:

- ``defect_to_event_s``: from the arrival of the frame at the vacancy to the
  example's receipt of the ``anomaly`` event (the defect map, stream/defects.py, scores
  only complete rows, and a cluster waits for the rows just below it, so this
  includes the frames of those rows); ``disc_to_event_s`` is the same from the
  arrival of every position within 1 A of the vacancy (negative: the event
  came before the last of them);
- ``event_to_subscan_frame_s``: from the event to the subscan's first frame
  in the service, of which ``waiting_for_scan_end_s`` is the rest of the
  parent scan (a bridge acquires a subscan after the running scan) and
  ``bridge_s`` the bridge's own time (answer, first frames computed).

The worst over seeds is printed beside each seed's figures, as JSON.
Run under the shared lock: ``flock /tmp/rrstem-bench.lock python bench/steer.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from rrstem.client import Client
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.service import Service, ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
ANY = "tcp://127.0.0.1:0"


def one_run(seed: int, rate: float, train: bool, tmp: Path) -> dict:
    cfg = ServiceConfig(listen=ANY, bind=True, publish=None, control=ANY, events=ANY, steering=ANY,
                        out=tmp / f"steer-{seed}.h5", train=train, trainer={"consolidate_seconds": 5.0},
                        preprocess=PreprocessConfig())
    svc = Service(cfg).start()
    times: dict[str, float] = {}
    stop = threading.Event()
    near = None

    def watch():  # when the vacancy's neighbourhood has arrived, and when the subscan's first frame has
        nonlocal near
        while not stop.is_set():
            cur = svc.current
            if cur is not None and cur.ready:
                if "vacancy_in" not in times and not cur.scan_id.endswith("-sub1"):
                    if cur.filled[(cur.scan_shape[0] // 2) * cur.scan_shape[1] + cur.scan_shape[1] // 2]:
                        times["vacancy_in"] = time.time()
                if "defect_in" not in times and not cur.scan_id.endswith("-sub1"):
                    ny, nx = cur.scan_shape
                    if near is None:
                        yy, xx = np.mgrid[0:ny, 0:nx]
                        near = np.flatnonzero(np.hypot(yy - ny // 2, xx - nx // 2) * 0.2 <= 1.0)  # 0.2 A step
                    if cur.filled[near].all():
                        times["defect_in"] = time.time()
                if cur.scan_id.endswith("-sub1") and "sub_first_frame" not in times and cur.n_filled() > 0:
                    times["sub_first_frame"] = time.time()
                if "parent_last_frame" not in times and not cur.scan_id.endswith("-sub1") and cur.filled.all():
                    times["parent_last_frame"] = time.time()
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = []
    try:
        example = subprocess.Popen([sys.executable, str(ROOT / "examples" / "steer_on_defects.py"), "--events",
                                    svc.events.endpoint, "--control", svc.control_endpoint, "--max-subscans", "1",
                                    "--exit-after", "120"], stdout=subprocess.PIPE, text=True)
        procs.append(example)
        example.stdout.readline()  # subscribed
        with Client(events=svc.events.endpoint, timeout=120) as client:
            time.sleep(0.3)
            sim = subprocess.Popen([sys.executable, "-m", "rrstem.cli", "simulate", "--scan", "64", "--detector", "64",
                                    "--dose", "1e6", "--defect", "vacancy", "--seed", str(seed), "--rate", str(rate),
                                    "--to", svc.listen_endpoint, "--connect", "--steer", svc.steering.endpoint,
                                    "--steer-idle", "3", "--no-progress"], stderr=subprocess.DEVNULL)
            procs.append(sim)
            anomaly = None
            for event in client.events():
                if event.type == "anomaly" and anomaly is None:
                    times["event"], anomaly = time.time(), event
                if event.type == "scan_started" and event.subscan is not None:
                    break
        deadline = time.monotonic() + 60
        while "sub_first_frame" not in times and time.monotonic() < deadline:
            time.sleep(0.01)
        sim.wait(120)
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        svc.close()
    d = math.dist(anomaly.position, (32, 32)) * 0.2
    wait_end = max(0.0, times["parent_last_frame"] - times["event"])
    return {"seed": seed, "anomaly_position": list(anomaly.position), "distance_a": round(d, 3),
            "defect_to_event_s": round(times["event"] - times["vacancy_in"], 3),
            "disc_to_event_s": round(times["event"] - times["defect_in"], 3),
            "event_to_subscan_frame_s": round(times["sub_first_frame"] - times["event"], 3),
            "waiting_for_scan_end_s": round(wait_end, 3),
            "bridge_s": round(times["sub_first_frame"] - max(times["event"], times["parent_last_frame"]), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rate", type=float, default=2000.0, help="frames/s the simulator sends (default 2000)")
    p.add_argument("--train", action="store_true", help="with the rrVAE training beside (its CPU load)")
    p.add_argument("--tmp", type=Path, default=Path("/tmp"))
    args = p.parse_args()
    runs = [one_run(s, args.rate, args.train, args.tmp) for s in args.seeds]
    keys = ("defect_to_event_s", "event_to_subscan_frame_s", "bridge_s", "distance_a")
    print(json.dumps({"rate": args.rate, "train": args.train, "scan": "graphene 64x64 vacancy, 64 px, 1e6 e",
                      "worst": {k: max(r[k] for r in runs) for k in keys}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
