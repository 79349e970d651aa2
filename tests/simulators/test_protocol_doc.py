"""The minimal sender in docs/protocol.md runs as documented and speaks valid rrstem/1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import zmq

from rrstem.stream import protocol

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_sender() -> str:
    text = DOC.read_text()
    section = text[text.index("## Minimal sender"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_doc_lists_every_field_of_every_message():
    text = DOC.read_text()
    for model in (protocol.Start, protocol.Frames, protocol.End, protocol.Calibration):
        for name in model.model_fields:
            assert f"`{name}`" in text, f"{model.__name__}.{name} is not documented"
    for dtype in protocol.DTYPES:
        assert f"`{dtype}`" in text


def test_documented_sender_streams_a_valid_scan(zctx, tmp_path, receive):
    script = tmp_path / "sender.py"
    script.write_text(documented_sender())
    endpoint = f"ipc://{tmp_path}/bridge"
    proc = subprocess.Popen([sys.executable, str(script), endpoint], stderr=subprocess.PIPE)
    try:
        pull = zctx.socket(zmq.PULL)
        pull.connect(endpoint)  # ZeroMQ retries until the sender has bound
        got = receive(pull, timeout=20.0)
        assert proc.wait(timeout=20) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
    start = got["start"]
    assert (start.scan_id, start.scan_shape, start.frame_shape, start.dtype) == ("bridge-demo-0001", (16, 16),
                                                                                  (64, 64), "uint16")
    assert start.calibration.energy_kev == 60.0 and start.metadata == {"instrument": "my detector bridge"}
    assert got["messages"][:2] == [(0, 32), (32, 32)] and len(got["messages"]) == 8
    assert sorted(got["frames"]) == list(range(256)) and got["end"].frames_sent == 256
    for i in (0, 77, 255):  # the stand-in detector writes the frame index into every pixel
        assert np.all(got["frames"][i][0] == i)
