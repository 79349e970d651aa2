"""Results files the field's tools open: a file written by ``rrstem analyze`` and one by a real ``rrstem serve``,
read by emdfile (py4DSTEM's file layer), RosettaSciIO's EMD reader, HyperSpy and RosettaSciIO's NeXus reader
(which reads any HDF5 file and fails on an empty dataset); and ``rrstem export --binned`` read back.

Known answers: every map equals rrstem's own ``read_scan``; the axes are the scan step in nm and one binned
detector pixel in mrad that the source gave; the exported frames are the NumPy binning of the frames sent.
py4DSTEM itself (0.14 pins numpy<2, so it may not install beside rrstem) is run in-process when importable,
else in the interpreter named by ``PY4DSTEM_PYTHON`` when set, else skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from file_writers import write_emd_ncem
from processes import RRSTEM, serve
from support import Sender, disc_frames, reference
from rrstem.simulators.files import open_file
from rrstem.stream.results import read_scan

emdfile = pytest.importorskip("emdfile")
rsciio_emd = pytest.importorskip("rsciio.emd")

STEP_NM, PIXEL_MRAD, BIN = 0.5, 0.8, 2
FRAMES = disc_frames(5, 6, seed=3)  # (5, 6, 32, 32) uint16; a scan too small to score: no alarms


def scan_maps(res) -> dict[str, np.ndarray]:
    ny, nx = res["attrs"]["scan_shape"]
    return {k: v for k, v in res["maps"].items() if np.shape(v) == (ny, nx)}


def assert_emdfile_reads(path, res):
    """Each (ny, nx) map a calibrated RealSlice, the mean pattern a DiffractionSlice, in the scan's EMD root."""
    assert emdfile.utils._is_EMD_file(str(path))
    assert emdfile.utils._get_EMD_rootgroups(str(path)) == [res["scan_id"]]
    maps = scan_maps(res)
    assert {"vbf", "vadf", "com_x", "dpc_x", "dpc_y", "idpc", "ddpc", "filled", "anomaly"} <= set(maps)
    with h5py.File(path, "r") as f:
        root = f[res["scan_id"]]
        cal = emdfile.Metadata.from_h5(root["metadatabundle/calibration"])
        assert (cal["R_pixel_size"], cal["R_pixel_units"]) == (STEP_NM, "nm")
        assert (cal["Q_pixel_size"], cal["Q_pixel_units"]) == (pytest.approx(PIXEL_MRAD * BIN), "mrad")
        for name, values in maps.items():
            assert root[name].attrs["python_class"] == "RealSlice"
            arr = emdfile.Array.from_h5(root[name])
            np.testing.assert_array_equal(arr.data, values)
            assert list(arr.dim_names) == ["y", "x"] and list(arr.dim_units) == ["nm", "nm"]
            np.testing.assert_allclose(arr.dims[1][:3], [0, STEP_NM, 2 * STEP_NM])
        assert root["mean_pattern"].attrs["python_class"] == "DiffractionSlice"
        pattern = emdfile.Array.from_h5(root["mean_pattern"])
        np.testing.assert_array_equal(pattern.data, res["mean_pattern"])
        assert list(pattern.dim_units) == ["mrad", "mrad"]
        np.testing.assert_allclose(pattern.dims[0][1], PIXEL_MRAD * BIN)
        empty = []
        f.visititems(lambda name, obj: empty.append(name) if isinstance(obj, h5py.Dataset) and obj.size == 0 else None)
        assert empty == []


def assert_rosettasciio_reads(path, res):
    """RosettaSciIO's EMD reader (HyperSpy's ``reader="EMD"``) gives every map with its axes in nm, the mean
    pattern in mrad; its NeXus reader, which walks every dataset, does not fail."""
    signals = {d["metadata"]["General"]["title"]: d for d in rsciio_emd.file_reader(str(path))}
    maps = scan_maps(res)
    assert set(maps) | {"mean_pattern"} == set(signals)
    for name, values in maps.items():
        np.testing.assert_array_equal(signals[name]["data"], values)
        assert [(a["name"], a["units"]) for a in signals[name]["axes"]] == [("y", "nm"), ("x", "nm")]
        assert signals[name]["axes"][1]["scale"] == pytest.approx(STEP_NM)
    axes = signals["mean_pattern"]["axes"]
    assert [(a["name"], a["units"]) for a in axes] == [("ky", "mrad"), ("kx", "mrad")]
    assert axes[0]["scale"] == pytest.approx(PIXEL_MRAD * BIN)
    from rsciio.nexus import file_reader as nexus_reader

    assert len(nexus_reader(str(path))) > 0


