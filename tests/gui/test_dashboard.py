"""The dashboard against a real PUB publisher and a real REP control server."""

import time

import numpy as np
import pytest
import zmq
from pyqtgraph.Qt import QtCore

from demo_data import synthetic_snapshot
from rrstem.gui.source import SnapshotSource
from rrstem.gui.window import Dashboard
from rrstem.stream.snapshot import HISTORY_AXIS, LOSS_HISTORIES, history_key

WAIT = 5000  # ms, upper bound for every wait


def make_dashboard(qtbot, publisher, control_server, **kwargs):
    dash = Dashboard(connect=publisher.endpoint, control=control_server.endpoint, stale_after=5.0,
                     poll_ms=20, control_timeout=1.0, **kwargs)
    qtbot.addWidget(dash)
    dash.show()
    qtbot.waitExposed(dash)
    return dash


@pytest.fixture
def dashboard(qtbot, publisher, control_server):
    return make_dashboard(qtbot, publisher, control_server)


def publish_until_shown(qtbot, publisher, dash, snap):
    """Publish ``snap`` repeatedly (a new SUB joins late) until the dashboard has drawn it."""

    def shown():
        publisher.send(snap)
        return dash.snapshot is not None and dash.snapshot.header.seq == snap.header.seq

    qtbot.waitUntil(shown, timeout=WAIT)


def click_map(qtbot, dash, y, x, name="vadf"):
    """A left click on pixel (y, x) of map ``name``."""
    panel = dash.maps[name]
    # the layout settles on the next paint; wait until pixel -> scene -> pixel is consistent
    qtbot.waitUntil(lambda: panel.index_at(panel.scene_pos_of(y, x)) == (y, x), timeout=WAIT)
    view_pos = dash.maps_view.mapFromScene(panel.scene_pos_of(y, x))
    qtbot.mouseClick(dash.maps_view.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=view_pos)


def shows_frame(dash, expected) -> bool:
    img = dash.patterns["frame"].image.image
    return img is not None and np.array_equal(img, expected)


def frame_title(dash) -> str:
    return dash.patterns["frame"].plot.titleLabel.text


def test_maps_hold_exactly_the_published_data(qtbot, publisher, dashboard):
    for seq, rows in enumerate([0, 5, 17, 31, 32]):
        snap = synthetic_snapshot(ny=32, nx=40, latent_dim=3, filled_rows=rows, seq=seq, detector=24)
        publish_until_shown(qtbot, publisher, dashboard, snap)
        a = snap.arrays
        for name in ("vbf", "vadf", "com_magnitude", "rotation", "recon_error"):
            np.testing.assert_array_equal(dashboard.maps[name].image.image, a[name], err_msg=name)
        for i in range(3):
            np.testing.assert_array_equal(dashboard.maps[f"latent/{i}"].image.image, a["latent"][i])
        np.testing.assert_array_equal(dashboard.patterns["mean"].image.image, a["mean_pattern"])
        alpha = dashboard.maps["com_direction"].image.image[..., 3]
        np.testing.assert_array_equal(alpha == 0, np.isnan(a["com_angle"]))
        # positions without data are NaN in the image, so they are drawn transparent
        assert np.isnan(dashboard.maps["vbf"].image.image[rows:]).all()
        # the defect map rings exactly the alarm positions the snapshot lists, and counts them in its title
        panel = dashboard.maps["anomaly"]
        np.testing.assert_array_equal(panel.image.image, a["anomaly"])
        rings = np.column_stack(panel.rings.getData())  # (x, y) in nm: pixel centres times the scan step
        expect = np.array([[(x + 0.5) * 0.05, (y + 0.5) * 0.05] for y, x in a["alarms"]]).reshape(-1, 2)
        np.testing.assert_allclose(rings.reshape(-1, 2), expect, rtol=1e-6)
        assert len(a["alarms"]) == sum(y < rows for y, _ in ((9, 20), (21, 7)))
        assert f"({len(a['alarms'])} positions > 3)" in panel.plot.titleLabel.text
        # one ring per defect (cluster of alarm positions), on its highest position
        want = np.array([yx for yx in ((21, 7), (9, 20)) if yx[0] < rows]).reshape(-1, 2)  # higher first
        np.testing.assert_array_equal(panel.peak_yx, want)
    assert dashboard.status.progress.value() == 1000
    assert "received 1280" in dashboard.status.counters.text()
    assert "step 490" in dashboard.status.training.text()
    assert len(dashboard.loss_plot.curves["loss"].xData) == 50
    # every curve of the schema on its plot, against its own axis
    assert set(dashboard.loss_plot.curves) == set(LOSS_HISTORIES)
    assert set(dashboard.metric_plot.curves) == set(HISTORY_AXIS) - set(LOSS_HISTORIES)
    for name, axis in HISTORY_AXIS.items():
        plot = dashboard.loss_plot if name in LOSS_HISTORIES else dashboard.metric_plot
        np.testing.assert_array_equal(plot.curves[name].xData, a[history_key(axis)], err_msg=name)
        np.testing.assert_array_equal(plot.curves[name].yData, a[history_key(name)], err_msg=name)


