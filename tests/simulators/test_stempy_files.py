"""NCEM 4D Camera electron-counted files (stempy's sparse HDF5), known answers: written from a dense array of
counts, read lazily, analyzed by ``rrstem analyze`` into the maps of a NumPy reduction of that array, with peak
memory bounded by the frame store rather than by the dense scan.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from file_writers import write_stempy, write_stempy_events
from support import reference
from rrstem.simulators.files import open_file
from rrstem.stream.results import read_scan

RRSTEM = [sys.executable, "-m", "rrstem.cli"]


def electron_frames(ny=6, nx=7, k=2, h=32, w=32, seed=3, empty=()) -> np.ndarray:
    """``k`` detector frames per position of single electrons (0/1 per pixel, as counted): a disc whose centre
    moves with the position, a known COM signal. Positions in ``empty`` get no electron at all."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy = h / 2 - 0.5 + 1.5 * np.sin(np.arange(ny))[:, None, None, None, None]
    cx = w / 2 - 0.5 + 1.5 * np.cos(np.arange(nx))[None, :, None, None, None]
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (h / 4) ** 2) * 0.4 + 0.01
    frames = (rng.random((ny, nx, k, h, w)) < disc).astype(np.uint8)
    for y, x in empty:
        frames[y, x] = 0
    return frames


@pytest.mark.parametrize("version", [2, 3])
def test_several_frames_per_position_are_summed(tmp_path, version):
    sub = electron_frames(4, 5, k=3)
    dense = sub.sum(axis=2).reshape(20, 32, 32)
    path = write_stempy(tmp_path / "counted.h5", sub, version=version,
                        metadata={"microscope": {"energy_kev": 300.0, "convergence_mrad": 25.0}, "note": "scan 7"})
    with open_file(path) as src:
        assert (src.start.scan_shape, src.start.frame_shape) == ((4, 5), (32, 32))
        assert src.start.dtype == "uint8"  # at most 3 electrons a pixel: one per frame
        np.testing.assert_array_equal(src.chunk(0, 20), dense)
        np.testing.assert_array_equal(src.chunk(7, 9), dense[7:16])
        assert src.start.metadata["frames_per_position"] == 3
        assert src.start.metadata["metadata"]["note"] == "scan 7"
        cal = src.start.calibration
        assert (cal.energy_kev, cal.convergence_mrad, cal.detector_pixel_mrad) == (300.0, 25.0, None)


def test_version_1_repeats_a_pixel_for_each_electron(tmp_path):
    counts = np.random.default_rng(1).poisson(2.0, (3, 4, 16, 24)).astype(np.uint16)
    counts[1, 2, 5, 7] = 300  # more than uint8 holds
    path = write_stempy(tmp_path / "v1.h5", counts, version=1)
    with open_file(path) as src:
        assert src.start.frame_shape == (16, 24) and src.start.dtype == "uint16"
        np.testing.assert_array_equal(src.array(), counts)


def test_a_chunk_reads_only_the_events_of_its_positions(tmp_path):
    rows = [[0, 5], [7], [], [4096 * 9], [3, 3]]  # position 3's event lies outside the 64x64 frame
    path = write_stempy_events(tmp_path / "bad.h5", rows, (1, 5), (64, 64))
    with open_file(path) as src:
        got = src.chunk(0, 3)
        assert got.sum(axis=(1, 2)).tolist() == [2, 1, 0] and got[0].reshape(-1)[[0, 5]].tolist() == [1, 1]
        assert src.chunk(4, 1).reshape(-1)[3] == 2
        with pytest.raises(ValueError, match=r"bad.h5: position 3 has an event at pixel 36864, outside its 64x64"):
            src.chunk(2, 2)


def test_a_version_3_file_needs_as_many_frames_at_every_position(tmp_path):
    path = write_stempy_events(tmp_path / "odd.h5", [[1]] * 7, (2, 3), (8, 8))
    with pytest.raises(ValueError, match=r"odd.h5: 7 frames of events are not a whole number per position of the "
                                         r"2x3 scan"):
        open_file(path)


