"""``rrstem analyze`` and ``rrstem demo``: the commands that compose packages.

Each streams a source from ``simulators/`` into a ``stream/`` service in one
process and runs the real pipeline. ``analyze`` feeds a file over an
``inproc://`` socket (zero-copy, lossless PUSH/PULL), so its results are
exactly what the live service would have written. ``demo`` streams the
synthetic graphene scan over TCP loopback at a detector's pace (the paper's
7.5 ms dwell by default: a 64x64 scan takes 31 s), so the maps and the rrVAE
are watched converging while the scan fills in, and opens the ``gui/``
dashboard beside it. ``rrstem.cli`` registers both.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import zmq

from rrstem.stream.cli import (add_acquisition_args, add_processing_args, add_save_frames_arg, dpc_options,
                               parse_scan_shape, preprocess_config, run_service, trainer_overrides)

log = logging.getLogger("rrstem")


def _stream_in_thread(source, endpoint: str, *, rate: float | None, context, bind: bool,
                      progress: bool, on_error=None) -> tuple[threading.Thread, dict]:
    """Stream ``source`` from a thread; its stats or exception land in the returned dict (and go to ``on_error``)."""
    from rrstem.simulators.source import stream

    box: dict = {}

    def run():
        try:
            box["stats"] = stream(source, endpoint, bind=bind, rate=rate, progress=progress, context=context,
                                  timeout=60.0, order=source.valid_order)
        except BaseException as exc:  # reported by the caller
            box["error"] = exc
            log.error("sending the scan failed: %s", exc)
            if on_error is not None:
                on_error()

    t = threading.Thread(target=run, name="rrstem-source", daemon=True)
    t.start()
    return t, box


def cmd_analyze(args: argparse.Namespace) -> int:
    from rrstem.simulators.files import open_file
    from rrstem.stream.scan import Scan
    from rrstem.stream.service import Service, ServiceConfig

    src = open_file(args.input, args.key, scan_shape=args.scan_shape, sync_offset=args.sync_offset,
                    flyback=args.flyback)  # refused here (exit 2): nothing is analyzed
    if src.problem:
        print(f"rrstem analyze: warning: {src.problem}; analyzing the {src.available_frames} good frames "
              f"of {src.n_frames}", file=sys.stderr, flush=True)
    endpoint = f"inproc://rrstem-analyze-{uuid.uuid4().hex}"
    out = args.out or Path(args.input).with_suffix(".rrstem.h5")
    cfg = ServiceConfig(listen=endpoint, bind=True, publish=args.publish, control=None, out=out,
                        scan_shape=args.scan_shape, sync_offset=args.sync_offset, flyback=args.flyback,
                        preprocess=preprocess_config(args), dpc=dpc_options(args), train=not args.no_train,
                        model=args.model, trainer=trainer_overrides(args), device=args.device, once=True,
                        save_frames=args.save_frames)
    try:  # a mask of another shape would refuse the scan; say so now rather than wait for it
        Scan.check_mask(src.start, cfg.preprocess)
    except ValueError as exc:
        src.close()
        print(f"rrstem analyze: error: {exc}", file=sys.stderr)
        return 2
    if args.cluster is not None or args.workers is not None:  # partitions on Dask workers: rrstem/scaleout.py
        return _analyze_partitioned(args, src, cfg)
    ctx = zmq.Context.instance()  # inproc:// joins only sockets of one context: the service's and the sender's
    with src:
        service = Service(cfg, context=ctx).start()
        # a source that fails mid-way never sends its end: stop rather than wait for it forever
        sender, box = _stream_in_thread(src, endpoint, rate=None, context=ctx, bind=False,
                                        progress=not args.no_progress, on_error=service.stop)
        code = run_service(service, progress=False)  # the sender draws the bar: frames read from the file
        sender.join(5)
    if "error" in box:
        print(f"rrstem analyze: error while reading {args.input}: {box['error']}", file=sys.stderr)
        return 1
    return code or analyze_exit_code(service.current)


def _analyze_partitioned(args: argparse.Namespace, src, cfg) -> int:
    from rrstem.scaleout import analyze_partitioned

    with src:
        try:
            scan = analyze_partitioned(args, src, cfg)
        except ValueError as exc:  # refused before any work
            print(f"rrstem analyze: error: {exc}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError) as exc:
            print(f"rrstem analyze: error while analysing {args.input} on Dask: {exc}", file=sys.stderr)
            return 1
    print(f"results of scan {scan.results_name}: {scan.results_path}")
    return analyze_exit_code(scan)


def analyze_exit_code(scan) -> int:
    """README "Exit codes": 0 when every position was analysed, 1 when the results are incomplete (they say why,
    in ``incomplete_detail``). Refusals before the start (2) never get here."""
    if scan is not None and scan.complete:
        return 0
    from rrstem.stream.incomplete import incomplete_detail

    why = incomplete_detail(scan) if scan is not None else "no scan started"
    print(f"rrstem analyze: the scan is incomplete: {why}", file=sys.stderr)
    return 1


def add_analyze_args(sub) -> None:
    p = sub.add_parser("analyze", help="run a recorded scan through the live pipeline and write its results")
    p.add_argument("input", type=Path, help="scan file: .npy, .npz, HDF5 (generic, DECTRIS master, EMD/py4DSTEM, "
                                            "stempy), .hspy/.zspy, EMPAD .raw/.xml, .dm3/.dm4, .ndata1, Merlin .mib/.hdr")
    p.add_argument("--key", default=None, help="array or dataset name when the file holds several 4D ones")
    p.add_argument("--scan-shape", type=parse_scan_shape, default=None, metavar="NYxNX",
                   help="scan shape: of a flat series of frames (a DECTRIS master file, a .mib without "
                        "ScanX/ScanY), or the positions the frames fill with --sync-offset/--flyback")
    p.add_argument("--out", type=Path, default=None, metavar="RESULTS.h5",
                   help="results file (default: INPUT with suffix .rrstem.h5)")
    p.add_argument("--model", type=Path, default=None, metavar="CKPT",
                   help="encode with this trained rrVAE (a .pt checkpoint, or the results .h5 of an earlier "
                        "scan) instead of training a new one")
    p.add_argument("--publish", default=None, metavar="EP", help="also publish snapshots here (for a dashboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--cluster", default=None, metavar="ADDRESS",
                       help="reduce the scan in partitions on this Dask scheduler's workers (tcp://HOST:PORT); "
                            "they read the file themselves, at the same path; the rrVAE trains here on frames "
                            "sampled across the partitions and encodes every frame on the workers")
    scale.add_argument("--workers", type=int, default=None, metavar="N",
                       help="the same on N local Dask worker processes")
    p.add_argument("--partition-frames", type=int, default=None, metavar="N",
                   help="frames per partition with --cluster/--workers (default: about 128 MiB of frames)")
    add_save_frames_arg(p)
    add_acquisition_args(p)
    add_processing_args(p)
    p.set_defaults(func=cmd_analyze)


def cmd_demo(args: argparse.Namespace) -> int:
    from rrstem.simulators.graphene import GrapheneSource
    from rrstem.stream.service import Service, ServiceConfig

    rate = demo_rate(args)
    if not args.headless and not has_display():
        print("rrstem demo: no display found (DISPLAY/WAYLAND_DISPLAY unset): running --headless; "
              "the dashboard is saved as a PNG at the end", file=sys.stderr)
        args.headless = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphene = GrapheneSource(args.scan, args.detector, dose=args.dose or None, defect=args.defect,
                              seed=args.seed, scan_id=f"demo-{uuid.uuid4().hex[:6]}")
    src = pregenerate(graphene)
    if args.bin is None:
        args.bin = max(1, args.detector // 64)  # the paper's 64x64 binned patterns
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish=args.publish, control=args.control,
                        out=out_dir / "results.h5", preprocess=preprocess_config(args), dpc=dpc_options(args),
                        train=not args.no_train, trainer=trainer_overrides(args), device=args.device,
                        once=args.headless and not args.steer,
                        **({"events": "tcp://127.0.0.1:0", "steering": "tcp://127.0.0.1:0"} if args.steer else {}))
    service = Service(cfg).start()
    print(f"rrstem demo: graphene {args.scan[0]}x{args.scan[1]} scan, {args.detector}px detector, "
          f"dose {args.dose or 'noise-free'}, {rate:.4g} frames/s ({1e3 / rate:.3g} ms dwell: "
          f"{src.n_frames / rate:.1f} s); snapshots on {service.publish_endpoint}, "
          f"control on {service.control_endpoint}; results in {out_dir}", flush=True)
    dashboard = None
    if not args.headless:
        dashboard = subprocess.Popen([sys.executable, "-m", "rrstem.gui", "--connect", service.publish_endpoint,
                                      "--control", service.control_endpoint])
    steer = start_steering(service, graphene, args) if args.steer else None  # bridge + example, before the scan
    sender, box = _stream_in_thread(src, service.listen_endpoint, rate=rate, context=None, bind=False,
                                    progress=False)
    if steer is not None:
        steer.sender = sender  # subscans go out once the scan is sent, as a microscope's would
        if args.headless:
            threading.Thread(target=steer.stop_when_done, args=(service, graphene.start.scan_id), daemon=True).start()
    dashboard_failed = False
    if args.headless:
        code = run_service(service)
    else:
        code, dashboard_failed = _run_with_dashboard(service, dashboard)
    sender.join(5)
    if steer is not None:
        steer.close()
    if "error" in box:
        return 1
    if "stats" in box:
        st = box["stats"]
        print(f"rrstem demo: sent {st.frames} frames in {st.seconds:.2f} s ({st.frames_per_s:.0f} frames/s)")
    if (args.headless or dashboard_failed) and code == 0:
        png = render_headless(service, out_dir / "dashboard.png")
        print(f"dashboard screenshot: {png}")
    return code


def demo_rate(args: argparse.Namespace) -> float:
    """Frames/s the demo streams at: ``--rate``, else one frame per ``--dwell`` ms (7.5 ms: 133 frames/s)."""
    if args.rate is not None:
        return float(args.rate)
    if not args.dwell > 0:
        raise ValueError(f"--dwell must be a positive number of milliseconds, not {args.dwell}")
    return 1e3 / args.dwell


def has_display() -> bool:
    """Whether a window can be shown: a display on Linux, always elsewhere (or if Qt is told a platform)."""
    if sys.platform in ("win32", "darwin") or os.environ.get("QT_QPA_PLATFORM", "") not in ("", "offscreen"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def pregenerate(source):
    """The whole synthetic scan in memory, so it streams at the requested rate (generating frames on the fly
    could not keep up with a fast one)."""
    import numpy as np
    from tqdm import tqdm

    from rrstem.simulators.source import ArraySource

    n, (h, w) = source.n_frames, source.start.frame_shape
    frames = np.empty((n, h, w), dtype=source.start.dtype)
    step = 256
    with tqdm(total=n, desc="simulating graphene", unit="frame", dynamic_ncols=True) as bar:
        for first in range(0, n, step):
            count = min(step, n - first)
            frames[first:first + count] = source.chunk(first, count)
            bar.update(count)
    source.close()
    return ArraySource(frames.reshape(*source.start.scan_shape, h, w), source.start)


def _run_with_dashboard(service, dashboard: subprocess.Popen) -> tuple[int, bool]:
    """Serve until the dashboard window is closed (or Ctrl-C). Returns (exit code, dashboard failed).

    A dashboard that cannot start (exit code != 0) does not end the demo: the
    scan runs to its end, and the results and a dashboard PNG are written as
    with ``--headless``.
    """
    failed = threading.Event()

    def watch():
        if dashboard.wait() != 0:
            failed.set()
            log.error("the dashboard exited with code %s (its message is above); carrying on without it: the "
                      "results and a dashboard PNG are written at scan end. On Linux, Qt's window needs the X11 "
                      "libraries libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0 "
                      "(apt-get install ...), or run 'rrstem demo --headless'", dashboard.returncode)
            service.stop_after_scan()
        else:
            service.stop()  # the window was closed

    threading.Thread(target=watch, daemon=True).start()
    code = run_service(service)
    if dashboard.poll() is None:
        dashboard.terminate()
    return code, failed.is_set()


def render_headless(service, path: Path) -> Path:
    """Render the dashboard offscreen from the final snapshot, clicked on the scan centre."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from rrstem.gui import render_png

    snap = service.snapshot()
    ny, nx = snap.header.scan_shape
    index = (ny // 2, nx // 2)
    return render_png(snap, path, frame_reply=service.frame_reply(index), index=index)


def add_demo_args(sub) -> None:
    p = sub.add_parser("demo", help="simulated graphene scan + service + dashboard, in one command")
    p.add_argument("--headless", action="store_true",
                   help="no window: run one scan, write results and a dashboard screenshot, exit")
    p.add_argument("--out", default="rrstem-demo", metavar="DIR", help="folder for results.h5 and dashboard.png")
    p.add_argument("--scan", type=parse_scan_shape, default=(64, 64), metavar="NYxNX", help="scan shape: 64x48, or 64 for 64x64 (default 64x64)")
    p.add_argument("--detector", type=int, default=128, help="detector pixels, 64..256 (default 128)")
    p.add_argument("--dose", type=float, default=1e6, help="electrons per pattern; 0 = noise-free (default 1e6)")
    p.add_argument("--defect", choices=("none", "vacancy", "si"), default="si", help="lattice defect (default si)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steer", action="store_true",
                   help="close the loop: examples/steer_on_defects.py asks for a subscan around each anomaly, "
                        "twice as fine at 4x the dose, and the simulator, as the microscope bridge, streams it "
                        "(docs/steering.md)")
    p.add_argument("--dwell", type=float, default=7.5, metavar="MS",
                   help="dwell time per scan position in ms, the detector's pace (default 7.5, the paper's: "
                        "133 frames/s, 31 s for 64x64)")
    p.add_argument("--rate", type=float, default=None, metavar="FPS", help="frames/s sent, instead of --dwell")
    p.add_argument("--publish", default="tcp://127.0.0.1:0", metavar="EP", help="snapshot endpoint (port 0: any)")
    p.add_argument("--control", default="tcp://127.0.0.1:0", metavar="EP", help="control endpoint (port 0: any)")
    add_processing_args(p)
    p.set_defaults(func=cmd_demo, bin=None)


class DemoSteering:
    """``demo --steer``: the simulator as the microscope bridge, and the example that steers on anomalies."""

    EXAMPLE = Path(__file__).resolve().parent / "examples" / "steer_on_defects.py"

    def __init__(self, service, graphene, args):
        from rrstem.simulators.bridge import Bridge, graphene_subscans

        if not self.EXAMPLE.exists():
            raise ValueError(f"--steer runs {self.EXAMPLE}, which is not there (an install without the examples)")
        self.bridge = Bridge(service.steering.endpoint, graphene_subscans(graphene))
        self.example = subprocess.Popen([sys.executable, str(self.EXAMPLE), "--events", service.events.endpoint,
                                         "--control", service.control_endpoint, "--max-subscans", "1",
                                         "--exit-after", "300"], stdout=subprocess.PIPE, text=True)
        print(self.example.stdout.readline(), end="", flush=True)  # "watching ...": subscribed
        threading.Thread(target=lambda: [print(f"steer_on_defects: {line}", end="", flush=True)
                                         for line in self.example.stdout], daemon=True).start()
        self.rate, self.endpoint, self.streamed = demo_rate(args), service.listen_endpoint, []
        self.sender: threading.Thread | None = None  # the scan's sender; subscans wait for it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._obey, name="rrstem-demo-bridge", daemon=True)
        self._thread.start()

    def _obey(self) -> None:
        from rrstem.simulators.source import stream

        while not self._stop.is_set():
            sub = self.bridge.next_subscan(0.2)
            if sub is None:
                continue
            while self.sender is None or self.sender.is_alive():
                if self._stop.wait(0.1):
                    return
            self.bridge.wait_parent_ended(sub)
            dwell = sub.start.metadata.get("rescan", {}).get("dwell_factor", 1.0)
            try:
                stream(sub, self.endpoint, bind=False, rate=self.rate / dwell, progress=False, timeout=60.0)
                self.streamed.append(sub.start.scan_id)
            except (TimeoutError, ValueError) as exc:
                log.error("demo: streaming subscan %s failed: %s", sub.start.scan_id, exc)
            finally:
                sub.close()

    def stop_when_done(self, service, scan_id: str, grace: float = 3.0) -> None:
        """Headless: stop once the scan's results are written, and then every subscan asked for within
        ``grace`` seconds of that (its final maps may still raise an anomaly) is written too."""
        while scan_id not in {s for s, _ in service.results_written} and not service.stop_event.is_set():
            time.sleep(0.2)
        time.sleep(grace)
        while service.steering.pending() or any(
                r["state"] == "acquiring" and r["scan_id"] not in {s for s, _ in service.results_written}
                for r in service.steering.requests()):
            time.sleep(0.2)
        service.stop_after_scan()

    def close(self) -> None:
        self._stop.set()
        if self.example.poll() is None:
            self.example.terminate()
        self._thread.join(5)
        self.bridge.close()


def start_steering(service, graphene, args) -> DemoSteering:
    return DemoSteering(service, graphene, args)