def test_axes_in_nm_when_calibrated(qtbot, publisher, dashboard):
    snap = synthetic_snapshot(ny=20, nx=30, step_nm=0.25, detector=16)
    publish_until_shown(qtbot, publisher, dashboard, snap)
    rect = dashboard.maps["vadf"].image.mapRectToParent(dashboard.maps["vadf"].image.boundingRect())
    assert rect.width() == pytest.approx(30 * 0.25)
    assert rect.height() == pytest.approx(20 * 0.25)
    assert "nm" in dashboard.maps["vadf"].plot.getAxis("bottom").labelText


def test_stale_snapshots_are_skipped_unread(zctx):
    pub = zctx.socket(zmq.PUB)
    pub.bind("inproc://snapshots")
    source = SnapshotSource("inproc://snapshots", context=zctx)
    try:
        for _ in range(100):  # wait for the subscription to reach the publisher
            pub.send_multipart(synthetic_snapshot(ny=4, nx=4, seq=0, detector=4).encode())
            if source.poll(timeout=0.05) is not None:
                break
        skipped = source.skipped
        for seq in range(1, 4):
            pub.send_multipart(synthetic_snapshot(ny=4, nx=4, seq=seq, detector=4).encode())
        newest = source.poll(timeout=1.0)
        assert newest.header.seq == 3
        assert source.skipped - skipped == 2
        assert source.poll() is None
    finally:
        source.close()
        pub.close()


def test_click_on_a_map_shows_that_positions_frame(qtbot, publisher, control_server, dashboard, frame_for):
    snap = synthetic_snapshot(ny=24, nx=24, step_nm=0.1, detector=16)
    publish_until_shown(qtbot, publisher, dashboard, snap)
    y, x = 7, 15
    click_map(qtbot, dashboard, y, x)
    expected = frame_for(y, x)
    qtbot.waitUntil(lambda: shows_frame(dashboard, expected), timeout=WAIT)
    assert {"cmd": "frame", "index": [y, x]} in control_server.requests
    np.testing.assert_array_equal(dashboard.patterns["recon"].image.image, expected * 0.5)
    np.testing.assert_array_equal(dashboard.patterns["residual"].image.image, expected * 0.5 - 1)
    assert dashboard.selected == (y, x)
    for p in dashboard.maps.values():  # crosshair at the pixel centre, in nm, on every map
        assert p.cross_v.isVisible() and p.cross_v.value() == pytest.approx((x + 0.5) * 0.1)
        assert p.cross_h.value() == pytest.approx((y + 0.5) * 0.1)


@pytest.mark.parametrize(
    "button, cmd, shown",
    [("pause_training", "pause_training", "paused"), ("resume_training", "resume_training", "running"),
     ("reset_model", "reset_model", "reset_model: ok"), ("save", "save", "/data/results-test.h5")],
)
def test_control_button_sends_request_and_shows_reply(qtbot, control_server, dashboard, button, cmd, shown):
    qtbot.mouseClick(dashboard.controls.buttons[button], QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: shown in dashboard.controls.reply.text(), timeout=WAIT)
    assert control_server.requests == [{"cmd": cmd}]


def test_failed_command_shows_the_services_error(qtbot, control_server, dashboard):
    control_server.replies["save"] = {"ok": False, "error": "disk full"}
    qtbot.mouseClick(dashboard.controls.buttons["save"], QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "save failed: disk full" in dashboard.controls.reply.text(), timeout=WAIT)
    assert not dashboard.banner.isVisibleTo(dashboard)


def test_export_writes_png(qtbot, dashboard, tmp_path):
    dashboard.export_dir = tmp_path
    qtbot.mouseClick(dashboard.controls.buttons["export"], QtCore.Qt.MouseButton.LeftButton)
    files = list(tmp_path.glob("rrstem-*.png"))
    assert len(files) == 1 and files[0].stat().st_size > 1000
    assert str(files[0]) in dashboard.controls.reply.text()


def test_unreachable_banner_appears_and_clears(qtbot, publisher):
    dash = Dashboard(connect=publisher.endpoint, stale_after=0.4, poll_ms=20)
    qtbot.addWidget(dash)
    snap = synthetic_snapshot(ny=8, nx=8, detector=8)
    publish_until_shown(qtbot, publisher, dash, snap)
    assert not dash.banner.isVisibleTo(dash)
    qtbot.waitUntil(lambda: dash.banner.isVisibleTo(dash), timeout=WAIT)  # publisher went quiet
    assert "unreachable" in dash.banner.text()
    snap.header.seq += 1
    publish_until_shown(qtbot, publisher, dash, snap)
    assert not dash.banner.isVisibleTo(dash)


