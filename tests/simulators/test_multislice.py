"""The multislice generator (abTEM): ground truth, calibration, dose scaling, axes, and replay of its files.

One small Si-substituted graphene scan (5x5 positions, a 17 A supercell, 64 px
detector, ~10 s) is computed once for the module. abTEM is the optional extra
``rrstem[multislice]`` (also in ``[test]``); without it the physics tests skip
and only the checks that need no abTEM run.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from rrstem.simulators import multislice as ms
from rrstem.simulators.files import open_file
from rrstem.simulators.optics import wavelength_angstrom

SPEC = ms.ScanSpec("tiny-si", "graphene", (5, 5), defect="substitution", element="Si", cells=(7, 4), gpts=192,
                   detector=64)
DOSE = 1e5


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    pytest.importorskip("abtem", reason="abTEM is the optional extra rrstem[multislice]; pip install abtem")
    out = tmp_path_factory.mktemp("multislice")
    [truth] = ms.generate([SPEC], out, doses=(None, DOSE), seed=3, log=lambda *_: None)
    return out, truth


def test_ground_truth_places_the_defect_at_the_scan_centre(generated):
    out, truth = generated
    assert json.loads((out / "tiny-si.json").read_text()) == truth
    [defect] = truth["defects"]
    assert defect["kind"] == "substitution" and defect["element"] == "Si" and defect["site_species"] == "C"
    assert defect["position_pixels"] == pytest.approx([2.0, 2.0], abs=1e-4)  # centred: ny // 2, nx // 2
    assert defect["position_angstrom"] == pytest.approx([2 * ms.STEP_A, 2 * ms.STEP_A], abs=1e-4)
    atoms = np.asarray(truth["atoms_pixels"])
    species = np.asarray(truth["atom_species"])
    at_defect = np.hypot(*(atoms - [2.0, 2.0]).T) < 1e-3
    assert species[at_defect].tolist() == ["Si"]
    # its nearest neighbours are C at the graphene bond length a / sqrt(3) (the cell is strained by < 1 %)
    bond = np.sort(np.hypot(*(atoms[~at_defect] - [2.0, 2.0]).T))[0] * truth["scan_step_angstrom"]
    assert bond == pytest.approx(2.46 / math.sqrt(3), rel=0.01)


def test_files_replay_with_the_calibration(generated):
    out, truth = generated
    assert set(truth["files"]) == {"none", "1e5", "1e6-rescan"}
    pixel = wavelength_angstrom(60.0) / truth["supercell_angstrom"] * 1e3  # far-field sampling: lambda / extent
    for tag, dtype in (("none", "float32"), ("1e5", "uint16"), ("1e6-rescan", "uint16")):
        with open_file(out / truth["files"][tag]) as src:
            assert src.start.scan_shape == (5, 5) and src.start.frame_shape == (64, 64)
            assert src.start.dtype == dtype
            cal = src.start.calibration
            assert (cal.energy_kev, cal.convergence_mrad) == (60.0, 31.0)
            assert cal.scan_step_nm == pytest.approx(ms.STEP_A / 10)
            assert cal.detector_pixel_mrad == pytest.approx(pixel, rel=1e-6)
            assert src.chunk(0, 25).shape == (25, 64, 64)


def test_dose_scaling_and_noise(generated):
    out, truth = generated
    with open_file(out / truth["files"]["none"]) as src:
        clean = src.array().astype(np.float64)
    with open_file(out / truth["files"]["1e5"]) as src:
        noisy = src.array().astype(np.float64)
    frac = truth["detector_fraction"]
    assert 0.98 < frac <= 1.0  # a little of the beam scatters beyond the detector's +-91 mrad
    # noise-free: expected counts at the reference dose; Poisson: counts at DOSE, mean per pattern = DOSE * fraction
    assert clean.sum(axis=(2, 3)).mean() == pytest.approx(ms.REFERENCE_DOSE * frac, rel=1e-4)
    assert noisy.sum(axis=(2, 3)).mean() == pytest.approx(DOSE * frac, rel=0.005)  # 25 patterns: std 0.06 %
    assert np.array_equal(noisy, np.rint(noisy))
    resid = noisy - clean * (DOSE / ms.REFERENCE_DOSE)
    lam = clean * (DOSE / ms.REFERENCE_DOSE)
    bright = lam > 20
    assert np.var(resid[bright] / np.sqrt(lam[bright])) == pytest.approx(1.0, abs=0.05)  # Poisson: variance = mean


def test_com_points_toward_the_atom_on_the_scan_axes(generated):
    """rrstem's convention: (scan_y, scan_x, det_y, det_x), detector axes parallel to the scan axes, the COM toward
    the nearest column. A probe left of the Si deflects toward +x, above it toward +y; a swap of axes would not."""
    out, truth = generated
    with open_file(out / truth["files"]["none"]) as src:
        f = src.array().astype(np.float64)
    k = np.arange(64) - 32
    total = f.sum(axis=(2, 3))
    cx = (f * k).sum(axis=(2, 3)) / total
    cy = (f * k[:, None]).sum(axis=(2, 3)) / total
    assert cx[2, 0] > 0.1 and cx[2, 4] < -0.1 and abs(cy[2, 0]) < 0.2 * cx[2, 0]
    assert cy[0, 2] > 0.1 and cy[4, 2] < -0.1 and abs(cx[0, 2]) < 0.2 * cy[0, 2]
    assert abs(cx[2, 2]) < 0.01 and abs(cy[2, 2]) < 0.01  # on the column: no deflection


def test_generate_reuses_files_that_are_up_to_date(generated):
    out, truth = generated
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    said = []
    [again] = ms.generate([SPEC], out, doses=(None, DOSE), seed=3, log=said.append)
    assert again == truth and said == [f"tiny-si: up to date in {out}"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="needs element"):
        ms.ScanSpec("x", "graphene", (4, 4), defect="substitution")
    with pytest.raises(ValueError, match="material must be one of graphene, MoS2"):
        ms.ScanSpec("x", "gold", (4, 4))
    with pytest.raises(ValueError, match="at most gpts/2"):
        ms.ScanSpec("x", "graphene", (4, 4), gpts=192, detector=128)
    assert ms.dose_tag(None) == "none" and ms.dose_tag(1e6) == "1e6" and ms.dose_tag(1e5) == "1e5"


def test_without_abtem_the_message_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "abtem", None)  # import abtem now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rrstem\[multislice\]'"):
        ms.simulate(SPEC)


def test_cli_refuses_unknown_scans(capsys):
    assert ms.main(["--scans", "graphene-pristine,nope", "--out", "/nonexistent"]) == 2
    assert "unknown scan(s) ['nope']" in capsys.readouterr().err
