"""Display transforms, offscreen rendering and the command-line entry point."""

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from pyqtgraph.Qt import QtGui

from rrstem.gui import add_dashboard_args, render_png
from demo_data import synthetic_frame_reply, synthetic_snapshot
from rrstem.gui.maps import StableLevels, direction_rgba, wrap_angle
from rrstem.stream.control import pack_array


def test_stable_levels_ignore_small_changes_and_follow_large_ones():
    rng = np.random.default_rng(0)
    levels = StableLevels(percentiles=(1, 99), tolerance=0.1)
    data = rng.uniform(0, 100, (64, 64))
    lo, hi = levels.update(data)
    assert lo == pytest.approx(np.percentile(data, 1), rel=0.05)
    assert hi == pytest.approx(np.percentile(data, 99), rel=0.05)
    assert levels.update(data * 1.02) == (lo, hi)  # 2 % drift: unchanged
    new = levels.update(data * 2)
    assert new[1] == pytest.approx(2 * hi, rel=0.05)


def test_stable_levels_skip_nan_and_auto_follows_min_max():
    data = np.full((8, 8), np.nan)
    levels = StableLevels()
    assert levels.update(data) is None  # nothing to show yet
    data[:2] = np.arange(16).reshape(2, 8)
    levels.auto = True
    assert levels.update(data) == (0.0, 15.0)


def test_direction_colours_are_a_hsv_wheel():
    angle = np.array([[0.0, 2 * np.pi / 3, -2 * np.pi / 3, np.nan]])
    mag = np.array([[1.0, 1.0, 0.5, 1.0]])
    rgba = direction_rgba(angle, mag, vmax=1.0)
    np.testing.assert_array_equal(rgba[0, 0], [255, 0, 0, 255])  # 0 rad: red
    np.testing.assert_array_equal(rgba[0, 1], [0, 255, 0, 255])  # 120 deg: green
    np.testing.assert_array_equal(rgba[0, 2], [0, 0, 127, 255])  # 240 deg at half magnitude: dark blue
    assert rgba[0, 3, 3] == 0  # no data: transparent


def test_wrap_angle_keeps_in_range_data_unchanged():
    inside = np.array([-3.0, 0.0, 3.0, np.nan], np.float32)
    assert wrap_angle(inside) is inside
    np.testing.assert_allclose(wrap_angle(np.array([3 * np.pi / 2])), [-np.pi / 2])


def test_colour_bar_ticks_stay_distinct_on_a_narrow_range(qapp):
    from rrstem.gui.maps import CompactAxis, ImagePanel, compact_tick_strings

    labels = compact_tick_strings([2915000.0, 2920000.0, 2925000.0], 1.0, 5000.0)
    assert labels == ["2.915e+06", "2.92e+06", "2.925e+06"]
    panel = ImagePanel("counts")
    axis = panel.bar.axis  # the axis the colour bar draws is the compact one
    assert isinstance(axis, CompactAxis) and panel.bar.getAxis("right") is axis
    assert axis.tickStrings([2915000.0, 2920000.0, 2925000.0], 1.0, 5000.0) == labels
    assert axis.fixedWidth == 60 and axis.style["showValues"]  # the colour bar styled it as its value axis


def test_render_png_from_snapshot_and_frame(qapp, tmp_path):
    snap = synthetic_snapshot(ny=40, nx=40, filled_rows=30, detector=32)
    reply = synthetic_frame_reply(10, 20, detector=32)
    reply = {k: pack_array(v) if isinstance(v, np.ndarray) else v for k, v in reply.items()}
    path = render_png(snap, tmp_path / "dash.png", frame_reply=reply, index=(10, 20), size=(1200, 800))
    image = QtGui.QImage(str(path))
    assert (image.width(), image.height()) == (1200, 800)
    colours = {image.pixel(x, y) for x in range(0, 1200, 15) for y in range(0, 800, 15)}
    assert len(colours) > 50  # maps, bars and curves drawn, not a blank window


def test_render_png_needs_index_with_frame(qapp, tmp_path):
    with pytest.raises(ValueError, match="index"):
        render_png(synthetic_snapshot(ny=8, nx=8, detector=8), tmp_path / "x.png", frame_reply={"frame": 1})


