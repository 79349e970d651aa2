"""Bad recorded files: each gets an error naming the file and what is wrong; the good frames before the damage
are still streamed and counted, and the rest of the scan is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from file_writers import write_dectris, write_dm, write_empad, write_hspy, write_zspy
from support import disc_frames, reference, wait_results
from rrstem.simulators.files import open_file
from rrstem.simulators.formats.empad import FRAME_BYTES
from rrstem.simulators.source import stream
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.results import read_scan
from rrstem.stream.service import Service, ServiceConfig

RRSTEM = [sys.executable, "-m", "rrstem.cli"]


def replay_into_service(src, tmp_path) -> dict:
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                        out=tmp_path / "results.h5", train=False, preprocess=PreprocessConfig(calibration_frames=4))
    svc = Service(cfg).start()
    try:
        stats = stream(src, svc.listen_endpoint, bind=False, progress=False, frames_per_message=4)
        res = read_scan(wait_results(svc))
    finally:
        svc.close()
    res["sent"] = stats.frames
    return res


def assert_good_frames_in_maps(res, frames, n_good):
    filled = np.zeros(frames.shape[0] * frames.shape[1], bool)
    filled[:n_good] = True
    filled = filled.reshape(frames.shape[:2])
    np.testing.assert_array_equal(res["maps"]["filled"], filled)
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"), filled=filled)
    np.testing.assert_allclose(res["maps"]["vbf"][filled], ref["vbf"][filled], rtol=1e-6)
    assert np.isnan(res["maps"]["vbf"][~filled]).all()


def test_a_truncated_empad_raw_streams_its_whole_frames(tmp_path):
    frames = disc_frames(3, 4, 128, 128, seed=2, dtype=np.float32, level=30.0)
    raw = write_empad(tmp_path, frames)
    with open(raw, "r+b") as fh:
        fh.truncate(9 * FRAME_BYTES + FRAME_BYTES // 2)  # 9 whole frames and half of the 10th
    with open_file(raw) as src:
        assert src.start.scan_shape == (3, 4) and src.available_frames == 9
        assert src.problem.startswith("scan_x4_y3.raw is truncated: ") and "9 whole of the 12 frames" in src.problem
        assert src.start.metadata["source_problem"] == src.problem
        with pytest.raises(ValueError, match="frames 8..9 cannot be read: scan_x4_y3.raw is truncated"):
            src.chunk(8, 2)
        res = replay_into_service(src, tmp_path)
    assert res["sent"] == 9
    assert (res["attrs"]["counters"]["received"], res["attrs"]["counters"]["missing"]) == (9, 3)
    assert_good_frames_in_maps(res, frames, 9)


def test_analyze_of_a_truncated_file_warns_and_counts_the_missing_frames(tmp_path):
    frames = disc_frames(4, 5, seed=3)
    np.save(tmp_path / "cut.npy", frames)
    size = os.path.getsize(tmp_path / "cut.npy")
    with open(tmp_path / "cut.npy", "r+b") as fh:
        fh.truncate(size - 32 * 32 * 2 * 3 - 100)  # the last 3 frames gone, and part of a 4th
    out = tmp_path / "cut.h5"
    run = subprocess.run([*RRSTEM, "analyze", str(tmp_path / "cut.npy"), "--no-train", "--no-progress",
                          "--calibration-frames", "4", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr  # results written, the scan incomplete (README "Exit codes")
    assert "warning: cut.npy is truncated: it holds 16 whole frames of the 20" in run.stderr
    res = read_scan(out)
    assert (res["attrs"]["counters"]["received"], res["attrs"]["counters"]["missing"]) == (16, 4)
    assert "truncated" in res["attrs"]["metadata"]["source_problem"]
    assert res["attrs"]["incomplete_detail"] == (
        "cut.npy is truncated: it holds 16 whole frames of the 20 its header announces ((4, 5, 32, 32)); the rest "
        "of the scan is missing; 4 of 20 positions have no frame")
    assert_good_frames_in_maps(res, frames, 16)


def test_a_dectris_master_with_a_missing_data_file_streams_the_files_before_it(tmp_path):
    frames = disc_frames(6, 7, seed=4)
    master = write_dectris(tmp_path, frames, per_file=25)
    (tmp_path / "scan_data_000002.h5").unlink()
    with open_file(master, scan_shape=(6, 7)) as src:
        assert src.available_frames == 25
        assert src.problem == (f"scan_master.h5: data file scan_data_000002.h5 (data_000002) is missing from "
                               f"{tmp_path}; frames from there on are missing")
        res = replay_into_service(src, tmp_path)
    assert (res["attrs"]["counters"]["received"], res["attrs"]["counters"]["missing"]) == (25, 17)
    assert_good_frames_in_maps(res, frames, 25)
    run = subprocess.run([*RRSTEM, "replay", str(master), "--scan-shape", "6x7", "--to", "tcp://127.0.0.1:0",
                          "--timeout", "0.2", "--no-progress"], capture_output=True, text=True, timeout=60)
    assert "warning: scan_master.h5: data file scan_data_000002.h5 (data_000002) is missing" in run.stderr
    assert "sending the 25 good frames of 42" in run.stderr


def test_a_dectris_master_without_any_data_file_is_refused(tmp_path):
    master = write_dectris(tmp_path, disc_frames(2, 3, seed=1), per_file=10)
    (tmp_path / "scan_data_000001.h5").unlink()
    with pytest.raises(ValueError, match=r"scan_master.h5: data file scan_data_000001.h5 \(data_000001\) is missing"):
        open_file(master, scan_shape=(2, 3))


def test_a_dectris_master_short_of_its_announced_frames_says_so(tmp_path):
    master = write_dectris(tmp_path, disc_frames(2, 3, seed=1), per_file=10, announce=9)
    with open_file(master, scan_shape=(3, 3)) as src:
        assert src.available_frames == 6 and src.problem == "scan_master.h5: holds 6 of the 9 frames its header announces"


@pytest.mark.parametrize("name, write, match", [
    ("noise", lambda p: p.write_bytes(os.urandom(64)), r"cannot read 'noise': unknown format \(suffix \(none\)"),
    ("cut.h5", lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40),
     r"cut.h5 cannot be opened as HDF5 \(truncated or damaged\?\)"),
    ("flat.hspy", lambda p: write_hspy(p, np.zeros((4, 5, 6), np.uint16), energy_kev=200.0, convergence_mrad=1.0,
                                       step=1.0, step_units="nm", k=1.0, k_units="mrad"),
     r"flat.hspy holds no 4D HyperSpy signal; it holds: scan \(4, 5, 6\)"),
    ("empty.zspy", lambda p: p.mkdir(), r"empty.zspy (is not a zarr store|holds no 4D HyperSpy signal)"),
    ("a.xml", lambda p: p.write_text("<root><pix_x>2</pix_x></root>"), r"a.xml is not an EMPAD .xml"),
    ("b.xml", lambda p: p.write_text('<root><raw_file filename="gone.raw"/></root>'),
     r"b.xml names the raw file gone.raw, which is missing"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, write, match):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=match):
        open_file(path)


def test_a_truncated_dm4_says_where_it_stops(tmp_path):
    path = write_dm(tmp_path / "s.dm4", disc_frames(2, 3, seed=1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"s.dm4 is truncated: its tag tree stops at byte \d+"):
        open_file(path)
    (tmp_path / "t.dm4").write_bytes(b"\x00\x00\x00\x07" + b"\0" * 20)
    with pytest.raises(ValueError, match=r"t.dm4 is not a DigitalMicrograph file: version"):
        open_file(tmp_path / "t.dm4")


def test_an_emd_or_zspy_without_a_4d_dataset_is_refused(tmp_path):
    with h5py.File(tmp_path / "x.emd", "w") as f:
        g = f.create_group("data/image")
        g.attrs["emd_group_type"] = 1
        g["data"] = np.zeros((8, 8), np.uint16)
    with pytest.raises(ValueError, match=r"x.emd holds no 4D EMD data group; it holds: data/image \(8, 8\)"):
        open_file(tmp_path / "x.emd")
    write_zspy(tmp_path / "y.zspy", np.zeros((3, 4, 5), np.uint8), energy_kev=200.0, convergence_mrad=1.0,
               step=1.0, step_units="nm", k=1.0, k_units="mrad")
    with pytest.raises(ValueError, match=r"y.zspy holds no 4D HyperSpy signal; it holds: scan \(3, 4, 5\)"):
        open_file(tmp_path / "y.zspy")


def test_a_npy_cut_inside_its_header_is_named(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((2, 2, 4, 4), np.uint16))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut\.npy is not a readable \.npy file"):
        open_file(path)
