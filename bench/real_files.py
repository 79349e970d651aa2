"""rrstem on real recorded files, against an independent reader: rosettasciio.

    python bench/real_files.py DATA_DIR [--reference-python PY] [--rrstem CMD] [-- ANALYZE ARGS]

``DATA_DIR`` is rosettasciio's test data (``rsciio/tests/data`` of
github.com/hyperspy/rosettasciio, zips unpacked; EMPAD ``.raw`` files made as
its tests make them), or any folder laid out alike. For each 4D file it
finds (Merlin ``.mib``, EMPAD ``.xml``, DECTRIS/ARINA ``*_master.h5``), it
runs ``rrstem analyze FILE --no-train`` as its own process, as a user does,
and reads the same file with rosettasciio in another process
(``--reference-python``: a Python where ``rosettasciio`` and ``hdf5plugin``
are installed; rosettasciio is GPL-3.0, so it is not an rrstem dependency).
From the reference array, with the pixels rrstem masked set to zero, it
computes the virtual bright field over rrstem's disc and the COM relative to
the mean pattern's, and compares them with rrstem's maps.

rosettasciio flips a ``.mib`` file's rows (HyperSpy's convention); rrstem
keeps the file's order, so the reference is flipped back before comparing.

Prints one JSON object: a row per file (exit code, filled positions, the
fraction of all counts in masked pixels, the largest relative VBF
difference, the largest COM difference in raw pixels, from mrad where the
file is calibrated) and the worst of each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

#: Scan shapes (ny, nx) of rosettasciio's test files that carry none (Merlin .hdr files without ScanX/ScanY,
#: an ARINA master), by a part of their name, given only where rrstem asks for one (exit 2).
SHAPES = {"_1_Frame": "1x1", "_9_Frame": "3x3", "4x2": "2x4", "test_00_master": "4x4", "stack_images": "1x10"}

REFERENCE = r"""
import sys, numpy as np
path, out, nav = sys.argv[1], sys.argv[2], tuple(int(v) for v in sys.argv[3].split("x"))
low = path.lower()
if low.endswith(".mib"):
    from rsciio.quantumdetector import file_reader
    d = np.flip(np.asarray(file_reader(path, navigation_shape=nav[::-1])[0]["data"]), axis=-2)
elif low.endswith(".xml"):
    from rsciio.empad import file_reader
    d = np.asarray(file_reader(path)[0]["data"])
else:
    import hdf5plugin
    from rsciio.arina import file_reader
    d = np.asarray(file_reader(path)[0]["data"])
