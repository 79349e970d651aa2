"""The live calibration's rules (stream/dpc/live.py) and the options' files (stream/dpc/files.py), without a service.

The field is the exact one of test_dpc_live.py (grad of Gaussians, turned by 37 degrees and mirrored), given
here as COM maps directly, filled row by row as a scan fills.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from dpc_field import ANGLE, FLIP, field, to_detector
from rrstem.stream.dpc import dpc_maps, remove_descan
from rrstem.stream.dpc.live import RECALIBRATE_EVERY, DPCSession, LiveCalibration
from rrstem.stream.preprocess import Geometry
from rrstem.stream.reductions import Partial, ScanInfo
from rrstem.stream.reductions.dpc import DifferentialPhaseContrast


def rows(dx, dy, n):
    """The descan-free field with only its first ``n`` rows known."""
    fx, fy = (np.where(np.arange(dx.shape[0])[:, None] < n, d, np.nan) for d in (dx, dy))
    return remove_descan(fx, fy, 1)


def turn(a, b):
    return abs((a - b + 180) % 360 - 180)


def test_found_settles_on_agreement_and_carries_to_the_next_scan():
    dx, dy = to_detector(*field())
    ny, nx = dx.shape
    session = DPCSession()
    live = LiveCalibration(session, dx.size)
    assert live.choose(*rows(dx, dy, 2), 2 * nx) is None  # two rows: no stencil yet, nothing carried
    first = live.choose(*rows(dx, dy, 8), 8 * nx)
    assert first.source == "found" and first.record["filled"] == 8 * nx and not first.record["settled"]
    assert session.carried() is None
    # not due: fewer than RECALIBRATE_EVERY of the scan more, so the same estimate comes back
    assert live.choose(*rows(dx, dy, 9), 9 * nx) == first and nx < RECALIBRATE_EVERY * dx.size
    settled = live.choose(*rows(dx, dy, 16), 16 * nx)
    assert settled.record["settled"] and session.carried() == settled
    assert turn(settled.angle_deg, ANGLE) < 1.0 and settled.flip is FLIP
    # the next scan: two rows of another specimen find nothing; the settled calibration is its starting value
    ox, oy = to_detector(*field(seed=3))
    nxt = LiveCalibration(session, ox.size).choose(*rows(ox, oy, 2), 2 * nx)
    assert (nxt.angle_deg, nxt.flip, nxt.record["carried_over"]) == (settled.angle_deg, FLIP, True)
    assert nxt.attrs()["dpc_calibration"]["source"] == "found"


def test_a_given_calibration_is_never_replaced():
    dx, dy = to_detector(*field())
    session = DPCSession.open(rotation_deg=-10.0, flip=False)
    choice = LiveCalibration(session, dx.size).choose(*rows(dx, dy, 32), dx.size)
    assert choice.attrs() == {"dpc_rotation_deg": 350.0, "dpc_flip": False, "dpc_calibration": {"source": "given"}}


def write_results(path, angle, flip, com=None):
    """A results file in the layout of docs/results.md, written here with h5py."""
    with h5py.File(path, "w") as f:
        m = f.create_group("scans/s1/maps")
        m.attrs.update(dpc_rotation_deg=angle, dpc_flip=flip,
                       dpc_calibration=json.dumps({"source": "found", "uncertainty_deg": 0.2}))
        for name, arr in (com or {}).items():
            m.create_dataset(name, data=arr).attrs["unit"] = "mrad"


def test_calibration_files_results_and_json(tmp_path):
    write_results(tmp_path / "r.h5", 123.5, True)
    s = DPCSession.open(calibration_file=str(tmp_path / "r.h5"))
    assert s.fixed.attrs() == {"dpc_rotation_deg": 123.5, "dpc_flip": True, "dpc_calibration": {
        "source": "loaded", "file": str(tmp_path / "r.h5"), "uncertainty_deg": 0.2, "loaded_source": "found"}}
    (tmp_path / "c.json").write_text('{"rotation_deg": -90, "flip": false}')
    assert DPCSession.open(calibration_file=str(tmp_path / "c.json")).fixed.angle_deg == 270.0
    (tmp_path / "bad.json").write_text('{"angle": 3}')
    with pytest.raises(ValueError, match="needs a number rotation_deg"):
        DPCSession.open(calibration_file=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="no scan 'nope'"):
        DPCSession.open(calibration_file=f"{tmp_path / 'r.h5'}:nope")
    with pytest.raises(ValueError, match="not both"):
        DPCSession.open(rotation_deg=3.0, calibration_file=str(tmp_path / "r.h5"))


def test_a_reference_on_another_grid_falls_back_to_a_plane(tmp_path):
    ref = {"com_x": np.ones((4, 5)), "com_y": np.zeros((4, 5))}
    write_results(tmp_path / "vac.h5", 0.0, False, ref)
    session = DPCSession.open(descan_reference=str(tmp_path / "vac.h5"))
    assert session.descan_order is None and session.descan_text() == f"reference {tmp_path / 'vac.h5'}:s1"
    g = Geometry((16, 16), 1, (0, 16, 0, 16), (8.0, 8.0), 5.0, 6.0, 8.0)
    same = DifferentialPhaseContrast(ScanInfo((4, 5), g, 0.5, session={"dpc": session}))
    assert same.descan_order is None and same.reference[0] is session.reference[0]
    other = DifferentialPhaseContrast(ScanInfo((6, 5), g, 0.5, session={"dpc": session}))
    assert other.reference is None and other.descan_order == 1
    assert other.descan.startswith("plane (reference") and "4x5 in mrad, this scan 6x5 in mrad" in other.descan


def test_an_unchanged_scan_is_not_derived_again():
    """The maps of a scan whose filled positions did not change are the last ones, shared and read-only; a new
    row derives them again, equal to dpc_maps on the COM maps of the positions so far."""
    dx, dy = to_detector(*field())
    ny, nx = dx.shape
    session = DPCSession()
    geometry = Geometry((16, 16), 1, (0, 16, 0, 16), (8.0, 8.0), 5.0, 6.0, 8.0)
    info = ScanInfo((ny, nx), geometry, session={"dpc": session})
    partial = Partial(info, (DifferentialPhaseContrast,))
    sums = np.zeros((ny * nx, len(partial.columns)))
    sums[:, partial.columns["intensity"]] = 1000.0
    sums[:, partial.columns["moment_x"]] = 1000.0 * (8 + dx.ravel())
    sums[:, partial.columns["moment_y"]] = 1000.0 * (8 + dy.ravel())

    def fill(n_rows):
        idx = np.arange(n_rows * nx)
        partial.take(idx, sums[idx], np.zeros((16, 16)))
        return partial.maps()

    first = fill(12)
    again = partial.maps()
    assert all(again[k] is first[k] and not first[k].flags.writeable for k in first)
    later = fill(20)
    assert later["idpc"] is not first["idpc"] and np.isfinite(later["idpc"][:20]).all()
    known = np.arange(ny)[:, None] < 20
    com_x, com_y = (np.where(known, d - d[:20].mean(), np.nan) for d in (dx, dy))  # relative to the mean pattern
    choice = partial.reductions[0].live.choose(*remove_descan(com_x, com_y, 1), 20 * nx)
    expected = dpc_maps(com_x, com_y, choice.angle_deg, choice.flip)
    np.testing.assert_allclose(later["idpc"], expected.idpc, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(later["dpc_x"], expected.dpc_x, atol=1e-12, equal_nan=True)
