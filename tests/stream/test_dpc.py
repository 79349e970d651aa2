"""DPC (stream/dpc): calibration, descan, iDPC and dDPC against a phase object with a known answer.

The specimen is a pure phase object, a sum of Gaussians at seeded random positions (well inside the
scan, so the phase is flat at its edges). Every frame is computed exactly: the probe is a soft-edged
aperture in reciprocal space, the exit wave is the probe at the scan position times exp(i sigma V),
the frame is |FFT|^2. The COM is taken from the frames with NumPy. For a phase object the COM is
exactly sigma/(2 pi) times the gradient of V convolved with the probe intensity |P|^2 (the COM
theorem), so the iDPC is compared with V * |P|^2: its known answer, up to the parts that COM cannot
see (a constant field: the COM is relative to the mean pattern's) or that a descan fit takes away.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from rrstem.stream.dpc import (NotEnoughData, calibrate, curl, divergence, dpc_maps, fit_descan,
                               integrate_gradient, remove_descan, to_scan_frame)

SCAN, WINDOW, SIZE = 48, 32, 96  # scan positions per side, frame side, object side (object px = scan step)


def pearson(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    return np.corrcoef(a[ok], b[ok])[0, 1]


def com_of(frames):
    """COM (x: columns, y: rows) of each frame in detector px, relative to the mean pattern's COM."""
    c = np.arange(frames.shape[-1]) - frames.shape[-1] // 2
    total = frames.sum((-2, -1))
    cx, cy = (frames.sum(-2) * c).sum(-1) / total, (frames.sum(-1) * c).sum(-1) / total
    mean = frames.sum((0, 1))
    return cx - (mean.sum(0) * c).sum() / mean.sum(), cy - (mean.sum(1) * c).sum() / mean.sum()


@pytest.fixture(scope="module")
def specimen():
    """Frames, the projected potential V and its known answer V * |P|^2, both on the scan grid."""
    rng = np.random.default_rng(7)
    lo, h, atoms = (SIZE - SCAN) // 2, WINDOW // 2, 25
    pos = rng.uniform(lo + 6, lo + SCAN - 6, (atoms, 2))
    width, height = rng.uniform(1.5, 3.0, atoms), rng.uniform(0.5, 1.0, atoms)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    v = sum(a * np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * w**2)) for p, w, a in zip(pos, width, height))
    k = np.fft.fftfreq(WINDOW) * WINDOW
    aperture = 1 / (1 + np.exp((np.hypot(k[:, None], k[None, :]) - 5.0) / 1.5))  # soft edge: short probe tails
    probe = np.fft.fftshift(np.fft.ifft2(aperture))  # centred on pixel (h, h) of the window
    windows = np.lib.stride_tricks.sliding_window_view(np.exp(0.4j * v), (WINDOW, WINDOW))
    exit_wave = windows[lo - h:lo - h + SCAN, lo - h:lo - h + SCAN] * probe  # probe on object px (lo+i, lo+j)
    frames = np.abs(np.fft.fftshift(np.fft.fft2(exit_wave), axes=(-2, -1))) ** 2
    intensity = np.zeros((SIZE, SIZE))
    intensity[:WINDOW, :WINDOW] = np.abs(probe) ** 2 / (np.abs(probe) ** 2).sum()
    intensity = np.roll(intensity, (-h, -h), (0, 1))  # centred on (0, 0)
    blurred = np.real(np.fft.ifft2(np.fft.fft2(v) * np.conj(np.fft.fft2(intensity))))
    scan = np.s_[lo:lo + SCAN, lo:lo + SCAN]
    return dict(frames=frames, v=v[scan], blurred=blurred[scan], com=com_of(frames))


def on_detector(sx, sy, angle_deg, flip):
    """The scan-frame field seen by a detector turned by -angle and then mirrored: F @ R(-angle) @ s."""
    a = np.deg2rad(-angle_deg)
    dx, dy = np.cos(a) * sx - np.sin(a) * sy, np.sin(a) * sx + np.cos(a) * sy
    return dx, (-dy if flip else dy)


