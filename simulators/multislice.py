"""Multislice test scans (abTEM): graphene pristine, with a vacancy, with a substitution; MoS2.

Why: the synthetic simulator (``graphene.py``) is a single-slice phase object
with Gaussian atoms, calibrated to a multislice COM. Real scattering is
harder for the rrVAE, so tuning and ``bench/quality.py`` also run on scans
computed with abTEM's multislice (Lobato potentials, the paper's 60 kV and
31 mrad aberration-free probe). abTEM is GPL-3.0-or-later and an optional
extra (``pip install rrstem[multislice]``); it is imported only when a scan
is computed, so the rest of rrstem never needs it.

Geometry, per scan (``SCANS``):

- The specimen is an orthogonal supercell made square (strained by < 0.6 %)
  so the detector pixels are square: the far-field sampling is 1 / extent,
  ``lambda / extent`` rad per pixel (graphene 19x11 cells, 46.8 A: 1.04 mrad;
  MoS2 12x7 cells, 38.4 A: 1.27 mrad). Frames are cropped to ``detector``
  pixels (128: +-66 mrad for graphene, about twice the 31 mrad disc, like the
  synthetic scan and the paper's 62 mrad disc), with zero angle at pixel
  ``detector // 2``; the service bins them by 2 to the paper's 64x64.
- Axes as everywhere in rrstem: arrays ``(scan_y, scan_x, det_y, det_x)``,
  detector axes parallel to the scan axes (abTEM's ``(x, y, kx, ky)`` is
  transposed). The COM points toward the nearest atom column.
- Scan step 0.164 A (graphene: 26 steps per 4.26 A cell, 15 per 2.46 A,
  so the pristine 52x30 scan spans exactly 2x2 cells). Defect scans (48x48)
  are centred on the defect; the ground truth gives its position in A from
  the first scan position and in scan pixels (y, x).
- No thermal vibrations and no partial coherence (the paper's Fig. 2-3
  setting); substitutions sit in the plane.

Files (``generate``), in ``OUT`` (default ``~/.cache/rrstem/multislice``):
``NAME-none.h5`` (noise-free float32, expected counts at ``REFERENCE_DOSE``
electrons per pattern), ``NAME-1e6.h5``, ``NAME-1e5.h5`` (uint16 Poisson
counts at that many electrons per pattern, seeded), ``NAME-1e6-rescan.h5``
(the same area and dose, another noise seed: the second scan of a warm
start), each one 4D HDF5 dataset ``data`` with the calibration attributes
``rrstem replay`` reads, and ``NAME.json``, the ground truth. The incident
dose is per pattern; the counts on the detector are a little lower (what
scatters beyond its edge is lost; ``detector_fraction`` in the JSON).

    python -m rrstem.simulators.multislice [--out DIR] [--scans graphene-pristine,...] [--doses none,1e6,1e5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ENERGY_KEV = 60.0
CONVERGENCE_MRAD = 31.0
STEP_A = 4.260845 / 26  #: scan step, Angstrom: 26 steps per graphene 4.26 A cell (~0.164 A)
REFERENCE_DOSE = 1e6  #: electrons per pattern the noise-free file's counts are scaled to
DOSES = (None, 1e6, 1e5)  #: the dose variants written by default (None: noise-free)
RESCAN_DOSE = 1e6  #: dose of the second scan of each area (another noise seed), for warm-start figures
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ScanSpec:
    """One test scan: the specimen, its supercell, the scan window and the simulation grid."""

    name: str
    material: str  # "graphene" or "MoS2"
    scan_shape: tuple[int, int]  # (ny, nx) probe positions
    defect: str = "none"  # "none", "vacancy" or "substitution"
    element: str | None = None  # the substituting element (substitution only)
    cells: tuple[int, int] = (19, 11)  # supercell of orthogonal unit cells along (x, y)
    gpts: int = 480  # potential grid per axis (0.0975 A for the 46.8 A graphene cell)
    detector: int = 128  # detector pixels per axis after the crop
    step_a: float = STEP_A
    slice_thickness: float | None = None  # A; None: one slice (a monolayer)

    def __post_init__(self):
        if self.material not in MATERIALS:
            raise ValueError(f"material must be one of {', '.join(MATERIALS)}, not {self.material!r}")
        if self.defect not in ("none", "vacancy", "substitution"):
            raise ValueError(f"defect must be none, vacancy or substitution, not {self.defect!r}")
        if (self.defect == "substitution") != (self.element is not None):
            raise ValueError("a substitution needs element=..., and only a substitution takes one")
        if self.detector % 2 or self.detector > self.gpts // 2:
            raise ValueError(f"detector {self.detector} must be even and at most gpts/2 = {self.gpts // 2} "
                             "(abTEM's antialiasing keeps 2/3 of the grid's angles)")


#: material -> (lattice constant a in A, ase builder keyword arguments)
MATERIALS = {
    "graphene": {"builder": "graphene", "a": 2.46},
    "MoS2": {"builder": "mx2", "a": 3.19},
}

SCANS = {s.name: s for s in (
    ScanSpec("graphene-pristine", "graphene", (52, 30)),
    ScanSpec("graphene-vacancy", "graphene", (48, 48), defect="vacancy"),
    ScanSpec("graphene-si", "graphene", (48, 48), defect="substitution", element="Si"),
    # 2H MoS2 monolayer (Mo between two S layers, 3.2 A thick): 1 A slices; 56x32 at a/16 spans ~2x2 cells
    ScanSpec("mos2-pristine", "MoS2", (56, 32), cells=(12, 7), gpts=384, step_a=3.19 / 16, slice_thickness=1.0),
)}


def default_out() -> Path:
    """``$XDG_CACHE_HOME/rrstem/multislice`` (``~/.cache/rrstem/multislice``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rrstem" / "multislice"


def _abtem():
    try:
        import abtem
    except ImportError:
        raise ImportError("the multislice scans need abTEM: pip install 'rrstem[multislice]' "
                          "(or pip install abtem)") from None
    return abtem


def build_specimen(spec: ScanSpec):
    """(ase Atoms of the square supercell, index of the atom at the defect site or the scan anchor).

    The anchor is the atom (of the first species listed, C or Mo) nearest the supercell centre; a
    vacancy removes it, a substitution changes its element. The cell is scaled to a square in x and y.
    """
    import ase.build

    abtem = _abtem()
    m = MATERIALS[spec.material]
    if m["builder"] == "graphene":
        unit = ase.build.graphene(a=m["a"], vacuum=2.0)
    else:
        unit = ase.build.mx2("MoS2", kind="2H", a=m["a"], thickness=3.19, vacuum=2.0)
    atoms = abtem.orthogonalize_cell(unit) * (spec.cells[0], spec.cells[1], 1)
    cell = atoms.cell.lengths()
    side = math.sqrt(cell[0] * cell[1])  # the square of the same area: each axis strained by half the mismatch
    atoms.set_cell([side, side, cell[2]], scale_atoms=True)
    pos = atoms.positions
    heavy = np.array([s == atoms.get_chemical_symbols()[0] for s in atoms.get_chemical_symbols()])
    near = np.hypot(pos[:, 0] - side / 2, pos[:, 1] - side / 2) + np.where(heavy, 0.0, np.inf)
    return atoms, int(np.argmin(near))


def scan_origin(spec: ScanSpec, anchor_xy: np.ndarray) -> np.ndarray:
    """(x, y) in A of the first scan position: defect scans centred on the anchor, pristine ones starting at it."""
    if spec.defect == "none":
        return np.asarray(anchor_xy, dtype=np.float64)
    ny, nx = spec.scan_shape
    return np.asarray(anchor_xy, dtype=np.float64) - spec.step_a * np.array([nx // 2, ny // 2])


def simulate(spec: ScanSpec, *, progress: bool = False) -> tuple[np.ndarray, dict]:
    """The noise-free scan: ``(intensity (ny, nx, d, d) float32, ground truth dict)``.

    Intensities are fractions of the incident beam per detector pixel (each pattern sums to a little
    under 1). The truth holds the calibration, the defect and the atom columns within 3 A of the scan.
    """
    abtem = _abtem()
    abtem.config.set({"diagnostics.progress_bar": bool(progress), "fftw.planning_effort": "FFTW_ESTIMATE"})
    t0 = time.monotonic()
    atoms, anchor = build_specimen(spec)
    anchor_xy = atoms.positions[anchor, :2].copy()
    origin = scan_origin(spec, anchor_xy)
    defect_species = atoms.get_chemical_symbols()[anchor]
    if spec.defect == "vacancy":
        del atoms[anchor]
    elif spec.defect == "substitution":
        atoms[anchor].symbol = spec.element
    thickness = atoms.cell[2, 2] if spec.slice_thickness is None else spec.slice_thickness
    potential = abtem.Potential(atoms, gpts=spec.gpts, slice_thickness=thickness, projection="infinite",
                                parametrization="lobato")
    probe = abtem.Probe(energy=ENERGY_KEV * 1e3, semiangle_cutoff=CONVERGENCE_MRAD)
    probe.grid.match(potential)
    ny, nx = spec.scan_shape
    end = origin + spec.step_a * np.array([nx, ny])
    scan = abtem.GridScan(start=tuple(origin), end=tuple(end), gpts=(nx, ny), endpoint=False)
    patterns = probe.scan(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None))
    patterns = patterns.crop(gpts=(spec.detector, spec.detector)).compute()
    pixel_mrad = [float(v) for v in patterns.angular_sampling]
    intensity = np.ascontiguousarray(np.asarray(patterns.array, dtype=np.float32).transpose(1, 0, 3, 2))
    if intensity.shape != (ny, nx, spec.detector, spec.detector):
        raise RuntimeError(f"abTEM returned {patterns.array.shape}, expected ({nx}, {ny}, d, d)")
    truth = _truth(spec, atoms, origin, anchor_xy, defect_species, pixel_mrad, intensity)
    truth["seconds_to_simulate"] = round(time.monotonic() - t0, 1)
    return intensity, truth


def _truth(spec, atoms, origin, anchor_xy, defect_species, pixel_mrad, intensity) -> dict:
    ny, nx = spec.scan_shape
    step = spec.step_a
    px = (atoms.positions[:, [1, 0]] - origin[[1, 0]]) / step  # (y, x) scan pixels
    margin = 3.0 / step  # atoms within 3 A of the scan: its neighbours too
    near = np.all((px >= -margin) & (px <= np.array([ny - 1, nx - 1]) + margin), axis=1)
    defects = []
    if spec.defect != "none":
        yx_a = [float(anchor_xy[1] - origin[1]), float(anchor_xy[0] - origin[0])]
        defects.append({"kind": spec.defect, "site_species": defect_species,
                        "element": spec.element if spec.defect == "substitution" else None,
                        "position_angstrom": [round(v, 5) for v in yx_a],
                        "position_pixels": [round(v / step, 5) for v in yx_a]})
    return {
        "format_version": FORMAT_VERSION, "generator": "rrstem.simulators.multislice",
        "abtem_version": _abtem().__version__, "spec": _spec_json(spec),
        "material": spec.material, "scan_shape": [ny, nx], "frame_shape": [spec.detector, spec.detector],
        "scan_step_angstrom": step, "energy_kev": ENERGY_KEV, "convergence_mrad": CONVERGENCE_MRAD,
        "detector_pixel_mrad": float(np.mean(pixel_mrad)), "detector_pixel_mrad_xy": pixel_mrad,
        "zero_angle_pixel": [spec.detector // 2, spec.detector // 2],
        "axes": "(scan_y, scan_x, det_y, det_x); detector axes parallel to the scan axes",
        "origin_angstrom_xy": [float(v) for v in origin], "supercell_angstrom": float(atoms.cell[0, 0]),
        "defects": defects,
        "atoms_pixels": np.round(px[near], 4).tolist(),
        "atom_species": [atoms.get_chemical_symbols()[i] for i in np.flatnonzero(near)],
        "detector_fraction": float(intensity.sum(axis=(2, 3)).mean()),
        "model": "abTEM multislice, Lobato potentials, infinite projection, aberration-free in-focus probe; "
                 "no thermal vibrations, no partial coherence",
    }


def poisson(intensity: np.ndarray, dose: float, seed: int) -> np.ndarray:
    """uint16 Poisson counts of ``intensity`` (fractions of the beam) at ``dose`` electrons per pattern."""
    rng = np.random.default_rng((seed, int(dose)))
    lam = intensity.astype(np.float64) * dose
    if lam.max() > 0.6 * 65535:
        raise ValueError(f"dose {dose:g} puts ~{lam.max():.0f} counts in one pixel, too many for uint16")
    return rng.poisson(lam).astype(np.uint16)


def dose_tag(dose: float | None) -> str:
    """``none``, ``1e6``, ``1e5``, ``3e5``: the file name part of a dose."""
    return "none" if dose is None else f"{dose:.0e}".replace("e+0", "e").replace("e+", "e")


def write_scan(path: Path, frames: np.ndarray, truth: dict, **attrs) -> None:
    """One 4D dataset ``data`` with the calibration ``rrstem replay`` reads; atomic (temporary file, rename)."""
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("data", data=frames, chunks=(1, *frames.shape[1:]))
        ds.attrs.update(energy_kev=truth["energy_kev"], convergence_mrad=truth["convergence_mrad"],
                        detector_pixel_mrad=truth["detector_pixel_mrad"],
                        scan_step_nm=truth["scan_step_angstrom"] / 10.0, material=truth["material"],
                        defect=",".join(d["kind"] for d in truth["defects"]) or "none",
                        generator=truth["generator"], **attrs)
    os.replace(tmp, path)


def generate(specs, out: Path, doses=DOSES, seed: int = 0, rescan: bool = True, force: bool = False,
             progress: bool = False, log=print) -> list[dict]:
    """Simulate each spec (unless its files exist) and write its dose variants and ground truth.

    Returns the ground truth of each scan, with ``files``: dose tag -> file name (in ``out``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for spec in specs:
        sidecar = out / f"{spec.name}.json"
        wanted = {dose_tag(d): d for d in doses}
        if rescan:
            wanted[dose_tag(RESCAN_DOSE) + "-rescan"] = RESCAN_DOSE
        old = json.loads(sidecar.read_text()) if sidecar.is_file() and not force else None
        if old is not None and old.get("spec") == _spec_json(spec) and old.get("seed") == seed and all(
                (out / old.get("files", {}).get(tag, "-")).is_file() for tag in wanted):
            log(f"{spec.name}: up to date in {out}")
            done.append(old)
            continue
        log(f"{spec.name}: simulating {spec.scan_shape[0]}x{spec.scan_shape[1]} positions ({spec.material}, "
            f"defect {spec.defect}{'' if spec.element is None else ' ' + spec.element})...")
        intensity, truth = simulate(spec, progress=progress)
        truth.update(seed=seed, reference_dose=REFERENCE_DOSE, files={})
        for tag, dose in wanted.items():
            name = f"{spec.name}-{tag}.h5"
            if dose is None:
                frames = (intensity * np.float32(REFERENCE_DOSE)).astype(np.float32)
                attrs = dict(dose="none", counts_scale=REFERENCE_DOSE)
            else:
                noise_seed = seed + (1 if tag.endswith("-rescan") else 0)
                frames = poisson(intensity, dose, noise_seed)
                attrs = dict(dose=float(dose), noise_seed=noise_seed)
            write_scan(out / name, frames, truth, **attrs)
            truth["files"][tag] = name
        sidecar.write_text(json.dumps(truth, indent=1))
        log(f"{spec.name}: {truth['seconds_to_simulate']} s; wrote {', '.join(truth['files'].values())} "
            f"and {sidecar.name}")
        done.append(truth)
    return done


def _spec_json(spec: ScanSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


def _doses(text: str) -> list[float | None]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(None if part in ("none", "0", "inf") else float(part))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rrstem.simulators.multislice",
                                 description="Compute the multislice test scans (abTEM) and their ground truth.")
    ap.add_argument("--out", type=Path, default=None, help=f"folder for the files (default {default_out()})")
    ap.add_argument("--scans", default=",".join(SCANS), help=f"comma-separated, of: {', '.join(SCANS)} (default all)")
    ap.add_argument("--doses", default="none,1e6,1e5", help="comma-separated e/pattern, none = noise-free "
                                                            "(default none,1e6,1e5)")
    ap.add_argument("--seed", type=int, default=0, help="Poisson noise seed (the rescan uses seed+1)")
    ap.add_argument("--no-rescan", action="store_true", help="do not write the second (rescan) file of each area")
    ap.add_argument("--force", action="store_true", help="recompute scans whose files exist")
    ap.add_argument("--progress", action="store_true", help="abTEM's progress bar")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.scans.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCANS]
    if unknown:
        print(f"unknown scan(s) {unknown}; known: {', '.join(SCANS)}", file=sys.stderr)
        return 2
    out = args.out or default_out()
    generate([SCANS[n] for n in names], out, _doses(args.doses), seed=args.seed, rescan=not args.no_rescan,
             force=args.force, progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
