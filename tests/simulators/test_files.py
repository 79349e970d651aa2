"""Replay loaders: every format round-trips values, dtype and calibration; bad files get clear errors."""

from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest

from rrstem.simulators.files import load_array, nion_calibration, open_file
from rrstem.simulators.optics import wavelength_angstrom


def scan(dtype="uint16", shape=(3, 5, 8, 6)) -> np.ndarray:
    """Frames whose every pixel encodes (frame index, pixel index): any mix-up shows."""
    n = np.prod(shape)
    return (np.arange(n) % 50_000).reshape(shape).astype(dtype)


def write_ndata1(path, data: np.ndarray, meta: dict, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        with zf.open("data.npy", "w") as fh:
            np.save(fh, data)
        zf.writestr("metadata.json", json.dumps(meta))


NION_META = {
    "type": "data_item",
    "title": "4D scan",
    "collection_dimension_count": 2,
    "datum_dimension_count": 2,
    "dimensional_calibrations": [
        {"offset": 0.0, "scale": 0.25, "units": "Å"},
        {"offset": 0.0, "scale": 0.25, "units": "Å"},
        {"offset": -20.0, "scale": 0.0012, "units": "rad"},
        {"offset": -20.0, "scale": 0.0012, "units": "rad"},
    ],
    "metadata": {"instrument": {"high_tension": 60000.0, "defocus": 0.0}},
}


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "int32", "float32", "float64"])
def test_npy_round_trip_preserves_dtype_and_is_memory_mapped(tmp_path, dtype):
    data = scan(dtype)
    np.save(tmp_path / "s.npy", data)
    with open_file(tmp_path / "s.npy") as src:
        assert isinstance(src.data, np.memmap)
        assert src.start.dtype == dtype and src.start.scan_shape == (3, 5) and src.start.frame_shape == (8, 6)
        got = src.chunk(0, 15)
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, data.reshape(15, 8, 6))
        assert np.array_equal(src.chunk(4, 7), data.reshape(15, 8, 6)[4:11])  # spans three scan rows
        assert src.start.scan_id == "s"


def test_big_endian_npy_is_sent_little_endian_with_the_same_values(tmp_path):
    data = scan(">u2")
    np.save(tmp_path / "be.npy", data)
    with open_file(tmp_path / "be.npy") as src:
        got = src.chunk(0, 15)
    assert got.dtype == np.dtype("<u2") and np.array_equal(got, data.reshape(15, 8, 6))


def test_npz_picks_the_only_4d_array_or_the_key(tmp_path):
    data, other = scan("float32"), scan("uint16", (2, 2, 4, 4))
    np.savez(tmp_path / "one.npz", frames=data, mask=np.ones((8, 6), bool))
    assert np.array_equal(load_array(tmp_path / "one.npz"), data)
    np.savez_compressed(tmp_path / "two.npz", a=data, b=other)
    with open_file(tmp_path / "two.npz", key="b") as src:
        assert src.start.dtype == "uint16" and src.start.scan_shape == (2, 2)
        assert np.array_equal(src.array(), other)
        assert src.start.scan_id == "two-b" and src.start.metadata["key"] == "b"
    with pytest.raises(ValueError, match=r"several 4D arrays \(a, b\); choose one with key="):
        open_file(tmp_path / "two.npz")
    with pytest.raises(ValueError, match=r"has no array 'c'; it holds: a \(3, 5, 8, 6\), b \(2, 2, 4, 4\)"):
        open_file(tmp_path / "two.npz", key="c")
    np.savez(tmp_path / "none.npz", m=np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"holds no 4D array; it holds: m \(3, 3\)"):
        open_file(tmp_path / "none.npz")


def test_hdf5_nested_dataset_is_read_lazily_with_calibration(tmp_path):
    data = scan("uint32", (6, 7, 5, 4))
    with h5py.File(tmp_path / "s.h5", "w") as f:
        g = f.create_group("entry/data")
        ds = g.create_dataset("frames", data=data, chunks=(1, 7, 5, 4))
        g.attrs["energy_kev"] = 60.0
        ds.attrs["detector_pixel_mrad"] = 0.5
        ds.attrs["scan_step_nm"] = 0.03
        ds.attrs["operator"] = b"ada"
        f.create_dataset("dark", data=np.zeros((5, 4)))
    with open_file(tmp_path / "s.h5") as src:
        assert isinstance(src.data, h5py.Dataset)  # not loaded
        cal = src.start.calibration
        assert (cal.energy_kev, cal.detector_pixel_mrad, cal.scan_step_nm) == (60.0, 0.5, 0.03)
        assert src.start.metadata["key"] == "entry/data/frames" and src.start.metadata["operator"] == "ada"
        assert src.chunk(9, 20).dtype == np.uint32
        assert np.array_equal(src.chunk(9, 20), data.reshape(42, 5, 4)[9:29])
    assert not src.data.id.valid  # the file closed with the source


