"""Subscan outlines on the maps: where rescans of the shown scan were asked for (docs/steering.md).

The snapshot header lists the rescan requests on the current scan
(``rescans``: region, subscan id, state). ``SubscanOverlay.update`` draws each
region's outline on every map panel, in the panels' units, dashed while it
waits for the bridge and solid once it is acquired; a refused or timed-out
request is drawn dotted. Nothing is computed here but the rectangle corners.
"""

from __future__ import annotations

import pyqtgraph as pg
from pyqtgraph.Qt import QtCore

STYLES = {"sent": QtCore.Qt.PenStyle.DashLine, "accepted": QtCore.Qt.PenStyle.DashLine,
          "acquiring": QtCore.Qt.PenStyle.SolidLine, "done": QtCore.Qt.PenStyle.SolidLine,
          "refused": QtCore.Qt.PenStyle.DotLine, "timed_out": QtCore.Qt.PenStyle.DotLine}


class SubscanOverlay:
    def __init__(self, colour: str = "#ff4fd8"):
        self.colour = colour
        self._items: dict[int, list[pg.PlotCurveItem]] = {}  # panel id -> its outlines
        self.drawn: list[tuple[int, int, int, int]] = []  # regions drawn last (y0, y1, x0, x1), for tests

    def update(self, panels, rescans: list[dict], scale: tuple[float, float]) -> None:
        """Outline every region of ``rescans`` on every panel; ``scale`` = (sy, sx) of one position."""
        sy, sx = scale
        self.drawn = [tuple(r["region"]) for r in rescans]
        for panel in panels:
            items = self._items.setdefault(id(panel), [])
            while len(items) < len(rescans):
                item = pg.PlotCurveItem()
                panel.plot.addItem(item, ignoreBounds=True)
                items.append(item)
            for item, req in zip(items, rescans):
                y0, y1, x0, x1 = req["region"]
                xs = [x0 * sx, x1 * sx, x1 * sx, x0 * sx, x0 * sx]
                ys = [y0 * sy, y0 * sy, y1 * sy, y1 * sy, y0 * sy]
                item.setData(xs, ys)
                item.setPen(pg.mkPen(self.colour, width=2, style=STYLES.get(req.get("state"), STYLES["sent"])))
                item.setVisible(True)
            for item in items[len(rescans):]:
                item.setVisible(False)
