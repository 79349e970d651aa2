"""A reduction added in one new module (tests/annular_detector.py), with no other file edited, shows everywhere:
in the snapshots over real sockets, in the results file with its unit, on the dashboard's panel list, and in a
two-shard merge; its map equals a NumPy reduction of the whole array."""

import numpy as np
import pytest

from rrstem.gui.window import Dashboard
from rrstem.stream.framepass import FramePass
from rrstem.stream.preprocess import Geometry, PreprocessConfig
from rrstem.stream.reductions import Partial, ScanInfo, register, registered, unregister
from rrstem.stream.results import read_scan
from rrstem.stream.service import Service, ServiceConfig
from support import Sender, disc_frames, reference

WAIT = 10000  # ms


@pytest.fixture
def annular():
    import annular_detector  # the new module registers its reduction on import

    register(annular_detector.AnnularDetector)  # again, for a test after the first: a module is imported once
    yield annular_detector
    unregister(annular_detector.AnnularDetector)
    assert annular_detector.AnnularDetector not in registered()


def numpy_annulus(frames: np.ndarray, geometry: dict, inner: float, outer: float) -> np.ndarray:
    """(ny, nx) float64: the annulus' sum of each binned frame, straight from NumPy."""
    binned = reference(frames, geometry)["binned"]
    hb, wb = binned.shape[2:]
    ky, kx = np.mgrid[0:hb, 0:wb]
    r = np.hypot(ky - geometry["center"][0], kx - geometry["center"][1]) / geometry["radius"]
    return (binned * ((r >= inner) & (r < outer))).sum(axis=(2, 3))


def test_a_new_reduction_reaches_snapshots_results_dashboard_and_merge(annular, qtbot, tmp_path):
    name = annular.MAP.name
    frames = disc_frames(6, 7, seed=4)
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish="tcp://127.0.0.1:0",
                        control="tcp://127.0.0.1:0", out=tmp_path / "r.h5", train=False,
                        preprocess=PreprocessConfig(calibration_frames=8))
    with Service(cfg) as svc:
        dash = Dashboard(connect=svc.publish_endpoint, poll_ms=20)
        qtbot.addWidget(dash)
        assert name not in dash.maps  # the dashboard knows nothing of it before the service declares it
        sender = Sender(svc.listen_endpoint)
        sender.start("ring", (6, 7), (32, 32))
        sender.frames("ring", 0, frames.reshape(42, 32, 32))
        sender.end("ring", 42)
        qtbot.waitUntil(lambda: len(svc.results_written) == 1, timeout=WAIT)
        qtbot.waitUntil(lambda: dash.snapshot is not None and dash.snapshot.header.state == "done", timeout=WAIT)
        res = read_scan(svc.results_written[0][1])
        expected = numpy_annulus(frames, res["attrs"]["geometry"], annular.INNER, annular.OUTER)
        assert expected.min() > 0  # the annulus holds counts at every position: a real signal

        snap = dash.snapshot  # the snapshot as received over the PUB socket
        np.testing.assert_array_equal(snap.arrays[name], expected.astype(np.float32))
        declared = {m["name"]: m for m in snap.header.maps}
        assert declared[name]["unit"] == "counts" and declared[name]["description"] == annular.MAP.description

        np.testing.assert_array_equal(res["maps"][name], expected)  # integer counts: exact
        assert res["units"][name] == "counts"

        assert name in dash.maps  # a panel of its own, titled by the declaration, showing the map
        np.testing.assert_array_equal(dash.maps[name].image.image, expected.astype(np.float32))
        sender.close()
        dash.close()

    # two shards of the same scan, each reduced by the fused pass, merge into the whole scan's map
    g = Geometry.from_json(res["attrs"]["geometry"])
    flat = frames.reshape(42, 32, 32)
    halves = []
    for rows in (np.arange(0, 21), np.arange(21, 42)):
        p = Partial(ScanInfo((6, 7), g))
        store = np.zeros((42, *g.binned_shape), np.uint32)
        sums, total, _ = FramePass(g, flat.dtype, store, weights=p.weight_images())(rows, flat[rows])
        p.take(rows, sums, total)
        halves.append(Partial.from_bytes(p.to_bytes()))
    halves[0].merge(halves[1])
    np.testing.assert_array_equal(halves[0].maps()[name], expected)


def test_analyze_runs_a_reduction_module_named_on_its_command_line(tmp_path):
    """``--reductions FILE.py``, as a user adds their own map to ``rrstem analyze`` (and ``serve``): a real process."""
    import subprocess
    import sys
    from pathlib import Path

    import annular_detector

    frames = disc_frames(5, 6, seed=6)
    np.save(tmp_path / "scan.npy", frames)
    module = Path(annular_detector.__file__)
    run = subprocess.run([sys.executable, "-m", "rrstem.cli", "analyze", str(tmp_path / "scan.npy"), "--no-train",
                          "--no-progress", "--calibration-frames", "8", "--reductions", str(module),
                          "--out", str(tmp_path / "r.h5")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = read_scan(tmp_path / "r.h5")
    name = annular_detector.MAP.name
    expected = numpy_annulus(frames, res["attrs"]["geometry"], annular_detector.INNER, annular_detector.OUTER)
    np.testing.assert_array_equal(res["maps"][name], expected)
    assert res["units"][name] == "counts"
    np.testing.assert_array_equal(res["maps"]["vbf"], reference(frames, res["attrs"]["geometry"])["vbf"])
    bad = subprocess.run([sys.executable, "-m", "rrstem.cli", "analyze", str(tmp_path / "scan.npy"),
                          "--reductions", str(tmp_path / "missing.py")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such file" in bad.stderr
