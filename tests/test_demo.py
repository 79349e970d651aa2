"""``rrstem demo`` streams at a detector's pace: one frame per ``--dwell`` ms (7.5 ms unless told)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from rrstem.cli import build_parser
from rrstem.commands import demo_rate


def test_the_default_pace_is_the_papers_dwell():
    args = build_parser().parse_args(["demo"])
    assert (args.dwell, args.rate) == (7.5, None)
    assert demo_rate(args) == pytest.approx(133.333, abs=1e-3)  # 7.5 ms per position
    assert demo_rate(build_parser().parse_args(["demo", "--dwell", "2"])) == 500.0
    assert demo_rate(build_parser().parse_args(["demo", "--dwell", "2", "--rate", "5000"])) == 5000.0
    with pytest.raises(ValueError, match="--dwell must be a positive number of milliseconds"):
        demo_rate(argparse.Namespace(rate=None, dwell=0.0))


def test_the_demo_sends_one_frame_per_dwell(tmp_path):
    """A small headless demo at 25 ms dwell: 64 frames take 1.6 s, as the banner says."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-m", "rrstem.cli", "demo", "--headless", "--out", str(tmp_path / "demo"),
                           "--scan", "8", "--detector", "64", "--no-train", "--dwell", "25"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "40 frames/s (25 ms dwell: 1.6 s)" in proc.stdout
    sent = re.search(r"rrstem demo: sent (\d+) frames in ([\d.]+) s", proc.stdout)
    assert sent is not None, proc.stdout
    assert int(sent[1]) == 64
    assert 0.95 * 1.6 <= float(sent[2]) <= 1.6 + 1.0  # paced by an absolute clock: never early
    assert (tmp_path / "demo" / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
