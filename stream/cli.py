"""What the stream package contributes to the ``rrstem`` command line (``rrstem.cli``).

- ``add_serve_args(subparsers)``: the ``serve`` subcommand.
- ``add_keys_args(subparsers)``: the ``keys`` subcommand (CURVE certificates, ``stream/auth.py``).
- ``add_keys_option(parser, what)``: the ``--keys DIR`` option of every command that talks ZeroMQ.
- ``add_processing_args(parser)``, ``preprocess_config(args)``, ``dpc_options(args)``,
  ``trainer_overrides(args)``: the preprocessing, DPC and training options of every command that runs a service
  (serve, analyze, demo), and the ``ServiceConfig`` parts they make.
- ``run_service(service)``: run a started service to its end with a progress bar.
- ``parse_scan_shape(text)``: the one parser of ``NY`` / ``NYxNX`` scan shapes,
  for every ``--scan`` and ``--scan-shape`` option of every package.

argparse is the standard library's parser, and tqdm draws the progress bars.
This module imports nothing from ``gui/`` or ``simulators/``.
"""

from __future__ import annotations

import argparse
import sys
import logging
from pathlib import Path

from rrstem.stream.detectors import PROTOCOLS

log = logging.getLogger("rrstem")

#: Scan states in which every frame of the scan is in (see ``stream.snapshot.STATES``).
ALL_FRAMES_IN = ("finishing", "consolidating", "done")


def parse_scan_shape(text: str) -> tuple[int, int]:
    """``"64x48"`` -> (64, 48); ``"64"`` -> (64, 64). Anything else is refused with one message."""
    parts = text.strip().lower().split("x")
    if len(parts) <= 2 and all(p.isascii() and p.isdigit() for p in parts):
        ny, nx = int(parts[0]), int(parts[-1])
        if ny > 0 and nx > 0:
            return ny, nx
    raise argparse.ArgumentTypeError(
        f"scan shape must be NYxNX or N (a square scan) in positive integers, such as 64x48 or 64; got {text!r}")


def protocols_help() -> str:
    """What ``serve --protocol`` says of each protocol in ``PROTOCOLS``."""
    def one(p) -> str:
        return (f"{p.name}: {p.description}" + (", needs --scan-shape NYxNX" if p.needs_scan_shape else "")
                + (", connects to the port the detector serves: --listen tcp://HOST:PORT" if p.transport == "tcp"
                   else ""))
    return "; ".join(one(p) for p in PROTOCOLS.values())


def add_processing_args(p: argparse.ArgumentParser) -> None:
    """Options shared by serve, analyze and demo."""
    g = p.add_argument_group("preprocessing")
    g.add_argument("--bin", type=int, default=1, help="sum-binning factor (default 1)")
    g.add_argument("--crop", type=float, default=None, metavar="RADII",
                   help="crop each frame to this many disc radii around the disc")
    g.add_argument("--disc", type=float, nargs=3, default=None, metavar=("CY", "CX", "R"),
                   help="bright-field disc centre and radius in raw pixels (default: detect)")
    g.add_argument("--flip-rows", action="store_true",
                   help="reverse the rows of every frame before anything else (row 0 becomes the last): HyperSpy "
                        "and RosettaSciIO show a Merlin .mib this way (README, 'Detector orientation')")
    g.add_argument("--transpose", action="store_true",
                   help="swap the rows and columns of every frame, after --flip-rows; --disc and the results are "
                        "in the oriented frame")
    g.add_argument("--calibration-frames", type=int, default=64,
                   help="frames used to find the disc and bad pixels (default 64)")
    g.add_argument("--no-mask", action="store_true",
                   help="do not look for stuck, hot and dead pixels (a --mask FILE and the detector's own mask "
                        "still apply)")
    g.add_argument("--mask", type=_mask_file, default=None, metavar="FILE[:DATASET]",
                   help="a known detector mask: a .npy file, or an HDF5 file with one 2D dataset (or name it: "
                        "FILE:DATASET); non-zero (True) pixels are masked, as in DECTRIS' pixel_mask; its shape "
                        "must be the raw frame's, else the scan is refused")
    g.add_argument("--reductions", type=_reduction_modules, default=None, metavar="MODULE[,MODULE]",
                   help="your own maps: Python modules (my_maps.py, or a module name) whose reductions "
                        "(@register) every scan runs beside the built-in ones (README, 'Your own maps')")
    add_dpc_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--no-train", action="store_true", help="do not train the rrVAE")
    t.add_argument("--device", default="cpu", help="torch device for the rrVAE: cpu, cuda, cuda:1, mps")
    t.add_argument("--consolidate", type=float, default=None, metavar="SECONDS",
                   help="longest consolidation of the rrVAE after a scan ends")
    t.add_argument("--latent-dim", type=int, default=None, help="rrVAE content latents")
    t.add_argument("--no-warm-start", action="store_true",
                   help="train a fresh rrVAE on every scan (default: a scan whose binned frames match the previous "
                        "scan's starts from that scan's model)")
    t.add_argument("--trainer", type=_json_object, default=None, metavar="JSON",
                   help="trainer and model options as JSON, as TrainerConfig.from_dict takes them (model/config.py), "
                        "e.g. '{\"seed\": 3, \"lr\": 1e-3}'; --consolidate and --latent-dim win over it")