def angle_error(found, true):
    return abs((found - true + 180) % 360 - 180)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("angle", [0, 37, 123, 250])
def test_calibration_finds_angle_and_flip(specimen, angle, flip):
    cal = calibrate(*on_detector(*specimen["com"], angle, flip))
    assert cal.flip is flip
    assert angle_error(cal.angle_deg, angle) < 0.5  # 250 and 70 leave the same curl: the polarity decides
    assert cal.polarity > 0.9 and cal.curl_ratio < 0.05 < 0.3 < cal.curl_ratio_other_flip
    assert 0 < cal.angle_uncertainty_deg < 0.5


def test_turning_the_frames_themselves(specimen):
    """The conventions read on real detector operations: rows mirrored = flip; np.rot90 = 90 degrees."""
    frames = specimen["frames"]
    mirrored = calibrate(*com_of(frames[..., ::-1, :]))
    assert mirrored.flip and angle_error(mirrored.angle_deg, 0) < 0.5
    turned = calibrate(*com_of(np.rot90(frames, axes=(-2, -1))))  # detector (x, y) -> (y, -x): R(-90)
    assert not turned.flip and angle_error(turned.angle_deg, 90) < 0.5
    both = calibrate(*com_of(np.rot90(frames[..., ::-1, :], axes=(-2, -1))))  # R(-90) F = F R(90)
    assert both.flip and angle_error(both.angle_deg, 270) < 0.5


def test_sign_convention_field_points_to_atoms(specimen):
    """Calibrated, the field points up the potential: dDPC negative on the atoms, iDPC positive."""
    cal = calibrate(*specimen["com"])
    assert angle_error(cal.angle_deg, 0) < 0.5
    reversed_ = calibrate(*(-c for c in specimen["com"]))  # a detector turned by 180 degrees
    assert angle_error(reversed_.angle_deg, 180) < 0.5 and not reversed_.flip
    maps = dpc_maps(*specimen["com"], cal.angle_deg, cal.flip)
    peaks = specimen["blurred"] > np.percentile(specimen["blurred"], 98)
    assert np.nanmean(maps.ddpc[peaks]) < 0 < np.nanmean(maps.idpc[peaks])


def test_closed_form_minimum_matches_a_brute_force_search(specimen):
    dx, dy = on_detector(*specimen["com"], 123, False)
    rms = []
    grid = np.arange(0, 180, 0.05)
    for a in np.deg2rad(grid):  # turned by an explicit matrix, curl by np.gradient, interior only
        sx, sy = np.cos(a) * dx - np.sin(a) * dy, np.sin(a) * dx + np.cos(a) * dy
        rms.append(np.mean((np.gradient(sy, axis=1) - np.gradient(sx, axis=0))[1:-1, 1:-1] ** 2))
    cal = calibrate(dx, dy, descan_order=None)
    assert angle_error(cal.angle_deg % 180, grid[np.argmin(rms)]) <= 0.05


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_calibration_on_the_first_rows_of_a_live_scan(specimen, fraction):
    dx, dy = on_detector(*specimen["com"], 37, True)
    rows = int(SCAN * fraction)
    dx[rows:], dy[rows:] = np.nan, np.nan
    cal = calibrate(dx, dy)
    assert cal.flip and angle_error(cal.angle_deg, 37) < 1.0
    assert cal.positions == (rows - 2) * (SCAN - 2)


def test_uncertainty_grows_with_noise_and_covers_the_error(specimen):
    sx, sy = specimen["com"]
    rng = np.random.default_rng(3)
    spreads = []
    for noise in (0.02, 0.1, 0.3):  # the field's RMS is ~0.18 px
        cal = calibrate(*on_detector(sx + rng.normal(0, noise, sx.shape), sy + rng.normal(0, noise, sy.shape), 123, False))
        assert angle_error(cal.angle_deg, 123) < 4 * cal.angle_uncertainty_deg + 0.1
        spreads.append(cal.angle_uncertainty_deg)
    assert spreads[0] < spreads[1] < spreads[2]


