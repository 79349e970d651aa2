"""A sender process that finishes before a slow receiver has read everything still delivers every frame."""

import re
import subprocess
import sys
import time

import numpy as np
import zmq

from rrstem.stream import protocol as P


def test_replay_process_exits_only_after_a_late_slow_receiver_has_everything(tmp_path):
    np.save(tmp_path / "scan.npy", np.arange(12 * 12 * 8 * 8, dtype=np.uint16).reshape(12, 12, 8, 8))
    # the sender binds a free port itself (port 0) and says which: no port is freed and taken again
    sender = subprocess.Popen([sys.executable, "-m", "rrstem.cli", "replay", str(tmp_path / "scan.npy"),
                               "--to", "tcp://127.0.0.1:0", "--frames-per-message", "1", "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        for line in sender.stderr:  # "bound EP" is printed once bound, before anything is sent
            said.append(line)
            if bound := re.search(r"bound (tcp://\S+);", line):
                break
        assert bound, "".join(said)
        rx = zmq.Context.instance().socket(zmq.PULL)
        rx.connect(bound.group(1))  # the receiver comes late: the sender is already waiting with its scan
        frames, last, head = 0, None, None
        while rx.poll(10000):
            parts = rx.recv_multipart()
            head = P.decode_header(parts[0])
            if head.type == "frames":
                frames += head.count
                last = np.frombuffer(parts[1], np.uint16)
            time.sleep(0.002)  # and reads slowly: the sender has long finished sending into its queue
            if head.type == "end":
                break
        rx.close()
        assert sender.wait(30) == 0, sender.stderr.read()
    finally:
        sender.kill()
    assert frames == 144 and head.type == "end" and head.frames_sent == 144
    np.testing.assert_array_equal(last, np.arange(143 * 64, 144 * 64, dtype=np.uint16))
