"""Every recorded format, known answers: written with its own writer (or byte by byte), read lazily, replayed
over real sockets into a service, and analyzed; the maps equal a NumPy reduction of the array.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from file_writers import (write_dectris, write_dm, write_emd_hyperspy, write_emd_ncem, write_empad, write_hspy,
                          write_py4dstem, write_zspy)
from support import disc_frames, reference, wait_results
from rrstem.simulators.files import open_file
from rrstem.simulators.formats.common import energy_from_wavelength_kev
from rrstem.simulators.optics import wavelength_angstrom
from rrstem.simulators.source import SeriesSource, stream
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.results import read_scan
from rrstem.stream.service import Service, ServiceConfig

RRSTEM = [sys.executable, "-m", "rrstem.cli"]
HS_CAL = dict(energy_kev=200.0, convergence_mrad=21.0, step=0.5, step_units="nm", k=0.8, k_units="mrad")


def frames_u16(ny=6, nx=7):
    return disc_frames(ny, nx, 32, 32, seed=5)


def empad_frames():
    return disc_frames(3, 4, 128, 128, seed=6, dtype=np.float32, level=40.0)


# format -> (writer(tmp_path, frames) -> path, frames, scan_shape option, expected calibration)
FORMATS = {
    "dectris": (lambda d, a: write_dectris(d, a), frames_u16, (6, 7),
                {"energy_kev": pytest.approx(200.0, rel=1e-3),  # 0.02508 A is a 200 keV electron
                 "detector_pixel_mrad": pytest.approx(0.5)}),
    "empad": (lambda d, a: write_empad(d, a), empad_frames, None,  # step: 14.4 nm / 0.72 / 4 positions
              {"energy_kev": 300.0, "scan_step_nm": pytest.approx(5.0)}),
    "emd": (lambda d, a: write_emd_ncem(d / "scan.emd", a), frames_u16, None,
            {"scan_step_nm": 0.5, "detector_pixel_mrad": pytest.approx(0.8)}),
    "emd-hyperspy": (lambda d, a: write_emd_hyperspy(d / "rev.emd", a), frames_u16, None,
                     {"scan_step_nm": 0.5, "detector_pixel_mrad": pytest.approx(0.8)}),
    "py4dstem": (lambda d, a: write_py4dstem(d / "cube.h5", a), frames_u16, None, {"scan_step_nm": 0.03}),
    "hspy": (lambda d, a: write_hspy(d / "scan.hspy", a, **HS_CAL), frames_u16, None,
             {"energy_kev": 200.0, "convergence_mrad": 21.0, "scan_step_nm": 0.5, "detector_pixel_mrad": 0.8}),
    "zspy": (lambda d, a: write_zspy(d / "scan.zspy", a, **{**HS_CAL, "k": 0.05, "k_units": "1/nm"}), frames_u16,
             None, {"energy_kev": 200.0, "scan_step_nm": 0.5,
                    "detector_pixel_mrad": pytest.approx(0.05 * wavelength_angstrom(200.0) / 10 * 1e3)}),
    "dm4": (lambda d, a: write_dm(d / "scan.dm4", a, 4), frames_u16, None,
            {"energy_kev": 200.0, "scan_step_nm": 0.2, "detector_pixel_mrad": 0.5}),
    "dm3": (lambda d, a: write_dm(d / "scan.dm3", a, 3), frames_u16, None,
            {"energy_kev": 200.0, "scan_step_nm": 0.2, "detector_pixel_mrad": 0.5}),
    "dm4-scan-fastest": (lambda d, a: write_dm(d / "scan.dm4", a, 4, scan_fastest=True), frames_u16, None,
                         {"scan_step_nm": 0.2, "detector_pixel_mrad": 0.5}),
}


@pytest.fixture(params=sorted(FORMATS))
def recorded(request, tmp_path):
    writer, make, scan_shape, cal = FORMATS[request.param]
    frames = make()
    return {"name": request.param, "path": writer(tmp_path, frames), "frames": frames,
            "scan_shape": scan_shape, "calibration": cal}


def test_each_format_reads_its_frames_and_calibration(recorded):
    frames, (ny, nx, h, w) = recorded["frames"], recorded["frames"].shape
    with open_file(recorded["path"], scan_shape=recorded["scan_shape"]) as src:
        assert (src.start.scan_shape, src.start.frame_shape) == ((ny, nx), (h, w))
        assert src.start.dtype == frames.dtype.name and src.problem is None
        flat = frames.reshape(-1, h, w)
        np.testing.assert_array_equal(src.chunk(0, ny * nx), flat)
        a, n = ny * nx // 3, ny * nx // 2
        np.testing.assert_array_equal(src.chunk(a, n), flat[a:a + n])  # across scan rows (and data files)
        cal = src.start.calibration.model_dump()
        for field, value in recorded["calibration"].items():
            assert cal[field] == value, field
        assert src.start.metadata["source_file"].endswith(recorded["path"].name)


def test_each_format_replays_over_sockets_into_the_service(recorded, tmp_path):
    frames = recorded["frames"]
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                        out=tmp_path / "results.h5", train=False, preprocess=PreprocessConfig(calibration_frames=8, bin=2))
    svc = Service(cfg).start()
    try:
        with open_file(recorded["path"], scan_shape=recorded["scan_shape"]) as src:
            stats = stream(src, svc.listen_endpoint, bind=False, progress=False, frames_per_message=5)
        res = read_scan(wait_results(svc))
    finally:
        svc.close()
    n = frames.shape[0] * frames.shape[1]
    assert stats.frames == n and res["attrs"]["counters"]["received"] == n
    assert res["attrs"]["counters"]["missing"] == 0
    assert_maps_equal_reference(res, frames)
    for field, value in recorded["calibration"].items():
        assert res["attrs"]["calibration"][field] == value, field


def assert_maps_equal_reference(res, frames):
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"))
    for name in ("vbf", "vadf"):
        if frames.dtype.kind in "ui":  # integer counts sum exactly
            np.testing.assert_array_equal(res["maps"][name], ref[name])
        else:
            np.testing.assert_allclose(res["maps"][name], ref[name], rtol=1e-6)
    scale = np.abs(ref["com_x"]).max() + np.abs(ref["com_y"]).max()
    scale_unit = res["attrs"]["calibration"].get("detector_pixel_mrad") or 1.0
    factor = scale_unit * res["attrs"]["geometry"]["bin"] if res["units"]["com_x"] == "mrad" else 1.0
    for name in ("com_x", "com_y"):
        np.testing.assert_allclose(res["maps"][name], factor * ref[name], atol=1e-6 * scale * factor)


@pytest.mark.parametrize("name", ["dectris", "empad", "py4dstem", "hspy", "zspy", "dm4"])
def test_analyze_writes_the_maps_of_each_format(name, tmp_path):
    writer, make, scan_shape, _ = FORMATS[name]
    frames = make()
    path = writer(tmp_path, frames)
    out = tmp_path / "analyzed.h5"
    extra = ["--scan-shape", f"{scan_shape[0]}x{scan_shape[1]}"] if scan_shape else []
    run = subprocess.run([*RRSTEM, "analyze", str(path), *extra, "--bin", "2", "--no-train", "--no-progress",
                          "--calibration-frames", "8", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = read_scan(out)
    assert res["attrs"]["counters"]["received"] == frames.shape[0] * frames.shape[1]
    assert_maps_equal_reference(res, frames)


@pytest.mark.parametrize("kev", [30.0, 60.0, 200.0, 300.0])
def test_energy_from_wavelength_inverts_the_relativistic_wavelength(kev):
    assert energy_from_wavelength_kev(wavelength_angstrom(kev)) == pytest.approx(kev, rel=1e-9)


def test_a_flat_series_says_it_needs_the_scan_shape(tmp_path):
    master = write_dectris(tmp_path, frames_u16())
    with pytest.raises(ValueError, match=r"scan_master.h5 stores a flat series of 42 frames without the scan shape; "
                                         r"give it with --scan-shape NYxNX .*NY\*NX = 42"):
        open_file(master)
    run = subprocess.run([*RRSTEM, "analyze", str(master), "--no-train"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--scan-shape NYxNX" in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(ValueError, match=r"holds 42 frames, more than the 5x8 scan takes \(40 frames\); fix "
                                         r"--scan-shape, or account for the extra frames with --sync-offset"):
        open_file(master, scan_shape=(5, 8))


def test_a_4d_file_can_be_reshaped_to_as_many_positions_only(tmp_path):
    frames = frames_u16()
    path = write_hspy(tmp_path / "s.hspy", frames, **HS_CAL)
    with open_file(path, scan_shape=(3, 14)) as src:
        assert isinstance(src, SeriesSource) and src.start.scan_shape == (3, 14)
        np.testing.assert_array_equal(src.chunk(10, 20), frames.reshape(42, 32, 32)[10:30])
    with pytest.raises(ValueError, match=r"stores a 6x7 scan \(42 frames\); --scan-shape 4x4 holds 16: drop it"):
        open_file(path, scan_shape=(4, 4))


def test_formats_are_found_by_their_first_bytes_without_a_suffix(tmp_path):
    frames = frames_u16()
    for name, writer in (("hspy", lambda p: write_hspy(p, frames, **HS_CAL)), ("dm4", lambda p: write_dm(p, frames)),
                         ("npy", lambda p: np.save(open(p, "wb"), frames))):
        path = tmp_path / f"{name}-no-suffix"
        writer(path)
        with open_file(path) as src:
            np.testing.assert_array_equal(src.array(), frames)


def test_dm_several_4d_images_need_a_key(tmp_path):
    frames = frames_u16(2, 3)
    path = write_dm(tmp_path / "a.dm4", frames)
    with open_file(path, key="1") as src:
        assert src.start.metadata["key"] == "1" and np.array_equal(src.array(), frames)
    with pytest.raises(ValueError, match=r"a.dm4 has no image '5'; it holds: 0 \(8, 8\), 1 \(2, 3, 32, 32\)"):
        open_file(path, key="5")
