"""The defect map (stream/defects.py) on the multislice scans, offline: every file, every partial fill.

What is measured: for each scan NAME and dose of ``--data`` (the files of
``python -m rrstem.simulators.multislice``: ``NAME-DOSE.h5`` and ``NAME.json``),
the VADF map as the service makes it (``--bin 2``, the geometry calibrated
from the first 64 frames, ``stream.reductions.Partial``), then
``defects.defect_score`` of the whole map and of every partial fill (the
first k rows complete, k from ``MIN_ROWS - 2`` to all). Reported per file:
the highest score and its distance from the defect (truth JSON), in A; the
highest score farther than 1.5 A from the defect (all of a pristine scan),
in the whole map and over all fills; the first fill whose alarms reach the
defect; and the alarms (positions above the threshold) of the whole map.
No service, no timing: the live figures come from ``bench/quality.py``.
Prints JSON.

    python bench/defects.py --data /work/cache/multislice [--doses none,1e6,1e5,1e6-rescan]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np

from rrstem.stream import defects
from rrstem.stream.preprocess import PreprocessConfig, calibrate
from rrstem.stream.reductions import Partial, ScanInfo

SCANS = ("graphene-vacancy", "graphene-si", "graphene-pristine", "mos2-pristine")
FAR_A = 1.5  #: "elsewhere": farther than this from the defect


def vadf_map(path: Path, bin_: int = 2) -> np.ndarray:
    """(ny, nx) VADF of a (ny, nx, h, w) file, as the service computes it."""
    with h5py.File(path, "r") as f:
        data = f["data"][()]
    ny, nx, h, w = data.shape
    frames = data.reshape(ny * nx, h, w)
    geometry = calibrate(frames[:64], PreprocessConfig(bin=bin_))
    y0, y1, x0, x1 = geometry.crop
    binned = frames[:, y0:y1, x0:x1].reshape(ny * nx, (y1 - y0) // bin_, bin_, (x1 - x0) // bin_, bin_)
    binned = binned.sum(axis=(2, 4), dtype=np.float64)
    partial = Partial(ScanInfo((ny, nx), geometry))
    weights = partial.weight_images().reshape(len(partial.table), -1)
    partial.take(np.arange(ny * nx), binned.reshape(ny * nx, -1) @ weights.T, binned.sum(axis=0))
    return partial.maps()["vadf"]


def measure(vadf: np.ndarray, defect: tuple[float, float] | None, step_a: float) -> dict:
    ny, nx = vadf.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    far = np.ones((ny, nx), bool) if defect is None else np.hypot(yy - defect[0], xx - defect[1]) * step_a > FAR_A
    full = defects.defect_score(vadf, np.ones((ny, nx), bool))
    out: dict = {"scored": round(float(np.isfinite(full).mean()), 3)}
    if np.isfinite(full).any():
        py, px = np.unravel_index(int(np.nanargmax(full)), full.shape)
        out["highest"] = round(float(full[py, px]), 2)
        out["distance_a"] = None if defect is None else round(float(np.hypot(py - defect[0], px - defect[1]) * step_a), 3)
        out["highest_elsewhere"] = round(float(np.nanmax(np.where(far, full, np.nan))), 2)
        out["alarms"] = int((full[np.isfinite(full)] > defects.THRESHOLD).sum())
    worst, first = 0.0, None
    for k in range(defects.MIN_ROWS - 2, ny + 1):
        filled = np.zeros((ny, nx), bool)
        filled[:k] = True
        s = defects.defect_score(np.where(filled, vadf, np.nan), filled)
        if not np.isfinite(s).any():
            continue
        worst = max(worst, float(np.nanmax(np.where(far, s, np.nan))))
        if first is None and defect is not None and np.nanmax(np.where(~far, s, np.nan)) > defects.THRESHOLD:
            first = k
    out["highest_elsewhere_any_fill"] = round(worst, 2)
    out["first_fill_finding_the_defect"] = first
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--doses", default="none,1e6,1e5,1e6-rescan")
    args = ap.parse_args(argv)
    report: dict = {"threshold": defects.THRESHOLD, "files": {}}
    for name in SCANS:
        truth = json.loads((args.data / f"{name}.json").read_text())
        defect = tuple(truth["defects"][0]["position_pixels"]) if truth["defects"] else None
        for dose in args.doses.split(","):
            path = args.data / f"{name}-{dose}.h5"
            if path.exists():
                report["files"][path.name] = measure(vadf_map(path), defect, truth["scan_step_angstrom"])
    files = report["files"].values()
    report["worst"] = {"highest_elsewhere_any_fill": max(f["highest_elsewhere_any_fill"] for f in files),
                       "weakest_defect": min((f["highest"] for f in files if f.get("distance_a") is not None),
                                             default=None),
                       "farthest_defect_a": max((f["distance_a"] for f in files if f.get("distance_a") is not None),
                                                default=None)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