np.save(out, d.reshape(*nav, *d.shape[-2:]))
"""


def files(root: Path) -> list[tuple[Path, str | None]]:
    """(file, scan shape to pass or None) for every 4D file under ``root``."""
    found = [*sorted(root.rglob("*.mib")), *sorted(root.rglob("*_master.h5"))]
    found += [p for p in sorted(root.rglob("*.xml")) if "<raw_file" in p.read_text(errors="replace")]  # EMPAD
    return [(p, next((s for key, s in SHAPES.items() if key in p.name), None)) for p in found]


def rrstem_results(out: Path):
    with h5py.File(out, "r") as h:
        g = h["scans"][list(h["scans"])[0]]
        if "maps" not in g or "vbf" not in g["maps"]:
            return None
        return dict(filled=g["maps/filled"][()], vbf=g["maps/vbf"][()], com_x=g["maps/com_x"][()],
                    com_y=g["maps/com_y"][()], unit=g["maps/com_x"].attrs.get("unit"),
                    mask=g["pixel_mask"][()], geometry=json.loads(g.attrs["geometry"]),
                    pixel_mrad=json.loads(g.attrs["calibration"]).get("detector_pixel_mrad"),
                    scan_shape=tuple(int(v) for v in g.attrs["scan_shape"]))


def compare(ref: np.ndarray, got: dict) -> dict:
    """Masked fraction of counts, and the differences of rrstem's VBF and COM to those of ``ref``."""
    data = ref.astype(np.float64)
    mask = got["mask"]
    total = data.sum()
    row = {"masked_fraction": float(data[..., mask].sum() / total) if total else 0.0}
    data[..., mask] = 0
    h, w = data.shape[-2:]
    ky, kx = np.mgrid[0:h, 0:w]
    g = got["geometry"]
    if g["bin"] != 1 or g["crop"] != [0, h, 0, w]:
        row["note"] = "binned or cropped: VBF/COM not compared"
        return row
    bf = np.hypot(ky - g["center"][0], kx - g["center"][1]) <= g["radius"]
    vbf = data[..., bf].sum(-1)
    row["vbf_max_rel_diff"] = float(np.max(np.abs(got["vbf"] - vbf) / np.maximum(np.abs(vbf), 1)))
    i = data.sum((-2, -1))
    ok = i > 0
    scale = {"px": 1.0, "mrad": got["pixel_mrad"]}.get(got["unit"])  # COM in px, or px x mrad per raw pixel
    if scale and ok.any():
        diffs = []
        for k, name in ((kx, "com_x"), (ky, "com_y")):
            m = (data * k).sum((-2, -1))
            ref_com = np.where(ok, m / np.where(ok, i, 1), np.nan) - m[ok].sum() / i[ok].sum()
            diffs.append(np.nanmax(np.abs(got[name] / scale - ref_com)))
        row["com_max_abs_diff_px"] = float(max(diffs))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--reference-python", default=sys.executable)
    ap.add_argument("--rrstem", default="rrstem", help="the command that runs rrstem (default: rrstem)")
    ap.add_argument("analyze_args", nargs="*", help="more arguments for rrstem analyze (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path, shape in files(args.data):
            out = Path(tmp) / (path.name + ".rrstem.h5")
            cmd = [*shlex.split(args.rrstem), "analyze", str(path), "--no-train", "--no-progress", "--out", str(out),
                   *args.analyze_args]
            p = subprocess.run(cmd, capture_output=True, text=True)
            given = p.returncode == 2 and shape is not None and "scan shape" in p.stderr
            if given:  # rrstem cannot tell the scan shape from the file: give it, as a user must
                p = subprocess.run([*cmd, "--scan-shape", shape], capture_output=True, text=True)
            row = {"file": path.name, "exit": p.returncode, "scan_shape_given": given}
            rows.append(row)
            got = rrstem_results(out) if out.exists() else None
            if got is None:
                row["message"] = (p.stderr.strip().splitlines() or [""])[-1][:300]
                continue
            row.update(scan_shape=list(got["scan_shape"]), filled=int(got["filled"].sum()),
                       positions=int(got["filled"].size))
            ref_file = Path(tmp) / (path.name + ".npy")
            nav = "x".join(str(v) for v in got["scan_shape"])
            r = subprocess.run([args.reference_python, "-c", REFERENCE, str(path), str(ref_file), nav],
                               capture_output=True, text=True)
            if r.returncode:
                row["reference"] = "failed: " + (r.stderr.strip().splitlines() or [""])[-1][:200]
                continue
            row.update(compare(np.load(ref_file), got))
    compared = [r for r in rows if "masked_fraction" in r]
    worst = {
        "files": len(rows), "compared": len(compared),
        "all_filled": all(r["filled"] == r["positions"] for r in rows if "filled" in r),
        "masked_fraction": max((r["masked_fraction"] for r in compared), default=None),
        "vbf_max_rel_diff": max((r.get("vbf_max_rel_diff", 0.0) for r in compared), default=None),
        "com_max_abs_diff_px": max((r.get("com_max_abs_diff_px", 0.0) for r in compared), default=None),
    }
    print(json.dumps({"files": rows, "worst": worst}, indent=1))


if __name__ == "__main__":
    main()
