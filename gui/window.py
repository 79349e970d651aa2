"""The dashboard window: scan maps, patterns, training curves, status and controls.

Only the GUI thread runs this code. A QTimer calls ``tick``, which takes the
newest snapshot off the SUB socket (older ones are dropped unread), draws it,
and hands finished control replies to their panels. The frame inspector shows
the newest frame the service took (``header.latest_index``, asked for over the
control socket) until the user clicks a map, then the clicked position.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtWidgets

from rrstem.gui.dpc import DPC_DIRECTION, DPCPanels
from rrstem.gui.grid import MapGrid
from rrstem.gui.layout import (COM_DIRECTION, FIXED_MAPS, LATENT_PANEL, MODEL_PANELS, NEWEST_TITLE, latent_panel,
                               scan_step)
from rrstem.gui.maps import (CYCLIC, DIVERGING, AnomalyPanel, ImagePanel, ViewGroup, colour_wheel, direction_rgba,
                             wrap_angle)
from rrstem.gui.overlay import SubscanOverlay
from rrstem.gui.panels import Banner, ControlBar, HistoryPlot, StatusPanel, is_loss_history
from rrstem.gui.source import ControlReply, ControlWorker, SnapshotSource
from rrstem.stream.protocol import ProtocolError
from rrstem.stream.snapshot import HISTORY_AXES, HISTORY_PREFIX, Arrays, Snapshot

class Dashboard(QtWidgets.QMainWindow):
    """Live view of one service. Without ``connect`` it only shows what it is given.

    connect:       snapshot endpoint (SUB connects to it)
    control:       control endpoint; when None, the header field ``control`` is used if present
                   (and ``use_advertised_control``)
    stale_after:   seconds without a snapshot before the unreachable banner shows
    follow_interval: seconds between two requests for the newest frame (``header.latest_index``),
                   which the frame inspector shows until the user clicks a map
    keys:          a ``rrstem keys`` folder: snapshots and control over CURVE (``stream/auth.py``)
    """

    def __init__(self, connect=None, control=None, stale_after=3.0, poll_ms=50, control_timeout=2.0,
                 export_dir=".", use_advertised_control=True, follow_interval=0.5, keys=None):
        super().__init__()
        self.setWindowTitle(f"rrstem dashboard - {connect or 'offline'}")
        self.stale_after = stale_after
        self.control_timeout = control_timeout
        self.export_dir = Path(export_dir)
        self.use_advertised_control = use_advertised_control
        self.keys = keys
        self.source = SnapshotSource(connect, keys=keys) if connect else None
        self.control_endpoint: str | None = None
        self.worker: ControlWorker | None = None
        self.snapshot: Snapshot | None = None
        self.selected: tuple[int, int] | None = None  # the user's position; None: follow the newest frame
        self.follow_interval = follow_interval
        self._newest_requested: tuple[int, int] | None = None  # the latest_index last asked for
        self._newest_time = -float("inf")  # monotonic time of that request
        self.redraws = 0
        self._started = time.monotonic()
        self._last_probe = 0.0
        self._build()
        if control:
            self.set_control_endpoint(control)
        self.timer = QtCore.QTimer(self)
        self.timer.timeout.connect(self.tick)
        if self.source is not None:
            self.timer.start(poll_ms)

    # ---- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.overlay = SubscanOverlay()  # rescan outlines on the maps (gui/overlay.py)
        central = QtWidgets.QWidget()
        column = QtWidgets.QVBoxLayout(central)
        column.setContentsMargins(2, 2, 2, 2)
        self.banner = Banner()
        self.controls = ControlBar()
        column.addWidget(self.banner)
        column.addWidget(self.controls)
        split = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        column.addWidget(split, 1)
        self.setCentralWidget(central)

        # maps and patterns each in a grid whose cells take the images' shape (MapGrid)
        self.maps_view, self.map_grid = pg.GraphicsView(), MapGrid()
        self.maps_view.setCentralItem(self.map_grid)
        self.map_views = ViewGroup()
        split.addWidget(self.maps_view)
        self.maps: dict[str, ImagePanel] = {}
        for name, title in FIXED_MAPS:
            self._add_map(name, title)
        self._add_wheel_legend(self.maps[COM_DIRECTION])
        self.dpc = DPCPanels(self._add_direction_map)
        self.maps_view.scene().sigMouseClicked.connect(self._on_click)

        right = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        split.addWidget(right)
        self.patterns_view, self.pattern_grid = pg.GraphicsView(), MapGrid()
        self.patterns_view.setCentralItem(self.pattern_grid)
        right.addWidget(self.patterns_view)
        self.patterns = {
            "mean": ImagePanel("mean pattern"),
            "frame": ImagePanel(f"{NEWEST_TITLE} (click a map to pick one)"),
            "recon": ImagePanel("reconstruction"),
            "residual": ImagePanel("residual", cmap=DIVERGING, symmetric=True),
        }
        self.pattern_views = ViewGroup()
        for panel in self.patterns.values():
            self.pattern_grid.add(panel.plot)
            self.pattern_views.add(panel)
        self.loss_plot = HistoryPlot("training loss", "loss")
        self.metric_plot = HistoryPlot("correlation metrics", "r", legend_offset=(-5, -30))
        right.addWidget(self.loss_plot.widget)
        right.addWidget(self.metric_plot.widget)
        right.setSizes([500, 250, 250])
        split.setSizes([1150, 650])

        self.status = StatusPanel(self.statusBar())
        for key, button in self.controls.buttons.items():
            button.clicked.connect(lambda _=False, k=key: self._on_button(k))
        self.controls.auto_levels.toggled.connect(self.set_auto_levels)
        self._enable_controls()
        self.resize(1800, 1050)

    def _add_map(self, name: str, title: str) -> ImagePanel:
        cmap = CYCLIC if name == Arrays.ROTATION else "viridis"
        fixed = (-np.pi, np.pi) if name == Arrays.ROTATION else None
        kind = AnomalyPanel if name == Arrays.ANOMALY else ImagePanel
        panel = kind(title, cmap=cmap, fixed_levels=fixed, colour_bar=name not in (COM_DIRECTION, DPC_DIRECTION))
        self.map_grid.add(panel.plot)
        self.map_views.add(panel)
        panel.set_auto(self.controls.auto_levels.isChecked())
        self.maps[name] = panel
        return panel

    def _add_direction_map(self, name: str, title: str) -> ImagePanel:
        panel = self._add_map(name, title)
        self._add_wheel_legend(panel)
        return panel

    def _add_wheel_legend(self, panel: ImagePanel) -> None:
        box = pg.ViewBox(lockAspect=True, enableMouse=False)
        wheel = colour_wheel()
        box.addItem(pg.ImageItem(wheel, axisOrder="row-major"))
        box.setRange(xRange=(0, wheel.shape[1]), yRange=(0, wheel.shape[0]), padding=0.0)
        box.setFixedWidth(48)
        box.setFixedHeight(48)
        panel.add_legend(box)

    # ---- snapshot ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Timer slot: newest snapshot, control replies, banner state."""
        if self.source is not None:
            try:
                snap = self.source.poll()
                self.banner.set_problem("decode", None)
            except ProtocolError as exc:
                snap = None
                self.banner.set_problem("decode", f"Undecodable snapshot: {exc}")
            # judged before drawing: a snapshot that takes longer than stale_after to draw is not stale
            age = time.monotonic() - (self.source.last_time or self._started)
            self.banner.set_problem(
                "stale",
                f"Service unreachable: no snapshot from {self.source.endpoint} for {age:.0f} s"
                if age > self.stale_after else None,
            )
            if snap is not None:
                self.show_snapshot(snap)
        if self.worker is not None:
            for reply in self.worker.replies():
                self._on_reply(reply)
            self._follow_newest()  # a request that the rate limit held back goes out here
            now = time.monotonic()
            if "control" in self.banner.problems and now - self._last_probe > max(self.control_timeout, 1.0):
                self._last_probe = now
                self.worker.submit("status")

    def show_snapshot(self, snap: Snapshot) -> None:
        """Draw one snapshot. Every array is read, none is changed."""
        h, a = snap.header, snap.arrays
        old = self.snapshot.header if self.snapshot is not None else None
        if old is not None and old.scan_id == h.scan_id and old.seq == h.seq:
            return  # already drawn
        if old is None or old.scan_id != h.scan_id:
            self._new_scan()
        self.snapshot = snap
        self.banner.set_problem("service", f"Service error: {h.error}" if h.error else None)
        advertised = h.control
        if self.use_advertised_control and self.control_endpoint is None and isinstance(advertised, str):
            self.set_control_endpoint(advertised)

        step = scan_step(h.calibration)
        unit = "nm" if step else "px"
        sy, sx = step or (1.0, 1.0)
        shape = h.scan_shape or (a[Arrays.VBF].shape if Arrays.VBF in a else None)
        if shape:
            self.map_grid.set_aspect(shape[0] * sy / (shape[1] * sx))
        if Arrays.MEAN_PATTERN in a:
            self.pattern_grid.set_aspect(a[Arrays.MEAN_PATTERN].shape[0] / a[Arrays.MEAN_PATTERN].shape[1])
        self._add_declared_maps(h.maps, a)
        self.dpc.show(h, a, self.maps)  # before the scale is set on every panel: it may add one
        for name, panel in self.maps.items():
            panel.set_scale(*(step or (1.0, 1.0)), unit)
            if name in a:
                panel.set_data(wrap_angle(a[name]) if name == Arrays.ROTATION else a[name])
            if name in MODEL_PANELS:
                panel.set_waiting(name not in a, "no model yet")
        if Arrays.COM_ANGLE in a and Arrays.COM_MAGNITUDE in a:
            magnitude = a[Arrays.COM_MAGNITUDE]
            levels = self.maps[Arrays.COM_MAGNITUDE].image.levels
            vmax = float(levels[1]) if levels is not None else float(np.nanmax(magnitude))
            self.maps[COM_DIRECTION].set_data(direction_rgba(a[Arrays.COM_ANGLE], magnitude, vmax))
        if Arrays.ALARMS in a:
            threshold = a.get(Arrays.ALARM_THRESHOLD)
            self.maps[Arrays.ANOMALY].set_alarms(a[Arrays.ALARMS], None if threshold is None else float(threshold))
        latent = a.get(Arrays.LATENT)
        if latent is not None:
            for i in range(latent.shape[0]):
                name = latent_panel(i)
                panel = self.maps.get(name) or self._add_map(name, f"rrVAE latent {i}")
                panel.set_scale(*(step or (1.0, 1.0)), unit)
                panel.set_data(latent[i])
        if Arrays.MEAN_PATTERN in a:
            self.patterns["mean"].set_data(a[Arrays.MEAN_PATTERN])
        self.overlay.update(self.maps.values(), getattr(h, "rescans", None) or [], step or (1.0, 1.0))
        self._show_histories(a)
        self.status.update(snap)
        self._follow_newest()
        self.redraws += 1

    def _show_histories(self, a: dict) -> None:
        hist = {k.removeprefix(HISTORY_PREFIX): v for k, v in a.items() if k.startswith(HISTORY_PREFIX)}
        axes = {k: v for k, v in hist.items() if k in HISTORY_AXES}
        curves = {k: v for k, v in hist.items() if k not in HISTORY_AXES}
        self.loss_plot.set_histories({k: v for k, v in curves.items() if is_loss_history(k)}, axes)
        self.metric_plot.set_histories({k: v for k, v in curves.items() if not is_loss_history(k)}, axes)

    def _add_declared_maps(self, declared: list[dict], arrays: dict) -> None:
        """A panel for each map the service declares as one (``header.maps``) that has none yet, once it has
        data: a reduction added to the service shows here without a change to the dashboard."""
        for spec in declared:
            name = spec.get("name")
            if (spec.get("panel") and spec.get("per_position", True) and name not in self.maps
                    and np.ndim(arrays.get(name)) == 2):
                self._add_map(name, spec.get("description") or name)

    def _new_scan(self) -> None:
        self.dpc.magnitude.levels = None
        for panel in [*self.maps.values(), *self.patterns.values()]:
            panel.set_auto(self.controls.auto_levels.isChecked())
        for name in [n for n in self.maps if n.startswith(LATENT_PANEL)]:
            self.maps[name].clear()
        for key in ("frame", "recon", "residual"):  # the last scan's frame
            self.patterns[key].clear()
        self.select(None)  # a new scan: follow its newest frame again
        self.loss_plot.clear()
        self.metric_plot.clear()

    def set_auto_levels(self, auto: bool) -> None:
        for panel in [*self.maps.values(), *self.patterns.values()]:
            panel.set_auto(auto)
        if self.snapshot is not None:
            snap, self.snapshot = self.snapshot, None
            self.show_snapshot(snap)

    # ---- frame inspection --------------------------------------------------------------------
    def _on_click(self, event) -> None:
        if event.button() != QtCore.Qt.MouseButton.LeftButton:
            return
        for panel in self.maps.values():
            index = panel.index_at(event.scenePos())
            if index is not None:
                self.select(index)
                return

    def select(self, index: tuple[int, int] | None) -> None:
        """Mark (y, x) on every map and ask the service for that frame; None: follow the newest frame."""
        self.selected = index
        for panel in self.maps.values():
            panel.set_crosshair(*(index or (None, None)))
        if index is None:  # the next snapshot or tick asks for the newest frame, at once
            self._newest_requested, self._newest_time = None, -float("inf")
            self.patterns["frame"].set_title(f"{NEWEST_TITLE} (click a map to pick one)")
            return
        self.patterns["frame"].set_title(f"frame ({index[0]}, {index[1]}) requested")
        if self.worker is not None:
            self.worker.submit("frame", index=[int(index[0]), int(index[1])])

    def _follow_newest(self) -> None:
        """Until the user picks a position, ask for the frame at ``header.latest_index``.

        Only when it has changed, and at most once per ``follow_interval``; a
        change held back by that limit is asked for on a later tick.
        """
        if self.selected is not None or self.worker is None or self.snapshot is None:
            return
        latest = self.snapshot.header.latest_index
        if latest is None:
            return
        index = (int(latest[0]), int(latest[1]))
        now = time.monotonic()
        if index == self._newest_requested or now - self._newest_time < self.follow_interval:
            return
        if self.worker.submit("frame", index=list(index)):
            self._newest_requested, self._newest_time = index, now

    def show_frame(self, index, reply: dict, newest: bool = False) -> None:
        """Show a ``frame`` reply (arrays unpacked) for scan position ``index``; ``newest``: one it followed."""
        frame = reply.get("frame")
        y, x = index
        if frame is None:
            return
        self.patterns["frame"].set_title(f"{NEWEST_TITLE} ({y}, {x})" if newest else f"frame ({y}, {x})")
        self.patterns["frame"].set_data(frame)
        for key, title in (("recon", "reconstruction"), ("residual", "residual")):
            arr = reply.get(key)
            if arr is None:
                self.patterns[key].clear()
                self.patterns[key].set_title(f"{title} (no model yet)")
            else:
                self.patterns[key].set_title(f"{title} ({y}, {x})")
                self.patterns[key].set_data(arr)

    def _on_frame_reply(self, r: ControlReply) -> None:
        index = tuple(r.args["index"])
        newest = self.selected is None
        if index != (self._newest_requested if newest else self.selected):
            return  # the answer to a request replaced since: by a click, a newer frame or a new scan
        if not r.ok:
            if newest:
                self.patterns["frame"].set_title(f"{NEWEST_TITLE} {index}: {r.error}")
            else:
                self.controls.reply.setText(f"frame failed: {r.error}")
            return
        self.show_frame(index, r.reply, newest=newest)

    # ---- control -----------------------------------------------------------------------------
    def set_control_endpoint(self, endpoint: str) -> None:
        if self.worker is not None:
            self.worker.close()
        self.control_endpoint = endpoint
        self.worker = ControlWorker(endpoint, timeout=self.control_timeout, keys=self.keys)
        self._enable_controls()

    def _enable_controls(self) -> None:
        for key, button in self.controls.buttons.items():
            button.setEnabled(key == "export" or self.worker is not None)
        self.controls.reply.setText(
            f"control: {self.control_endpoint}" if self.worker is not None else "no control endpoint (use --control EP)"
        )

    def _on_button(self, key: str) -> None:
        if key == "export":
            path = self.export_png()
            self.controls.reply.setText(f"exported {path}")
        elif self.worker is not None:
            queued = self.worker.submit(key)
            self.controls.reply.setText(f"{key}: sent" if queued else f"{key}: busy, not sent")

    def _on_reply(self, r: ControlReply) -> None:
        if r.timeout:
            self.banner.set_problem("control", f"Control socket {self.control_endpoint} not answering ({r.cmd})")
        else:
            self.banner.set_problem("control", None)
        if r.cmd == "frame":
            self._on_frame_reply(r)
        elif not r.ok:
            self.controls.reply.setText(f"{r.cmd} failed: {r.error}")
        elif r.cmd == "save":
            self.controls.reply.setText(f"saved {r.reply.get('path', '')}")
        elif r.cmd != "status":
            training = r.reply.get("training") or {}
            state = training.get("state", "") if isinstance(training, dict) else training
            self.controls.reply.setText(f"{r.cmd}: ok {state}".rstrip())

    def export_png(self, path=None) -> Path:
        """Save the whole window as PNG; default name from scan id and time, in ``export_dir``."""
        if path is None:
            scan = self.snapshot.header.scan_id if self.snapshot is not None else "none"
            path = self.export_dir / f"rrstem-{scan}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        path = Path(path)
        if not self.grab().save(str(path)):
            raise OSError(f"could not write {path}")
        return path

    def closeEvent(self, event) -> None:
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the timer and close both sockets (idempotent)."""
        self.timer.stop()
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.source is not None:
            self.source.close()
            self.source = None
