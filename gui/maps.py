"""Image panels: one scan map (or pattern) with a colour bar, stable levels and a crosshair.

Display transforms only: level choice, wrapping of angles into one turn and
the HSV colouring of the COM direction. The arrays shown are the snapshot's
own arrays, set on the ImageItem unchanged wherever that is possible.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtGui, QtWidgets

from rrstem.stream.events import clusters

BLANK = "#5a5a5a"  # scan positions without data (NaN, drawn transparent) show as this grey
CYCLIC = "CET-C6"  # cyclic map for the rrVAE rotation
SEQUENTIAL = "viridis"
DIVERGING = "CET-D1"  # residuals
#: fixed sizes around a panel's view box, so that every panel of a grid needs the same room (gui/grid.py)
LEFT_AXIS_WIDTH = 54  # fits four-digit tick labels and the axis label
BAR_WIDTH = 12  # the colour bar itself
LEGEND_WIDTH = 76  # the column right of the view box: colour bar and its 60 px axis, or another legend


class StableLevels:
    """Percentile levels that change only when the data move them noticeably.

    ``update(arr)`` returns the levels to use. In auto mode they follow the
    data's min and max on every call; otherwise they are the (lo, hi)
    percentiles of the finite values, replaced only when either end moves by
    more than ``tolerance`` of the current span, so the colours do not flicker
    while a scan fills in.
    """

    def __init__(self, percentiles=(1.0, 99.0), tolerance=0.1, max_samples=16384):
        self.percentiles = percentiles
        self.tolerance = tolerance
        self.max_samples = max_samples
        self.auto = False
        self.levels: tuple[float, float] | None = None

    def update(self, arr: np.ndarray) -> tuple[float, float] | None:
        stride = max(1, int(np.sqrt(arr.size / self.max_samples)))
        sample = arr[..., ::stride, ::stride] if arr.ndim >= 2 else arr[::stride]
        finite = sample[np.isfinite(sample)]
        if finite.size == 0:
            return self.levels
        if self.auto:
            lo, hi = float(finite.min()), float(finite.max())
        else:
            lo, hi = (float(v) for v in np.percentile(finite, self.percentiles))
        if hi <= lo:
            hi = lo + (abs(lo) * 1e-6 or 1e-6)
        if self.auto or self.levels is None:
            self.levels = (lo, hi)
        else:
            clo, chi = self.levels
            span = chi - clo
            if abs(lo - clo) > self.tolerance * span or abs(hi - chi) > self.tolerance * span:
                self.levels = (lo, hi)
        return self.levels


def wrap_angle(arr: np.ndarray) -> np.ndarray:
    """Angles into [-pi, pi); returned unchanged when they already are."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0 or (finite.min() >= -np.pi and finite.max() <= np.pi):
        return arr
    return (arr + np.pi) % (2 * np.pi) - np.pi


def direction_rgba(angle: np.ndarray, magnitude: np.ndarray, vmax: float) -> np.ndarray:
    """HSV colour wheel: hue = direction, value = magnitude / vmax; NaN -> transparent.

    Returns (ny, nx, 4) uint8.
    """
    hue = (np.nan_to_num(angle, nan=0.0) % (2 * np.pi)) / (2 * np.pi) * 6.0  # sector 0..6
    val = np.clip(np.nan_to_num(magnitude, nan=0.0) / max(vmax, 1e-12), 0.0, 1.0)
    # HSV -> RGB with saturation 1: each channel is a triangular function of hue
    r = np.clip(np.abs(hue - 3.0) - 1.0, 0.0, 1.0)
    g = np.clip(2.0 - np.abs(hue - 2.0), 0.0, 1.0)
    b = np.clip(2.0 - np.abs(hue - 4.0), 0.0, 1.0)
    rgba = np.empty(angle.shape + (4,), np.uint8)
    for i, chan in enumerate((r, g, b)):
        rgba[..., i] = (chan * val * 255).astype(np.uint8)
    rgba[..., 3] = np.where(np.isfinite(angle) & np.isfinite(magnitude), 255, 0)
    return rgba


def colour_wheel(size: int = 64) -> np.ndarray:
    """The legend for ``direction_rgba``: a disc, angle = hue, radius = value."""
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    rgba = direction_rgba(np.arctan2(yy, xx), np.hypot(yy, xx), 1.0)
    rgba[np.hypot(yy, xx) > 1.0] = 0
    return rgba


