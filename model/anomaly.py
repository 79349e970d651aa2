"""The defect map: how unlike the rest of the scan each position is, and the alarms.

Two signs of a defect, each turned into a robust z-score over the scan
(``(s - median) / (1.4826 MAD)``: standard deviations for normal scores, and
the median and MAD barely move for a handful of defects):

- the reconstruction error in units of the expected Poisson noise
  (``recon_sigma``, ``encode.py``): a pattern the model cannot explain, such
  as the strong scattering of a substituted heavier atom;
- the distance of the position's content latents from the others' (the
  ``NEIGHBOURS``-th nearest of up to ``REFERENCE`` latents, in units of each
  latent's spread): a pattern the model explains, but one the rest of the
  scan does not have, such as the deflections around a vacancy. Measured on
  a multislice vacancy, the reconstruction error is lowest at the vacancy
  (its pattern is like a hexagon centre's), while the latent distance peaks
  0.46 A from it.

``anomaly`` is the larger of the two, in robust standard deviations, and a
position alarms when it exceeds ``sigma``: a scan of a perfect lattice
spreads its scores over a few standard deviations, a defect stands out.
"""

from __future__ import annotations

import numpy as np

from rrstem.model.interface import ALARM_THRESHOLD, ALARMS, ANOMALY, LATENT, RECON_SIGMA

MIN_POSITIONS = 16  #: fewer scored positions than this: no threshold yet (inf), no alarms
NEIGHBOURS = 8  #: the latent distance is to the k-th nearest reference latent
REFERENCE = 2048  #: at most this many positions (a fixed random subset) are the reference


def robust_z(scores: np.ndarray) -> np.ndarray:
    """``(s - median) / (1.4826 MAD)`` over the finite scores (NaN stays NaN; the MAD at least 1e-3 |median|)."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    out = np.full(s.shape, np.nan)
    if not ok.any():
        return out
    med = np.median(s[ok])
    mad = 1.4826 * np.median(np.abs(s[ok] - med))
    mad = max(mad, 1e-3 * abs(med), 1e-12)  # scores all alike but a few: those few stand out, not NaN
    out[ok] = (s[ok] - med) / mad
    return out


def latent_distance(latent: np.ndarray, seed: int = 0) -> np.ndarray:
    """(ny, nx) distance of each position's latents (d, ny, nx) to its ``NEIGHBOURS``-th nearest reference."""
    d = latent.shape[0]
    z = latent.reshape(d, -1).T.astype(np.float64)  # (N, d)
    ok = np.isfinite(z).all(axis=1)
    out = np.full(len(z), np.nan)
    if ok.sum() <= NEIGHBOURS + 1 or d == 0:
        return out.reshape(latent.shape[1:])
    zs = z[ok]
    zs = (zs - zs.mean(axis=0)) / np.where(zs.std(axis=0) > 0, zs.std(axis=0), 1.0)
    ref = zs if len(zs) <= REFERENCE else zs[np.random.default_rng(seed).choice(len(zs), REFERENCE, replace=False)]
    dist = np.empty(len(zs))
    for lo in range(0, len(zs), 1024):
        part = ((zs[lo:lo + 1024, None, :] - ref[None, :, :]) ** 2).sum(-1)  # (b, R)
        dist[lo:lo + 1024] = np.sqrt(np.partition(part, NEIGHBOURS, axis=1)[:, NEIGHBOURS])  # self is the 0th
    out[np.flatnonzero(ok)] = dist
    return out.reshape(latent.shape[1:])


def anomaly_map(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(ny, nx) float32: the larger robust z-score of ``recon_sigma`` and of the latent distance."""
    zr = robust_z(arrays[RECON_SIGMA])
    zl = robust_z(latent_distance(arrays[LATENT]))
    both = np.fmax(zr, zl)  # NaN only where both are
    return both.astype(np.float32)


def alarms(anomaly: np.ndarray, sigma: float) -> tuple[float, np.ndarray]:
    """(threshold, (k, 2) int32 [y, x] of the positions above it, highest score first) of an (ny, nx) map."""
    thr = float(sigma) if np.isfinite(anomaly).sum() >= MIN_POSITIONS else float("inf")
    a = np.where(np.isfinite(anomaly), anomaly, -np.inf)
    flat = np.flatnonzero(a.ravel() > thr)
    flat = flat[np.argsort(-a.ravel()[flat], kind="stable")]
    yx = np.stack(np.unravel_index(flat, anomaly.shape), axis=1) if len(flat) else np.zeros((0, 2))
    return thr, yx.astype(np.int32)


def add_alarms(arrays: dict[str, np.ndarray], sigma: float) -> dict[str, np.ndarray]:
    """Add ``ANOMALY``, ``ALARMS`` and ``ALARM_THRESHOLD`` (0-d float32) to maps holding ``RECON_SIGMA`` and
    ``LATENT``; returns ``arrays``."""
    arrays[ANOMALY] = anomaly_map(arrays)
    thr, yx = alarms(arrays[ANOMALY], sigma)
    arrays[ALARMS], arrays[ALARM_THRESHOLD] = yx, np.array(thr, dtype=np.float32)
    return arrays


def summary(arrays: dict[str, np.ndarray]) -> dict:
    """``anomaly_threshold`` (None until there is one) and ``alarms`` (how many), JSON-able, for the status."""
    thr = float(arrays[ALARM_THRESHOLD])
    return {ALARM_THRESHOLD: thr if np.isfinite(thr) else None, ALARMS: int(len(arrays[ALARMS]))}