def assert_export_round_trips(path, res, frames, tmp_path):
    """``rrstem export --binned`` as a DataCube and as .zspy: rrstem's file reader gives the binned frames."""
    binned = reference(frames, res["attrs"]["geometry"])["binned"]
    for fmt, out in (("py4dstem", tmp_path / "cube.emd"), ("zspy", tmp_path / "cube.zspy")):
        run = subprocess.run([*RRSTEM, "export", str(path), "--binned", "--format", fmt, "--out", str(out)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        with open_file(out) as src:
            assert src.start.calibration.scan_step_nm == pytest.approx(STEP_NM)
            assert src.start.calibration.detector_pixel_mrad == pytest.approx(PIXEL_MRAD * BIN)
            np.testing.assert_array_equal(np.asarray(src.data[:]), binned)
    return tmp_path / "cube.emd"


PY4DSTEM_SCRIPT = """
import json, sys, py4DSTEM
results, cube = sys.argv[1], sys.argv[2]
root = py4DSTEM.read(results)
out = {}
for name in sys.argv[3:]:
    node = root.tree(name)
    out[name] = [type(node).__name__, node.data.astype(float).tolist()]
cal = root.metadata["calibration"]
out["calibration"] = [cal.get_R_pixel_size(), cal.get_R_pixel_units(), cal.get_Q_pixel_size(), cal.get_Q_pixel_units()]
dc = py4DSTEM.read(cube).tree("datacube")
out["datacube"] = [type(dc).__name__, list(dc.data.shape), float(dc.data.sum()), list(dc.dim_units)]
print(json.dumps(out))
"""


def assert_py4dstem_reads(path, cube, res):
    names = ["vbf", "com_x", "idpc", "mean_pattern"]
    python = os.environ.get("PY4DSTEM_PYTHON") or sys.executable
    run = subprocess.run([python, "-c", PY4DSTEM_SCRIPT, str(path), str(cube), *names],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for name in names[:3]:
        assert got[name][0] == "RealSlice"
        np.testing.assert_array_equal(np.array(got[name][1]), res["maps"][name])
    assert got["mean_pattern"][0] == "DiffractionSlice"
    assert got["calibration"] == [STEP_NM, "nm", pytest.approx(PIXEL_MRAD * BIN), "mrad"]
    assert got["datacube"][0] == "DataCube" and got["datacube"][1] == [5, 6, 16, 16]
    assert got["datacube"][3] == ["nm", "nm", "mrad", "mrad"]


def test_analyze_results_open_in_emdfile_rosettasciio_and_export(tmp_path):
    source = write_emd_ncem(tmp_path / "scan.emd", FRAMES, step_nm=STEP_NM, pixel_mrad=PIXEL_MRAD)
    out = tmp_path / "scan.h5"
    run = subprocess.run([*RRSTEM, "analyze", str(source), "--bin", str(BIN), "--no-train", "--no-mask",
                          "--no-progress", "--save-frames", "--out", str(out)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    res = read_scan(out)
    assert res["maps"]["alarms"].shape == (0, 2)  # left out of the file as empty, given back by read_scan
    assert_emdfile_reads(out, res)
    assert_rosettasciio_reads(out, res)
    cube = assert_export_round_trips(out, res, FRAMES, tmp_path)
    if os.environ.get("PY4DSTEM_PYTHON") or _importable("py4DSTEM"):
        assert_py4dstem_reads(out, cube, res)


def test_serve_results_open_in_hyperspy_and_export(tmp_path):
    out = tmp_path / "session.h5"
    proc, frames_ep, _ = serve(tmp_path, "--out", str(out), "--no-mask", "--bin", str(BIN), "--save-frames")
    try:
        sender = Sender(frames_ep)
        sender.start("s1", (5, 6), (32, 32), calibration={"detector_pixel_mrad": PIXEL_MRAD, "scan_step_nm": STEP_NM})
        sender.frames("s1", 0, FRAMES.reshape(30, 32, 32))
        sender.end("s1", 30)
        sender.close()
        deadline = time.monotonic() + 30
        while not (out.exists() and read_scan(out)["attrs"]["end_reason"] == "end"):
            assert time.monotonic() < deadline and proc.poll() is None, "no results"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    res = read_scan(out)
    assert_emdfile_reads(out, res)
    assert_rosettasciio_reads(out, res)
    hs = pytest.importorskip("hyperspy.api")
    signals = {s.metadata.General.title: s for s in hs.load(str(out), file_format="EMD")}
    np.testing.assert_array_equal(signals["vbf"].data, res["maps"]["vbf"])
    assert [(a.name, a.units) for a in signals["com_x"].axes_manager.signal_axes] == [("x", "nm"), ("y", "nm")]
    assert_export_round_trips(out, res, FRAMES, tmp_path)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
