"""DPC in the live service: ``rrstem serve`` fed frames whose COM field is known exactly.

Known answer. The specimen's field in the scan's frame is ``g = grad V``, V a sum of Gaussians (so it
points towards the "atoms", the sign convention of docs/dpc.md). The detector sees it turned and
mirrored: ``d = F R(-angle) g`` (the inverse of ``scan = R(angle) F detector``), plus a descan plane.
Each frame is a flat disc tilted by ``1 + ux (col - c) + uy (row - c)``, whose COM moves from the
disc's centre by exactly ``(ux, uy) * S / N`` (``S = sum (col - c)**2`` over the disc, ``N`` its
pixels), so ``(ux, uy)`` is chosen to give ``d`` exactly. The service must find the angle and the flip,
and its ``dpc_x``/``dpc_y`` must be ``g`` in mrad, less the plane a descan fit takes away (fitting a
plane commutes with turning the field, so that plane is the one fitted to ``g``: computed here by
``numpy.linalg.lstsq``, independently of ``stream/dpc``).
"""

from __future__ import annotations

import json
import time

import h5py
import numpy as np
import pytest

from dpc_field import ANGLE, DET, FLIP, RADIUS, SCAN, field, to_detector
from processes import serve
from support import Sender
from rrstem.stream.results import read_scan

PIXEL_MRAD, STEP_NM = 0.5, 0.1
CAL = {"detector_pixel_mrad": PIXEL_MRAD, "scan_step_nm": STEP_NM}


def frames(dx, dy):
    """(n, DET, DET) float32 frames whose COM is the disc's centre plus (dx, dy) px, exactly."""
    c = DET // 2
    row, col = np.mgrid[:DET, :DET] - c
    disc = (np.hypot(row, col) <= RADIUS).astype(float)
    per_unit = (col**2 * disc).sum() / disc.sum()  # COM shift per unit of tilt
    ux, uy = dx.reshape(-1, 1, 1) / per_unit, dy.reshape(-1, 1, 1) / per_unit
    return (1000.0 * disc * (1 + ux * col + uy * row)).astype(np.float32)


def less_plane(f):
    """``f`` less its least-squares plane (NumPy, not stream/dpc)."""
    y, x = np.mgrid[:f.shape[0], :f.shape[1]]
    a = np.column_stack([np.ones(f.size), x.ravel(), y.ravel()])
    coef, *_ = np.linalg.lstsq(a, f.ravel(), rcond=None)
    return f - (a @ coef).reshape(f.shape)


