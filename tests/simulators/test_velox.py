"""A Velox (Thermo Fisher) EMD file without 4D data is refused with what it is, not with a list of datasets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from file_writers import write_velox
from rrstem.simulators.files import open_file

RRSTEM = [sys.executable, "-m", "rrstem.cli"]


def test_a_velox_file_without_4d_data_says_it_is_velox(tmp_path):
    path = write_velox(tmp_path / "Test SI.emd", images=3, spectra=2)
    with pytest.raises(ValueError, match=r"^Test SI.emd holds no 4D data: this looks like a Velox \(Thermo Fisher\) "
                                         r"EMD file \(Velox 11\); it holds 3 Image \(16x16x1\); 2 Spectrum "
                                         r"\(4096x1\)\. rrstem reads a 4D-STEM scan from a 4D dataset"):
        open_file(path)
    run = subprocess.run([*RRSTEM, "analyze", str(path), "--no-train"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "this looks like a Velox (Thermo Fisher) EMD file" in run.stderr
    assert "Traceback" not in run.stderr and "Data/Image/" not in run.stderr
