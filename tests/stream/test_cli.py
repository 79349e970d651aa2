"""The command line, run as a user would: real processes, real sockets, real files."""

import re
import subprocess
import sys

import numpy as np

from support import disc_frames, reference
from rrstem.stream.results import read_scan

RRSTEM = [sys.executable, "-m", "rrstem.stream.cli"]


def test_analyze_writes_the_maps_of_the_file(tmp_path):
    frames = disc_frames(5, 6, seed=11)
    np.save(tmp_path / "scan.npy", frames)
    out = tmp_path / "scan.h5"
    run = subprocess.run([*RRSTEM, "analyze", str(tmp_path / "scan.npy"), "--bin", "2", "--no-train",
                          "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = read_scan(out)
    ref = reference(frames, res["attrs"]["geometry"])
    np.testing.assert_array_equal(res["maps"]["vbf"], ref["vbf"])
    np.testing.assert_allclose(res["maps"]["com_x"], ref["com_x"], atol=1e-9)
    assert res["attrs"]["counters"]["received"] == 30


def test_analyze_explains_a_bad_input(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.uint16))
    run = subprocess.run([*RRSTEM, "analyze", str(tmp_path / "flat.npy"), "--no-train"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert "4D" in run.stderr and "Traceback" not in run.stderr


def test_serve_once_takes_a_replayed_scan(tmp_path):
    frames = disc_frames(4, 4, seed=12)
    np.save(tmp_path / "scan.npy", frames)
    out = tmp_path / "served.h5"
    serve = subprocess.Popen([*RRSTEM, "serve", "--bind", "--listen", "tcp://127.0.0.1:0", "--publish",
                              "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--once", "--no-train",
                              "--no-progress", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        line = serve.stdout.readline()
        endpoint = re.search(r"frames from (tcp://\S+?),", line).group(1)
        replay = subprocess.run([*RRSTEM, "replay", str(tmp_path / "scan.npy"), "--to", endpoint, "--connect",
                                 "--no-progress"], capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0, replay.stderr
        assert serve.wait(60) == 0, serve.stderr.read()
    finally:
        serve.kill()
    res = read_scan(out)
    assert res["attrs"]["counters"]["received"] == 16
    np.testing.assert_array_equal(res["maps"]["vbf"], reference(frames, res["attrs"]["geometry"])["vbf"])
