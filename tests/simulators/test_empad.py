"""EMPAD .xml files of every software version RosettaSciIO reads: the scan shape and calibration each gives.

Files are written in the layouts of EMPAD software 0.51 (``pix_x``/``pix_y``, and acquire parameters that
say 128x128 whatever was acquired), 1.2 (the shape in the raw file's name) and a series of images.
"""

from __future__ import annotations

import numpy as np
import pytest

from file_writers import write_empad
from support import disc_frames, reference
from rrstem.cli import main
from rrstem.simulators.files import open_file
from rrstem.simulators.optics import wavelength_angstrom
from rrstem.stream.results import read_scan


def frames(ny=4, nx=4):
    return disc_frames(ny, nx, 128, 128, seed=8, dtype=np.float32, level=30.0)


def test_older_software_takes_pix_x_and_pix_y_over_the_acquire_parameters(tmp_path):
    f = frames(2, 3)
    write_empad(tmp_path, f, layout="0.51", name="acq.raw", fov_m=6e-8)  # no shape in the raw file's name
    with open_file(tmp_path / "acquisition.xml") as src:
        assert src.start.scan_shape == (2, 3) and src.problem is None
        np.testing.assert_array_equal(src.chunk(0, 6), f.reshape(6, 128, 128))
        cal = src.start.calibration
        assert cal.energy_kev == 300.0 and cal.scan_step_nm == pytest.approx(20.0)  # 60 nm / 3 positions
        # 2e-10 x 1e9 = 0.2 per nm, as RosettaSciIO reads calibrated_pixelsize
        assert cal.detector_pixel_mrad == pytest.approx(0.2 * wavelength_angstrom(300.0) / 10 * 1e3)
    with open_file(tmp_path / "acquisition.xml", scan_shape=(1, 6)) as src:  # the 6 frames it holds
        assert src.start.scan_shape == (1, 6)
    with pytest.raises(ValueError, match=r"holds 6 frames, more than the 1x5 scan"):
        open_file(tmp_path / "acquisition.xml", scan_shape=(1, 5))


def test_analyze_an_older_software_file_fills_every_position(tmp_path):
    f = frames()
    write_empad(tmp_path, f, layout="0.51")
    out = tmp_path / "r.h5"
    assert main(["analyze", str(tmp_path / "acquisition.xml"), "--no-train", "--no-progress",
                 "--calibration-frames", "8", "--bin", "2", "--out", str(out)]) == 0
    res = read_scan(out)
    assert list(res["attrs"]["scan_shape"]) == [4, 4] and res["maps"]["filled"].all()
    ref = reference(f, res["attrs"]["geometry"], res["pixel_mask"])
    np.testing.assert_allclose(res["maps"]["vbf"], ref["vbf"], rtol=1e-6)


@pytest.mark.parametrize("name, acquire, expected", [("scan_x3_y2.raw", None, (2, 3)),  # the name wins
                                                     ("renamed.raw", (2, 3), (2, 3))])  # else acquire
def test_newer_software_takes_the_raw_file_name_then_the_acquire_parameters(tmp_path, name, acquire, expected):
    f = frames(2, 3)
    path = write_empad(tmp_path, f, name=name)
    if acquire is None:  # an acquire section that disagrees: the name is what RosettaSciIO reads
        xml = tmp_path / "acquisition.xml"
        xml.write_text(xml.read_text().replace("<scan_resolution_y>2<", "<scan_resolution_y>5<"))
    for given in (path, tmp_path / "acquisition.xml"):
        with open_file(given) as src:
            assert src.start.scan_shape == expected
            assert src.start.calibration.scan_step_nm == pytest.approx(14.4 / 0.72 / 3)


def test_a_series_of_images_is_a_one_row_scan(tmp_path):
    f = frames(2, 5)
    write_empad(tmp_path, f, layout="series", name="series_x10.raw")
    with open_file(tmp_path / "acquisition.xml") as src:
        assert src.start.scan_shape == (1, 10) and src.start.metadata["empad"]["scan_shape_from"] == "series_count"
        np.testing.assert_array_equal(src.chunk(3, 4), f.reshape(10, 128, 128)[3:7])
    with open_file(tmp_path / "acquisition.xml", scan_shape=(2, 5)) as src:
        assert src.start.scan_shape == (2, 5)


def test_a_damaged_xml_is_named_and_bytes_after_the_last_frame_are_not_truncation(tmp_path, caplog):
    f = frames(2, 2)
    write_empad(tmp_path, f)
    xml = next(tmp_path.glob("*.xml"))
    raw = next(tmp_path.glob("*.raw"))
    with open(raw, "ab") as fh:  # 100 bytes too many: every frame of the 2x2 scan is there
        fh.write(b"\0" * 100)
    with open_file(xml) as src:
        assert src.problem is None and src.start.scan_shape == (2, 2)
        np.testing.assert_array_equal(src.chunk(0, 4), f.reshape(4, 128, 128))
    assert "100 byte(s) after its 4 whole frames" in caplog.text
    xml.write_text("<root><garbage")
    out = tmp_path / "out.h5"
    assert main(["analyze", str(xml), "--no-train", "--no-progress", "--out", str(out)]) == 2
    assert not out.exists()
    with open_file(raw) as src:  # the .raw alone: its name gives the shape
        assert src.start.scan_shape == (2, 2)


def test_a_scan_without_any_counts_derives_without_warnings(tmp_path, recwarn):
    """An all-zero scan (an ARINA test file is one): every position filled, COM NaN, no NumPy warnings."""
    f = np.zeros((2, 2, 128, 128), np.float32)
    write_empad(tmp_path, f)
    out = tmp_path / "zero.h5"
    assert main(["analyze", str(next(tmp_path.glob("*.xml"))), "--no-train", "--no-progress",
                 "--out", str(out)]) == 0
    res = read_scan(out)
    assert res["maps"]["filled"].all() and np.isnan(res["maps"]["com_x"]).all()
    assert res["attrs"]["zero_counts"] == 4
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
