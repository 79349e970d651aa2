"""The dashboard outlines the rescan regions a snapshot lists, on every map, in the maps' units."""

import numpy as np

from demo_data import synthetic_snapshot
from test_dashboard import dashboard, publish_until_shown  # noqa: F401 (the fixture)
from rrstem.gui.overlay import STYLES


def test_rescan_regions_are_outlined_on_the_maps(qtbot, publisher, dashboard):
    snap = synthetic_snapshot(seq=1, step_nm=0.05)
    snap.header.rescans = [{"request_id": "a", "scan_id": "synthetic-sub1", "region": [10, 20, 30, 44],
                            "state": "acquiring"},
                           {"request_id": "b", "scan_id": "synthetic-sub2", "region": [0, 4, 0, 4],
                            "state": "timed_out"}]
    publish_until_shown(qtbot, publisher, dashboard, snap)
    assert dashboard.overlay.drawn == [(10, 20, 30, 44), (0, 4, 0, 4)]
    for panel in dashboard.maps.values():
        first, second = dashboard.overlay._items[id(panel)][:2]
        xs, ys = first.getData()
        np.testing.assert_allclose(xs, np.array([30, 44, 44, 30, 30]) * 0.05)  # nm, as the axes
        np.testing.assert_allclose(ys, np.array([10, 10, 20, 20, 10]) * 0.05)
        assert first.opts["pen"].style() == STYLES["acquiring"] and second.opts["pen"].style() == STYLES["timed_out"]
    later = synthetic_snapshot(seq=2, step_nm=0.05)  # a snapshot without requests: the outlines go
    publish_until_shown(qtbot, publisher, dashboard, later)
    assert all(not item.isVisible() for items in dashboard.overlay._items.values() for item in items)