def test_too_few_rows_is_said():
    com = np.full((2, 10, 10), np.nan)
    com[:, :2] = 1.0
    with pytest.raises(NotEnoughData, match="at least 3 scanned rows"):
        calibrate(*com)


def test_three_rows_calibrate_without_an_uncertainty(specimen):
    dx, dy = on_detector(*specimen["com"], 37, False)
    dx[3:], dy[3:] = np.nan, np.nan
    cal = calibrate(dx, dy)  # one row of stencil: an angle, but no spread over rows to measure
    assert cal.positions == SCAN - 2 and np.isnan(cal.angle_uncertainty_deg)
    # These rows hold no atom, only the outskirts of their fields, where the divergence is positive:
    # the 180-degree choice needs scatterers in the rows scanned, and here it is the wrong one.
    assert angle_error(cal.angle_deg, 37 + 180) < 5


def test_idpc_recovers_the_potential(specimen):
    """No descan in the simulation, so only the mean is taken away (order 0): r >= 0.99 with V * |P|^2.

    V * |P|^2 is the known answer (COM theorem); V itself differs by the probe's blur (r is reported).
    """
    dx, dy = on_detector(*specimen["com"], 250, True)
    cal = calibrate(dx, dy)
    maps = dpc_maps(dx, dy, cal.angle_deg, cal.flip, descan_order=0)
    assert pearson(maps.idpc, specimen["blurred"]) >= 0.999
    assert pearson(maps.idpc, specimen["v"]) >= 0.99
    assert abs(np.mean(maps.idpc)) < 1e-9


def test_plane_descan_takes_the_specimens_own_plane_too(specimen):
    """With the plane fit (the default) the known answer is V * |P|^2 less the quadratic whose
    gradient is the plane fitted to its gradient: the fit cannot tell the specimen's plane from descan."""
    sx, sy = specimen["com"]
    maps = dpc_maps(sx, sy, 0.0, False)
    ny, nx = sx.shape
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    gx, gy = np.gradient(specimen["blurred"], 2 / (nx - 1), 2 / (ny - 1), axis=(1, 0))  # per unit of x, y
    # q = a x + b y + c x^2 + d x y + e y^2; grad q = (a + 2c x + d y, b + d x + 2e y), fitted to (gx, gy)
    zero, one = np.zeros(x.size), np.ones(x.size)
    basis = np.stack([np.r_[one, zero], np.r_[zero, one], np.r_[2 * x.ravel(), zero],
                      np.r_[y.ravel(), x.ravel()], np.r_[zero, 2 * y.ravel()]], axis=1)
    coef, *_ = np.linalg.lstsq(basis, np.r_[gx.ravel(), gy.ravel()], rcond=None)
    quadratic = coef @ np.stack([x.ravel(), y.ravel(), x.ravel() ** 2, (x * y).ravel(), y.ravel() ** 2])
    assert pearson(maps.idpc, specimen["blurred"] - quadratic.reshape(ny, nx)) >= 0.99


def test_a_descan_plane_is_removed_exactly(specimen):
    dx, dy = on_detector(*specimen["com"], 37, False)
    ny, nx = dx.shape
    y, x = np.mgrid[:ny, :nx]
    plane_x, plane_y = 0.8 + 0.03 * x - 0.02 * y, -0.5 + 0.01 * x + 0.04 * y  # larger than the field
    fx, fy = fit_descan(plane_x, plane_y)
    np.testing.assert_allclose(fx, plane_x, atol=1e-12)
    np.testing.assert_allclose(fy, plane_y, atol=1e-12)
    clean = dpc_maps(dx, dy, 37, False)
    drifted = dpc_maps(dx + plane_x, dy + plane_y, 37, False)
    for name in ("dpc_x", "dpc_y", "idpc", "ddpc"):
        np.testing.assert_allclose(getattr(drifted, name), getattr(clean, name), atol=1e-10, equal_nan=True)
    cal = calibrate(dx + plane_x, dy + plane_y)
    assert not cal.flip and angle_error(cal.angle_deg, 37) < 0.5


