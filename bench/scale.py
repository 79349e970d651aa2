"""Scale-out: ``rrstem analyze`` of a recorded file in-process and on N local Dask workers (``--workers N``).

Case ``analyze``: makes (unless it exists) a ``.npy`` of a ``--scan`` x
``--scan`` scan of 256x256 uint16 frames (16 Poisson bright-field discs,
fixed seed, cycled; 110x110: 1.6 GB), reads it once so that it is in the page
cache, runs one untimed in-process ``analyze`` (numba's caches, imports),
then times, as a user runs it (``rrstem analyze FILE --bin 4 --no-train``, its
own process, wall clock from start to exit):

- ``inprocess``: the file streamed over ``inproc://`` into the service;
- ``workers_<N>`` for each N of ``--workers``: ``--workers N`` (a LocalCluster
  of N processes, one thread each, started by the command), default partitions
  (about 128 MiB of frames each);
- ``workers_<N>_small``: the same with ``--partition-frames`` ``--small``
  (many small partitions): with ``workers_<N>`` it gives the cost of one
  partition task beyond its frames.

Per run: ``seconds`` (wall), ``frames_per_s``, ``partitions`` and
``reduce_seconds`` (the command's own log: submitting the first partition to
merging the last), ``warm_seconds`` (its workers' imports and compiled pass,
before that), ``peak_rss_anon_GB`` of the command's process and of its
largest descendant (a Dask worker), sampled every 0.2 s from ``/proc``.
``cost_model``: per N, the command's fixed cost (``seconds - reduce_seconds``:
imports, cluster start, warm-up, calibration, results) and ``per_task_s``, the time one
more partition costs a worker beyond its frames:
``(reduce_small - reduce_default) * N / (tasks_small - tasks_default)``.

Other sessions add live-ingest cases (``serve --ingest-workers``) here.
One run per case: on a shared 2-core machine, the figures are noisy.
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

from files_memory import make_file, rss_anon_kib

RRSTEM = [sys.executable, "-m", "rrstem.cli"]
REDUCED = re.compile(r"(\d+) partition\(s\) reduced on (\d+) worker\(s\) in ([0-9.]+) s")
READY = re.compile(r"worker\(s\) ready in ([0-9.]+) s")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def timed(args: list[str]) -> dict:
    """Run ``rrstem *args``; wall seconds, the reduce time from its log, peak anonymous memory."""
    peaks: dict[int, int] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*RRSTEM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            for pid in (proc.pid, *descendants(proc.pid)):
                kib = rss_anon_kib(pid)
                if kib is not None:
                    peaks[pid] = max(peaks.get(pid, 0), kib)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"rrstem {' '.join(args)} exited {proc.returncode}: {err[-2000:]}")
    row = {"seconds": round(seconds, 3), "peak_rss_anon_GB": round(peaks.get(proc.pid, 0) / 2**20, 3),
           "peak_rss_anon_GB_largest_child": round(max((v for p, v in peaks.items() if p != proc.pid), default=0)
                                                   / 2**20, 3)}
    found = REDUCED.search(err)
    if found:
        row.update(partitions=int(found[1]), workers=int(found[2]), reduce_seconds=float(found[3]))
    ready = READY.search(err)
    if ready:
        row["warm_seconds"] = float(ready[1])
    return row


def analyze_case(a: argparse.Namespace) -> dict:
    path = Path(a.file)
    made = None
    if not path.exists():
        made = round(make_file(path, a.scan, a.scan), 1)
    t0 = time.perf_counter()
    with open(path, "rb") as fh:  # into the page cache
        while fh.read(64 << 20):
            pass
    cache_s = time.perf_counter() - t0
    n = a.scan * a.scan
    out = Path(a.out_dir)
    common = ["analyze", str(path), "--bin", str(a.bin), "--no-train", "--no-progress"]
    timed([*common, "--out", str(out / "warmup.h5")])
    runs = {"inprocess": timed([*common, "--out", str(out / "inprocess.h5")])}
    for w in a.workers:
        runs[f"workers_{w}"] = timed([*common, "--workers", str(w), "--out", str(out / f"w{w}.h5")])
        runs[f"workers_{w}_small"] = timed([*common, "--workers", str(w), "--partition-frames", str(a.small),
                                            "--out", str(out / f"w{w}s.h5")])
    for row in runs.values():
        row["frames_per_s"] = round(n / row["seconds"])
    model = {}
    for w in a.workers:
        big, small = runs[f"workers_{w}"], runs[f"workers_{w}_small"]
        extra = small["partitions"] - big["partitions"]
        model[f"workers_{w}"] = {
            "fixed_s": round(big["seconds"] - big["reduce_seconds"], 3),
            "reduce_frames_per_s": round(n / big["reduce_seconds"]),
            "per_task_s": round((small["reduce_seconds"] - big["reduce_seconds"]) * w / extra, 4) if extra > 0 else None,
        }
    return {"file": str(path), "file_GB": round(path.stat().st_size / 1e9, 3), "made_s": made,
            "page_cache_read_s": round(cache_s, 2), "scan": [a.scan, a.scan], "frame": [256, 256], "bin": a.bin,
            "frames": n, "runs": runs, "cost_model": model}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="analyze", help="comma-separated: analyze")
    p.add_argument("--file", default="/tmp/rrstem-scale.npy", help="the analyze case's input (made if missing)")
    p.add_argument("--scan", type=int, default=110, help="scan edge of the made file (110: 1.6 GB)")
    p.add_argument("--bin", type=int, default=4)
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    p.add_argument("--small", type=int, default=256, help="--partition-frames of the small-partition runs")
    p.add_argument("--out-dir", default="/tmp", help="where the results files go")
    a = p.parse_args(argv)
    cases = {"analyze": analyze_case}
    report = {"benchmark": "scale", "cpus": os.cpu_count(), "python": sys.version.split()[0],
              "loadavg_before": os.getloadavg()[0], "cases": {}}
    for name in a.cases.split(","):
        report["cases"][name] = cases[name](a)
    report["loadavg_after"] = os.getloadavg()[0]  # other processes on the machine: the figures' noise
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