def _small_font():
    font = QtGui.QFont()
    font.setPointSize(7)
    return font


def compact_tick_strings(values, scale, spacing) -> list[str]:
    """Short tick labels with enough digits to tell neighbouring ticks apart."""
    if not values:
        return []
    top = max(abs(v * scale) for v in values)
    digits = 3 if top == 0 or spacing <= 0 else max(3, int(np.ceil(np.log10(top / (spacing * scale)))) + 1)
    return [f"{v * scale:.{min(digits, 8)}g}" for v in values]


class CompactAxis(pg.AxisItem):
    """An axis with ``compact_tick_strings`` labels, so that large counts fit a colour bar's width."""

    def tickStrings(self, values, scale, spacing):
        return compact_tick_strings(values, scale, spacing)


class ColourBar(pg.ColorBarItem):
    """A ColorBarItem whose value axis (the right one) is a ``CompactAxis``.

    ColorBarItem builds its axes through PlotItem's ``setAxisItems`` and then
    styles the right axis as its value axis; supplying a CompactAxis there lets
    it style ours.
    """

    def setAxisItems(self, axisItems=None):
        axisItems = dict(axisItems or {})
        if "right" not in self.axes:  # while PlotItem builds its axes; never replace one later
            axisItems.setdefault("right", CompactAxis("right"))
        super().setAxisItems(axisItems)


class TitleLabel(pg.LabelItem):
    """A plot title that asks for no width.

    LabelItem makes its text's width its minimum width, so a long title would
    squeeze the neighbouring maps out of the grid. This one asks only for its
    text's height (the title row has a fixed height anyway); a title longer
    than its plot overhangs it.
    """

    def updateMin(self):
        super().updateMin()
        self.setMinimumWidth(0)

    def sizeHint(self, which, constraint=QtCore.QSizeF()):
        hint = super().sizeHint(which, constraint)
        if which in (QtCore.Qt.SizeHint.MinimumSize, QtCore.Qt.SizeHint.PreferredSize):
            hint.setWidth(0)
        return hint


