"""Real ``rrstem serve`` processes for tests: started as users start them, on port 0, their endpoints read from
the line serve prints."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rrstem.stream.control import ControlClient

RRSTEM = [sys.executable, "-m", "rrstem.cli"]


def serve(tmp_path: Path, *extra: str, command: list[str] = RRSTEM) -> tuple[subprocess.Popen, str, str]:
    """``rrstem serve`` bound on port 0 in its own process; (process, frames endpoint, control endpoint)."""
    proc = subprocess.Popen([*command, "serve", "--bind", "--listen", "tcp://127.0.0.1:0", "--publish",
                             "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--no-train", "--no-progress",
                             "--events", "tcp://127.0.0.1:0", "--steering", "tcp://127.0.0.1:0",
                             "--calibration-frames", "4", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # log lines, then "rrstem serve: frames from EP, snapshots on EP, control on EP, ..."
        seen.append(line)
        if line.startswith("rrstem serve: frames from"):
            break
    else:
        raise AssertionError("".join(seen))
    frames_ep = line.split("frames from ")[1].split(",")[0]
    control_ep = line.split("control on ")[1].split(",")[0]
    proc.banner = line
    return proc, frames_ep, control_ep


def wait_received(control_ep: str, n: int, timeout: float = 20.0) -> None:
    with ControlClient(control_ep, timeout=5) as ctl:
        deadline = time.monotonic() + timeout
        while ctl.request("status")["status"]["counters"].get("received", 0) < n:
            assert time.monotonic() < deadline, f"fewer than {n} frames received"
            time.sleep(0.02)