def test_dashboard_subcommand_is_registered():
    parser = argparse.ArgumentParser(prog="rrstem")
    add_dashboard_args(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", "--connect", "tcp://127.0.0.1:5555", "--exit-after", "2"])
    assert (args.command, args.connect, args.exit_after, args.control) == ("dashboard", "tcp://127.0.0.1:5555", 2.0, None)
    from rrstem.gui.app import run

    assert args.func is run


def test_exit_after_exits_by_itself(publisher, tmp_path):
    """The real entry point, fed live snapshots, exits cleanly after --exit-after seconds."""
    shot = tmp_path / "exit.png"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    cmd = [sys.executable, "-m", "rrstem.gui", "--connect", publisher.endpoint, "--exit-after", "1.5",
           "--screenshot", str(shot)]
    snap = synthetic_snapshot(ny=32, nx=32, detector=16)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while time.monotonic() - t0 < 60:
            snap.header.seq += 1
            publisher.send(snap)
            try:
                proc.wait(timeout=0.1)  # the publisher's 10 Hz pace; returns as soon as the dashboard exits
                break
            except subprocess.TimeoutExpired:
                continue
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 >= 1.5
    drawn = int(re.search(r"(\d+) snapshots drawn", err).group(1))
    assert drawn >= 1
    assert shot.stat().st_size > 1000


def test_each_history_is_drawn_against_its_named_axis(qapp):
    from rrstem.gui.panels import HistoryPlot

    plot = HistoryPlot("t", "y")
    step = np.arange(10.0) * 7
    eval_step = np.array([20.0, 41.0, 62.0])
    # the metric has the step axis's length by chance: it must still take eval_step, by name
    plot.set_histories({"loss": np.linspace(5, 1, 10), "rotation_r": np.array([0.1, 0.5, 0.8])},
                       {"step": step, "eval_step": eval_step, "time": np.arange(10.0) * 0.5})
    np.testing.assert_array_equal(plot.curves["loss"].xData, step)
    np.testing.assert_array_equal(plot.curves["rotation_r"].xData, eval_step)


def test_history_without_its_axis_falls_back_to_an_index(qapp):
    from rrstem.gui.panels import HistoryPlot

    plot = HistoryPlot("t", "y")
    plot.set_histories({"heldout_elbo": np.array([3.0, 2.0, 1.5]), "loss": np.ones(4), "new_metric": np.ones(2)},
                       {"step": np.arange(5.0) * 10})  # eval_step missing, step of another length
    np.testing.assert_array_equal(plot.curves["heldout_elbo"].xData, [0, 1, 2])
    np.testing.assert_array_equal(plot.curves["loss"].xData, [0, 1, 2, 3])
    np.testing.assert_array_equal(plot.curves["new_metric"].xData, [0, 1])
    plot.set_histories({"loss": np.ones(5)}, {"step": np.arange(5.0) * 10})  # the axis caught up
    np.testing.assert_array_equal(plot.curves["loss"].xData, np.arange(5.0) * 10)


def test_loss_histories_by_schema_and_unknown_names_by_wording():
    from rrstem.gui.panels import is_loss_history
    from rrstem.stream.snapshot import HISTORIES, HISTORY_AXES, LOSS_HISTORIES

    curves = [h for h in HISTORIES if h not in HISTORY_AXES]
    assert [h for h in curves if is_loss_history(h)] == list(LOSS_HISTORIES)
    assert not is_loss_history("rotation_r") and not is_loss_history("latent_r_max")
    assert is_loss_history("heldout_kl_v2")  # a name the schema does not know yet, that reads like a loss
    assert not is_loss_history("corr_rotation_com_angle")


def test_synthetic_snapshots_use_only_the_schemas_names():
    from rrstem.stream.snapshot import COUNTERS, HISTORIES, HISTORY_AXIS, Arrays, Snapshot, history_key

    snap = Snapshot.decode(synthetic_snapshot(ny=6, nx=5, filled_rows=4, detector=8).encode())
    maps = {Arrays.FILLED, Arrays.MEAN_PATTERN, *Arrays.SCAN_MAPS, *Arrays.DEFECT_MAPS, *Arrays.MODEL_OUTPUTS}
    assert set(snap.arrays) == maps | {history_key(h) for h in HISTORIES}
    for curve, axis in HISTORY_AXIS.items():  # each curve as long as its axis
        assert len(snap.arrays[history_key(curve)]) == len(snap.arrays[history_key(axis)]) > 0, curve
    assert list(snap.header.counters) == list(COUNTERS)
    assert snap.header.latest_index == [3, 4]  # last position of the last filled row
