"""The grid that gives each image panel the shape of its image, so that the image fills it."""

from __future__ import annotations

import pyqtgraph as pg
from pyqtgraph.Qt import QtCore


class MapGrid(pg.GraphicsWidget):
    """Places image plots in a grid of equal cells, each view box shaped like the image it shows.

    An aspect-locked view box whose shape differs from its image's pads the
    other axis with empty range: in a grid that stretches its cells to the
    window, a square 48x48 map in a tall, narrow cell used under half of its
    panel. Instead, ``arrange`` picks the number of columns that shows the
    images largest, makes every cell just big enough for an image of the
    images' aspect plus the plot's axes, title and colour bar, and centres the
    grid; what space is left over lies between the panels, not inside them.

    It arranges on every resize, when a plot is added and when the image
    aspect changes (``set_aspect``). The room a plot needs around its view box
    (``overhead``: axes, title, colour bar) is measured from the plots; the
    panels fix those sizes (``maps.LEFT_AXIS_WIDTH``, ``maps.LEGEND_WIDTH``), so the
    measurement settles after the first layout.
    """

    def __init__(self, spacing: float = 6.0):
        super().__init__()
        self.plots: list[pg.PlotItem] = []
        self.spacing = spacing
        self.aspect = 1.0  # image height / width, in the plots' data units
        self.columns = 1
        self.overhead = (0.0, 0.0)  # plot size minus view box size, the largest over the plots
        self._arranging = False

    def add(self, plot: pg.PlotItem) -> None:
        plot.setParentItem(self)
        plot.getViewBox().sigResized.connect(self._view_resized)
        self.plots.append(plot)
        self.arrange()

    def set_aspect(self, aspect: float) -> None:
        """Height / width of the images (all plots show images of one shape)."""
        if aspect > 0 and abs(aspect - self.aspect) > 1e-9 * aspect:
            self.aspect = aspect
            self.arrange()

    def resizeEvent(self, ev) -> None:
        super().resizeEvent(ev)
        self.arrange()

    def _view_resized(self, *_) -> None:
        # something around a view box changed size (a title shown, a legend added): arrange again
        if not self._arranging and not self._settled(self._measure()):
            self.arrange()

    def _settled(self, measured) -> bool:
        return all(abs(m - o) <= 0.5 for m, o in zip(measured, self.overhead))

    def _measure(self) -> tuple[float, float]:
        ox = oy = 0.0
        for plot in self.plots:
            vb = plot.getViewBox()
            if vb.width() > 0 and vb.height() > 0:
                ox = max(ox, plot.width() - vb.width())
                oy = max(oy, plot.height() - vb.height())
        return ox, oy

    def layout_for(self, width: float, height: float, n: int, overhead) -> tuple[int, float, float]:
        """(columns, cell width, cell height) that show ``n`` images largest in ``width`` x ``height``."""
        ox, oy = overhead
        best = (1, 0.0, 0.0)
        best_image = -1.0
        for cols in range(1, n + 1):
            rows = -(-n // cols)
            cell_w = (width - (cols - 1) * self.spacing) / cols
            cell_h = (height - (rows - 1) * self.spacing) / rows
            image_w = max(0.0, min(cell_w - ox, (cell_h - oy) / self.aspect))  # the image's width in pixels
            if image_w > best_image + 1e-6:
                best_image = image_w
                best = (cols, image_w + ox, image_w * self.aspect + oy)
        return best

    def arrange(self) -> None:
        n = len(self.plots)
        width, height = self.size().width(), self.size().height()
        if n == 0 or width <= 0 or height <= 0:
            return
        self._arranging = True
        try:
            for _ in range(2):  # the second pass uses the overhead the first one measured
                cols, cell_w, cell_h = self.layout_for(width, height, n, self.overhead)
                self.columns = cols
                rows = -(-n // cols)
                x0 = (width - cols * cell_w - (cols - 1) * self.spacing) / 2
                y0 = (height - rows * cell_h - (rows - 1) * self.spacing) / 2
                for i, plot in enumerate(self.plots):
                    r, c = divmod(i, cols)
                    plot.setGeometry(QtCore.QRectF(x0 + c * (cell_w + self.spacing),
                                                   y0 + r * (cell_h + self.spacing), cell_w, cell_h))
                    plot.layout.activate()
                measured = self._measure()
                if self._settled(measured):
                    break
                self.overhead = measured
        finally:
            self._arranging = False
