"""``rrstem serve`` as its own process, started as a user starts it, for the benchmarks.

``ServeProcess`` runs the ``rrstem`` console script (the one beside this
Python, so ``PYTHONPATH`` picks the code) with ``serve --bind --listen
tcp://127.0.0.1:0 --no-train`` (or ``--listen`` a sender's port) and every other socket a user gets (snapshots,
control, events, steering) on port 0 so that runs never collide; everything
else (checkpoints every 30 s, the progress bar, logging, the events thread)
stays at serve's defaults. It reads the endpoints from the line serve prints,
waits for serve's warm-up (the frame pass compiled, logged), as a user's
serve has long done before the microscope scans, and measures nothing itself: the caller times frames into ``frames`` against
snapshots from ``publish`` (``wait_reported``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import msgpack
import zmq

from rrstem.stream.control import ControlClient


def rrstem_command() -> list[str]:
    """The ``rrstem`` console script of this Python's environment, else ``python -m rrstem.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "rrstem")
    if os.path.exists(script):
        return [script]
    found = shutil.which("rrstem")
    return [found] if found else [sys.executable, "-m", "rrstem.cli"]


class ServeProcess:
    """One ``rrstem serve`` process; a context manager that stops it (SIGTERM, as Ctrl-C does) on exit."""

    def __init__(self, tmp: str, *args: str, name: str = "serve", train: bool = False, listen: str | None = None):
        """``args`` are added to serve's; ``train``: the rrVAE trains (else ``--no-train``); ``listen``: connect
        to a sender there (else bind port 0, ``frames``, for the sender to connect)."""
        self.log_path = os.path.join(tmp, f"{name}.log")
        frames = ["--listen", listen] if listen else ["--bind", "--listen", "tcp://127.0.0.1:0"]
        self.argv = [*rrstem_command(), "serve", *frames,
                     "--publish", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0",
                     "--events", "tcp://127.0.0.1:0", "--steering", "tcp://127.0.0.1:0",
                     *([] if train else ["--no-train"]), "--out", os.path.join(tmp, f"{name}.h5"), *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()  # "rrstem serve: frames from EP, snapshots on EP, control on EP, ..."
        if not line.startswith("rrstem serve: frames from"):
            self.close()
            raise RuntimeError(f"rrstem serve did not start: {line!r}; log: {self.tail()}")
        self.frames = line.split("frames from ")[1].split(",")[0]
        self.publish = line.split("snapshots on ")[1].split(",")[0]
        self.control = line.split("control on ")[1].split(",")[0]
        self.wait_log(("frame pass compiled", "frame pass warm-up failed"))  # as a user's serve is, before a scan

    def wait_log(self, texts: tuple[str, ...], timeout: float = 120.0) -> None:
        """Wait until serve's log has one of ``texts``."""
        deadline = time.monotonic() + timeout
        while not any(t in self.tail(10**6) for t in texts):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not log {texts[0]!r} within {timeout} s; log: {self.tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 2000) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-n:]

    def status(self) -> dict:
        """The control ``status`` reply's header (state, counters, scan_id ...)."""
        with ControlClient(self.control, timeout=10) as ctl:
            return ctl.request("status")["status"]

    def wait_done(self, scan_id: str, timeout: float = 300.0) -> dict:
        """Wait until ``scan_id`` is ``done`` (its results written); its last status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            h = self.status()
            if h.get("scan_id") == scan_id and h.get("state") == "done":
                return h
            time.sleep(0.1)
        raise RuntimeError(f"scan {scan_id} not done within {timeout} s; log: {self.tail()}")

    def peak_rss_gb(self) -> float:
        """The serve process's peak resident memory (VmHWM) since it started or since ``reset_peak_rss``."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
        return float("nan")

    def reset_peak_rss(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"rrstem serve exited with {self.proc.returncode}; log: {self.tail()}")

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def subscribe(endpoint: str) -> zmq.Socket:
    """A SUB socket on a snapshot endpoint."""
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    time.sleep(0.2)  # the subscription reaches the publisher before the scan starts
    return sub


def wait_reported(sub: zmq.Socket, total: int, scan_id: str | None = None, timeout: float = 300.0) -> float:
    """``time.monotonic()`` when a snapshot on ``sub`` (of ``scan_id``, if given) first reports ``total``
    frames received; closes ``sub``."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sub.poll(1000):
                parts = sub.recv_multipart(copy=False)
                now = time.monotonic()
                head = msgpack.unpackb(parts[0].bytes, raw=False)
                if scan_id is not None and head.get("scan_id") != scan_id:
                    continue
                if (head.get("counters") or {}).get("received", 0) >= total:
                    return now
        raise RuntimeError(f"no snapshot reported {total} frames received within {timeout} s")
    finally:
        sub.close(linger=0)