def test_service_error_banner_appears_and_clears(qtbot, publisher):
    dash = Dashboard(connect=publisher.endpoint, stale_after=5.0, poll_ms=20)
    qtbot.addWidget(dash)
    snap = synthetic_snapshot(ny=8, nx=8, detector=8, seq=1)
    snap.header.error = "trainer thread failed: RuntimeError('nan loss')"
    publish_until_shown(qtbot, publisher, dash, snap)
    assert dash.banner.isVisibleTo(dash) and "nan loss" in dash.banner.text()
    snap.header.error, snap.header.seq = None, 2
    publish_until_shown(qtbot, publisher, dash, snap)
    assert not dash.banner.isVisibleTo(dash)


def test_control_timeout_banner_clears_when_service_returns(qtbot, make_control_server, tmp_path):
    endpoint = f"ipc://{tmp_path}/control"  # nothing listens yet
    dash = Dashboard(control=endpoint, control_timeout=0.3)
    qtbot.addWidget(dash)
    dash.timer.start(20)  # no snapshot source; the timer still collects control replies
    qtbot.mouseClick(dash.controls.buttons["pause_training"], QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dash.banner.isVisibleTo(dash), timeout=WAIT)
    assert "not answering" in dash.banner.text()
    server = make_control_server(endpoint)
    qtbot.waitUntil(lambda: not dash.banner.isVisibleTo(dash), timeout=WAIT)  # the status probe got through
    assert {"cmd": "status"} in server.requests


def test_control_endpoint_from_snapshot_header(qtbot, publisher, control_server):
    dash = Dashboard(connect=publisher.endpoint, poll_ms=20)
    qtbot.addWidget(dash)
    assert not dash.controls.buttons["save"].isEnabled()
    snap = synthetic_snapshot(ny=8, nx=8, detector=8)
    snap.header.control = control_server.endpoint  # extra header field advertised by the service
    publish_until_shown(qtbot, publisher, dash, snap)
    assert dash.control_endpoint == control_server.endpoint
    assert dash.controls.buttons["save"].isEnabled()


def test_a_long_title_does_not_widen_its_map(qtbot):
    dash = Dashboard()
    qtbot.addWidget(dash)
    dash.show()
    qtbot.waitExposed(dash)
    dash.show_snapshot(synthetic_snapshot(ny=16, nx=16, detector=8))
    plots = [dash.maps[name].plot for name in ("vbf", "vadf", "com_magnitude")]
    qtbot.waitUntil(lambda: plots[0].width() > 0, timeout=WAIT)
    width = plots[0].width()
    dash.maps["vbf"].set_title("a very long title " * 12)
    assert plots[0].titleLabel.minimumWidth() == 0
    dash.map_grid.arrange()  # a plot's minimum size bounds the geometry the grid gives it
    for plot in plots:
        assert plot.width() == pytest.approx(width, abs=1)
    assert plots[0].geometry().right() <= plots[1].geometry().left()  # no overlap with its neighbour


@pytest.mark.parametrize("ny, nx, with_model", [(48, 48, True), (48, 48, False), (64, 64, True), (32, 80, True)])
def test_each_map_fills_its_panel(qtbot, ny, nx, with_model):
    """The view range of every map is its image in one dimension and barely more in the other."""
    dash = Dashboard()  # the window's normal size
    qtbot.addWidget(dash)
    dash.show()
    qtbot.waitExposed(dash)
    dash.show_snapshot(synthetic_snapshot(ny=ny, nx=nx, detector=32, with_model=with_model))
    shown = [p for p in dash.maps.values() if p.image.image is not None]
    # VBF, VADF, COM x2, defect map, iDPC, DPC direction; the model: rotation, recon error, 4 latents
    assert len(shown) == (13 if with_model else 7)
    dash.grab()  # paint once: the axes size themselves to their tick labels

    def fills():
        for panel in shown:
            vb = panel.view_box()
            (x0, x1), (y0, y1) = vb.viewRange()
            rect = panel.image.mapRectToParent(panel.image.boundingRect())
            w, h = rect.width(), rect.height()
            assert (w, h) == pytest.approx((nx * 0.05, ny * 0.05))
            tol = 0.01
            assert x0 <= rect.left() + tol * w and x1 >= rect.right() - tol * w, panel.title  # all of the image
            assert y0 <= rect.top() + tol * h and y1 >= rect.bottom() - tol * h, panel.title
            assert abs((x1 - x0) - w) <= tol * w or abs((y1 - y0) - h) <= tol * h, panel.title
            box_aspect = vb.height() / vb.width()
            assert x1 - x0 <= max(w, h / box_aspect) * (1 + tol), panel.title  # no more than the aspect needs
            assert y1 - y0 <= max(h, w * box_aspect) * (1 + tol), panel.title
            # and the view box has the image's shape, so that "what the aspect needs" is the image itself
            assert x1 - x0 <= 1.05 * w and y1 - y0 <= 1.05 * h, (panel.title, vb.viewRange(), w, h)

    qtbot.waitUntil(fills, timeout=WAIT)  # until the layout has settled; the last failure is reported


