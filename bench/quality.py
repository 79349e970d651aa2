"""Quality of the live rrVAE maps on multislice scans, through a real ``rrstem serve`` process.

What is measured, on what data:

- data: the abTEM multislice scans of ``simulators/multislice.py`` (60 kV,
  31 mrad, 128x128 detector binned by 2 to 64x64 in the service), read from
  ``--data`` (default ``~/.cache/rrstem/multislice``; make them with
  ``python -m rrstem.simulators.multislice --out DIR``). Each case is a scan,
  a dose (``none`` = noise-free, or e/pattern) and a pace in frames/s (133 =
  the paper's 7.5 ms dwell).
- how: per case and trainer seed, a fresh ``sys.executable -m rrstem.cli
  serve`` process (it inherits ``PYTHONPATH``, so ``PYTHONPATH=SHIM`` measures
  that checkout's code; bin 2, training on, checkpoints off, ``--trainer
  '{"seed": S, ...}'``) and ``rrstem replay FILE --rate FPS``; this script
  subscribes to its snapshots.
- when: AT THE LAST FRAME (the first snapshot that reports every frame
  received; its maps are the latest the trainer had encoded) and in the
  RESULTS FILE. ``seconds_to_results``: from that snapshot's time to the
  moment the scan's group is in the results file (polled every 20 ms).
- figures (``model/metrics.py``, as the issue's table): ``rotation_r``,
  the circular correlation of the rotation map with the COM angle, weighted
  by the COM magnitude, best over fold 1..6 and both signs; ``latent_r``,
  the largest |Pearson r| of a content latent with the COM magnitude. The
  COM is the NOISE-FREE scan's, computed here with NumPy from the noise-free
  frames sum-binned by 2 as the service bins them, relative to their mean
  pattern's COM, over the positions the maps cover (``covered``: their share
  of the scan; at the last frame the trainer's latest encode may lag).
- defects (read from an ``anomaly`` map in the snapshot and the results, null
  if absent): ``anomaly_distance_a``, from the highest score to the defect
  (ground truth JSON), in Angstrom; ``alarms``, how many positions are above
  the alarm threshold: the length of an ``alarms`` (k, 2) list, else the count
  of an ``anomaly_alarm`` map, else of ``anomaly`` above ``anomaly_threshold``
  (a 0-d array beside the maps, the ``threshold`` attribute of the results'
  ``anomaly``, or a number in the training status or metrics); on pristine
  scans the target is none, at every dose, at the last frame and in the
  results. For comparison, the rrVAE's own outlier map ``rrvae_anomaly``
  gets ``rrvae_anomaly_distance_a`` and ``rrvae_alarms`` (positions above
  ``RRVAE_SIGMA``, the trainer's former alarm threshold); no target.
- warm start (``--warm-start``): the service keeps running; the 1e6 scan, then
  its rescan (the same area, another noise seed, ``NAME-1e6-rescan.h5``), at
  the same pace. Rotation and latent r of the second scan when 25 % of it
  has arrived, and in its results.
- seeds: ``--seeds N`` trainer seeds (0..N-1, default 5) per case; the
  summary gives the median and the worst (lowest r, longest time, farthest
  anomaly) of each figure, and whether the worst meets the issue's target.

Runs one service at a time; no warm-up: each run is a fresh service and model,
as in use. Wrap it in the bench lock. A dev run of a minute or two:

    flock /tmp/rrstem-bench.lock python bench/quality.py --cases graphene-pristine:1e6:2000 --seeds 1
    python bench/quality.py --list          # the cases, and the files they need

The JSON (stdout, and ``--json FILE``) holds every run and the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import zmq

from rrstem.model import metrics
from rrstem.stream.snapshot import Snapshot

BIN = 2
DWELL_FPS = 1 / 7.5e-3  # the paper's 7.5 ms dwell: 133 frames/s
#: the issue's cases: (scan, dose tag, frames/s)
DEFAULT_CASES = [
    ("graphene-pristine", "1e6", 133), ("graphene-vacancy", "1e6", 133), ("graphene-pristine", "1e5", 133),
    ("graphene-pristine", "none", 2000), ("graphene-pristine", "1e6", 2000),
    ("graphene-si", "1e6", 133), ("mos2-pristine", "1e6", 133),
]
#: (figure, target, better): targets of issue 10 by (dose, pace); "up" means higher is better
TARGETS = {
    ("1e6", "dwell"): {"last_frame.rotation_r": 0.95, "last_frame.latent_r": 0.9, "seconds_to_results": 10.0},
    ("1e6", "fast"): {"results.rotation_r": 0.95, "results.latent_r": 0.9, "seconds_to_results": 30.0},
    ("none", "fast"): {"results.rotation_r": 0.95, "results.latent_r": 0.9, "seconds_to_results": 30.0},
    ("1e5", "any"): {"results.rotation_r": 0.95, "results.latent_r": 0.7},
}
DEFECT_TARGET_A = 1.0
#: the rrVAE outlier map's former alarm threshold (TrainerConfig.alarm_sigma), for the comparison figures
RRVAE_SIGMA = 40.0
WARM_TARGETS = {"warm_quarter.rotation_r": 0.95, "warm_quarter.latent_r": 0.8}
LOWER_IS_BETTER = ("seconds_to_results", "anomaly_distance_a", "alarms")


def default_data() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rrstem" / "multislice"


# ---------------------------------------------------------------- reference COM


def reference_com(frames: np.ndarray, b: int = BIN) -> dict[str, np.ndarray]:
    """COM magnitude and angle (ny, nx) of ``frames`` sum-binned by ``b``, relative to their mean pattern's COM."""
    ny, nx, h, w = frames.shape
    f = frames.reshape(ny, nx, h // b, b, w // b, b).sum(axis=(3, 5), dtype=np.float64)
    ky, kx = np.mgrid[0:h // b, 0:w // b]
    total = f.sum(axis=(2, 3))
    cx = (f * kx).sum(axis=(2, 3)) / total
    cy = (f * ky).sum(axis=(2, 3)) / total
    mean = f.mean(axis=(0, 1))
    cx -= (mean * kx).sum() / mean.sum()
    cy -= (mean * ky).sum() / mean.sum()
    return {"com_magnitude": np.hypot(cx, cy), "com_angle": np.arctan2(cy, cx)}


class Dataset:
    """The files and ground truth of one multislice scan in ``data``."""

    def __init__(self, data: Path, name: str):
        sidecar = data / f"{name}.json"
        if not sidecar.is_file():
            raise SystemExit(f"no {sidecar}: make the scans with python -m rrstem.simulators.multislice --out {data}")
        self.name, self.data = name, data
        self.truth = json.loads(sidecar.read_text())
        self.step_a = float(self.truth["scan_step_angstrom"])
        self._ref = None

    def file(self, tag: str) -> Path:
        name = self.truth["files"].get(tag)
        if name is None or not (self.data / name).is_file():
            raise SystemExit(f"{self.name} has no {tag} file in {self.data} (it has {sorted(self.truth['files'])})")
        return self.data / name

    @property
    def ref(self) -> dict[str, np.ndarray]:
        if self._ref is None:
            with h5py.File(self.file("none"), "r") as f:
                self._ref = reference_com(f["data"][()])
        return self._ref

    @property
    def defects_px(self) -> list[list[float]]:
        return [d["position_pixels"] for d in self.truth.get("defects", [])]


# ---------------------------------------------------------------- the service


class Serve:
    """A ``rrstem serve`` process with its endpoints, and a thread that keeps the snapshots this bench needs."""

    LINE = re.compile(r"frames from (\S+), snapshots on (\S+), control on (\S+),")

    def __init__(self, out: Path, trainer: dict, once: bool, log_path: Path, extra: list[str]):
        cmd = [sys.executable, "-m", "rrstem.cli", "serve", "--listen", "tcp://127.0.0.1:0", "--bind",
               "--publish", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--out", str(out),
               "--bin", str(BIN), "--no-progress", "--checkpoint-seconds", "0", *extra]
        if trainer:
            cmd += ["--trainer", json.dumps(trainer)]
        if once:
            cmd.append("--once")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=os.environ.copy())
        line = self.proc.stdout.readline()
        m = self.LINE.search(line)
        if not m:
            self.proc.kill()
            self.log.close()
            said = log_path.read_text()
            if "unrecognized arguments: --trainer" in said:
                raise RuntimeError("this rrstem serve has no --trainer option (per-seed runs need it): take commit "
                                   "'serve/analyze/demo --trainer JSON' of branch multislice (stream/cli.py)")
            raise RuntimeError(f"rrstem serve did not announce its endpoints (got {line!r}); see {log_path}: "
                               f"{said[-500:]}")
        self.listen, self.publish, self.control = m.groups()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain the rest
        self.watch: dict[str, dict] = {}  # scan_id -> {"fractions": {...}, "snaps": {...}}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("no snapshot subscription")

    def expect(self, scan_id: str, fractions: tuple[float, ...]) -> dict:
        box = {"fractions": sorted(fractions), "snaps": {}, "done": threading.Event()}
        self.watch[scan_id] = box
        return box

    def _listen(self):
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 4)
        sub.connect(self.publish)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sub.poll(50):
                    continue
                snap = Snapshot.decode(sub.recv_multipart(copy=False))
                box = self.watch.get(snap.header.scan_id)
                if box is None:
                    continue
                got = snap.header.counters.get("received", 0) / max(1, snap.header.expected)
                all_in = got >= 1.0 or snap.header.state not in ("idle", "acquiring")
                for frac in box["fractions"]:
                    if frac not in box["snaps"] and (got >= frac or all_in):
                        box["snaps"][frac] = snap
                if 1.0 in box["snaps"]:
                    box["done"].set()
        finally:
            sub.close(0)

    def close(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stop.set()
        self._thread.join(2)
        self.log.close()
        return code


def replay(path: Path, endpoint: str, fps: float, scan_id: str, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rrstem.cli", "replay", str(path), "--to", endpoint, "--connect",
           "--rate", str(fps), "--no-progress", "--scan-id", scan_id]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def wait_results(path: Path, scan_id: str, timeout: float, proc: subprocess.Popen) -> float | None:
    """Unix time at which ``scan_id``'s group is first seen in the results file (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            st = path.stat()
            if (st.st_ino, st.st_mtime_ns) != seen:
                seen = (st.st_ino, st.st_mtime_ns)
                with h5py.File(path, "r") as f:
                    if scan_id in f.get("scans", {}):
                        return time.time()
        except (OSError, KeyError):
            pass
        if proc.poll() is not None and not path.exists():
            return None
        time.sleep(0.02)
    return None


def read_results(path: Path, scan_id: str) -> dict:
    """The maps, model metrics and attributes of ``scan_id`` (h5py only: any rrstem version's file)."""
    with h5py.File(path, "r") as f:
        g = f["scans"][scan_id]
        maps = {k: v[()] for k, v in g["maps"].items()}
        attrs = {k: g.attrs[k] for k in g.attrs}
        out = {"maps": maps, "attrs": attrs, "metrics": {}, "step": None}
        if "training" in g:
            out["metrics"] = json.loads(g["training"].attrs.get("metrics", "{}"))
        if "model" in g:
            out["step"] = int(g["model"].attrs.get("step", 0))
        if "anomaly" in g["maps"] and "threshold" in g["maps"]["anomaly"].attrs:  # the rrvae branch's layout
            maps.setdefault("anomaly_threshold", np.float64(g["maps"]["anomaly"].attrs["threshold"]))
    return out


# ---------------------------------------------------------------- figures


def _threshold(*places) -> float | None:
    for place in places:
        if not isinstance(place, dict):
            continue
        for key in ("anomaly_threshold", "alarm_threshold"):
            if key in place:
                try:
                    return float(place[key] if not isinstance(place[key], str) else json.loads(place[key]))
                except (TypeError, ValueError):
                    pass
    return None


def judge(maps: dict, ds: Dataset, threshold: float | None = None) -> dict:
    """Rotation and latent r against the noise-free COM over the positions the maps cover; defect figures."""
    out: dict = {"rotation_r": None, "fold": None, "latent_r": None, "latent_rs": None, "covered": 0.0}
    if "rotation" in maps and "latent" in maps:
        rot = np.asarray(maps["rotation"], dtype=np.float64)
        lat = np.asarray(maps["latent"], dtype=np.float64)
        if lat.ndim == 2:
            lat = lat[None]
        covered = np.isfinite(rot)
        ref = {k: np.where(covered, v, np.nan) for k, v in ds.ref.items()}
        found = metrics.com_metrics({"rotation": rot, "latent": lat}, ref)
        out.update(rotation_r=_r(found["rotation_r"]), fold=found["rotation_fold"],
                   latent_r=_r(found["latent_r_max"]), latent_rs=[_r(v) for v in found["latent_r"]],
                   covered=round(float(covered.mean()), 4))
    anomaly = maps.get("anomaly")
    out["anomaly_distance_a"] = None
    out["alarms"] = None
    if anomaly is not None:
        a = np.where(np.isfinite(anomaly), anomaly, -np.inf)
        peak = np.unravel_index(int(np.argmax(a)), a.shape)
        out["anomaly_peak_px"] = [int(v) for v in peak]
        out["anomaly_max"] = round(float(a[peak]), 3) if np.isfinite(a[peak]) else None  # the margin
        if ds.defects_px:
            d = min(np.hypot(peak[0] - y, peak[1] - x) for y, x in ds.defects_px)
            out["anomaly_distance_a"] = round(float(d) * ds.step_a, 3)
        if "anomaly_threshold" in maps:  # a 0-d array beside the maps (inf: no threshold yet)
            threshold = float(np.asarray(maps["anomaly_threshold"]))
        out["anomaly_threshold"] = None if threshold is None or not np.isfinite(threshold) else round(threshold, 4)
        listed, alarm_map = maps.get("alarms"), maps.get("anomaly_alarm")
        if listed is not None:  # (k, 2) [y, x] of the positions above the threshold
            out["alarms"] = int(np.asarray(listed).reshape(-1, 2).shape[0])
        elif alarm_map is not None:  # or a (ny, nx) bool map
            out["alarms"] = int(np.count_nonzero(np.asarray(alarm_map)))
        elif threshold is not None:
            out["alarms"] = int(np.count_nonzero(np.asarray(anomaly)[np.isfinite(anomaly)] > threshold))
    rrvae = maps.get("rrvae_anomaly")
    if rrvae is not None and np.isfinite(rrvae).any():
        peak = np.unravel_index(int(np.nanargmax(rrvae)), rrvae.shape)
        out["rrvae_anomaly_distance_a"] = round(float(min(np.hypot(peak[0] - y, peak[1] - x)
                                                          for y, x in ds.defects_px)) * ds.step_a, 3) if ds.defects_px else None
        out["rrvae_alarms"] = int(np.count_nonzero(np.asarray(rrvae)[np.isfinite(rrvae)] > RRVAE_SIGMA))
    return out


def _r(v) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def run_case(data: Path, scan: str, dose: str, fps: float, seed: int, trainer: dict, extra: list[str],
             timeout: float, tmp: Path, warm: bool = False) -> dict:
    """One fresh service, one scan (or, ``warm``, the scan then its rescan); the figures of the run."""
    ds = Dataset(data, scan)
    trainer = {**trainer, "seed": seed} if seed is not None else dict(trainer)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{scan}-{dose}-{int(fps)}-s{seed}-", dir=tmp))
    out = run_dir / "results.h5"
    svc = Serve(out, trainer, once=not warm, log_path=run_dir / "serve.log", extra=extra)
    report: dict = {"scan": scan, "dose": dose, "fps": fps, "seed": seed, "warm_start_run": warm}
    try:
        files = [("first", ds.file(dose))] + ([("rescan", ds.file(f"{dose}-rescan"))] if warm else [])
        for which, path in files:
            scan_id = f"{scan}-{dose}-{which}-s{seed}"
            box = svc.expect(scan_id, (0.25, 1.0))
            t0 = time.time()
            sender = replay(path, svc.listen, fps, scan_id, run_dir / f"replay-{which}.log")
            t_res = wait_results(out, scan_id, timeout, svc.proc)
            sender.wait(30)
            if t_res is None:
                raise RuntimeError(f"no results for {scan_id} within {timeout} s; see {run_dir}")
            box["done"].wait(5)
            last, quarter = box["snaps"].get(1.0), box["snaps"].get(0.25)
            res = read_results(out, scan_id)
            thr_res = _threshold(res["metrics"], res["attrs"])
            part = {
                "stream_seconds": round((last.header.time if last else t_res) - t0, 2),
                "seconds_to_results": round(t_res - last.header.time, 2) if last else None,
                "training_steps": res["step"],
            }
            if last is not None:
                part["last_frame"] = judge(last.arrays, ds, _threshold(last.header.training))
                part["last_frame"]["steps"] = last.header.training.get("step")
            if quarter is not None and which == "rescan":
                part["quarter"] = judge(quarter.arrays, ds, _threshold(quarter.header.training))
            part["results"] = judge(res["maps"], ds, thr_res)
            report[which] = part
    finally:
        report["serve_exit"] = svc.close()
    return report


# ---------------------------------------------------------------- summary


def _get(run: dict, path: str):
    cur = run
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


FIGURES = ["last_frame.rotation_r", "last_frame.latent_r", "last_frame.covered", "results.rotation_r", "results.latent_r",
           "seconds_to_results", "last_frame.anomaly_distance_a", "results.anomaly_distance_a",
           "last_frame.alarms", "results.alarms", "results.rrvae_anomaly_distance_a", "results.rrvae_alarms"]


def summarize(runs: list[dict], key: str, figures: list[str]) -> dict:
    out = {}
    for fig in figures:
        vals = [_get(r, f"{key}.{fig}") for r in runs]
        missing = sum(v is None for v in vals)
        vals = [v for v in vals if v is not None]
        if not vals:
            out[fig] = {"median": None, "worst": None, "n": 0, "missing": missing}
            continue
        lower = any(fig.endswith(k) for k in LOWER_IS_BETTER)
        # a run without the figure (no map yet at the last frame) is the worst run of all
        worst = None if missing else round(float(max(vals) if lower else min(vals)), 4)
        out[fig] = {"median": round(float(np.median(vals)), 4), "worst": worst, "n": len(vals), "missing": missing}
    return out


def targets_for(scan: str, dose: str, fps: float, ds_truth: dict) -> dict:
    pace = "dwell" if fps < 500 else "fast"
    t = dict(TARGETS.get((dose, pace), {}))
    t.update(TARGETS.get((dose, "any"), {}))
    if ds_truth.get("defects") and dose == "1e6":
        t["results.anomaly_distance_a"] = DEFECT_TARGET_A
    if not ds_truth.get("defects"):  # pristine: no alarm at any dose, at the last frame or in the results
        t["last_frame.alarms"] = t["results.alarms"] = 0
    return t


def verdict(summary: dict, targets: dict) -> dict:
    out = {}
    for fig, target in targets.items():
        got = summary.get(fig, {})
        worst = got.get("worst")
        if worst is None:  # absent from some runs: failed; from all (not implemented): unknown
            out[fig] = {"target": target, "worst": None, "pass": False if got.get("n") else None}
            continue
        lower = any(fig.endswith(k) for k in LOWER_IS_BETTER)
        out[fig] = {"target": target, "worst": worst, "pass": bool(worst <= target if lower else worst >= target)}
    return out


def parse_case(text: str) -> tuple[str, str, float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a case is SCAN:DOSE:FPS such as graphene-pristine:1e6:133, not {text!r}")
    return parts[0], parts[1], float(parts[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help=f"folder of the multislice scans (default {default_data()})")
    ap.add_argument("--cases", default=None, help="comma-separated SCAN:DOSE:FPS, or none (default: the issue's cases: "
                    + ", ".join(f"{s}:{d}:{f}" for s, d, f in DEFAULT_CASES) + ")")
    ap.add_argument("--warm-start", default="graphene-pristine:1e6:133", metavar="SCAN:DOSE:FPS|none",
                    help="the warm-start case: the scan, then its rescan, in one service (default "
                         "graphene-pristine:1e6:133; none to skip)")
    ap.add_argument("--seeds", type=int, default=5, help="trainer seeds per case, 0..N-1 (default 5)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--trainer", default="{}", help="JSON trainer overrides for every run (serve --trainer)")
    ap.add_argument("--serve-args", default="", help="extra rrstem serve arguments, one string")
    ap.add_argument("--timeout", type=float, default=300.0, help="longest wait for a results file, s")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument("--list", action="store_true", help="list the cases and the files they need, and exit")
    args = ap.parse_args()
    data = args.data or default_data()
    if args.cases is None:
        cases = DEFAULT_CASES
    else:  # "none": only the warm-start case
        cases = [] if args.cases.strip().lower() in ("", "none") else [parse_case(c) for c in args.cases.split(",")]
    warm = None if args.warm_start.lower() == "none" else parse_case(args.warm_start)
    trainer = json.loads(args.trainer)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.list:
        for s, d, f in cases:
            print(f"{s}:{d}:{f:g}  needs {data / (s + '-' + d + '.h5')} and {data / (s + '-none.h5')}")
        if warm:
            print(f"warm start {':'.join(map(str, warm))}  needs also {warm[0]}-{warm[1]}-rescan.h5")
        return
    extra = args.serve_args.split()
    report = {"data": str(data), "seeds": seeds, "trainer": trainer, "serve_args": extra, "bin": BIN,
              "python": sys.executable, "pythonpath": os.environ.get("PYTHONPATH"),
              "load_1min_before": round(os.getloadavg()[0], 2), "runs": [], "summary": {}}
    with tempfile.TemporaryDirectory(prefix="rrstem-quality-") as tmp:
        for scan, dose, fps in cases:
            key = f"{scan}:{dose}:{fps:g}"
            runs = []
            for seed in seeds:
                r = run_case(data, scan, dose, fps, seed, trainer, extra, args.timeout, Path(tmp))
                runs.append(r)
                print(json.dumps({"case": key, "seed": seed, **_brief(r.get("first", {}))}), file=sys.stderr,
                      flush=True)
            report["runs"] += runs
            ds = Dataset(data, scan)
            summ = summarize(runs, "first", FIGURES)
            report["summary"][key] = {"figures": summ, "targets": verdict(summ, targets_for(scan, dose, fps, ds.truth))}
        if warm:
            scan, dose, fps = warm
            key = f"warm:{scan}:{dose}:{fps:g}"
            runs = []
            for seed in seeds:
                r = run_case(data, scan, dose, fps, seed, trainer, extra, args.timeout, Path(tmp), warm=True)
                runs.append(r)
                print(json.dumps({"case": key, "seed": seed, **_brief(r.get("rescan", {}))}), file=sys.stderr,
                      flush=True)
            report["runs"] += runs
            figs = ["quarter.rotation_r", "quarter.latent_r", "quarter.covered", "results.rotation_r",
                    "results.latent_r", "seconds_to_results"]
            summ = summarize(runs, "rescan", figs)
            report["summary"][key] = {"figures": summ, "targets": verdict(summ, {
                "quarter.rotation_r": WARM_TARGETS["warm_quarter.rotation_r"],
                "quarter.latent_r": WARM_TARGETS["warm_quarter.latent_r"]})}
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


def _brief(part: dict) -> dict:
    out = {"seconds_to_results": part.get("seconds_to_results")}
    for where in ("last_frame", "quarter", "results"):
        if where in part:
            out[where] = {k: part[where].get(k) for k in ("rotation_r", "latent_r", "anomaly_distance_a", "alarms",
                                                          "anomaly_max", "rrvae_anomaly_distance_a", "rrvae_alarms")}
    return out


if __name__ == "__main__":
    main()
