"""One rule for every reader (README "Exit codes"): 0 every position analysed; 1 results written, the scan
incomplete, and the results say why; 2 refused before the start. A scan shape too small for the frames is
refused unless --sync-offset/--flyback account for them; a file short of frames is analysed as far as it goes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from file_writers import write_dectris, write_empad, write_hspy
from support import disc_frames
from rrstem.cli import main
from rrstem.simulators.formats.empad import FRAME_BYTES
from rrstem.simulators.merlin import acquisition_order, write_mib
from rrstem.stream.results import read_scan

NY, NX = 4, 5


def npy(tmp_path, frames):
    np.save(tmp_path / "s.npy", frames)
    return tmp_path / "s.npy"


def hdf5(tmp_path, frames):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["data"] = frames
    return tmp_path / "s.h5"


def dectris(tmp_path, frames):
    return write_dectris(tmp_path, frames, per_file=8)


def empad(tmp_path, frames):
    return write_empad(tmp_path, frames.astype(np.float32))


def mib(tmp_path, frames):
    return write_mib(tmp_path / "s.mib", frames.reshape(-1, *frames.shape[2:]), scan_xy=(NX, NY))


def hspy(tmp_path, frames):
    return write_hspy(tmp_path / "s.hspy", frames, energy_kev=200.0, convergence_mrad=1.0, step=1.0,
                      step_units="nm", k=1.0, k_units="mrad")


WRITERS = {"npy": npy, "hdf5": hdf5, "dectris": dectris, "empad": empad, "mib": mib, "hspy": hspy}
FLAT = ("dectris", "empad", "mib")  # a flat series of frames: a larger scan shape leaves positions missing


def frames_for(name):
    h = 128 if name == "empad" else 16
    return disc_frames(NY, NX, h, h, seed=1, level=100.0)


def analyze(path, *extra):
    out = path.parent / "res.h5"
    code = main(["analyze", str(path), "--no-train", "--no-progress", "--calibration-frames", "4", "--out", str(out),
                 *extra])
    return code, out


@pytest.mark.parametrize("name", WRITERS)
def test_every_reader_follows_the_rule(tmp_path, name, capsys):
    path = WRITERS[name](tmp_path, frames_for(name))
    shape = [] if name not in ("dectris",) else ["--scan-shape", f"{NY}x{NX}"]
    code, out = analyze(path, *shape)
    assert code == 0 and read_scan(out)["attrs"]["complete"]
    out.unlink()
    code, out = analyze(path, "--scan-shape", f"{NY - 1}x{NX}")  # 15 positions for 20 frames
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert ("holds 20 frames, more than the 3x5 scan takes (15 frames)" in err if name in FLAT
            else "--scan-shape 3x5 holds 15: drop it" in err)
    if name in FLAT:  # 25 positions for 20 frames: analysed, incomplete, and the results say why
        code, out = analyze(path, "--scan-shape", f"{NY + 1}x{NX}")
        res = read_scan(out)
        assert code == 1 and res["attrs"]["counters"]["received"] == 20 and not res["attrs"]["complete"]
        assert res["attrs"]["incomplete_detail"].endswith(
            "holds 20 frames, fewer than the 25 the 5x5 scan takes; 5 of 25 positions have no frame")


@pytest.mark.parametrize("name", ["npy", "empad", "mib"])
def test_a_truncated_file_exits_1_and_says_why(tmp_path, name):
    path = WRITERS[name](tmp_path, frames_for(name))
    frame = FRAME_BYTES if name == "empad" else 16 * 16 * 2 + (384 if name == "mib" else 0)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 2 * frame - frame // 2)
    code, out = analyze(path)
    res = read_scan(out)
    assert code == 1 and res["attrs"]["counters"]["received"] == 17
    assert "truncated" in res["attrs"]["incomplete_detail"]
    assert res["attrs"]["incomplete_detail"].endswith("3 of 20 positions have no frame")


@pytest.mark.parametrize("name", ["dectris", "mib", "npy"])
def test_flyback_and_sync_offset_account_for_extra_frames(tmp_path, name):
    frames = frames_for(name)
    acq = frames.reshape(-1, 16, 16)[acquisition_order((NY, NX), 2, 1)]  # 2 + 4 * (5 + 1) = 26 frames
    if name == "npy":
        acq = acq[:24].reshape(4, 6, 16, 16)  # a 4D file of the acquisition without its sync offset
        path, extra = npy(tmp_path, acq), ["--flyback", "1"]
        assert analyze(path, "--scan-shape", f"{NY}x{NX}")[0] == 2
    else:
        path = (write_dectris(tmp_path, acq[None], per_file=10) if name == "dectris"
                else write_mib(tmp_path / "s.mib", acq, hdr=False))
        extra = ["--sync-offset", "2", "--flyback", "1"]
        assert analyze(path, "--scan-shape", f"{NY}x{NX}")[0] == 2
    code, out = analyze(path, "--scan-shape", f"{NY}x{NX}", *extra)
    res = read_scan(out)
    assert code == 0 and res["attrs"]["complete"] and res["attrs"]["counters"]["received"] == 20
    np.testing.assert_array_equal(res["maps"]["filled"], np.ones((NY, NX), bool))


def test_a_scan_refused_at_its_start_exits_2_at_once(tmp_path):
    """A scan the service refuses (here: its frame store would not fit this machine's memory) is not waited
    for: analyze exits 2 with the reason, and no results are written (it used to wait until killed)."""
    path = dectris(tmp_path, disc_frames(NY, NX, seed=2))
    out = tmp_path / "out.h5"
    code = main(["analyze", str(path), "--scan-shape", "16000x16000", "--no-train", "--no-progress",
                 "--out", str(out)])
    assert code == 2
    assert not out.exists()
