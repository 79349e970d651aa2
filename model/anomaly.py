"""The defect map's alarms: which positions of the ``anomaly`` map are out of the ordinary.

``anomaly`` (``encode.py``) is each frame's reconstruction error in units of
its expected Poisson noise, so a frame the model explains down to its
counting noise scores about 1. The model never explains every frame that
well (two content latents are a coarse summary of a CBED pattern), so a
fixed threshold in noise units would either alarm everywhere at high dose or
nowhere at low dose. The threshold is therefore robust and relative to the
scan itself: ``median + sigma * 1.4826 * MAD`` of the scores over the
positions that have one (1.4826 MAD is the standard deviation for normal
scores, and the median and MAD barely move for a handful of defects), and
never below ``floor``, so that a scan explained to within its noise raises
no alarm at all.
"""

from __future__ import annotations

import numpy as np

from rrstem.model.interface import ALARM_THRESHOLD, ALARMS, ANOMALY

MIN_POSITIONS = 16  #: fewer scored positions than this: no threshold yet (inf), no alarms


def threshold(scores: np.ndarray, sigma: float, floor: float) -> float:
    """``max(median + sigma * 1.4826 * MAD, floor)`` over the finite ``scores``; inf if too few."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) < MIN_POSITIONS:
        return float("inf")
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med)))
    return max(med + sigma * 1.4826 * mad, floor)


def alarms(anomaly: np.ndarray, sigma: float, floor: float) -> tuple[float, np.ndarray]:
    """(threshold, (k, 2) int32 [y, x] of the positions above it, highest score first) of an (ny, nx) map."""
    thr = threshold(anomaly, sigma, floor)
    a = np.where(np.isfinite(anomaly), anomaly, -np.inf)
    flat = np.flatnonzero(a.ravel() > thr)
    flat = flat[np.argsort(-a.ravel()[flat], kind="stable")]
    yx = np.stack(np.unravel_index(flat, anomaly.shape), axis=1) if len(flat) else np.zeros((0, 2))
    return thr, yx.astype(np.int32)


def add_alarms(arrays: dict[str, np.ndarray], sigma: float, floor: float) -> dict[str, np.ndarray]:
    """Add ``ALARMS`` and ``ALARM_THRESHOLD`` (0-d float32) to maps holding ``ANOMALY``; returns ``arrays``."""
    thr, yx = alarms(arrays[ANOMALY], sigma, floor)
    arrays[ALARMS], arrays[ALARM_THRESHOLD] = yx, np.array(thr, dtype=np.float32)
    return arrays


def summary(arrays: dict[str, np.ndarray]) -> dict:
    """``anomaly_threshold`` (None until there is one) and ``alarms`` (how many), JSON-able, for the status."""
    thr = float(arrays[ALARM_THRESHOLD])
    return {ALARM_THRESHOLD: thr if np.isfinite(thr) else None, ALARMS: int(len(arrays[ALARMS]))}
