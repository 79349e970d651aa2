"""DPC on multislice scans: the calibration found, the maps against the truth, live settling, ingest cost.

Issue 27's targets, measured on the abTEM scans of ``simulators/multislice.py`` (60 kV, 31 mrad; graphene
with a Si substitution or a vacancy, pristine graphene, MoS2), one part each (``--parts``):

- ``accuracy``: every noise-free detector frame is turned about the pattern's centre (the zero-angle
  pixel) by ``--angles`` and, with ``flip``, its rows mirrored (bilinear interpolation as a sparse matrix; a pixel
  that samples outside the detector gets 0), so that rrstem's convention (``docs/dpc.md``) needs exactly
  that angle and flip to undo it; the turned expected counts (1e6 electrons per pattern) are then
  Poisson-sampled with ``--seeds`` noise seeds. Each file goes through ``rrstem analyze FILE --no-train``
  in its own process, as a user runs it, and the results file is read back. Figures: the angle's error
  (degrees, modulo 360), the flip, Pearson r of ``dpc_x``/``dpc_y`` with the COM of the unturned
  noise-free frames (mrad, full detector: the true field), and r of ``idpc`` with a plain (periodic)
  Fourier integration of that true field, and, for context, with rrstem's own mirrored integration of it.
  Targets: angle within 1 degree, flip right, dpc r >= 0.99, idpc r >= 0.95, for the worst case.
- ``settle``: one turned 1e6 scan per case fed live to its own ``rrstem serve --no-train`` process (bin 2)
  by ``rrstem replay --rate FPS``; the snapshots' ``map_attrs`` give the calibration in use at each fill.
  ``settled_at``: the fill from which the angle stays within 1 degree of the final one with the final
  flip (target: by 0.25); ``flag_at``: the first fill whose calibration says ``settled``.
- ``ingest``: ``bench/ingest.py``'s 256x256 uint16 bin-4 case through the in-process service with the
  DPC reduction registered and unregistered, alternating, at each ``--ingest-scans`` edge; frames/s as
  ``ingest.py`` times them (sender's first message to the snapshot that reports every frame), medians.
  Target: with / without >= 0.95. Also the snapshot rate during acquisition (target: 2 Hz or faster at
  512x512 with DPC on).

Prints one JSON object. ``--json FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import msgpack
import numpy as np
import scipy.sparse
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402  (bench/ingest.py: its sender and service helpers)
import quality  # noqa: E402  (bench/quality.py: the serve process and replay)

DOSE = 1e6  #: electrons per pattern; the noise-free files hold expected counts at this dose
TARGETS = {"angle_error_deg": 1.0, "dpc_r": 0.99, "idpc_r": 0.95, "settled_at": 0.25, "ingest_ratio": 0.95,
           "snapshot_hz_512": 2.0}


# ---------------------------------------------------------------- the scans and their truth


def load_scan(data: Path, name: str) -> tuple[np.ndarray, dict, dict]:
    """(noise-free frames (ny, nx, h, w) float32, the file's attributes, the ground truth JSON)."""
    truth = json.loads((data / f"{name}.json").read_text())
    with h5py.File(data / truth["files"]["none"], "r") as f:
        return f["data"][()], dict(f["data"].attrs), truth


def true_com(frames: np.ndarray, pixel_mrad: float) -> tuple[np.ndarray, np.ndarray]:
    """COM (x, y) of every frame in mrad, mean removed: the true field (detector axes = scan axes)."""
    h, w = frames.shape[-2:]
    total = frames.sum(axis=(2, 3), dtype=np.float64)
    cx = (frames.sum(axis=2, dtype=np.float64) @ np.arange(w)) / total
    cy = (frames.sum(axis=3, dtype=np.float64) @ np.arange(h)) / total
    return (cx - cx.mean()) * pixel_mrad, (cy - cy.mean()) * pixel_mrad


def plain_integration(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The periodic Fourier integral of the gradient field ``(gx, gy)`` (per scan step), mean 0."""
    ky = np.fft.fftfreq(gx.shape[0])[:, None]
    kx = np.fft.fftfreq(gx.shape[1])[None, :]
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    phi = (kx * np.fft.fft2(gx) + ky * np.fft.fft2(gy)) / (2j * np.pi * k2)
    phi[0, 0] = 0.0
    return np.fft.ifft2(phi).real


def turn(frames: np.ndarray, angle_deg: float, flip: bool, centre: tuple[float, float]) -> np.ndarray:
    """Frames as a detector turned by ``angle_deg`` (and rows mirrored with ``flip``) records them.

    Output pixel ``v`` (from the centre, (x, y)) takes the input at ``R(angle) F v`` (bilinear), so the
    COM becomes ``F R(-angle)`` times the true one and ``R(angle) F`` (rrstem's correction) undoes it.
    """
    h, w = frames.shape[-2:]
    cy, cx = centre
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    vx, vy = x - cx, (cy - y) if flip else (y - cy)
    a = np.deg2rad(angle_deg)
    ux, uy = np.cos(a) * vx - np.sin(a) * vy + cx, np.sin(a) * vx + np.cos(a) * vy + cy
    x0, y0 = np.floor(ux).astype(int), np.floor(uy).astype(int)
    tx, ty = ux - x0, uy - y0
    rows, cols, weights = [], [], []  # the (h*w, h*w) sparse matrix from input pixels to output pixels
    for dy, dx, wgt in ((0, 0, (1 - tx) * (1 - ty)), (0, 1, tx * (1 - ty)), (1, 0, (1 - tx) * ty), (1, 1, tx * ty)):
        yy, xx = y0 + dy, x0 + dx
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).ravel()
        rows.append((yy * w + xx).ravel()[inside])
        cols.append(np.flatnonzero(inside))
        weights.append(wgt.ravel()[inside])
    m = scipy.sparse.csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                                shape=(h * w, h * w), dtype=np.float32)
    flat = frames.reshape(-1, h * w)
    return (m.T @ flat.T).T.astype(frames.dtype).reshape(frames.shape)


def write_scan(path: Path, counts: np.ndarray, attrs: dict, seed: int) -> None:
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", data=counts, chunks=(1, 1, *counts.shape[2:]))
        d.attrs.update({**{k: v for k, v in attrs.items() if k != "counts_scale"}, "dose": DOSE, "noise_seed": seed})


def analyze(path: Path, out: Path) -> dict:
    """``rrstem analyze PATH --no-train`` in its own process; the maps and ``maps`` attributes of the scan."""
    subprocess.run([sys.executable, "-m", "rrstem.cli", "analyze", str(path), "--no-train", "--no-progress",
                    "--out", str(out)], check=True, capture_output=True, env=os.environ.copy())
    with h5py.File(out, "r") as f:
        (scan,) = f["scans"].values()
        maps = {k: scan["maps"][k][()] for k in ("dpc_x", "dpc_y", "idpc")}
        attrs = {k: scan["maps"].attrs[k] for k in scan["maps"].attrs}
    out.unlink()
    return {**maps, "angle": float(attrs["dpc_rotation_deg"]), "flip": bool(attrs["dpc_flip"]),
            "calibration": json.loads(attrs["dpc_calibration"])}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def angle_error(found: float, true: float) -> float:
    return abs((found - true + 180.0) % 360.0 - 180.0)


# ---------------------------------------------------------------- parts


def accuracy(data: Path, names: list[str], angles: list[float], seeds: int, tmp: Path) -> dict:
    from rrstem.stream.dpc.integrate import integrate_gradient

    out = {}
    for name in names:
        frames, attrs, truth = load_scan(data, name)
        tx, ty = true_com(frames, float(attrs["detector_pixel_mrad"]))
        plain, mirrored = plain_integration(tx, ty), integrate_gradient(tx, ty)
        centre = tuple(float(v) for v in truth["zero_angle_pixel"])
        runs = []
        for angle in angles:
            for flip in (False, True):
                turned = turn(frames, angle, flip, centre)
                for seed in range(seeds):
                    path = tmp / f"{name}-{angle:g}-{int(flip)}-{seed}.h5"
                    write_scan(path, np.random.default_rng(seed).poisson(turned).astype(np.uint16), attrs, seed)
                    t0 = time.perf_counter()
                    got = analyze(path, tmp / "results.h5")
                    path.unlink()
                    cal = got["calibration"]
                    runs.append({
                        "angle": angle, "flip": flip, "seed": seed, "found_angle": round(got["angle"], 3),
                        "found_flip": got["flip"], "angle_error_deg": round(angle_error(got["angle"], angle), 3),
                        "dpc_x_r": round(pearson(got["dpc_x"], tx), 4), "dpc_y_r": round(pearson(got["dpc_y"], ty), 4),
                        "idpc_r": round(pearson(got["idpc"], plain), 4),
                        "idpc_r_mirrored": round(pearson(got["idpc"], mirrored), 4),
                        "uncertainty_deg": round(cal.get("uncertainty_deg", float("nan")), 3),
                        "curl_ratio": round(cal.get("curl_ratio", float("nan")), 3),
                        "curl_ratio_other_flip": round(cal.get("curl_ratio_other_flip", float("nan")), 3),
                        "polarity": round(cal.get("polarity", float("nan")), 3),
                        "analyze_s": round(time.perf_counter() - t0, 1)})
                    print(name, json.dumps(runs[-1]), file=sys.stderr, flush=True)
        out[name] = {
            "scan": list(frames.shape[:2]), "truth_rms_mrad": round(float(np.sqrt(np.mean(tx**2 + ty**2))), 3),
            "r_plain_vs_mirrored_truth": round(pearson(plain, mirrored), 4),
            "worst": {"angle_error_deg": max(r["angle_error_deg"] for r in runs),
                      "flip_right": all(r["found_flip"] == r["flip"] for r in runs),
                      "dpc_r": min(min(r["dpc_x_r"], r["dpc_y_r"]) for r in runs),
                      "idpc_r": min(r["idpc_r"] for r in runs),
                      "idpc_r_mirrored": min(r["idpc_r_mirrored"] for r in runs)},
            "runs": runs}
    return out


def settle_case(data: Path, name: str, angle: float, flip: bool, fps: float, tmp: Path) -> dict:
    """One turned 1e6 scan into its own ``rrstem serve``; the calibration in use at each percent of fill."""
    frames, attrs, truth = load_scan(data, name)
    centre = tuple(float(v) for v in truth["zero_angle_pixel"])
    path = tmp / f"live-{name}.h5"
    write_scan(path, np.random.default_rng(0).poisson(turn(frames, angle, flip, centre)).astype(np.uint16), attrs, 0)
    fractions = tuple(round(0.01 * k, 2) for k in range(1, 101))
    serve = quality.Serve(tmp / "live.rrstem.h5", {}, False, tmp / "serve.log", ["--no-train"])
    try:
        scan_id = f"live-{name}-{angle:g}-{int(flip)}"
        box = serve.expect(scan_id, fractions)
        sender = quality.replay(path, serve.listen, fps, scan_id, tmp / "replay.log")
        if not box["done"].wait(120 + frames.shape[0] * frames.shape[1] / fps):
            raise RuntimeError(f"no snapshot of {scan_id} at full fill")
        sender.wait(30)
    finally:
        serve.close()
        path.unlink()
    trace = []
    for frac in fractions:
        snap = box["snaps"].get(frac)
        head = snap.header
        got = head.counters.get("received", 0) / max(1, head.expected)
        ma = head.map_attrs or {}
        cal = ma.get("dpc_calibration") or {}
        cal = json.loads(cal) if isinstance(cal, str) else cal
        used, unc = ma.get("dpc_rotation_deg"), cal.get("uncertainty_deg")
        trace.append({"fill": round(got, 3), "angle": None if used is None else round(used, 3),
                      "flip": ma.get("dpc_flip"), "source": cal.get("source"), "settled": cal.get("settled"),
                      "uncertainty_deg": None if unc is None else round(unc, 3), "estimated_on": cal.get("filled")})
    final = trace[-1]
    stays = None
    for i in range(len(trace) - 1, -1, -1):
        t = trace[i]
        if t["angle"] is None or t["flip"] != final["flip"] or angle_error(t["angle"], final["angle"]) > 1.0:
            break
        stays = t["fill"]
    flag = next((t["fill"] for t in trace if t["settled"]), None)
    return {"scan": name, "angle": angle, "flip": flip, "fps": fps, "final_angle": final["angle"],
            "final_flip": final["flip"], "final_error_deg": round(angle_error(final["angle"], angle), 3),
            "settled_at": stays, "flag_at": flag,
            "trace": trace[4::5]}


def run_recorded(scan, frame, per_msg, bin_, tmp: str) -> tuple[float, list[tuple[float, int]]]:
    """``ingest.run_service`` with every snapshot's arrival time and frames received kept: (frames/s, times)."""
    from rrstem.stream.service import Service

    total = scan[0] * scan[1]
    seen: list[tuple[float, int]] = []
    with Service(ingest.service_config(tmp, bin_, False, listen="tcp://127.0.0.1:0", bind=True)) as svc:
        sub = ingest.subscribe(svc)
        proc, go, sent = ingest.spawn_sender(svc.listen_endpoint, "bench", scan, frame, per_msg)
        go.set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not seen or seen[-1][1] < total):
            if sub.poll(1000):
                head = msgpack.unpackb(sub.recv_multipart(copy=False)[0].bytes, raw=False)
                seen.append((time.monotonic(), (head.get("counters") or {}).get("received", 0)))
        sub.close(linger=0)
        ingest.wait_all(svc, total)
        proc.join(30)
    if not seen or seen[-1][1] < total:
        raise RuntimeError(f"no snapshot reported {total} frames received")
    return total / (seen[-1][0] - sent.value), seen


def snapshot_rate(seen: list[tuple[float, int]]) -> dict:
    """Snapshot intervals while frames arrive (first snapshot with frames to the one with all)."""
    times = [t for t, n in seen if n > 0]
    gaps = np.diff(times)
    return {"snapshots": len(times), "median_hz": round(1 / float(np.median(gaps)), 2) if len(gaps) else None,
            "max_gap_s": round(float(gaps.max()), 3) if len(gaps) else None}


def ingest_cost(edges: list[int], repeats: int) -> dict:
    """Frames/s with the DPC reduction registered and not, alternating; snapshot rates of both."""
    from rrstem.stream.reductions import register, unregister
    from rrstem.stream.reductions.dpc import DifferentialPhaseContrast as DPC

    frame, per_msg, bin_ = (256, 256), 32, 4
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for edge in edges:
            scan = (edge, edge)
            ingest.run_service(scan, frame, per_msg, bin_, False, tmp)  # warm-up
            rates: dict[bool, list[float]] = {True: [], False: []}
            snaps: dict[bool, list[dict]] = {True: [], False: []}
            for _ in range(repeats):
                for on in (False, True):
                    (register if on else unregister)(DPC)
                    try:
                        fps, seen = run_recorded(scan, frame, per_msg, bin_, tmp)
                    finally:
                        register(DPC)
                    rates[on].append(fps)
                    snaps[on].append(snapshot_rate(seen))
            a, b = statistics.median(rates[True]), statistics.median(rates[False])
            out[f"scan{edge}"] = {
                "scan": list(scan), "frame": list(frame), "bin": bin_, "fps_with_dpc": round(a),
                "fps_without": round(b), "ratio": round(a / b, 3), "worst_ratio": round(min(rates[True]) / max(rates[False]), 3),
                "fps_with_dpc_all": [round(v) for v in rates[True]], "fps_without_all": [round(v) for v in rates[False]],
                "snapshots_with_dpc": snaps[True], "snapshots_without": snaps[False]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=quality.default_data(), help="the multislice scans' folder")
    ap.add_argument("--parts", default="accuracy,settle,ingest")
    ap.add_argument("--scans", default="graphene-si,graphene-vacancy,mos2-pristine,graphene-pristine",
                    help="multislice scans to use (those with a noise-free file in --data)")
    ap.add_argument("--angles", default="0,37,123,250", help="detector turns, degrees")
    ap.add_argument("--seeds", type=int, default=2, help="Poisson noise seeds per angle and flip")
    ap.add_argument("--settle-cases", default="123:1,250:0", help="ANGLE:FLIP live cases per scan")
    ap.add_argument("--settle-fps", type=float, default=quality.DWELL_FPS, help="replay rate, frames/s")
    ap.add_argument("--ingest-scans", default="256,512", help="scan edges of the ingest comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    names = [n for n in args.scans.split(",") if (args.data / f"{n}.json").is_file()]
    report: dict = {"benchmark": "dpc", "dose": DOSE, "scans": names, "targets": TARGETS, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        if "accuracy" in parts:
            report["accuracy"] = accuracy(args.data, names, [float(a) for a in args.angles.split(",")],
                                          args.seeds, Path(tmp))
        if "settle" in parts:
            cases = [(float(a), bool(int(f))) for a, f in (c.split(":") for c in args.settle_cases.split(","))]
            report["settle"] = [settle_case(args.data, n, a, f, args.settle_fps, Path(tmp)) for n in names
                                for a, f in cases]
    if "ingest" in parts:
        report["ingest"] = ingest_cost([int(e) for e in args.ingest_scans.split(",")], args.repeats)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