def test_analyze_maps_equal_numpy_and_an_empty_position_is_a_zero_count_one(tmp_path):
    sub = electron_frames(6, 7, k=2, empty=[(2, 3)])
    dense = sub.sum(axis=2)
    path = write_stempy(tmp_path / "counted.h5", sub)
    out = tmp_path / "analyzed.h5"
    run = subprocess.run([*RRSTEM, "analyze", str(path), "--bin", "2", "--no-train", "--no-progress",
                          "--calibration-frames", "8", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = read_scan(out)
    maps = res["maps"]
    assert res["attrs"]["counters"]["received"] == 42 and res["attrs"]["zero_counts"] == 1
    assert maps["filled"].all() and maps["vbf"][2, 3] == 0 and np.isnan(maps["com_x"][2, 3])
    with np.errstate(invalid="ignore", divide="ignore"):  # the empty position's COM is 0/0 in the reference too
        ref = reference(dense, res["attrs"]["geometry"], res.get("pixel_mask"))
    np.testing.assert_array_equal(maps["vbf"], ref["vbf"])
    np.testing.assert_array_equal(maps["vadf"], ref["vadf"])
    assert res["units"]["com_x"] == "px"  # no detector calibration in the file: COM in binned pixels
    for name in ("com_x", "com_y"):
        np.testing.assert_allclose(maps[name], ref[name], atol=1e-6, equal_nan=True)
        assert np.isnan(maps[name]).sum() == 1


def _peak_rss_mb(args: list[str]) -> float:
    """Run ``rrstem analyze`` as a child process and return its peak resident memory (VmHWM) in MB."""
    proc = subprocess.Popen([*RRSTEM, "analyze", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                peak = max([peak] + [int(line.split()[1]) for line in fh if line.startswith("VmHWM")])
        except OSError:  # it just ended
            pass
        time.sleep(0.02)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err
    return peak / 1024


def _disc_of_electrons(ny, nx, per=300, size=576, seed=0) -> list[np.ndarray]:
    """``per`` electrons per position in a disc of radius 60 px whose centre moves with the position."""
    rng = np.random.default_rng(seed)
    n = ny * nx
    r, angle = 60 * np.sqrt(rng.random(n * per)), 2 * np.pi * rng.random(n * per)
    pos = np.repeat(np.arange(n), per)
    cy, cx = size / 2 + 5 * np.sin(pos // nx / 5), size / 2 + 5 * np.cos(pos % nx / 5)
    row = np.clip(cy + r * np.sin(angle), 0, size - 1).astype(np.int64)
    col = np.clip(cx + r * np.cos(angle), 0, size - 1).astype(np.int64)
    return np.split(row * size + col, np.arange(per, n * per, per))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_a_large_counted_scan_is_analyzed_within_the_frame_store_not_the_dense_scan(tmp_path):
    ny = nx = 72  # 5184 positions of 576x576 uint8 counts: 1.72 GB dense; the frame store at bin 4, 215 MB
    events = _disc_of_electrons(ny, nx)
    big = write_stempy_events(tmp_path / "big.h5", events, (ny, nx))
    small = write_stempy_events(tmp_path / "small.h5", _disc_of_electrons(4, 4), (4, 4))
    dense_mb = ny * nx * 576 * 576 / 2**20
    store_mb = ny * nx * 144 * 144 * 2 / 2**20  # binned 144x144 frames of uint8 counts at bin 4, stored as uint16
    args = ["--bin", "4", "--no-train", "--no-progress"]
    baseline = _peak_rss_mb([str(small), *args, "--out", str(tmp_path / "small.rrstem.h5")])
    peak = _peak_rss_mb([str(big), *args, "--out", str(tmp_path / "big.rrstem.h5")])
    print(f"peak RSS {peak:.0f} MB (a 4x4 scan: {baseline:.0f} MB); frame store {store_mb:.0f} MB; "
          f"dense scan {dense_mb:.0f} MB")
    res = read_scan(tmp_path / "big.rrstem.h5")
    geometry = res["attrs"]["geometry"]
    assert res["attrs"]["counters"]["received"] == ny * nx and geometry["masked"] == []
    row, col = np.divmod(np.stack(events), 576)  # (positions, electrons): the VBF counts those in the disc
    r = np.hypot(row // 4 - geometry["center"][0], col // 4 - geometry["center"][1])
    np.testing.assert_array_equal(res["maps"]["vbf"], (r <= geometry["radius"]).sum(axis=1).reshape(ny, nx))
    assert peak < dense_mb / 2
    # the store, plus the pipeline's queues, maps and results (an events-free file of this scan peaks as high)
    assert peak - baseline < store_mb + 300