def test_a_reference_scan_is_subtracted(specimen):
    dx, dy = on_detector(*specimen["com"], 123, True)
    y, x = np.mgrid[:SCAN, :SCAN] / SCAN
    vacuum = (0.5 * np.sin(3 * x) + y**2, np.cos(2 * y) - x * y)  # not a plane: a fit would not take it
    clean = dpc_maps(dx, dy, 123, True, descan_order=None)
    corrected = dpc_maps(dx + vacuum[0], dy + vacuum[1], 123, True, descan_order=None, reference=vacuum)
    np.testing.assert_allclose(corrected.idpc, clean.idpc, atol=1e-10)
    with pytest.raises(ValueError, match="on the scan's grid"):
        remove_descan(dx, dy, reference=(vacuum[0][:5], vacuum[1][:5]))


def test_missing_positions_stay_missing_and_break_nothing(specimen):
    dx, dy = on_detector(*specimen["com"], 250, False)
    missing = np.random.default_rng(5).random(dx.shape) < 0.03  # frames with no counts
    missing[36:] = True  # rows not scanned yet
    dx[missing], dy[missing] = np.nan, np.nan
    cal = calibrate(dx, dy)
    assert not cal.flip and angle_error(cal.angle_deg, 250) < 1.0
    maps = dpc_maps(dx, dy, cal.angle_deg, cal.flip, descan_order=0)
    for name in ("dpc_x", "dpc_y", "idpc"):
        assert np.array_equal(np.isnan(getattr(maps, name)), missing)
    neighbours_known = np.zeros_like(missing)
    known = ~missing
    neighbours_known[1:-1, 1:-1] = known[:-2, 1:-1] & known[2:, 1:-1] & known[1:-1, :-2] & known[1:-1, 2:]
    assert np.array_equal(np.isfinite(maps.ddpc), neighbours_known)
    assert pearson(maps.idpc, specimen["blurred"]) >= 0.97


def test_integration_of_a_known_non_periodic_gradient():
    """phi sampled on a grid that is not periodic (a ramp, a parabola, a bump): mirror padding avoids
    the wrap-around; only the mean (set to 0) and the sampling differ."""
    y, x = np.mgrid[:64, :80].astype(float)
    phi = 0.05 * x - 0.03 * y + 0.002 * (x - 20) ** 2 + 3 * np.exp(-((x - 50) ** 2 + (y - 30) ** 2) / 50)
    gx = 0.05 + 0.004 * (x - 20) - 3 * (x - 50) / 25 * np.exp(-((x - 50) ** 2 + (y - 30) ** 2) / 50)
    gy = -0.03 - 3 * (y - 30) / 25 * np.exp(-((x - 50) ** 2 + (y - 30) ** 2) / 50)
    found = integrate_gradient(gx, gy, cutoff=0)
    expected = phi - phi.mean()
    assert np.abs(found - expected).max() < 0.02 * np.ptp(phi)
    assert pearson(found, expected) > 0.9999
    np.testing.assert_allclose(integrate_gradient(gx, gy, step=0.25, cutoff=0), 0.25 * found, atol=1e-12)


