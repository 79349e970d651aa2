"""The DPC panels: iDPC and the field's direction, drawn from a snapshot, with the calibration in their titles."""

import numpy as np
from pyqtgraph.Qt import QtGui

from demo_data import DPC_ATTRS, synthetic_snapshot
from rrstem.gui.dpc import DPC_DIRECTION, calibration_text
from rrstem.gui.window import Dashboard


def test_calibration_in_words():
    assert calibration_text(DPC_ATTRS) == "found 36.96±0.07°, flip"
    assert calibration_text({}) == "no calibration yet"
    assert calibration_text({"dpc_rotation_deg": 12.0, "dpc_flip": False,
                             "dpc_calibration": {"source": "given"}}) == "given 12.00°"
    carried = {"dpc_rotation_deg": 350.5, "dpc_flip": False, "dpc_calibration": {
        "source": "found", "uncertainty_deg": float("nan"), "carried_over": True, "settled": True}}
    assert calibration_text(carried) == "found 350.50°, earlier scan's"
    settling = {"dpc_rotation_deg": 3.0, "dpc_calibration": {"source": "found", "uncertainty_deg": 2.5}}
    assert calibration_text(settling) == "found 3.00±2.50°, settling"


def test_idpc_and_direction_panels_show_the_snapshot_and_its_calibration(qtbot, tmp_path):
    dash = Dashboard()
    qtbot.addWidget(dash)
    dash.resize(1800, 1050)
    dash.show()
    qtbot.waitExposed(dash)
    snap = synthetic_snapshot(ny=40, nx=40, filled_rows=30, detector=32, with_model=False)
    dash.show_snapshot(snap)
    a = snap.arrays
    idpc = dash.maps["idpc"]
    np.testing.assert_array_equal(idpc.image.image, a["idpc"])
    assert idpc.plot.titleLabel.text == "iDPC (mrad*nm), found 36.96±0.07°, flip"
    direction = dash.maps[DPC_DIRECTION]
    assert direction.plot.titleLabel.text == "DPC direction, found 36.96±0.07°, flip"
    rgba = direction.image.image
    np.testing.assert_array_equal(rgba[..., 3] == 0, np.isnan(a["dpc_x"]))  # no data: transparent
    # hue is the direction: where the field points along +x (dpc_y ~ 0, dpc_x > 0) the colour is red
    angle = np.arctan2(a["dpc_y"], a["dpc_x"])
    strong = np.hypot(a["dpc_x"], a["dpc_y"]) > np.nanpercentile(np.hypot(a["dpc_x"], a["dpc_y"]), 80)
    red = strong & (np.abs(angle) < 0.2)
    assert red.any() and (rgba[red][:, 0] > rgba[red][:, 1]).all() and (rgba[red][:, 0] > rgba[red][:, 2]).all()
    qtbot.wait(300)  # the new panel takes its place in the grid on the next layout pass
    path = dash.export_png(tmp_path / "dpc.png")
    image = QtGui.QImage(str(path))
    assert image.width() > 1000 and len({image.pixel(x, y) for x in range(0, image.width(), 15)
                                         for y in range(0, image.height(), 15)}) > 50
