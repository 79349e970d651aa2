"""Non-image panels: training curves, status bar, banner, control bar."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtWidgets

from rrstem.stream.snapshot import COUNTERS, HISTORIES, HISTORY_AXIS, LOSS_HISTORIES, Arrays, Snapshot

_PENS = ["#4cc9f0", "#f72585", "#ffd166", "#06d6a0", "#b5179e", "#f8961e", "#90be6d", "#bbbbbb"]
#: how a history the schema does not know is sorted onto the loss plot
_LOSS_WORDS = ("loss", "elbo", "kl", "recon")


def is_loss_history(name: str) -> bool:
    """Losses go on the loss plot, everything else on the metrics plot.

    The schema's ``LOSS_HISTORIES`` decides for the histories it names; a
    name it does not know (a newer service) counts as a loss if it reads like one.
    """
    if name in HISTORIES:
        return name in LOSS_HISTORIES
    return any(word in name.lower() for word in _LOSS_WORDS)


class HistoryPlot:
    """One PlotWidget with a curve per training history, each against its own axis (``HISTORY_AXIS``)."""

    def __init__(self, title: str, y_label: str, legend_offset=(-5, 5)):
        self.widget = pg.PlotWidget(title=title)
        self.widget.setMenuEnabled(False)
        self.widget.showGrid(x=True, y=True, alpha=0.3)
        self.widget.setLabel("bottom", "training step")
        self.widget.setLabel("left", y_label)
        self.widget.getAxis("left").enableAutoSIPrefix(False)
        self.legend = self.widget.addLegend(offset=legend_offset, labelTextSize="8pt")
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._drawn: dict[str, tuple] = {}

    def set_histories(self, histories: dict[str, np.ndarray], axes: dict[str, np.ndarray]) -> None:
        """Draw each curve of ``histories`` (name -> values) against ``axes[HISTORY_AXIS[name]]``.

        A curve whose axis is unknown, missing from ``axes`` or of another
        length is drawn against 0..n-1 instead: an index is honest, a wrong axis is not.
        """
        for name, values in histories.items():
            x = axes.get(HISTORY_AXIS.get(name, ""))
            if x is None or len(x) != len(values):
                x = np.arange(len(values))
            # histories only grow, so length, axis length and last values tell a changed curve
            key = (len(values), len(x), values[-1:].tobytes(), x[-1:].tobytes())
            if self._drawn.get(name) == key:
                continue  # unchanged since the last snapshot
            curve = self.curves.get(name)
            if curve is None:
                pen = pg.mkPen(_PENS[len(self.curves) % len(_PENS)], width=1.5)
                curve = self.curves[name] = self.widget.plot(name=name, pen=pen)
            curve.setData(x, values)
            self._drawn[name] = key

    def clear(self) -> None:
        for curve in self.curves.values():
            curve.setData([], [])
        self._drawn.clear()


class StatusPanel:
    """Widgets for the status bar: scan id, progress, rate, counters, training."""

    COUNTERS = COUNTERS

    def __init__(self, bar: QtWidgets.QStatusBar):
        self.scan = QtWidgets.QLabel("no scan")
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFixedWidth(200)
        self.progress.setFormat("%p%")
        self.rate = QtWidgets.QLabel("0 frames/s")
        self.counters = QtWidgets.QLabel("")
        self.training = QtWidgets.QLabel("training: -")
        bar.addWidget(self.scan)
        bar.addWidget(self.progress)
        bar.addWidget(self.rate)
        bar.addWidget(self.counters)
        bar.addPermanentWidget(self.training)

    def update(self, snap: Snapshot) -> None:
        h = snap.header
        self.scan.setText(f"scan {h.scan_id or '-'} [{h.state}]")
        filled = snap.arrays.get(Arrays.FILLED)
        done = int(np.count_nonzero(filled)) if filled is not None else h.counters.get("received", 0)
        self.progress.setValue(int(1000 * done / h.expected) if h.expected else 0)
        self.progress.setFormat(f"{done}/{h.expected}  %p%")
        self.rate.setText(f"{h.frames_per_s:.0f} frames/s")
        self.counters.setText("  ".join(f"{k} {h.counters.get(k, 0)}" for k in self.COUNTERS))
        t = h.training or {}
        text = f"training: {t.get('state', '-')}  step {t.get('step', 0)}"
        if isinstance(t.get("loss"), (int, float)):
            text += f"  loss {t['loss']:.4g}"
        self.training.setText(text)


class Banner(QtWidgets.QLabel):
    """A red strip across the top; visible while any problem is set."""

    def __init__(self):
        super().__init__()
        self.setStyleSheet("background:#b00020; color:white; font-weight:bold; padding:6px;")
        self.setWordWrap(True)
        self.problems: dict[str, str] = {}
        self.setVisible(False)

    def set_problem(self, key: str, message: str | None) -> None:
        if message:
            self.problems[key] = message
        else:
            self.problems.pop(key, None)
        self.setText("   |   ".join(self.problems.values()))
        self.setVisible(bool(self.problems))


class ControlBar(QtWidgets.QWidget):
    """Buttons for the control commands, the auto-levels toggle and the last reply."""

    def __init__(self):
        super().__init__()
        row = QtWidgets.QHBoxLayout(self)
        row.setContentsMargins(4, 2, 4, 2)
        self.buttons: dict[str, QtWidgets.QPushButton] = {}
        for key, text in [
            ("pause_training", "Pause training"),
            ("resume_training", "Resume training"),
            ("reset_model", "Reset model"),
            ("save", "Save results now"),
            ("export", "Export PNG"),
        ]:
            self.buttons[key] = QtWidgets.QPushButton(text)
            row.addWidget(self.buttons[key])
        self.auto_levels = QtWidgets.QCheckBox("Auto levels")
        self.auto_levels.setToolTip("Off: stable 1-99 percentile levels. On: min-max of every snapshot.")
        row.addWidget(self.auto_levels)
        self.reply = QtWidgets.QLabel("")
        self.reply.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        row.addWidget(self.reply, 1)