def add_dpc_args(p: argparse.ArgumentParser) -> None:
    """The DPC options (README, "DPC: rotation, descan, iDPC"): calibration and descan."""
    d = p.add_argument_group("DPC (dpc_x, dpc_y, idpc, ddpc)")
    d.add_argument("--scan-rotation", type=float, default=None, metavar="DEG",
                   help="the scan-detector rotation in degrees, from +x towards +y (default: found from the data "
                        "as the scan fills, and carried over to the next scans once settled)")
    d.add_argument("--flip", action="store_true",
                   help="the detector's rows are mirrored against the scan (applied before --scan-rotation)")
    d.add_argument("--dpc-calibration", default=None, metavar="FILE",
                   help="load the rotation and flip: the results .h5 of an earlier scan (FILE or FILE:SCAN_ID) "
                        "or a JSON file such as {\"rotation_deg\": 12.5, \"flip\": true}")
    d.add_argument("--descan-order", type=int, default=None, metavar="N",
                   help="polynomial fitted to the COM field and removed as descan: 0 the mean, 1 a plane "
                        "(default), 2 ...")
    d.add_argument("--descan-reference", default=None, metavar="RESULTS",
                   help="a vacuum scan's results (FILE or FILE:SCAN_ID) on the same grid: its COM maps are "
                        "subtracted as descan (then no fit, unless --descan-order is given)")


def dpc_options(args: argparse.Namespace):
    """``ServiceConfig.dpc`` from the options ``add_dpc_args`` added; files that cannot be read stop the command
    here, with a message that names them."""
    from rrstem.stream.config import DPCOptions
    from rrstem.stream.dpc.live import DPCSession

    opts = DPCOptions(rotation_deg=args.scan_rotation, flip=args.flip, calibration_file=args.dpc_calibration,
                      descan_order=args.descan_order, descan_reference=args.descan_reference)
    try:
        DPCSession.open(**opts.model_dump())
    except ValueError as exc:
        raise SystemExit(f"rrstem: error: {exc}") from None
    return opts