class ImagePlot(pg.PlotItem):
    """A PlotItem whose title is a ``TitleLabel``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        default = self.titleLabel
        self.layout.removeItem(default)
        default.setParentItem(None)
        self.titleLabel = TitleLabel("", size="11pt", parent=self)
        self.layout.addItem(self.titleLabel, 0, 1)
        self.setTitle(None)  # hidden until set, as PlotItem's own


class ViewGroup:
    """Panels whose views pan and zoom together.

    pyqtgraph's setXLink/setYLink fight with aspect-locked views of
    different sizes (the range grows on every update), so a range the user
    sets by mouse in one panel is copied to the others instead.
    """

    def __init__(self):
        self.panels: list[ImagePanel] = []

    def add(self, panel: "ImagePanel") -> None:
        self.panels.append(panel)
        panel.view_box().sigRangeChangedManually.connect(lambda *_: self._follow(panel))

    def _follow(self, leader: "ImagePanel") -> None:
        xr, yr = leader.view_box().viewRange()
        for panel in self.panels:
            if panel is not leader:
                panel.plot.setRange(xRange=xr, yRange=yr, padding=0.0)


class ImagePanel:
    """A PlotItem holding one ImageItem, its colour bar and a crosshair.

    ``set_data(arr)`` shows ``arr`` as given (row-major: arr[y, x]).
    """

    def __init__(self, title, cmap=SEQUENTIAL, fixed_levels=None, colour_bar=True, symmetric=False):
        self.title = title
        self.plot = ImagePlot()  # a long title does not widen its plot
        self.set_title(title)
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.setAspectLocked(True)
        self.plot.disableAutoRange()  # the range follows the image size only (see _apply_rect)
        self.plot.invertY(True)
        # positions without data (NaN, drawn transparent) show this grey patch; outside the scan is black
        self.blank = QtWidgets.QGraphicsRectItem()
        self.blank.setBrush(pg.mkBrush(BLANK))
        self.blank.setPen(pg.mkPen(None))
        self.blank.setZValue(-1)
        self.blank.setVisible(False)
        self.plot.addItem(self.blank, ignoreBounds=True)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).enableAutoSIPrefix(False)  # no "(x0.001)" on nm axes
        self.plot.getAxis("left").setWidth(LEFT_AXIS_WIDTH)  # not the tick labels' width: a MapGrid needs it fixed
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.fixed_levels = fixed_levels
        self.symmetric = symmetric  # levels (-m, m), for residuals
        self.levels = StableLevels()
        self.bar = None
        if colour_bar:
            self.bar = ColourBar(
                values=fixed_levels or (0, 1), colorMap=pg.colormap.get(cmap), interactive=False, width=BAR_WIDTH
            )
            self.bar.setImageItem(self.image, insert_in=self.plot)  # into plot.layout at (2, 5)
            self.bar.axis.setWidth(LEGEND_WIDTH - BAR_WIDTH - 4)
            self.bar.axis.setStyle(tickFont=_small_font())
            self.plot.layout.setColumnFixedWidth(5, LEGEND_WIDTH)
        self.cross_v = pg.InfiniteLine(angle=90, pen=pg.mkPen("w", width=1, style=QtCore.Qt.PenStyle.DashLine))
        self.cross_h = pg.InfiniteLine(angle=0, pen=pg.mkPen("w", width=1, style=QtCore.Qt.PenStyle.DashLine))
        for line in (self.cross_v, self.cross_h):
            line.setVisible(False)
            line.setZValue(10)
            self.plot.addItem(line, ignoreBounds=True)
        self._shape: tuple[int, ...] | None = None
        self._scale = (1.0, 1.0)

    def add_legend(self, item: QtWidgets.QGraphicsLayoutItem) -> None:
        """Put ``item`` where a colour bar goes, for a panel made without one."""
        if self.bar is not None:
            raise ValueError(f"panel {self.title!r} has a colour bar where the legend would go")
        self.plot.layout.addItem(item, 2, 5)
        self.plot.layout.setAlignment(item, QtCore.Qt.AlignmentFlag.AlignHCenter | QtCore.Qt.AlignmentFlag.AlignTop)
        self.plot.layout.setColumnFixedWidth(4, 5)
        self.plot.layout.setColumnFixedWidth(5, LEGEND_WIDTH)

    def set_waiting(self, waiting: bool, why: str) -> None:
        """Say in the title why the panel is empty."""
        self.set_title(f"{self.title} ({why})" if waiting else self.title)

    def set_title(self, title: str) -> None:
        if title != self.plot.titleLabel.text:
            self.plot.setTitle(title)

    def set_auto(self, auto: bool) -> None:
        self.levels.auto = auto
        self.levels.levels = None

    def set_data(self, arr: np.ndarray, levels_from: np.ndarray | None = None) -> None:
        """Show ``arr``; levels come from ``levels_from`` (default ``arr``) unless fixed."""
        if arr.ndim == 2:
            lv = self.fixed_levels or self.levels.update(arr if levels_from is None else levels_from)
            if self.symmetric and lv is not None:
                m = max(abs(lv[0]), abs(lv[1]))
                lv = (-m, m)
            self.image.setImage(arr, autoLevels=False)
            self._set_levels(lv if lv is not None else (0.0, 1.0))
        else:  # RGBA, already coloured
            self.image.setImage(arr, autoLevels=False)
            self._set_levels((0.0, 255.0))
        if arr.shape[:2] != self._shape:
            self._shape = arr.shape[:2]
            self._apply_rect()

    def _set_levels(self, lv) -> None:
        lv = (float(lv[0]), float(lv[1]))
        if self.bar is not None:
            self.bar.setLevels(lv)  # sets the image's levels too
        else:
            self.image.setLevels(lv)

    def clear(self) -> None:
        self.image.clear()
        self.blank.setVisible(False)
        self._shape = None

    def set_scale(self, sy: float, sx: float, unit: str) -> None:
        """Size of one pixel in ``unit`` (axes show real units when known)."""
        if (sy, sx) != self._scale:
            self._scale = (sy, sx)
            self._apply_rect()
        self.plot.setLabel("bottom", f"x ({unit})")
        self.plot.setLabel("left", f"y ({unit})")

    def _apply_rect(self) -> None:
        if self._shape is None:
            return
        ny, nx = self._shape
        sy, sx = self._scale
        self.image.setRect(QtCore.QRectF(0, 0, nx * sx, ny * sy))
        self.blank.setRect(QtCore.QRectF(0, 0, nx * sx, ny * sy))
        self.blank.setVisible(True)
        self.plot.setRange(xRange=(0, nx * sx), yRange=(0, ny * sy), padding=0.0)

    def view_box(self) -> pg.ViewBox:
        return self.plot.getViewBox()

    def index_at(self, scene_pos) -> tuple[int, int] | None:
        """(y, x) pixel under a scene position, or None outside the image."""
        if self._shape is None or not self.plot.sceneBoundingRect().contains(scene_pos):
            return None
        p = self.image.mapFromScene(scene_pos)
        y, x = int(np.floor(p.y())), int(np.floor(p.x()))
        if 0 <= y < self._shape[0] and 0 <= x < self._shape[1]:
            return y, x
        return None

    def scene_pos_of(self, y: int, x: int):
        """Scene position of the centre of pixel (y, x); for tests and scripted clicks."""
        return self.image.mapToScene(QtCore.QPointF(x + 0.5, y + 0.5))

    def set_crosshair(self, y: int | None, x: int | None) -> None:
        visible = y is not None and x is not None
        for line in (self.cross_v, self.cross_h):
            line.setVisible(visible)
        if visible:
            sy, sx = self._scale
            self.cross_v.setValue((x + 0.5) * sx)
            self.cross_h.setValue((y + 0.5) * sy)


class AnomalyPanel(ImagePanel):
    """The defect map: ``anomaly`` (stream/defects.py) with its alarm positions marked, and their count and
    threshold in the title.

    ``set_alarms(yx, threshold)`` takes the snapshot's ``alarms`` ((k, 2) [y, x], highest first) and
    ``anomaly_threshold``. Every alarm position gets a small dot (``rings``), and each cluster of them (one
    defect: 8-connected, as the events group them) a ring on its highest position (``peaks``), so the map
    stays visible under a defect's tens of alarm positions. Both sit on the pixel centres, in the panel's
    scale like the crosshair.
    """

    def __init__(self, title, **kwargs):
        super().__init__(title, **kwargs)
        self.alarm_title = title
        self.rings = pg.ScatterPlotItem(symbol="o", size=4, pen=None, brush=pg.mkBrush(255, 48, 48, 170), pxMode=True)
        self.peaks = pg.ScatterPlotItem(symbol="o", size=24, pen=pg.mkPen("#ff3030", width=2), brush=None,
                                        pxMode=True)
        for item in (self.rings, self.peaks):
            item.setZValue(5)
            self.plot.addItem(item, ignoreBounds=True)
        self.alarms = np.zeros((0, 2), dtype=np.int32)
        self.peak_yx = np.zeros((0, 2), dtype=np.int64)

    def set_alarms(self, yx: np.ndarray, threshold: float | None) -> None:
        self.alarms = np.asarray(yx, dtype=np.int64).reshape(-1, 2)
        self.peak_yx = cluster_peaks(self.alarms)
        self._place()
        if threshold is None or not np.isfinite(threshold):
            self.title = self.alarm_title
        else:
            n = len(self.peak_yx)
            self.title = (f"{self.alarm_title}: {n} defect{'' if n == 1 else 's'} "
                          f"({len(self.alarms)} positions > {threshold:.3g})")
        self.set_title(self.title)

    def _place(self) -> None:
        sy, sx = self._scale
        for item, yx in ((self.rings, self.alarms), (self.peaks, self.peak_yx)):
            item.setData(x=(yx[:, 1] + 0.5) * sx, y=(yx[:, 0] + 0.5) * sy)

    def set_scale(self, sy: float, sx: float, unit: str) -> None:
        moved = (sy, sx) != self._scale
        super().set_scale(sy, sx, unit)
        if moved and len(self.alarms):
            self._place()

    def clear(self) -> None:
        super().clear()
        self.set_alarms(np.zeros((0, 2)), None)


def cluster_peaks(alarms: np.ndarray) -> np.ndarray:
    """(m, 2) [y, x]: the first (highest) position of each 8-connected cluster of ``alarms`` (k, 2), in order."""
    if not len(alarms):
        return np.zeros((0, 2), dtype=np.int64)
    lo = alarms.min(axis=0)
    mask = np.zeros(tuple(alarms.max(axis=0) - lo + 1), dtype=bool)
    mask[tuple((alarms - lo).T)] = True
    label = np.full(mask.shape, -1)
    for k, cluster in enumerate(clusters(mask)):
        label[tuple(cluster.T)] = k
    first = {}
    for y, x in alarms - lo:  # highest first: a cluster's first member is its peak
        first.setdefault(int(label[y, x]), (y, x))
    return np.array(list(first.values()), dtype=np.int64).reshape(-1, 2) + lo
