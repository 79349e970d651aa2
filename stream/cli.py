"""The ``rrstem`` command line: serve, simulate, replay, analyze, dashboard, demo.

argparse is the standard library's parser, and tqdm draws the progress bars.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("rrstem")


def shape_arg(text: str) -> tuple[int, int]:
    """Parse ``NYxNX`` (e.g. ``64x64``)."""
    try:
        ny, nx = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NYxNX such as 64x64, got {text!r}") from None
    if ny < 1 or nx < 1:
        raise argparse.ArgumentTypeError(f"scan shape must be positive, got {text!r}")
    return ny, nx


def add_processing_args(p: argparse.ArgumentParser) -> None:
    """Options shared by serve, analyze and demo."""
    g = p.add_argument_group("preprocessing")
    g.add_argument("--bin", type=int, default=1, help="sum-binning factor (default 1)")
    g.add_argument("--crop", type=float, default=None, metavar="RADII",
                   help="crop each frame to this many disc radii around the disc")
    g.add_argument("--disc", type=float, nargs=3, default=None, metavar=("CY", "CX", "R"),
                   help="bright-field disc centre and radius in raw pixels (default: detect)")
    g.add_argument("--calibration-frames", type=int, default=64,
                   help="frames used to find the disc and bad pixels (default 64)")
    g.add_argument("--no-mask", action="store_true", help="do not mask saturated and hot pixels")
    t = p.add_argument_group("training")
    t.add_argument("--no-train", action="store_true", help="do not train the rrVAE")
    t.add_argument("--device", default="cpu", help="torch device for the rrVAE: cpu, cuda, cuda:1, mps")
    t.add_argument("--consolidate", type=float, default=None, metavar="SECONDS",
                   help="longest consolidation of the rrVAE after a scan ends")
    t.add_argument("--latent-dim", type=int, default=None, help="rrVAE content latents")


def preprocess_config(args: argparse.Namespace):
    from rrstem.stream.preprocess import PreprocessConfig

    disc = args.disc
    return PreprocessConfig(bin=args.bin, crop=args.crop, calibration_frames=args.calibration_frames,
                            disc_center=tuple(disc[:2]) if disc else None, disc_radius=disc[2] if disc else None,
                            mask_saturated=not args.no_mask, mask_outliers=not args.no_mask)


def trainer_overrides(args: argparse.Namespace) -> dict:
    out = {}
    if args.consolidate is not None:
        out["consolidate_seconds"] = args.consolidate
    if args.latent_dim is not None:
        out["latent_dim"] = args.latent_dim
    return out


def run_service(service, progress: bool = True, stop_after: float | None = None) -> int:
    """Run until the service stops, with a progress bar per scan; Ctrl-C stops it cleanly."""
    from tqdm import tqdm

    from tqdm.contrib.logging import logging_redirect_tqdm

    bar, bar_scan, ended = None, None, False
    t0 = time.monotonic()
    redirect = logging_redirect_tqdm()  # log lines print above the bar instead of breaking it
    redirect.__enter__()
    try:
        while not service.wait(0.2):
            if stop_after is not None and time.monotonic() - t0 > stop_after:
                break
            cur = service.current
            if not progress or cur is None:
                continue
            if cur.scan_id != bar_scan:
                if bar is not None:
                    bar.close()
                bar, bar_scan, ended = tqdm(total=cur.start.n_positions, desc=cur.scan_id, unit="frame",
                                            dynamic_ncols=True), cur.scan_id, False
            if ended:
                continue
            bar.n = cur.counters["received"]
            extra = {k: v for k, v in cur.counter_dict().items() if v and k != "received"}
            if service.trainer is not None:
                st = service.trainer.status()
                extra["train"] = f"{st.get('state')}@{st.get('step', 0)}"
            bar.set_postfix(extra, refresh=False)
            bar.refresh()
            if cur.ended:  # the rate would only decay from here: close the bar, say what happens next
                bar.close()
                ended = True
                if service.trainer is not None and cur.ready.is_set():
                    log.info("scan %s: all frames in; finishing the rrVAE (consolidation, final encode)",
                             cur.scan_id)
    except KeyboardInterrupt:
        log.info("interrupted: stopping")
    finally:
        if bar is not None and not ended:
            bar.close()
        redirect.__exit__(None, None, None)
        service.close()
    try:
        service.check()
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    for scan_id, path in service.results_written:
        print(f"results of scan {scan_id}: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rrstem.stream.service import Service, ServiceConfig

    cfg = ServiceConfig(listen=args.listen, bind=args.bind, mode="sub" if args.sub else "pull", protocol=args.protocol,
                        publish=args.publish, control=args.control, out=args.out, scan_shape=args.scan_shape,
                        preprocess=preprocess_config(args), train=not args.no_train,
                        trainer=trainer_overrides(args), device=args.device, once=args.once)
    service = Service(cfg).start()
    print(f"rrstem serve: frames from {service.listen_endpoint}, snapshots on {service.publish_endpoint}, "
          f"control on {service.control_endpoint}, results to {cfg.out}", flush=True)
    return run_service(service, progress=not args.no_progress)


def add_serve_args(sub) -> None:
    p = sub.add_parser("serve", help="receive frames and keep maps, model and results current")
    p.add_argument("--listen", default="tcp://127.0.0.1:5555", metavar="EP",
                   help="frames endpoint; connects to the sender unless --bind (default tcp://127.0.0.1:5555)")
    p.add_argument("--bind", action="store_true", help="bind the frames endpoint instead of connecting")
    p.add_argument("--sub", action="store_true", help="tap a PUB stream (lossy; losses are counted)")
    p.add_argument("--protocol", default="rrstem", help="sender's wire protocol (default rrstem; see docs/protocol.md)")
    p.add_argument("--publish", default="tcp://127.0.0.1:5556", metavar="EP", help="snapshot PUB endpoint")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", metavar="EP", help="control REP endpoint")
    p.add_argument("--out", type=Path, default=Path("rrstem-results.h5"), metavar="RESULTS.h5",
                   help="results file (default rrstem-results.h5)")
    p.add_argument("--scan-shape", type=shape_arg, default=None, metavar="NYxNX",
                   help="override the scan shape the sender announces")
    p.add_argument("--once", action="store_true", help="exit after the first scan's results are written")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_processing_args(p)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrstem", description="Live 4D-STEM analysis beside the microscope.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from rrstem.gui import add_dashboard_args
    from rrstem.simulators.cli import add_replay_args, add_simulate_args
    from rrstem.stream.commands import add_analyze_args, add_demo_args

    add_demo_args(sub)
    add_serve_args(sub)
    add_simulate_args(sub)
    add_replay_args(sub)
    add_analyze_args(sub)
    add_dashboard_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    if args.command in ("serve", "demo", "analyze") and args.verbose == 0:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"rrstem {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