def snapshot_at(latest, seq, scan_id="synthetic"):
    snap = synthetic_snapshot(ny=8, nx=8, detector=8, seq=seq, scan_id=scan_id)
    snap.header.latest_index = latest
    return snap


def round_trip(qtbot, dash):
    """Save through the control worker and wait for the reply: requests submitted before are answered."""
    qtbot.mouseClick(dash.controls.buttons["save"], QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "saved" in dash.controls.reply.text(), timeout=WAIT)
    dash.controls.reply.setText("")


def test_frame_inspector_follows_the_newest_frame_until_a_click(qtbot, publisher, control_server, frame_for):
    dash = make_dashboard(qtbot, publisher, control_server, follow_interval=0.0)
    publish_until_shown(qtbot, publisher, dash, snapshot_at([3, 4], seq=1))
    qtbot.waitUntil(lambda: shows_frame(dash, frame_for(3, 4)), timeout=WAIT)
    assert {"cmd": "frame", "index": [3, 4]} in control_server.requests
    assert frame_title(dash) == "newest frame (3, 4)"
    assert dash.selected is None and not dash.maps["vbf"].cross_v.isVisible()

    click_map(qtbot, dash, 1, 2)
    qtbot.waitUntil(lambda: shows_frame(dash, frame_for(1, 2)), timeout=WAIT)
    assert frame_title(dash) == "frame (1, 2)"
    publish_until_shown(qtbot, publisher, dash, snapshot_at([5, 5], seq=2))
    round_trip(qtbot, dash)  # a request for [5, 5] from that snapshot would have come before the save
    assert {"cmd": "frame", "index": [5, 5]} not in control_server.requests
    assert shows_frame(dash, frame_for(1, 2)) and dash.selected == (1, 2)

    # a new scan: follow its newest frame again
    publish_until_shown(qtbot, publisher, dash, snapshot_at([2, 6], seq=3, scan_id="next"))
    qtbot.waitUntil(lambda: shows_frame(dash, frame_for(2, 6)), timeout=WAIT)
    assert frame_title(dash) == "newest frame (2, 6)" and dash.selected is None


def test_newest_frame_is_asked_for_only_when_it_changes(qtbot, publisher, control_server, frame_for):
    dash = make_dashboard(qtbot, publisher, control_server, follow_interval=0.0)
    for seq in range(1, 5):  # four snapshots, one newest frame
        publish_until_shown(qtbot, publisher, dash, snapshot_at([6, 1], seq=seq))
    qtbot.waitUntil(lambda: shows_frame(dash, frame_for(6, 1)), timeout=WAIT)
    round_trip(qtbot, dash)
    assert [r for r in control_server.requests if r["cmd"] == "frame"] == [{"cmd": "frame", "index": [6, 1]}]


def test_newest_frame_requests_are_rate_limited(qtbot, publisher, control_server, frame_for):
    interval = 0.5
    dash = make_dashboard(qtbot, publisher, control_server, follow_interval=interval)
    t0 = time.monotonic()
    for i in range(8):  # a new newest frame in every snapshot, faster than the limit
        publish_until_shown(qtbot, publisher, dash, snapshot_at([0, i], seq=i + 1))
    # the last change, held back by the limit, is asked for on a later tick
    qtbot.waitUntil(lambda: shows_frame(dash, frame_for(0, 7)), timeout=WAIT)
    elapsed = time.monotonic() - t0
    frames = [r["index"] for r in control_server.requests if r["cmd"] == "frame"]
    assert frames[-1] == [0, 7] and len(frames) == len({tuple(f) for f in frames})  # each index once
    assert len(frames) <= 1 + elapsed / interval  # a slow machine makes fewer requests, never more
    assert frame_title(dash) == "newest frame (0, 7)"


def test_one_ring_per_cluster_of_alarm_positions_on_its_highest():
    from rrstem.gui.maps import cluster_peaks

    # highest first: a blob of 5 around (10, 10) whose peak is (11, 10), a lone (3, 30), a blob of 2 at (30, 3)
    alarms = np.array([[11, 10], [3, 30], [10, 10], [10, 11], [30, 3], [9, 10], [12, 11], [31, 4]])
    np.testing.assert_array_equal(cluster_peaks(alarms), [[11, 10], [3, 30], [30, 3]])
    assert cluster_peaks(np.zeros((0, 2), np.int64)).shape == (0, 2)
