"""The rrVAE's outlier map: how unlike the rest of the scan the model finds each position.

This is an auxiliary map, ``rrvae_anomaly`` in snapshots and results. The
product's defect map (``anomaly``) and its alarms are the VADF lattice
residual of ``stream/defects.py``, which found the defects more reliably on
the multislice scans and needs no model (docs/steering.md, "The defect map";
the figures are in bench/README.md).

Two signs of an outlier, each turned into a robust z-score over the scan
(``(s - median) / (1.4826 MAD)``: standard deviations for normal scores, and
the median and MAD barely move for a handful of defects):

- the reconstruction error in units of the expected Poisson noise
  (``recon_sigma``, ``encode.py``): a pattern the model cannot explain, such
  as the strong scattering of a substituted heavier atom;
- the distance of the position's content latents from the others' (the
  ``NEIGHBOURS``-th nearest of up to ``REFERENCE`` latents, in units of each
  latent's spread): a pattern the model explains, but one the rest of the
  scan does not have, such as the deflections around a vacancy, where the
  reconstruction error is low (its pattern is like a hexagon centre's).

``rrvae_anomaly`` is the larger of the two, in robust standard deviations;
``summary`` gives its highest value. It raises no alarms: the defect map
(``stream/defects.py``) does.
"""

from __future__ import annotations

import numpy as np

from rrstem.model.interface import LATENT, RECON_SIGMA, RRVAE_ANOMALY

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


def outliers(anomaly: np.ndarray, sigma: float) -> np.ndarray:
    """(k, 2) int32 [y, x] of the positions above ``sigma`` (none with fewer than ``MIN_POSITIONS`` scored),
    highest score first, of an (ny, nx) map."""
    thr = float(sigma) if np.isfinite(anomaly).sum() >= MIN_POSITIONS else float("inf")
    a = np.where(np.isfinite(anomaly), anomaly, -np.inf)
    flat = np.flatnonzero(a.ravel() > thr)
    flat = flat[np.argsort(-a.ravel()[flat], kind="stable")]
    return np.stack(np.unravel_index(flat, anomaly.shape), axis=1).astype(np.int32).reshape(-1, 2)


def add_outlier_map(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add ``RRVAE_ANOMALY`` to maps holding ``RECON_SIGMA`` and ``LATENT``; returns ``arrays``. (It raises no
    alarms: those come from the defect map, ``stream/defects.py``.)"""
    arrays[RRVAE_ANOMALY] = anomaly_map(arrays)
    return arrays


def summary(arrays: dict[str, np.ndarray]) -> dict:
    """``rrvae_anomaly_max`` (None before any score), JSON-able, for the training status."""
    a = arrays[RRVAE_ANOMALY]
    return {"rrvae_anomaly_max": float(np.nanmax(a)) if np.isfinite(a).any() else None}
