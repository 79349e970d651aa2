"""Entry points: ``rrstem dashboard`` and offscreen rendering for ``rrstem demo --headless``.

Control endpoint convention: ``--control EP`` when given; otherwise the
snapshot header's extra field ``control`` (the endpoint the service
advertises) once the first snapshot arrives; otherwise the controls stay
disabled.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from rrstem.stream.cli import add_keys_option
from rrstem.stream.snapshot import Snapshot


def ensure_app(offscreen: bool = False):
    """The QApplication, created if needed. ``offscreen`` forces the offscreen platform."""
    has_display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("win32", "darwin")
    if offscreen or not (has_display or os.environ.get("QT_QPA_PLATFORM")):
        from pyqtgraph.Qt import QtWidgets

        if QtWidgets.QApplication.instance() is None:
            if not offscreen:
                print("rrstem dashboard: no display found, rendering offscreen", file=sys.stderr)
            os.environ["QT_QPA_PLATFORM"] = "offscreen"
    import pyqtgraph as pg
    from pyqtgraph.Qt import QtCore

    QtCore.qInstallMessageHandler(_qt_message)
    return pg.mkQApp("rrstem dashboard")


#: Qt warnings that say nothing a user can act on (the offscreen platform cannot resize windows).
_QT_NOISE = ("does not support propagateSizeHints",)


def _qt_message(mode, context, message: str) -> None:
    """Qt's messages go to Python logging, minus known noise."""
    if any(noise in message for noise in _QT_NOISE):
        return
    logging.getLogger("rrstem.gui.qt").warning("%s", message)


def render_png(snapshot: Snapshot, path, frame_reply: dict | None = None, index=None, size=(1800, 1050)) -> Path:
    """Render a dashboard offscreen from ``snapshot`` (+ a ``frame`` control reply) and save it as PNG.

    ``frame_reply`` is the reply map of the ``frame`` command (arrays packed
    or unpacked) for scan position ``index`` = (y, x); the crosshair marks it.
    Returns the path written.
    """
    app = ensure_app(offscreen=True)
    from rrstem.gui.source import _unpack_arrays
    from rrstem.gui.window import Dashboard

    win = Dashboard(use_advertised_control=False)
    try:
        win.resize(*size)
        win.show()
        win.show_snapshot(snapshot)
        if frame_reply is not None:
            if index is None:
                raise ValueError("render_png: give index=(y, x) with frame_reply")
            win.select(tuple(index))
            win.show_frame(tuple(index), _unpack_arrays(frame_reply))
        h = snapshot.header
        win.controls.reply.setText(f"rendered offline from snapshot {h.seq} of scan {h.scan_id}")
        app.processEvents()
        return win.export_png(path)
    finally:
        win.shutdown()
        _dispose(win)


def add_dashboard_args(subparsers) -> argparse.ArgumentParser:
    """Register ``dashboard`` on an argparse subparsers object; ``args.func(args)`` runs it."""
    p = subparsers.add_parser("dashboard", help="live dashboard of a running service")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", required=True, metavar="EP", help="snapshot endpoint of the service (PUB)")
    p.add_argument("--control", metavar="EP", default=None,
                   help="control endpoint (REP); default: the one the snapshots advertise")
    p.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                   help="close by itself after this many seconds (for smoke tests)")
    p.add_argument("--stale-after", type=float, default=3.0, metavar="SECONDS",
                   help="show the unreachable banner after this long without a snapshot")
    p.add_argument("--screenshot", default=None, metavar="PNG", help="save the window as PNG on exit")
    p.add_argument("--export-dir", default=".", metavar="DIR", help="where 'Export PNG' writes")
    p.add_argument("--offscreen", action="store_true", help="render offscreen (no display needed)")
    add_keys_option(p, "the dashboard is a CURVE client of the service (serve --keys) and needs DIR/server.key "
                       "and DIR/client.key_secret")


def run(args: argparse.Namespace) -> int:
    """Run the dashboard until the window closes or ``--exit-after`` passes. Returns the exit code."""
    app = ensure_app(offscreen=args.offscreen)
    from pyqtgraph.Qt import QtCore

    from rrstem.gui.window import Dashboard

    win = Dashboard(connect=args.connect, control=args.control, stale_after=args.stale_after,
                    export_dir=args.export_dir, keys=args.keys)
    win.show()

    def finish():
        if args.screenshot:
            win.export_png(args.screenshot)
        win.shutdown()
        app.quit()

    if args.exit_after is not None:
        QtCore.QTimer.singleShot(int(args.exit_after * 1000), finish)
    signal.signal(signal.SIGINT, lambda *_: finish())  # the poll timer lets Python see Ctrl-C
    app.exec()
    win.shutdown()
    print(f"dashboard: {win.redraws} snapshots drawn", file=sys.stderr)
    _dispose(win)
    return 0


def _dispose(widget) -> None:
    """Delete a window's C++ objects now, while the QApplication still exists.

    Left to interpreter teardown, PySide may destroy the application before
    the window's scene and crash on exit.
    """
    from pyqtgraph.Qt import QtCore

    widget.close()
    widget.deleteLater()
    QtCore.QCoreApplication.sendPostedEvents(None, QtCore.QEvent.Type.DeferredDelete)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rrstem dashboard", description=__doc__.splitlines()[0])
    _add_arguments(p)
    return run(p.parse_args(argv))
