"""Synthetic 4D-STEM scan of graphene: a single-slice phase-object CBED calculation.

Physics. A monolayer is thin enough that one slice is close to multislice:
the exit wave is ``psi(r - r0) * exp(i phi(r))``, where ``psi`` is the
aberration-free probe of the 31 mrad aperture (``optics.probe``) and ``phi``
is the projected potential times the interaction constant, a smooth sum of
two Gaussians per atom (a compact core and a screened tail; Si about 2.3x the
phase of C, as their electron scattering factors). Each CBED pattern is
``|FFT(exit wave)|^2``, cropped to the detector. The phase strength is
calibrated so the COM deflection matches a 60 kV multislice of graphene:
mean ~0.45 mrad and max ~0.8 mrad (~2.5% of the disc radius) over the scan.

Geometry. Honeycomb lattice a = 2.46 A, one C atom on the scan centre pixel
(that atom is the vacancy or the Si when a defect is asked for). Detector
axes are parallel to the scan axes, zero angle at pixel ``detector // 2``;
the COM points toward the nearest atom column (electrons are attracted by
the nuclei) and is zero on the columns and hexagon centres by symmetry. The
detector spans +-2x the convergence angle, so the disc diameter is half the
detector.

Noise. ``dose=None`` gives the noise-free expected counts, scaled so the
disc interior sits at ~40,000 counts (uint16 quantisation is negligible);
otherwise Poisson counts with ``dose`` electrons per pattern, seeded per frame
so any chunking gives the same frames. Same arguments except ``dose`` give
pairable noisy / noise-free scans.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rrstem.simulators import optics
from rrstem.simulators.source import Source
from rrstem.stream.protocol import Calibration, Start

LATTICE_A = 2.46  #: graphene lattice constant, Angstrom
DEFECTS = ("none", "vacancy", "si")
#: Per species: (integrated phase in rad*A^2, [(weight, Gaussian sigma in A), ...]).
#: The C value is calibrated to the COM target above; Si follows f_e(0) ratio ~2.3.
SPECIES = {
    "C": (0.1052, [(0.6, 0.20), (0.4, 0.60)]),
    "Si": (0.242, [(0.6, 0.22), (0.4, 0.66)]),
}
NOISE_FREE_LEVEL = 40000.0  #: counts in the disc interior when dose is None
BATCH = 8  #: frames per FFT batch handed to a worker thread


def honeycomb(origin: tuple[float, float], lo: tuple[float, float], hi: tuple[float, float]) -> np.ndarray:
    """(y, x) positions in A of every graphene atom in the box lo..hi; one atom at ``origin``."""
    a = LATTICE_A
    row = a * math.sqrt(3) / 2
    js = np.arange(math.floor((lo[0] - origin[0]) / row) - 1, math.ceil((hi[0] - origin[0]) / row) + 2)
    span = (hi[1] - lo[1]) / a + abs(js).max() / 2 + 3
    i0 = math.floor((lo[1] - origin[1]) / a - span)
    ii, jj = np.meshgrid(np.arange(i0, i0 + 2 * span + 4), js, indexing="ij")
    out = []
    for by, bx in ((0.0, 0.0), (a * math.sqrt(3) / 6, a / 2)):  # A and B sublattices
        y = origin[0] + jj * row + by
        x = origin[1] + ii * a + jj * a / 2 + bx
        out.append(np.stack([y.ravel(), x.ravel()], axis=1))
    pos = np.concatenate(out)
    keep = np.all((pos >= np.asarray(lo)) & (pos <= np.asarray(hi)), axis=1)
    return pos[keep]


def render_phase(shape: tuple[int, int], dx: float, atoms: np.ndarray, species: np.ndarray) -> np.ndarray:
    """Projected phase (rad) on a grid whose pixel (0, 0) is at (0, 0) A; atoms in A."""
    phase = np.zeros(shape[0] * shape[1])
    for name, (strength, gaussians) in SPECIES.items():
        pos = atoms[species == name] / dx  # grid pixels
        if not len(pos):
            continue
        half = math.ceil(6 * max(s for _, s in gaussians) / dx)
        offs = np.arange(-half, half + 1)
        for part in np.array_split(pos, max(1, len(pos) // 2000)):
            base = np.rint(part).astype(np.int64)
            iy = base[:, 0:1] + offs  # (atoms, P)
            ix = base[:, 1:2] + offs
            dy2 = ((iy - part[:, 0:1]) * dx) ** 2
            dx2 = ((ix - part[:, 1:2]) * dx) ** 2
            vals = sum(
                w * strength / (2 * math.pi * s * s)
                * np.exp(-dy2 / (2 * s * s))[:, :, None] * np.exp(-dx2 / (2 * s * s))[:, None, :]
                for w, s in gaussians
            )
            inside = ((iy >= 0) & (iy < shape[0]))[:, :, None] & ((ix >= 0) & (ix < shape[1]))[:, None, :]
            flat = iy[:, :, None] * shape[1] + ix[:, None, :]
            phase += np.bincount(flat[inside], weights=vals[inside], minlength=phase.size)
    return phase.reshape(shape)


class GrapheneSource(Source):
    """A lazily generated graphene scan; ``chunk(first, count)`` computes only those frames."""

    def __init__(
        self,
        scan_shape: tuple[int, int] = (64, 64),
        detector: int = 128,
        *,
        defect: str = "none",
        dose: float | None = None,
        seed: int = 0,
        step_nm: float = 0.02,
        energy_kev: float = 60.0,
        convergence_mrad: float = 31.0,
        scan_id: str | None = None,
        threads: int | None = None,
        centre_a: tuple[float, float] | None = None,
        metadata: dict | None = None,
    ):
        ny, nx = (int(v) for v in scan_shape)
        if ny < 1 or nx < 1:
            raise ValueError(f"scan_shape must be two positive integers (ny, nx), not {scan_shape!r}")
        if not 64 <= detector <= 256:
            raise ValueError(f"detector must be 64..256 pixels, not {detector}")
        if defect not in DEFECTS:
            raise ValueError(f"defect must be one of {', '.join(DEFECTS)}, not {defect!r}")
        if dose is not None and not dose > 0:
            raise ValueError(f"dose must be a positive number of electrons per pattern or None, not {dose!r}")
        if not 0.001 <= step_nm <= 1.0:
            raise ValueError(f"step_nm must be between 0.001 and 1 nm, not {step_nm!r}")
        self.energy_kev, self.convergence_mrad = float(energy_kev), float(convergence_mrad)
        self.dose, self.seed, self.defect = dose, int(seed), defect
        step = step_nm * 10.0  # Angstrom
        self.sampling = s = optics.choose_sampling(step, detector, energy_kev, convergence_mrad, 2 * convergence_mrad)
        disc_px = math.pi * (convergence_mrad / s.pixel_mrad) ** 2
        self.scale = float(dose) if dose is not None else NOISE_FREE_LEVEL * disc_px
        if dose is not None and dose / disc_px > 0.6 * 65535:
            raise ValueError(
                f"dose {dose:g} gives ~{dose / disc_px:.0f} counts per disc pixel, too many for uint16; "
                f"use a dose below {0.6 * 65535 * disc_px:.3g} or a larger detector"
            )

        # Atoms: one C atom exactly on the centre scan position (or at ``centre_a`` from position (0, 0), for
        # a subscan of a larger scan: see ``subscan``); the defect replaces it.
        centre = (ny // 2 * step, nx // 2 * step) if centre_a is None else tuple(float(v) for v in centre_a)
        margin = (s.n // 2 + 2) * s.dx + 4.0
        atoms = honeycomb(centre, (-margin, -margin), ((ny - 1) * step + margin, (nx - 1) * step + margin))
        at_centre = int(np.argmin(np.hypot(*(atoms - centre).T)))
        species = np.full(len(atoms), "C", dtype=object)
        if np.hypot(*(atoms[at_centre] - centre)) > 1e-6:  # the centre lies outside this (sub)scan's field
            defect_here = "none"
        else:
            defect_here = defect
        if defect_here == "vacancy":
            atoms, species = np.delete(atoms, at_centre, axis=0), np.delete(species, at_centre)
        elif defect_here == "si":
            species[at_centre] = "Si"
        self.atoms_a, self.species = atoms, species
        self.defect_px = None if defect_here == "none" else [centre[0] / step, centre[1] / step]
        self.step_nm, self.detector, self.scan_shape = step_nm, detector, (ny, nx)

        # Phase grating over every window a probe will see; grid pixel 0 sits
        # n//2 pixels before scan position 0, so a probe's window starts at its grid pixel.
        py_max, px_max = (int(s.split(v - 1)[0]) for v in (ny, nx))
        grid_origin = s.n // 2 * s.dx
        phase = render_phase((py_max + s.n + 1, px_max + s.n + 1), s.dx, atoms + grid_origin, species)
        self._trans = np.exp(1j * phase)
        self._probes: dict[tuple[int, int], np.ndarray] = {}
        self._crop = s.crop_index()
        self._threads = threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

        cal = Calibration(energy_kev=energy_kev, convergence_mrad=convergence_mrad,
                          detector_pixel_mrad=s.pixel_mrad, scan_step_nm=step_nm)
        tag = "nf" if dose is None else f"d{dose:.0e}"
        self.start = Start(
            scan_id=scan_id or f"graphene-{defect}-{ny}x{nx}-{tag}-s{seed}",
            scan_shape=(ny, nx), frame_shape=(detector, detector), dtype="uint16",
            calibration=cal, metadata={**self._metadata(step, (ny, nx)), **(metadata or {})},
        )

    def subscan(self, region: tuple[int, int, int, int], step_factor: float, dose_factor: float, scan_id: str,
                seed: int | None = None, metadata: dict | None = None) -> "GrapheneSource":
        """The same specimen rescanned: parent positions ``region`` = (y0, y1, x0, x1) at ``step_factor`` times
        the step and ``dose_factor`` times the dose (a noise-free scan stays noise-free)."""
        y0, y1, x0, x1 = region
        shape = (math.ceil((y1 - y0) / step_factor - 1e-9), math.ceil((x1 - x0) / step_factor - 1e-9))
        step = self.step_nm * 10.0
        ny, nx = self.scan_shape
        centre = ((ny // 2 - y0) * step, (nx // 2 - x0) * step)  # the parent's centre atom, from the region's corner
        return GrapheneSource(shape, self.detector, defect=self.defect,
                              dose=None if self.dose is None else self.dose * dose_factor,
                              seed=self.seed + 1 if seed is None else seed, step_nm=self.step_nm * step_factor,
                              energy_kev=self.energy_kev, convergence_mrad=self.convergence_mrad, scan_id=scan_id,
                              threads=self._threads, centre_a=centre, metadata=metadata)

    @property
    def atoms_px(self) -> np.ndarray:
        """(n, 2) atom positions (y, x) in scan pixels, all atoms near the scan."""
        return self.atoms_a / (self.start.calibration.scan_step_nm * 10.0)

    def _metadata(self, step: float, scan_shape: tuple[int, int]) -> dict:
        px = self.atoms_a / step
        near = np.all((px >= -2) & (px <= np.asarray(scan_shape) + 1), axis=1)
        meta = {
            "simulator": "rrstem.simulators.graphene", "specimen": "graphene", "lattice_a_nm": LATTICE_A / 10,
            "defect": self.defect, "defect_px": self.defect_px, "dose": self.dose, "seed": self.seed,
            "counts_per_pattern": self.scale,
            "detector_axes": "detector (row, col) parallel to scan (y, x); zero angle at pixel detector//2",
            "model": "single-slice phase object, Gaussian atomic potentials, COM calibrated to 60 kV multislice",
        }
        if near.sum() <= 4096:  # keep the start message small for huge scans
            meta["atoms_px"] = np.round(px[near], 4).tolist()
            meta["atom_species"] = [str(v) for v in self.species[near]]
        return meta

    def _probe(self, frac: tuple[int, int]) -> np.ndarray:
        if frac not in self._probes:
            s = self.sampling
            self._probes[frac] = optics.probe(s, self.energy_kev, self.convergence_mrad,
                                              (frac[0] / s.sub, frac[1] / s.sub))
        return self._probes[frac]

    def patterns(self, first: int, count: int) -> np.ndarray:
        """Noise-free float64 patterns ``(count, d, d)``, each summing to ~1 (the beam)."""
        return self._run(self._expected, first, count)

    def chunk(self, first: int, count: int) -> np.ndarray:
        return self._run(self._counts, first, count)

    def _run(self, work, first: int, count: int) -> np.ndarray:
        """Apply ``work`` to batches of frame indices, on worker threads when there are several."""
        self._check_range(first, count)
        idx = np.arange(first, first + count)
        parts = [idx[i:i + BATCH] for i in range(0, count, BATCH)] or [idx]
        if self._threads > 1 and len(parts) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="graphene")
            return np.concatenate(list(self._pool.map(work, parts)))
        return np.concatenate([work(p) for p in parts])

    def _expected(self, idx: np.ndarray) -> np.ndarray:
        s, nx = self.sampling, self.start.scan_shape[1]
        (py, fy), (px, fx) = s.split(idx // nx), s.split(idx % nx)
        exit_wave = np.empty((len(idx), s.n, s.n), dtype=np.complex128)
        for j in range(len(idx)):
            window = self._trans[py[j]:py[j] + s.n, px[j]:px[j] + s.n]
            np.multiply(self._probe((int(fy[j]), int(fx[j]))), window, out=exit_wave[j])
        far = np.fft.fft2(exit_wave)[:, self._crop[:, None], self._crop[None, :]]
        return (far.real ** 2 + far.imag ** 2) / s.n ** 2

    def _counts(self, idx: np.ndarray) -> np.ndarray:
        expected = self._expected(idx) * self.scale
        if self.dose is None:
            counts = np.rint(expected)
        else:
            counts = np.empty_like(expected)
            for j, i in enumerate(idx):  # one generator per frame: chunking never changes the noise
                counts[j] = np.random.default_rng((self.seed, int(i))).poisson(expected[j])
        return np.clip(counts, 0, 65535).astype(np.uint16)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def simulate(scan_shape=(64, 64), detector: int = 128, **kwargs) -> tuple[np.ndarray, GrapheneSource]:
    """Whole scan in memory: ``(frames (ny, nx, d, d) uint16, source)``; kwargs as ``GrapheneSource``."""
    src = GrapheneSource(scan_shape, detector, **kwargs)
    try:
        return src.array(), src
    finally:
        src.close()
