"""The minimal bridge in docs/steering.md runs as documented against a real service, and the doc names every field."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rrstem.stream import events as E
from rrstem.stream.results import read_scan
from rrstem.stream.steering import RescanRequest
from support import disc_frames, wait_results

DOC = Path(__file__).resolve().parents[2] / "docs" / "steering.md"


def test_the_doc_names_every_field_of_every_message():
    text = DOC.read_text()
    for model in (RescanRequest, E.Subscan, E.ScanStarted, E.ScanEnded, E.Anomaly, E.ModelConverged, E.ErrorEvent):
        for name in model.model_fields:
            assert f"`{name}`" in text, f"{model.__name__}.{name} is not documented"


def test_the_documented_bridge_acquires_a_subscan(make_service, sender_for, tmp_path):
    svc = make_service(events="tcp://127.0.0.1:0", steering="tcp://127.0.0.1:0")
    s = sender_for(svc)
    frames = disc_frames(8, 6, h=64, w=64)
    s.start("first", (8, 6), (64, 64), calibration={"scan_step_nm": 0.05})
    s.frames("first", 0, frames.reshape(48, 64, 64))
    s.end("first", 48)
    wait_results(svc)
    code = re.search(r"## Minimal bridge.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    script = tmp_path / "bridge.py"
    script.write_text(code)
    bridge = subprocess.Popen([sys.executable, str(script), svc.steering.endpoint, svc.listen_endpoint],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        req = None
        while req is None or svc.steering.pending():
            assert time.monotonic() < deadline, svc.steering.requests()
            if req is None:
                time.sleep(0.5)  # the bridge's subscription reaches the service; re-ask until it has one
                req = svc.rescan([2, 5, 1, 4], step_factor=0.5, dose_factor=2)
                time.sleep(0.5)
                if svc.steering.requests()[-1]["state"] == "sent":
                    req = None
            time.sleep(0.05)
        assert bridge.wait(20) == 0, bridge.stderr.read()
    finally:
        bridge.kill()
    res = read_scan(wait_results(svc, 2), req["scan_id"])
    assert res["attrs"]["parent_scan_id"] == "first" and list(res["attrs"]["region"]) == [2, 5, 1, 4]
    assert tuple(res["attrs"]["scan_shape"]) == (6, 6) and res["attrs"]["step_nm"] == 0.025
    assert res["attrs"]["complete"]
    vbf = res["maps"]["vbf"]  # the stand-in writes the frame index + 1 into every pixel: vbf = index * disc area
    assert np.all(np.diff(vbf.ravel()) > 0)
