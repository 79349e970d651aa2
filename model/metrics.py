"""How well the rrVAE maps agree with the COM: the paper's stopping criterion.

- ``latent_pearson``: Pearson r of each content latent against the COM
  magnitude over the filled positions (NaN-aware).
- ``rotation_correlation``: a circular correlation of the rotation map against
  the COM angle. Pearson r is wrong for angles (it sees a jump at +-pi where
  there is none). The rotation is only defined up to a constant offset (the
  angle's prior has no mean term), its sense may be reversed (the paper saw
  "reversed polarity"), and for a pattern with n-fold symmetry only n*phi is
  determined. So both angles are multiplied by n, for n in 1..max_fold, and
  compared with the Fisher-Lee circular correlation (Fisher and Lee 1983)

      r = sum_ij w_i w_j sin(a_i - a_j) sin(b_i - b_j)
          / sqrt(sum_ij w_i w_j sin^2(a_i - a_j) * sum_ij w_i w_j sin^2(b_i - b_j))

  which is +1 for b = a + c, -1 for b = -a + c, and 0 for unrelated angles,
  whatever the angles' spread. It is computed in O(N) (``fisher_lee``). The
  Jammalamadaka-SenGupta coefficient used before measures each angle from its
  circular mean, which is undefined for angles that go round the whole circle,
  as the COM angle does round every atom: it scored a near-perfect rotation map
  low and picked the wrong fold (``bench/README.md``). The reported value is the largest
  |r| over n (at the smallest n within ``FOLD_TOLERANCE`` of it), with the n,
  the sign and the offset that give it. Weights (optional, typically the COM
  magnitude) make positions with a well-defined COM angle count more.
"""

from __future__ import annotations

import numpy as np

from rrstem.model.interface import COM_ANGLE, COM_MAGNITUDE, LATENT, ROTATION

#: The smallest fold whose |r| is within this of the best is reported: if phi is
#: defined modulo 2 pi / n, it is also modulo 2 pi / (2n), so multiples fit as well.
FOLD_TOLERANCE = 0.01


def _valid(*arrays: np.ndarray, filled: np.ndarray | None = None) -> np.ndarray:
    ok = np.ones(arrays[0].shape, dtype=bool) if filled is None else np.asarray(filled, dtype=bool).copy()
    for a in arrays:
        ok &= np.isfinite(a)
    return ok


def pearson(a: np.ndarray, b: np.ndarray, filled: np.ndarray | None = None) -> float:
    """Pearson r over positions where both are finite (and ``filled``); NaN if < 3 or constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson needs equal shapes, got {a.shape} and {b.shape}")
    ok = _valid(a, b, filled=filled)
    if ok.sum() < 3:
        return float("nan")
    x, y = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def latent_pearson(latent: np.ndarray, com_magnitude: np.ndarray, filled: np.ndarray | None = None) -> list[float]:
    """Pearson r of each latent map (d, ny, nx) against the COM magnitude (ny, nx)."""
    if latent.shape[1:] != com_magnitude.shape:
        raise ValueError(f"latent maps {latent.shape[1:]} and COM magnitude {com_magnitude.shape} differ in shape")
    return [pearson(lat, com_magnitude, filled) for lat in latent]


def fisher_lee(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted Fisher-Lee circular correlation of angle arrays (finite values only); 0 if either is constant.

    The sums over pairs come from sums over single angles: with s, c = sin a, cos a and t, u = sin b, cos b,
    sum_ij w_i w_j sin(a_i - a_j) sin(b_i - b_j) = 2 [(sum w s t)(sum w c u) - (sum w s u)(sum w c t)].
    """
    w = np.ones_like(a) if weights is None else weights
    s, c, t, u = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
    ab = (w * s * t).sum() * (w * c * u).sum() - (w * s * u).sum() * (w * c * t).sum()
    aa = (w * s * s).sum() * (w * c * c).sum() - (w * s * c).sum() ** 2
    bb = (w * t * t).sum() * (w * u * u).sum() - (w * t * u).sum() ** 2
    den = np.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
    return float(np.clip(ab / den, -1.0, 1.0)) if den > 0 else 0.0


def rotation_correlation(rotation: np.ndarray, com_angle: np.ndarray, weights: np.ndarray | None = None,
                         filled: np.ndarray | None = None, max_fold: int = 6) -> dict:
    """Best circular correlation of ``rotation`` vs ``com_angle`` over fold n in 1..max_fold and both signs.

    Returns ``{"r": |r| best, "fold": n, "sign": +1 or -1, "offset": c (rad), "by_fold": [|r| per n]}``
    where rotation ~= sign * com_angle + c modulo 2 pi / n. NaN ``r`` if fewer than 3 usable positions.
    """
    rotation, com_angle = np.asarray(rotation, dtype=np.float64), np.asarray(com_angle, dtype=np.float64)
    if rotation.shape != com_angle.shape:
        raise ValueError(f"rotation {rotation.shape} and COM angle {com_angle.shape} differ in shape")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        ok = _valid(rotation, com_angle, weights, filled=filled) & (weights >= 0)
    else:
        ok = _valid(rotation, com_angle, filled=filled)
    if ok.sum() < 3:
        return {"r": float("nan"), "fold": 0, "sign": 0, "offset": float("nan"), "by_fold": []}
    phi, theta = rotation[ok], com_angle[ok]
    w = None if weights is None else weights[ok]
    by_fold = [fisher_lee(n * phi, n * theta, w) for n in range(1, max_fold + 1)]
    best = float(np.max(np.abs(by_fold)))
    n = 1 + int(np.flatnonzero(np.abs(by_fold) >= best - FOLD_TOLERANCE)[0])  # multiples of n fit as well
    sign = 1 if by_fold[n - 1] >= 0 else -1
    ww = np.ones_like(phi) if w is None else w
    offset = float(np.angle((ww * np.exp(1j * n * (phi - sign * theta))).sum()) / n)
    return {"r": float(abs(by_fold[n - 1])), "fold": n, "sign": sign, "offset": offset,
            "by_fold": [float(abs(r)) for r in by_fold]}


def com_metrics(maps: dict[str, np.ndarray], com: dict[str, np.ndarray], weighted: bool = True,
                max_fold: int = 6) -> dict:
    """All metrics of trainer ``maps`` (``rotation``, ``latent``) against ``com`` maps, JSON-able.

    ``rotation_r`` (best |r|, angles weighted by COM magnitude if ``weighted``),
    ``rotation_fold``, ``rotation_sign``, ``rotation_offset``, ``latent_r`` (per latent) and
    ``latent_r_max`` (largest |r|).
    """
    mag, ang = com[COM_MAGNITUDE], com[COM_ANGLE]
    rot = rotation_correlation(maps[ROTATION], ang, weights=mag if weighted else None, max_fold=max_fold)
    lat = latent_pearson(maps[LATENT], mag)
    finite = [abs(r) for r in lat if np.isfinite(r)]
    return {"rotation_r": rot["r"], "rotation_fold": rot["fold"], "rotation_sign": rot["sign"],
            "rotation_offset": rot["offset"], "latent_r": lat,
            "latent_r_max": max(finite) if finite else float("nan")}
