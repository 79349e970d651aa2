"""Dashboard redraw rate with 256x256 maps and 4 rrVAE latents.

What is measured: one redraw = take the newest snapshot off a real SUB socket
(published over tcp on 127.0.0.1 by a PUB socket in this process), decode
it, set every map, pattern, curve and status widget (``Dashboard.show_snapshot``),
and paint the whole window synchronously (``QWidget.repaint``, offscreen).
The snapshots are synthetic honeycomb scans that fill in row by row, so the
NaN mask and the levels change as in a live scan; they come from the
dashboard tests' fixture ``tests/gui/demo_data.py`` (built from the snapshot
schema; seed 0), imported from there. Warm-up redraws are not timed. Prints JSON; the target is >= 10
redraws/s.

    python bench/dashboard.py [--size 256] [--latents 4] [--redraws 60] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import zmq  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gui"))  # the tests' snapshots

from demo_data import synthetic_snapshot  # noqa: E402
from rrstem.gui.app import ensure_app  # noqa: E402
from rrstem.gui.window import Dashboard  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="scan is size x size")
    ap.add_argument("--latents", type=int, default=4)
    ap.add_argument("--redraws", type=int, default=60, help="timed redraws")
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args(argv)

    app = ensure_app(offscreen=True)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:0")
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    # a handful of distinct fill states, reused with increasing seq numbers
    fills = np.linspace(args.size // 8, args.size, 8).astype(int)
    snaps = [synthetic_snapshot(ny=args.size, nx=args.size, latent_dim=args.latents, filled_rows=int(r),
                                seed=0, detector=64, history=200) for r in fills]
    dash = Dashboard(connect=endpoint)
    dash.timer.stop()  # the benchmark drives the redraws itself
    dash.show()
    app.processEvents()

    seq = 0

    def redraw() -> tuple[float, float]:
        nonlocal seq
        seq += 1
        snap = snaps[seq % len(snaps)]
        snap.header.seq = seq
        t0 = time.perf_counter()
        for _ in range(1000):  # the first messages can be lost while the SUB joins
            pub.send_multipart(snap.encode(), copy=False)
            got = dash.source.poll(timeout=0.1)
            if got is not None:
                break
        else:
            raise RuntimeError(f"no snapshot arrived on {endpoint}")
        dash.show_snapshot(got)
        t1 = time.perf_counter()
        dash.repaint()
        app.processEvents()
        return t1 - t0, time.perf_counter() - t1

    for _ in range(args.warmup):
        redraw()
    times = []
    start = time.perf_counter()
    for _ in range(args.redraws):
        times.append(redraw())
    elapsed = time.perf_counter() - start
    update, paint = np.array(times).T
    result = {
        "benchmark": "dashboard_redraw",
        "maps": [args.size, args.size],
        "latents": args.latents,
        "map_panels": len(dash.maps),
        "redraws": args.redraws,
        "redraws_per_s": round(args.redraws / elapsed, 2),
        "receive_and_update_ms_median": round(float(np.median(update)) * 1e3, 2),
        "paint_ms_median": round(float(np.median(paint)) * 1e3, 2),
        "target_redraws_per_s": 10,
        "qt_platform": os.environ.get("QT_QPA_PLATFORM", ""),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    dash.shutdown()
    dash.close()
    pub.close()
    ctx.term()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
