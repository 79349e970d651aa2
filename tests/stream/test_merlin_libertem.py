"""Conformance with the field's reference: LiberTEM-live's Merlin simulator serves a .mib/.hdr pair into rrstem.

``libertem-live-mib-sim`` (LiberTEM-live, MIT; in the ``test`` extra) reads the
file with LiberTEM's own MIB reader and replays it over the real Merlin
framing. It runs here as a separate process on port 0; the service connects to
its data port, and the maps must equal the NumPy reduction of the file.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from support import disc_frames, reference, wait_results
from rrstem.simulators.merlin import write_mib
from rrstem.stream.results import read_scan

NY, NX = 4, 5
SIM = shutil.which("libertem-live-mib-sim", path=str(Path(sys.executable).parent)) or shutil.which(
    "libertem-live-mib-sim")
LISTENING = re.compile(r"DataSocketServer listening \('127\.0\.0\.1', (\d+)\)")

pytestmark = pytest.mark.skipif(SIM is None, reason="libertem-live-mib-sim not installed: pip install -e '.[test]' "
                                                    "(libertem-live) to run the Merlin conformance test")


def start_sim(hdr: Path, timeout: float = 90.0) -> tuple[subprocess.Popen, int]:
    """Run the simulator on free ports; returns it and its data port (read from its log)."""
    proc = subprocess.Popen([SIM, str(hdr), "--host", "127.0.0.1", "--data-port", "0", "--control-port", "0",
                             "--trigger-port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = LISTENING.search(line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError(f"libertem-live-mib-sim did not listen within {timeout:g} s: {''.join(seen)[-2000:]}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype, layout", [(np.uint16, "1x1"), (np.uint8, "2x2")])
def test_libertem_live_merlin_simulator_streams_into_rrstem(make_service, tmp_path, dtype, layout):
    frames = disc_frames(NY, NX, seed=11, dtype=dtype, level=100.0 if dtype == np.uint8 else 1000.0)
    mib = write_mib(tmp_path / "reference.mib", frames.reshape(-1, 32, 32), layout=layout, scan_xy=(NX, NY))
    proc, port = start_sim(mib.with_suffix(".hdr"))
    try:
        svc = make_service(protocol="merlin", listen=f"tcp://127.0.0.1:{port}", bind=False)
        path = wait_results(svc, timeout=120)
        res = read_scan(path, svc.results_written[0][0])  # the simulator repeats the acquisition: take the first
    finally:
        proc.kill()
        proc.wait(10)
    assert res["attrs"]["counters"] == {"received": 20, "missing": 0, "duplicate": 0, "invalid": 0, "stale": 0,
                                        "dropped": 0}
    assert res["attrs"]["complete"] and res["attrs"]["dtype"] == np.dtype(dtype).name
    assert res["attrs"]["metadata"]["frame_header"]["layout"] == layout
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"))
    for name in ("vbf", "vadf"):
        np.testing.assert_array_equal(res["maps"][name], ref[name])
    for name in ("com_x", "com_y"):
        np.testing.assert_allclose(res["maps"][name], ref[name], rtol=0, atol=1e-9 + 1e-6 * np.abs(ref[name]).max())
