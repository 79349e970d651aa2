"""Known-answer tests of the synthetic graphene scan: deflection size, direction, noise, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from rrstem.simulators.graphene import GrapheneSource, honeycomb
from rrstem.simulators.optics import wavelength_angstrom


def _nearest_atoms(src: GrapheneSource):
    """Per scan position: distance (A) to the nearest and second-nearest atom, and the unit vector to the nearest."""
    ny, nx = src.start.scan_shape
    step = src.start.calibration.scan_step_nm * 10
    pos = np.stack(np.mgrid[0:ny, 0:nx], axis=-1).reshape(-1, 1, 2).astype(float)
    d = np.linalg.norm(src.atoms_px[None] - pos, axis=-1) * step
    order = np.argsort(d, axis=1)
    d1, d2 = d[np.arange(len(d)), order[:, 0]], d[np.arange(len(d)), order[:, 1]]
    to_atom = src.atoms_px[order[:, 0]] - pos[:, 0]
    return d1, d2, to_atom / np.maximum(np.linalg.norm(to_atom, axis=1, keepdims=True), 1e-12)


def test_wavelength_at_60kv():
    assert wavelength_angstrom(60.0) == pytest.approx(0.04866, abs=2e-5)
    assert wavelength_angstrom(200.0) == pytest.approx(0.02508, abs=2e-5)


def test_honeycomb_bond_length_and_density():
    atoms = honeycomb((0.0, 0.0), (-20.0, -20.0), (20.0, 20.0))
    d = np.linalg.norm(atoms[:, None] - atoms[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert d.min(axis=1).max() == pytest.approx(2.46 / np.sqrt(3), abs=1e-9)  # C-C bond 1.42 A
    cell_area = 2.46**2 * np.sqrt(3) / 2  # two atoms per cell
    assert len(atoms) == pytest.approx(2 * 40 * 40 / cell_area, rel=0.05)
    assert np.any(np.all(atoms == 0.0, axis=1))


def test_default_scan_shape_dtype_calibration(graphene_default):
    src, frames = graphene_default["source"], graphene_default["frames"]
    start = src.start
    assert frames.shape == (64 * 64, 128, 128) and frames.dtype == np.uint16
    assert (start.scan_shape, start.frame_shape, start.dtype) == ((64, 64), (128, 128), "uint16")
    cal = start.calibration
    assert (cal.energy_kev, cal.convergence_mrad, cal.scan_step_nm) == (60.0, 31.0, 0.02)
    # The bright-field disc radius measured in pixels matches 31 mrad / pixel size.
    mean = frames.mean(axis=0)
    bright = mean > 0.5 * mean.max()
    radius_px = np.sqrt(bright.sum() / np.pi)
    assert radius_px * cal.detector_pixel_mrad == pytest.approx(31.0, rel=0.02)
    # Noise-free counts use uint16 well and leave headroom.
    assert 35_000 < np.median(frames[:, 64, 64]) < 45_000 and frames.max() < 60_000
    # 64 px at 0.2 A show several unit cells (a = 2.46 A).
    assert 64 * cal.scan_step_nm * 10 / 2.46 > 4


def test_com_size_matches_60kv_multislice(graphene_default, com):
    src, frames = graphene_default["source"], graphene_default["frames"]
    cy, cx = com(frames, src.start.calibration.detector_pixel_mrad)
    mag = np.hypot(cy, cx)
    assert mag.mean() == pytest.approx(0.45, rel=0.1)
    assert mag.max() == pytest.approx(0.8, rel=0.15)
    assert mag.max() / 31.0 == pytest.approx(0.025, rel=0.15)  # the largest is ~2.5% of the disc radius
    # uint16 quantisation is negligible: same COM from the float patterns.
    fy, fx = com(src.patterns(0, 256), src.start.calibration.detector_pixel_mrad)
    assert np.abs(fy - cy[:256]).max() < 1e-3 and np.abs(fx - cx[:256]).max() < 1e-3


def test_com_points_to_nearest_atom_and_vanishes_on_it(graphene_default, com):
    src, frames = graphene_default["source"], graphene_default["frames"]
    cy, cx = com(frames, src.start.calibration.detector_pixel_mrad)
    c = np.stack([cy, cx], axis=1)
    mag = np.linalg.norm(c, axis=1)
    d1, d2, unit = _nearest_atoms(src)
    cos = (c * unit).sum(axis=1) / np.maximum(mag, 1e-12)
    near = (d1 > 0.2) & (d1 < 0.7)
    clear = near & (d2 - d1 > 0.6)  # one atom clearly dominates
    assert clear.sum() > 500
    assert cos[clear].min() > 0.98
    assert np.median(cos[near]) > 0.99 and np.percentile(cos[near], 5) > 0.85
    # The centre scan position sits exactly on an atom column: no deflection there.
    centre = 32 * 64 + 32
    assert d1[centre] < 1e-9
    assert mag[centre] < 0.02 * mag.max()
    # Lattice visible: the COM map is large 0.3-0.5 A from atoms and small on them.
    assert mag[(d1 > 0.3) & (d1 < 0.5)].mean() > 3 * mag[d1 < 0.05].mean()


def test_atom_positions_in_metadata_match_attribute(graphene_default):
    src = graphene_default["source"]
    meta = src.start.metadata
    listed = np.array(meta["atoms_px"])
    assert len(listed) == len(meta["atom_species"]) > 40
    assert np.all(listed >= -2) and np.all(listed <= 65)
    assert np.allclose(listed[np.argmin(np.hypot(*(listed - 32).T))], [32.0, 32.0])
    assert meta["defect"] == "none" and meta["defect_px"] is None


@pytest.mark.parametrize("defect", ["si", "vacancy"])
def test_defect_changes_the_field_at_the_scan_centre(defect, com):
    kw = dict(scan_shape=(17, 17), detector=64, step_nm=0.05)
    plain, flawed = GrapheneSource(**kw), GrapheneSource(**kw, defect=defect)
    p = plain.start.calibration.detector_pixel_mrad
    ring = np.hypot(*(np.mgrid[0:17, 0:17] - 8.0)) * 0.5  # A from the centre atom
    ring = ((ring > 0.25) & (ring < 0.6)).ravel()
    m0 = np.hypot(*com(plain.chunk(0, 289), p))[ring].mean()
    m1 = np.hypot(*com(flawed.chunk(0, 289), p))[ring].mean()
    assert flawed.start.metadata["defect_px"] == [8.0, 8.0]
    if defect == "si":
        assert m1 > 1.8 * m0  # the heavier atom deflects more
        assert flawed.start.metadata["atom_species"].count("Si") == 1
    else:
        assert m1 < 0.3 * m0  # nothing attracts the probe near an empty site
        assert len(flawed.atoms_px) == len(plain.atoms_px) - 1


def test_noise_is_poisson_seeded_per_frame_and_pairs_with_noise_free():
    kw = dict(scan_shape=(8, 8), detector=64, step_nm=0.05)
    clean = GrapheneSource(**kw)
    noisy = GrapheneSource(**kw, dose=3e6, seed=7)
    expected = clean.patterns(0, 64) * 3e6
    counts = noisy.chunk(0, 64)
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(3e6, rel=2e-3)
    bright = expected > 100
    z = (counts[bright] - expected[bright]) / np.sqrt(expected[bright])
    assert abs(z.mean()) < 0.02 and z.std() == pytest.approx(1.0, abs=0.03)
    # Chunking does not change the noise; the seed does.
    assert np.array_equal(np.concatenate([noisy.chunk(0, 13), noisy.chunk(13, 51)]), counts)
    assert np.array_equal(GrapheneSource(**kw, dose=3e6, seed=7).chunk(20, 5), counts[20:25])
    assert not np.array_equal(GrapheneSource(**kw, dose=3e6, seed=8).chunk(0, 4), counts[:4])
    # Same geometry: noise-free frames are the expected patterns at the noise-free scale.
    assert np.allclose(clean.chunk(0, 64), clean.patterns(0, 64) * clean.scale, atol=0.5)
    assert noisy.start.calibration == clean.start.calibration
    assert noisy.start.scan_id != clean.start.scan_id


def test_subpixel_and_coarse_steps_keep_the_deflection_size(com):
    # 0.05 A steps use four probe sub-positions per grid pixel; 0.5 A steps skip grid pixels.
    for step_nm in (0.005, 0.05):
        src = GrapheneSource((12, 12), 64, step_nm=step_nm)
        mag = np.hypot(*com(src.chunk(0, 144), src.start.calibration.detector_pixel_mrad))
        assert mag.max() < 1.0
    fine = GrapheneSource((12, 12), 64, step_nm=0.005)
    assert fine.sampling.sub == 4
    # Along the centre row (0.05 A steps, atom at x = 6) the deflection grows away from the atom.
    mag = np.hypot(*com(fine.chunk(6 * 12, 12), fine.start.calibration.detector_pixel_mrad))
    assert mag[6] < 0.05 and mag[11] > 5 * mag[6]


def test_speed_of_default_scan(graphene_default):
    assert graphene_default["seconds"] < 15.0  # a few seconds on 2 cores; generous for loaded CI


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(detector=32), "detector must be 64..256"),
        (dict(defect="boron"), "defect must be one of none, vacancy, si"),
        (dict(dose=-1.0), "dose must be a positive"),
        (dict(dose=1e12), "too many for uint16"),
        (dict(scan_shape=(0, 4)), "scan_shape must be two positive"),
        (dict(step_nm=5.0), "step_nm must be between"),
    ],
)
def test_bad_parameters_say_how_to_fix_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrapheneSource(**kwargs)


def test_chunk_outside_scan_is_refused():
    src = GrapheneSource((4, 4), 64)
    with pytest.raises(ValueError, match="outside the scan of 16 frames"):
        src.chunk(10, 7)