def pearson(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def read_scans(path) -> list[str]:
    with h5py.File(path, "r") as f:
        return list(f["scans"])


def run(tmp_path, scans, *options, name="out.h5"):
    """``rrstem serve`` with ``options``, fed ``scans`` [(scan id, (dx, dy))] in turn; the results file."""
    out = tmp_path / name
    proc, frames_ep, _ = serve(tmp_path, "--out", str(out), "--no-mask", *options)
    try:
        sender = Sender(frames_ep)
        for scan_id, (dx, dy) in scans:
            sender.start(scan_id, dx.shape, (DET, DET), dtype="float32", calibration=CAL)
            sender.frames(scan_id, 0, frames(dx, dy))
            sender.end(scan_id, dx.size)
        sender.close()
        deadline = time.monotonic() + 20
        while not (out.exists() and all(s in read_scans(out) for s, _ in scans)):
            assert time.monotonic() < deadline and proc.poll() is None, "no results"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    return out


def assert_true_field(res, gx, gy):
    """dpc_x/dpc_y are the true field in mrad, less its plane."""
    m = res["maps"]
    ex, ey = less_plane(gx) * PIXEL_MRAD, less_plane(gy) * PIXEL_MRAD
    assert pearson(m["dpc_x"], ex) > 0.999 and pearson(m["dpc_y"], ey) > 0.999
    np.testing.assert_allclose(m["dpc_x"], ex, atol=2e-3 * np.abs(ex).max())
    np.testing.assert_allclose(m["dpc_y"], ey, atol=2e-3 * np.abs(ey).max())
    assert res["units"]["dpc_x"] == "mrad" and res["units"]["idpc"] == "mrad*nm"
    assert res["units"]["ddpc"] == "mrad/nm"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One service, two scans: the specimen (calibration found), then two rows only (too few to find one)."""
    tmp = tmp_path_factory.mktemp("dpc")
    gx, gy = field()
    first = to_detector(gx, gy)
    short = tuple(d[:2] for d in to_detector(*field(seed=9)))
    return tmp, gx, gy, run(tmp, [("found", first), ("short", short)])


def test_the_calibration_is_found_and_the_field_turned_back(session):
    _, gx, gy, out = session
    res = read_scan(out, "found")
    a = res["map_attrs"]
    assert abs((a["dpc_rotation_deg"] - ANGLE + 180) % 360 - 180) < 1.0
    assert bool(a["dpc_flip"]) is FLIP
    cal = a["dpc_calibration"]
    assert cal["source"] == "found" and cal["settled"] and not cal["carried_over"]
    assert cal["uncertainty_deg"] < 1.0 and cal["positions"] == (SCAN - 2) ** 2
    assert a["dpc_descan"] == "plane"
    assert_true_field(res, gx, gy)
    # ddpc is the divergence of the maps written, per nm (central differences, NumPy)
    m = res["maps"]
    div = ((m["dpc_x"][1:-1, 2:] - m["dpc_x"][1:-1, :-2]) + (m["dpc_y"][2:, 1:-1] - m["dpc_y"][:-2, 1:-1])) / 2
    np.testing.assert_allclose(m["ddpc"][1:-1, 1:-1], div / STEP_NM, rtol=1e-9, atol=1e-12)
    with h5py.File(out, "r") as f:  # as written: JSON text, and the numbers as numbers
        attrs = f["scans/found/maps"].attrs
        assert json.loads(attrs["dpc_calibration"])["source"] == "found"
        assert isinstance(attrs["dpc_rotation_deg"], float | np.floating)


def test_the_next_scan_starts_from_the_settled_calibration(session):
    _, _, _, out = session
    first, short = read_scan(out, "found")["map_attrs"], read_scan(out, "short")["map_attrs"]
    assert short["dpc_rotation_deg"] == first["dpc_rotation_deg"] and short["dpc_flip"] == first["dpc_flip"]
    assert short["dpc_calibration"]["source"] == "found" and short["dpc_calibration"]["carried_over"]


def test_a_given_calibration_is_used_as_given(tmp_path):
    gx, gy = field()
    out = run(tmp_path, [("given", to_detector(gx, gy))], "--scan-rotation", str(ANGLE), "--flip")
    res = read_scan(out)
    a = res["map_attrs"]
    assert (a["dpc_rotation_deg"], bool(a["dpc_flip"]), a["dpc_calibration"]) == (ANGLE, True, {"source": "given"})
    assert_true_field(res, gx, gy)


def test_a_calibration_is_loaded_from_earlier_results(session, tmp_path):
    earlier, gx, gy, found = session
    gx2, gy2 = field(seed=11)  # another specimen, same detector
    out = run(tmp_path, [("loaded", to_detector(gx2, gy2))], "--dpc-calibration", f"{found}:found")
    res = read_scan(out)
    a, first = res["map_attrs"], read_scan(found, "found")["map_attrs"]
    assert a["dpc_rotation_deg"] == first["dpc_rotation_deg"] % 360 and bool(a["dpc_flip"]) is FLIP
    cal = a["dpc_calibration"]
    assert cal["source"] == "loaded" and cal["file"] == f"{found}:found" and cal["loaded_source"] == "found"
    assert_true_field(res, gx2, gy2)
