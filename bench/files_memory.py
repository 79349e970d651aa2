"""Bounded memory while a recorded file larger than this machine's memory is replayed and analyzed.

Makes (unless it exists) a ``.npy`` of a ``NY x NX`` scan of 256x256 uint16
frames with a memory map (default 480x480: 30.2 GB; frames are 16 Poisson
bright-field discs, fixed seed, cycled), then measures, sampling
``RssAnon`` from ``/proc/PID/status`` every 0.2 s:

- ``replay``: ``rrstem serve --bind --once --bin 4 --no-train`` in one
  process and ``rrstem replay FILE --connect`` in another, over TCP loopback;
- ``analyze``: ``rrstem analyze FILE --bin 4 --no-train`` (one process).

The bound is the binned frame store (n_positions x 64 x 64 float32,
anonymous memory mapped up front) plus 1 GiB; file pages (the memory map of
the input) are page cache, not anonymous memory. Prints one JSON object;
``--delete`` removes the input file afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

RRSTEM = [sys.executable, "-m", "rrstem.cli"]
GIB = 1 << 30


def make_file(path: Path, ny: int, nx: int, edge: int = 256) -> float:
    """Write the scan with a memory map, a scan row at a time; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:edge, 0:edge]
    discs = np.stack([rng.poisson(((yy - edge / 2 - dy) ** 2 + (xx - edge / 2 - dx) ** 2 < (edge / 8) ** 2) * 200 + 2)
                      for dy, dx in rng.uniform(-3, 3, (16, 2))]).astype(np.uint16)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(ny, nx, edge, edge))
    for y in range(ny):
        out[y] = discs[(y + np.arange(nx)) % 16]
        if y % 32 == 31:
            out.flush()
    out.flush()
    del out
    return time.perf_counter() - t0


def rss_anon_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler:
    """Samples RssAnon of processes every ``interval`` s until stopped; keeps the peak and a thinned series."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        self.pids, self.interval = pids, interval
        self.peak = {k: 0 for k in pids}
        self.series = {k: [] for k in pids}
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            t = round(time.perf_counter() - self._t0, 1)
            for name, pid in self.pids.items():
                kib = rss_anon_kib(pid)
                if kib is not None:
                    self.peak[name] = max(self.peak[name], kib)
                    self.series[name].append((t, kib))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        return {name: {"peak_rss_anon_mib": round(self.peak[name] / 1024, 1),
                       "samples_mib": [(t, round(k / 1024)) for t, k in s[:: max(1, len(s) // 40)]]}
                for name, s in self.series.items()}


def run_replay(path: Path, out: Path) -> dict:
    serve = subprocess.Popen([*RRSTEM, "serve", "--bind", "--listen", "tcp://127.0.0.1:0", "--publish",
                              "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--once", "--no-train", "--bin",
                              "4", "--no-progress", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        line = serve.stdout.readline()
        endpoint = re.search(r"frames from (tcp://\S+?),", line).group(1)
        t0 = time.perf_counter()
        replay = subprocess.Popen([*RRSTEM, "replay", str(path), "--to", endpoint, "--connect", "--no-progress",
                                   "--timeout", "600"], stderr=subprocess.PIPE, text=True)
        sampler = Sampler({"serve": serve.pid, "replay": replay.pid})
        replay_err = replay.communicate(timeout=7200)[1]
        serve_code = serve.wait(7200)
        seconds = time.perf_counter() - t0
        figures = sampler.stop()
    finally:
        serve.kill()
    return {"seconds": round(seconds, 1), "replay_exit": replay.returncode, "serve_exit": serve_code,
            "replay_says": replay_err.strip().splitlines()[-1:], **figures}


def run_analyze(path: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([*RRSTEM, "analyze", str(path), "--bin", "4", "--no-train", "--no-progress", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler({"analyze": proc.pid})
    stdout, stderr = proc.communicate(timeout=7200)
    figures = sampler.stop()
    return {"seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode,
            "says": (stdout.strip().splitlines() + stderr.strip().splitlines())[-2:], **figures}


def received(out: Path, scan_id: str) -> dict:
    from rrstem.stream.results import read_scan

    return read_scan(out, scan_id)["attrs"]["counters"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", type=Path, default=Path("/tmp/rrstem-bench-30g.npy"))
    p.add_argument("--scan", type=int, nargs=2, default=(480, 480), metavar=("NY", "NX"))
    p.add_argument("--delete", action="store_true", help="delete the input file at the end")
    p.add_argument("--skip", choices=("replay", "analyze"), default=None)
    args = p.parse_args()
    ny, nx = args.scan
    result = {"file": str(args.path), "scan": [ny, nx], "frame": [256, 256], "dtype": "uint16", "bin": 4}
    try:
        if not args.path.exists():
            result["write_seconds"] = round(make_file(args.path, ny, nx), 1)
        result["file_gb"] = round(args.path.stat().st_size / 1e9, 2)
        result["memory_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
        store = ny * nx * 64 * 64 * 4
        result["frame_store_mib"] = round(store / 2**20, 1)
        result["bound_mib"] = round((store + GIB) / 2**20, 1)
        for part, run in (("replay", run_replay), ("analyze", run_analyze)):
            if args.skip == part:
                continue
            out = args.path.parent / f"rrstem-bench-{part}.h5"
            out.unlink(missing_ok=True)  # serve adds scans to an existing results file
            result[part] = run(args.path, out)
            result[part]["counters"] = received(out, args.path.stem)
            out.unlink()
        peaks = [v["peak_rss_anon_mib"] for part in ("replay", "analyze") if part in result
                 for v in result[part].values() if isinstance(v, dict) and "peak_rss_anon_mib" in v]
        result["under_bound"] = all(peak < result["bound_mib"] for peak in peaks)
    finally:
        if args.delete and args.path.exists():
            args.path.unlink()
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