def _mask_file(text: str) -> str:
    """``--mask``: read the file now, so an unreadable mask is refused with the command line's message."""
    from rrstem.stream.badpixels import load_mask

    try:
        load_mask(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _reduction_modules(text: str) -> list:
    """``--reductions``: import each module now, so a bad one is refused with the command line's message."""
    from rrstem.stream.reductions.base import load

    try:
        return [load(name) for name in text.split(",") if name]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(text: str) -> dict:
    """A JSON object from the command line (``--trainer``); anything else is refused with one message."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"seed\": 1}}', not {text!r}")
    return value


def add_acquisition_args(p: argparse.ArgumentParser) -> None:
    """``--sync-offset`` and ``--flyback``: where the frames of an acquisition land in the scan (serve, analyze)."""
    g = p.add_argument_group("acquisition (stream/acquisition.py)")
    g.add_argument("--sync-offset", type=int, default=0, metavar="N",
                   help="frames to skip at the start of an acquisition; negative: the first -N positions are "
                        "missing (default 0)")
    g.add_argument("--flyback", type=int, default=0, metavar="N",
                   help="extra frames at the end of each scan line, discarded (default 0)")


def preprocess_config(args: argparse.Namespace):
    """The ``PreprocessConfig`` of the options ``add_processing_args`` added."""
    from rrstem.stream.preprocess import PreprocessConfig

    disc = args.disc
    return PreprocessConfig(bin=args.bin, crop=args.crop, calibration_frames=args.calibration_frames,
                            disc_center=tuple(disc[:2]) if disc else None, disc_radius=disc[2] if disc else None,
                            mask_saturated=not args.no_mask, mask_outliers=not args.no_mask,
                            flip_rows=args.flip_rows, transpose=args.transpose, mask_file=args.mask)


def trainer_overrides(args: argparse.Namespace) -> dict:
    """``ServiceConfig.trainer``: the trainer fields the options set, e.g. {"consolidate_seconds": 5.0}."""
    out = dict(getattr(args, "trainer", None) or {})
    if args.consolidate is not None:
        out["consolidate_seconds"] = args.consolidate
    if args.latent_dim is not None:
        out["latent_dim"] = args.latent_dim
    if getattr(args, "no_warm_start", False):
        out["warm_start"] = False
    return out


def _stop_on_signals(service):
    """SIGTERM and the first Ctrl-C stop ``service`` gracefully (its running scan is written); a second
    Ctrl-C exits at once. Returns a function that puts the old handlers back. Main thread only."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    seen = []

    def handle(signum, frame):
        if signum == signal.SIGINT and seen:
            print("rrstem: second interrupt: exiting now, without writing the running scan", file=sys.stderr)
            os._exit(130)
        seen.append(signum)
        log.warning("%s: stopping; the running scan is written first (Ctrl-C again to quit at once)",
                    signal.Signals(signum).name)
        service.stop()

    old = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


def run_service(service, progress: bool = True) -> int:
    """Run a started service until it stops, with a progress bar per scan; Ctrl-C stops it cleanly.

    Closes the service, prints the results files written and returns the exit
    code: 1 if a worker failed (its message is logged); 2 if the service was to
    take one scan (``once``) and refused it (too large for this machine, a mask
    of another shape: the reason is logged); else 0.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar, bar_scan, all_in = None, None, False
    restore = _stop_on_signals(service)
    try:
        with logging_redirect_tqdm():  # log lines print above the bar instead of breaking it
            try:
                while not service.wait(0.2):
                    if service.stopping_for() > service.cfg.stop_timeout + 5.0:
                        log.error("the service did not stop within %.0f s; closing it", service.cfg.stop_timeout)
                        break
                    if not progress:
                        continue
                    h = service.header()
                    if h.scan_id is None:
                        continue
                    if h.scan_id != bar_scan:
                        if bar is not None:
                            bar.close()
                        bar = tqdm(total=h.expected, desc=h.scan_id, unit="frame", dynamic_ncols=True)
                        bar_scan, all_in = h.scan_id, False
                    if all_in:
                        continue
                    bar.n = h.counters.get("received", 0)
                    extra = {k: v for k, v in h.counters.items() if v and k != "received"}
                    if h.training:
                        extra["train"] = f"{h.training.get('state')}@{h.training.get('step', 0)}"
                    bar.set_postfix(extra, refresh=False)
                    bar.refresh()
                    if h.state in ALL_FRAMES_IN:  # the rate would only decay from here: say what happens next
                        bar.close()
                        all_in = True
                        if h.training and h.state != "done":
                            log.info("scan %s: all frames in; finishing the rrVAE (consolidation, final encode)",
                                     h.scan_id)
            except KeyboardInterrupt:
                log.info("interrupted: stopping")
            finally:
                if bar is not None and not all_in:
                    bar.close()
    finally:
        service.close()
        restore()
    try:
        service.check()
    except Exception as exc:  # a worker's failure, re-raised: report it, with its traceback under -vv
        log.error("%s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    for scan_id, path in service.results_written:
        print(f"results of scan {scan_id}: {path}")
    if service.cfg.once and service.current is None and service.lifecycle.notice:
        return 2  # the one scan was refused at its start (logged): nothing was analysed
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rrstem.stream.service import Service, ServiceConfig

    cfg = ServiceConfig(listen=args.listen, bind=args.bind, mode="sub" if args.sub else "pull", protocol=args.protocol,
                        publish=args.publish, control=args.control, out=args.out, scan_shape=args.scan_shape,
                        events=args.events or None, steering=args.steering or None, steer_timeout=args.steer_timeout,
                        sync_offset=args.sync_offset, flyback=args.flyback,
                        preprocess=preprocess_config(args), dpc=dpc_options(args), train=not args.no_train,
                        trainer=trainer_overrides(args), device=args.device, once=args.once,
                        idle_timeout=args.idle_timeout, checkpoint_seconds=args.checkpoint_seconds, save_frames=args.save_frames,
                        stop_timeout=args.stop_timeout, keys=args.keys, read_only_control=args.read_only_control)
    service = Service(cfg).start()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: service.stop())  # from now on: run_service installs the full handlers
    print(f"rrstem serve: frames from {service.listen_endpoint}, snapshots on {service.publish_endpoint}, "
          f"control on {service.control_endpoint}, events on {service.events.endpoint}, "
          f"steering on {service.steering.endpoint}, results to {cfg.out}", flush=True)
    return run_service(service, progress=not args.no_progress)


def add_save_frames_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-frames", action="store_true",
                   help="keep each scan's binned frames beside the results file, as an EMD 1.0 / py4DSTEM DataCube "
                        "RESULTS_STEM.SCAN.binned.emd (for 'rrstem export --binned'; as large as the frames)")


def add_serve_args(subparsers) -> argparse.ArgumentParser:
    """Register ``serve``: receive frames and keep maps, model and results current."""
    p = subparsers.add_parser("serve", help="receive frames and keep maps, model and results current")
    p.add_argument("--listen", default="tcp://127.0.0.1:5555", metavar="EP",
                   help="frames endpoint; connects to the sender unless --bind (default tcp://127.0.0.1:5555)")
    p.add_argument("--bind", action="store_true",
                   help="bind the frames endpoint instead of connecting (the sender then connects: "
                        "replay/simulate --connect)")
    p.add_argument("--sub", action="store_true", help="tap a PUB stream (lossy; losses are counted)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=next(iter(PROTOCOLS)),
                   help=f"sender's wire protocol (default %(default)s; docs/protocol.md): {protocols_help()}")
    p.add_argument("--publish", default="tcp://127.0.0.1:5556", metavar="EP", help="snapshot PUB endpoint")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", metavar="EP", help="control REP endpoint")
    p.add_argument("--events", default="tcp://127.0.0.1:5558", metavar="EP",
                   help="events PUB endpoint: scan_started, scan_ended, anomaly, ... (docs/steering.md); '' = off")
    p.add_argument("--steering", default="tcp://127.0.0.1:5559", metavar="EP",
                   help="steering PUB endpoint, where rescan requests go to the microscope bridge; '' = off")
    p.add_argument("--steer-timeout", type=float, default=30.0, metavar="S",
                   help="report a rescan request that no bridge answers within S seconds (default 30)")
    p.add_argument("--out", type=Path, default=Path("rrstem-results.h5"), metavar="RESULTS.h5",
                   help="results file (default rrstem-results.h5)")
    p.add_argument("--scan-shape", type=parse_scan_shape, default=None, metavar="NYxNX",
                   help="override the scan shape the sender announces (64x48, or 64 for 64x64)")
    p.add_argument("--once", action="store_true", help="exit after the first scan's results are written")
    add_save_frames_arg(p)
    r = p.add_argument_group("never lose a scan")
    r.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="close a scan that has had no frames for S seconds, marked incomplete "
                        "(default: 30x its frame interval, 5..300 s; 60 s before its first frame)")
    r.add_argument("--checkpoint-seconds", type=float, default=30.0, metavar="S",
                   help="write the running scan's partial results every S seconds (default 30; 0: never)")
    r.add_argument("--stop-timeout", type=float, default=10.0, metavar="S",
                   help="on stop, SIGTERM or Ctrl-C, write the running scan within S seconds (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.add_argument_group("strangers (docs/protocol.md, Authentication)")
    add_keys_option(a, "the snapshot and control sockets, and the frames socket (rrstem/1), are CURVE servers that "
                       "let in only the clients in DIR/authorized/; connecting to a sender, serve is its CURVE client")
    a.add_argument("--read-only-control", action="store_true",
                   help="refuse control commands that change the service (stop, pause/resume training, reset the "
                        "model, save to a path); status, frame and save still work")
    add_acquisition_args(p)
    add_processing_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_keys_option(p, what: str) -> None:
    """``--keys DIR``: CURVE authentication and encryption with the certificates ``rrstem keys DIR`` made."""
    p.add_argument("--keys", type=Path, default=None, metavar="DIR",
                   help=f"CURVE authentication and encryption with the keys `rrstem keys DIR` made: {what}")


def cmd_keys(args: argparse.Namespace) -> int:
    from rrstem.stream.auth import ROLES, make_keys

    make_keys(args.dir, force=args.force)
    width = max(len(name) for name in ROLES) + len(str(args.dir)) + 3
    print(f"rrstem keys: CURVE certificates in {args.dir}:")
    for name, role in ROLES.items():
        shown = str(args.dir / name) + ("/" if name.endswith("/") else "")
        print(f"  {shown:<{width}} {role}")
    print(f"Give every program --keys {args.dir}: the same folder, or on each machine a copy with the files its "
          "side needs. A peer without them gets nothing from rrstem's sockets and can change nothing.")
    return 0


def add_keys_args(subparsers) -> argparse.ArgumentParser:
    """Register ``keys``: make the CURVE certificates of ``--keys DIR``."""
    p = subparsers.add_parser("keys", help="make CURVE certificates for authenticated, encrypted sockets (--keys DIR)",
                              description="Write a server and a client CURVE certificate pair (pyzmq zmq.auth) into "
                                          "DIR, authorize the client, and say which file goes where.")
    p.add_argument("dir", type=Path, metavar="DIR", help="folder for the keys (made if needed)")
    p.add_argument("--force", action="store_true", help="replace keys already in DIR (every client needs the new ones)")
    p.set_defaults(func=cmd_keys)
    return p
