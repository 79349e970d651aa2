"""``rrstem export``: a scan's binned 4D frames for the field's offline tools.

``serve`` and ``analyze`` keep a scan's binned frames only when told (``--save-frames``): then beside the
results file, as the EMD 1.0 / py4DSTEM DataCube that the scan's ``binned_frames`` attribute names
(``stream/emd.py``). ``export`` writes them as a py4DSTEM DataCube (``--format py4dstem``, a copy of that file)
or a HyperSpy ``.zspy`` (zarr), a scan row at a time, so a scan larger than memory exports too.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import h5py
import numpy as np

from rrstem.stream.emd import root_name
from rrstem.stream.results import read_scan_attrs


def binned_frames(results: Path, scan_id: str | None) -> tuple[str, dict, Path]:
    """(scan name, its results attributes, the file of its binned frames); ValueError saying how to get them."""
    scan_id, attrs = read_scan_attrs(results, scan_id)
    name = attrs.get("binned_frames")
    if not name:
        raise ValueError(f"scan {scan_id} of {results} has no binned frames: run serve or analyze with "
                         "--save-frames to keep them")
    path = results.with_name(name)
    if not path.exists():
        raise FileNotFoundError(f"{path}, the binned frames of scan {scan_id}, is not there")
    return scan_id, attrs, path


def write_zspy(source: Path, scan_id: str, attrs: dict, out: Path) -> Path:
    """The DataCube of ``source`` as a HyperSpy .zspy (zarr format 2): ``Experiments/<scan_id>`` with ``data``
    (ny, nx, h, w), ``axis-0 .. axis-3`` (nm and mrad where known, else px) and the beam's metadata."""
    import zarr

    cal = attrs.get("calibration") or {}
    with h5py.File(source, "r") as f:
        group = f[root_name(scan_id)]["datacube"]
        data = group["data"]
        root = zarr.open_group(str(out), mode="w", zarr_format=2)
        root.attrs.update({"file_format": "HyperSpy", "file_format_version": "3.3"})
        signal = root.create_group(f"Experiments/{scan_id}")
        z = signal.create_array("data", shape=data.shape, dtype=data.dtype, chunks=(1, *data.shape[1:]))
        for row in range(data.shape[0]):
            z[row] = data[row]
        for i, name in enumerate(["y", "x", "ky", "kx"]):
            dim = group[f"dim{i}"]
            step = float(np.diff(dim[:2])[0])
            signal.create_group(f"axis-{i}").attrs.update(
                {"name": name, "size": int(data.shape[i]), "navigate": i < 2, "offset": 0.0, "scale": step,
                 "units": dim.attrs["units"]})
    meta = signal.create_group("metadata")
    meta.create_group("General").attrs.update({"title": scan_id})
    meta.create_group("Signal").attrs.update({"signal_type": "electron_diffraction"})
    tem = {k: v for k, v in (("beam_energy", cal.get("energy_kev")),
                             ("convergence_angle", cal.get("convergence_mrad"))) if v is not None}
    if tem:
        meta.create_group("Acquisition_instrument/TEM").attrs.update(tem)
    signal.create_group("original_metadata")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    scan_id, attrs, source = binned_frames(args.results, args.scan_id)
    suffix = ".zspy" if args.format == "zspy" else ".emd"
    out = args.out or source.with_suffix(suffix)
    if args.format == "zspy":
        write_zspy(source, scan_id, attrs, out)
    elif out.resolve() != source.resolve():
        shutil.copyfile(source, out)
    print(f"binned frames of scan {scan_id}: {out}")
    return 0


def add_export_args(sub) -> None:
    p = sub.add_parser("export", help="a scan's binned 4D frames as a py4DSTEM DataCube or a HyperSpy .zspy")
    p.add_argument("results", type=Path, help="results file of serve or analyze run with --save-frames")
    p.add_argument("--scan-id", default=None, metavar="ID", help="the scan, when the file holds several")
    p.add_argument("--binned", action="store_true", required=True,
                   help="export the binned frames (the one export there is)")
    p.add_argument("--format", choices=("py4dstem", "zspy"), default="py4dstem",
                   help="py4dstem: EMD 1.0 DataCube (.emd, py4DSTEM.read / hs.load); zspy: HyperSpy zarr store")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="output (default: the saved frames' name, with .emd or .zspy)")
    p.set_defaults(func=cmd_export)