def mirrored_integration(gx, gy):
    """The reference: the field mirrored to (2ny, 2nx) as the gradient of phi mirrored at the edges, one 2D
    FFT, phi_hat = (kx gx_hat + ky gy_hat) / (2 pi i (k**2 + k_c**2)), cropped back; the Nyquist bin of
    each axis (no real derivative there) left out. Holes are 0, as in ``integrate_gradient``."""
    known = np.isfinite(gx) & np.isfinite(gy)
    fx, fy = np.where(known, gx, 0.0), np.where(known, gy, 0.0)
    ny, nx = fx.shape
    ex = np.block([[fx, -fx[:, ::-1]], [fx[::-1], -fx[::-1, ::-1]]])
    ey = np.block([[fy, fy[:, ::-1]], [-fy[::-1], -fy[::-1, ::-1]]])
    ky, kx = np.fft.fftfreq(2 * ny)[:, None], np.fft.fftfreq(2 * nx)[None, :]
    ky[ny], kx[0, nx] = 0.0, 0.0
    k2 = kx**2 + ky**2 + (1 / (8 * max(ny, nx))) ** 2
    k2[0, 0] = 1.0
    phi = np.fft.ifft2((kx * np.fft.fft2(ex) + ky * np.fft.fft2(ey)) / (2j * np.pi * k2))[:ny, :nx]
    assert np.abs(phi.imag).max() < 1e-9 * np.abs(phi.real).max()
    return np.where(known, phi.real, np.nan)


@pytest.mark.parametrize("shape", [(40, 30), (33, 17), (2, 7), (64, 64)])
def test_integration_on_the_scan_grid_equals_the_mirrored_fft(shape):
    """The cosine/sine transforms on the original grid are the mirrored 2D FFT without building it: equal
    to rounding on random fields with holes, and x and y are treated alike (transposing commutes)."""
    rng = np.random.default_rng(sum(shape))
    gx, gy = rng.normal(size=(2, *shape))
    inner = np.zeros(shape, bool)
    inner[1:-1, 1:-1] = rng.random((shape[0] - 2, shape[1] - 2)) < 0.1
    gx[inner] = np.nan  # holes inside: the box stays the whole map
    found = integrate_gradient(gx, gy)
    expected = mirrored_integration(gx, gy)
    assert np.array_equal(np.isnan(found), inner)
    np.testing.assert_allclose(found, expected, atol=1e-10 * np.nanmax(np.abs(expected)), equal_nan=True)
    np.testing.assert_allclose(integrate_gradient(gy.T, gx.T), found.T, atol=1e-12, equal_nan=True)


def test_curl_and_divergence_of_known_fields():
    y, x = np.mgrid[:20, :30].astype(float)
    np.testing.assert_allclose(curl(-y, x)[1:-1, 1:-1], 2.0)  # a rotation: curl 2, no divergence
    np.testing.assert_allclose(divergence(-y, x)[1:-1, 1:-1], 0.0)
    np.testing.assert_allclose(divergence(x**2, y)[1:-1, 1:-1], 2 * x[1:-1, 1:-1] + 1)
    assert np.isnan(curl(-y, x)[0]).all() and np.isnan(divergence(-y, x)[:, -1]).all()


def test_units_follow_the_scan_step(specimen):
    sx, sy = specimen["com"]
    per_px = dpc_maps(sx, sy, 0, False)
    per_nm = dpc_maps(sx, sy, 0, False, step=0.02)
    assert per_px.units == {"dpc_x": "mrad", "dpc_y": "mrad", "idpc": "mrad*px", "ddpc": "mrad/px"}
    assert per_nm.units["idpc"] == "mrad*nm" and per_nm.units["ddpc"] == "mrad/nm"
    np.testing.assert_allclose(per_nm.idpc, 0.02 * per_px.idpc, atol=1e-12)
    np.testing.assert_allclose(per_nm.ddpc, per_px.ddpc / 0.02, equal_nan=True)
    np.testing.assert_allclose(to_scan_frame(sx, sy, 0, False), (sx, sy))
    with pytest.raises(ValueError, match="positive length"):
        dpc_maps(sx, sy, 0, False, step=0)


def test_a_512_scan_is_fast():
    rng = np.random.default_rng(0)
    cx, cy = rng.normal(size=(2, 512, 512))
    calibrate(cx[:64, :64], cy[:64, :64])  # warm up
    start = time.perf_counter()
    cal = calibrate(cx, cy)
    dpc_maps(cx, cy, cal.angle_deg, cal.flip)
    assert time.perf_counter() - start < 1.0  # ~0.15 s alone; generous for a busy machine
