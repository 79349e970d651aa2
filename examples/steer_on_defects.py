"""Steer by itself: watch a service's anomaly events and ask for a subscan around each.

Each subscan covers the anomaly's cluster plus ``--margin`` positions on every
side, twice as fine (step factor 0.5) at 4x the dose, on the scan the anomaly
was found in. Anomalies found in subscans are printed but not rescanned again.
Run beside ``rrstem serve`` and a bridge (``rrstem simulate --steer``), or let
``rrstem demo --defect vacancy --steer`` run all three::

    python examples/steer_on_defects.py --events tcp://127.0.0.1:5558 --control tcp://127.0.0.1:5557

It prints one line per anomaly and per request, and exits after
``--max-subscans`` requests, or ``--exit-after`` seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from rrstem.client import Client, ClientError


def region_around(bbox, margin: int, scan_shape) -> tuple[int, int, int, int]:
    """The anomaly's box (y0, y1, x0, x1) grown by ``margin`` positions, clipped to the scan."""
    y0, y1, x0, x1 = bbox
    ny, nx = scan_shape
    return max(y0 - margin, 0), min(y1 + margin, ny), max(x0 - margin, 0), min(x1 + margin, nx)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", default="tcp://127.0.0.1:5558", help="the service's events endpoint")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="the service's control endpoint")
    p.add_argument("--margin", type=int, default=3, help="positions around the anomaly's cluster (default 3)")
    p.add_argument("--step-factor", type=float, default=0.5, help="subscan step / scan step (default 0.5)")
    p.add_argument("--dose-factor", type=float, default=4.0, help="subscan dose / scan dose (default 4)")
    p.add_argument("--max-subscans", type=int, default=3, help="exit after this many requests (default 3)")
    p.add_argument("--exit-after", type=float, default=math.inf, help="exit after this many seconds")
    args = p.parse_args(argv)

    asked = 0
    with Client(events=args.events, control=args.control, timeout=10.0) as client:
        time.sleep(0.3)  # the subscription reaches the service (a PUB socket drops what no one subscribed to)
        print(f"watching {args.events} for anomalies", flush=True)
        for event in client.events(timeout=math.inf, until=time.monotonic() + args.exit_after):
            if event.type == "anomaly":
                print(f"anomaly in {event.scan_id} at {event.position} ({event.score_name} {event.score:.1f}, "
                      f"threshold {event.threshold:g})", flush=True)
                if event.parent_scan_id is not None:  # found in a subscan: it is the close look already
                    continue
                region = region_around(event.bbox, args.margin, event.scan_shape)
                try:
                    req = client.rescan(region, step_factor=args.step_factor, dose_factor=args.dose_factor,
                                        scan_id=event.scan_id)
                except ClientError as exc:
                    print(f"rescan refused: {exc}", file=sys.stderr, flush=True)
                    continue
                asked += 1
                print(f"requested {req['scan_id']}: region {region} at step x{args.step_factor:g}, "
                      f"dose x{args.dose_factor:g}", flush=True)
                if asked >= args.max_subscans:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