def test_hdf5_key_selects_among_several_and_errors_list_datasets(tmp_path):
    with h5py.File(tmp_path / "m.hdf5", "w") as f:
        f["a"] = scan("int16")
        f["grp/b"] = scan("float32", (2, 3, 4, 4))
    with open_file(tmp_path / "m.hdf5", key="/grp/b") as src:
        assert src.start.dtype == "float32" and np.array_equal(src.array(), scan("float32", (2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"several 4D datasets \(a, grp/b\)"):
        open_file(tmp_path / "m.hdf5")
    with pytest.raises(ValueError, match=r"no dataset 'x'; it holds: a \(3, 5, 8, 6\), grp/b"):
        open_file(tmp_path / "m.hdf5", key="x")


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_ndata1_round_trip_with_nion_calibration(tmp_path, compress):
    data = scan("float32")
    write_ndata1(tmp_path / "s.ndata1", data, NION_META, compress)
    with open_file(tmp_path / "s.ndata1") as src:
        assert isinstance(src.data, np.memmap) == (compress == zipfile.ZIP_STORED)
        assert src.start.dtype == "float32" and np.array_equal(src.array(), data)
        cal = src.start.calibration
        assert cal.scan_step_nm == pytest.approx(0.025)
        assert cal.detector_pixel_mrad == pytest.approx(1.2)
        assert cal.energy_kev == pytest.approx(60.0)
        assert src.start.metadata["nion"]["title"] == "4D scan"


def test_nion_reciprocal_detector_units_become_mrad():
    meta = json.loads(json.dumps(NION_META))
    meta["dimensional_calibrations"][2] = {"offset": 0, "scale": 0.2, "units": "1/nm"}
    cal = nion_calibration(meta)
    assert cal.detector_pixel_mrad == pytest.approx(0.2 * wavelength_angstrom(60.0) / 10 * 1e3)
    meta["dimensional_calibrations"] = []
    assert nion_calibration(meta).scan_step_nm is None


def test_ndata1_without_the_members_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.ndata1", "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(ValueError, match=r"needs data.npy and metadata.json"):
        open_file(tmp_path / "bad.ndata1")


def test_calibration_override_wins_over_the_file(tmp_path):
    from rrstem.stream.protocol import Calibration

    write_ndata1(tmp_path / "s.ndata1", scan(), NION_META)
    with open_file(tmp_path / "s.ndata1", calibration=Calibration(convergence_mrad=31.0, energy_kev=100.0)) as src:
        cal = src.start.calibration
    assert (cal.convergence_mrad, cal.energy_kev) == (31.0, 100.0)
    assert cal.detector_pixel_mrad == pytest.approx(1.2)


@pytest.mark.parametrize(
    "name, writer, key, match",
    [
        ("x.tif", lambda p: p.write_bytes(b"II*"), None, r"x.tif.: unknown format \(suffix \.tif.*use one of \.npy"),
        ("x.npy", lambda p: np.save(p, np.zeros((4, 4, 4))), None, r"shape \(4, 4, 4\), not 4D"),
        ("x.npy", lambda p: np.save(p, np.zeros((2, 2, 2, 2), np.int64)), None, r"dtype int64.*convert it to one of"),
        ("x.npy", lambda p: np.save(p, np.zeros((2, 2, 2, 2), np.float16)), None, r"dtype float16"),
        ("x.npy", lambda p: np.save(p, np.zeros((2, 2, 2, 2))), "frames", r"one array; drop key='frames'"),
        ("missing.h5", lambda p: None, None, r"no such file"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, name, writer, key, match):
    path = tmp_path / name
    writer(path)
    with pytest.raises(ValueError, match=match):
        open_file(path, key)


def test_h5_file_is_closed_when_the_dataset_is_refused(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["frames"] = np.zeros((2, 2, 2, 2), np.int64)
    with pytest.raises(ValueError, match="dtype int64"):
        open_file(tmp_path / "bad.h5")
    with h5py.File(tmp_path / "bad.h5", "w") as f:  # would fail if the reader still held it open
        f["ok"] = 1


def test_a_file_of_many_datasets_none_4d_gets_a_short_answer(tmp_path):
    """An HDF5 file of hundreds of 2D images (as a microscope's image files are) is refused in one line that lists
    ten of them and counts the rest, not in a page."""
    path = tmp_path / "images.h5"
    with h5py.File(path, "w") as f:
        for i in range(300):
            f.create_dataset(f"Data/Image/{i:04d}/Data", data=np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match=r"images.h5 holds no 4D dataset; it holds: .*, and 290 more$") as err:
        open_file(path)
    assert len(str(err.value)) < 600
