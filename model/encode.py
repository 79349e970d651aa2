"""The input contract of the rrVAE and encoding whole scans into maps.

Input contract: the model sees ``(frame - mean) * gain`` on the pixels of its
mask (its encoder sees that projected on the model's PCA ``basis`` if it has
one), where ``mean`` is the current running mean pattern (subtracted when a
batch is assembled, never stored) and ``gain`` is fixed for a scan:
``input_std / std(first frames - their mean)``, frozen when training starts.

Noise model: frames are counts of electrons, times ``scale`` (``count_scale``):
1 for counting data with at most ``dose_cap`` electrons per pattern; for
brighter or non-integer (noise-free, gain-corrected) data, the scale that
makes a pattern hold ``dose_cap`` electrons, so that no data is trusted more
than counts at that dose. A pixel's noise variance is then its Poisson
variance ``max(scale * mean, 1)`` in scaled counts (at least one count), and
``noise_weight`` is its inverse in input units.

Maps (named in ``interface.MAPS``): ``rotation`` (ny, nx) = the angle's
posterior mean phi (rad, see ``rrvae.py`` for its sign), ``latent``
(d, ny, nx) = the content posterior means in their principal axes over the
scan (``principal_axes``: latent 0 varies most; the prior N(0, I) is the
same in any rotation of them, so nothing else fixes their axes while the
model trains, and one quantity the frames show, such as the COM magnitude,
can lie along a diagonal of two), ``recon_error`` (ny, nx) = mean
squared error per pixel of the reconstruction from the posterior means, in
input units, and ``recon_sigma`` (ny, nx) = the same error in units of the
expected Poisson noise: sqrt(mean over pixels of w_p (x_p - xhat_p)^2), about
1 for a frame the model explains down to its counting noise (``anomaly.py``
makes the defect map from it and the latents). Both are estimated on a fixed subset of
pixels. NaN where no frame has arrived.
"""

from __future__ import annotations

import numpy as np
import torch

from rrstem.model.interface import LATENT, RECON_ERROR, RECON_SIGMA, ROTATION
from rrstem.model.rrvae import RRVAE, coordinate_grid

ROWS = 16384  #: images x pixels per decoder call: keeps activations small (see rrvae.backward_in_chunks)


def auto_mask_radius(frames: np.ndarray, mean: np.ndarray, fraction: float = 0.99, margin_px: float = 2.0) -> float:
    """Smallest radius (grid units, <= sqrt 2) holding ``fraction`` of the variance of ``frames - mean``, plus a margin.

    For bright-field dominated data (graphene) this is the disc plus a rim;
    for data with signal out to the corners it grows to cover the frame.
    """
    h, w = mean.shape
    var = ((frames.astype(np.float64) - mean) ** 2).sum(axis=0).ravel()  # (h*w,)
    grid = coordinate_grid(h, w)
    r = np.hypot(grid[:, 0], grid[:, 1])
    order = np.argsort(r)
    cum = np.cumsum(var[order])
    if cum[-1] <= 0:
        return float(np.sqrt(2))
    k = int(np.searchsorted(cum, fraction * cum[-1]))
    return float(min(np.sqrt(2), r[order[min(k, len(r) - 1)]] + margin_px * 2 / (max(h, w) - 1)))


def input_gain(frames: np.ndarray, mean: np.ndarray, model_pixels: np.ndarray, input_std: float,
               counts: bool = False) -> float:
    """The fixed gain that makes the *signal* in the first frames' mean-subtracted pixels have std ``input_std``.

    With ``counts`` (the frames are Poisson counts, ``is_counts``), the expected counting-noise variance
    (the mean count of each pixel) is taken off the variance first, so that the gain, and with it the
    balance of reconstruction against KL, is that of the signal at any dose (at most 95% is taken off).
    """
    d = (frames.reshape(len(frames), -1)[:, model_pixels] - mean.ravel()[model_pixels]).astype(np.float64)
    var = float(d.var())
    if counts:
        noise = float(np.clip(mean.ravel()[model_pixels], 0, None).mean())
        var = max(var - noise, 0.05 * var)
    return float(input_std / np.sqrt(var)) if var > 0 else 1.0


def is_counts(frames: np.ndarray) -> bool:
    """The frames hold non-negative integers: counted electrons (Poisson noise), not expected intensities."""
    f = np.asarray(frames)
    return bool(len(f)) and bool(np.all(f == np.round(f))) and bool(f.min() >= 0)


def count_scale(frames: np.ndarray, dose_cap: float) -> float:
    """The factor that turns stored values into the electron counts the noise model assumes (see above).

    ``frames`` (N, h, w): the first frames of a scan. Integer-valued frames with at most ``dose_cap``
    electrons per pattern on average are counts (1.0); others are scaled to ``dose_cap`` per pattern.
    """
    f = np.asarray(frames, dtype=np.float64)
    total = float(f.reshape(len(f), -1).sum(axis=1).mean()) if len(f) else 0.0
    if not (total > 0 and np.isfinite(total)):
        return 1.0
    return 1.0 if is_counts(f) and total <= dose_cap else dose_cap / total


def noise_weight(model: RRVAE, mean: np.ndarray, gain: float, scale: float) -> torch.Tensor:
    """(P,) inverse Poisson noise variance of each model pixel in input units, on the model's device.

    A pixel with mean ``m`` stored units holds ``scale * m`` counts, variance ``max(scale * m, 1)`` counts^2;
    in input units (``x = stored * gain``) that is ``max(scale * m, 1) * (gain / scale)^2``.
    """
    m = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)).to(model.noise_weight.device)
    counts = (m.reshape(-1)[model.mask_index] * scale).clamp_min(1.0)  # (P,)
    return (scale / gain) ** 2 / counts


def principal_axes(z: np.ndarray) -> np.ndarray:
    """(d, d) orthogonal matrix whose rows are the principal directions of latents ``z`` (N, d), largest first.

    Each row's largest component is positive, so that the axes keep their sense from one refresh to the next.
    ``principal_axes(z) @ z.T`` are the latents in those axes.
    """
    z = np.asarray(z, dtype=np.float64)
    d = z.shape[1]
    if len(z) < 2 or d < 2:
        return np.eye(d)
    zc = z - z.mean(axis=0)
    _, vectors = np.linalg.eigh(zc.T @ zc)  # ascending eigenvalues
    axes = vectors[:, ::-1].T  # (d, d) rows = directions, largest variance first
    big = np.argmax(np.abs(axes), axis=1)
    return axes * np.sign(axes[np.arange(d), big])[:, None]


def prepare(model: RRVAE, frames: np.ndarray, mean: np.ndarray, gain: float, device,
            resample: float | None = None) -> torch.Tensor:
    """(B, h, w) raw binned frames -> (B, P) model input on ``device`` (the encoder denoises it itself).

    ``resample`` (a ``count_scale``): each model pixel is first replaced by a Poisson draw of its counts at that
    scale, divided by it again: frames that are not counts (noise-free, gain-corrected) then carry the counting
    noise of ``dose_cap`` electrons per pattern, and the model is not trained to fit finer detail than that.
    """
    x = model.flatten(torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).to(device))  # (B, P)
    m = model.flatten(torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)).to(device)[None])  # (1, P)
    if resample:
        x = torch.poisson(x.clamp_min(0) * resample) / resample
    return (x - m) * gain


@torch.no_grad()
def encode_scan(model: RRVAE, frames: np.ndarray, filled: np.ndarray, scan_shape: tuple[int, int],
                mean: np.ndarray, gain: float, device, recon_pixels: torch.Tensor | None = None,
                recon_index: np.ndarray | None = None, chunk: int = 1024, axes: bool = True) -> dict[str, np.ndarray]:
    """Encode the filled frames of (N, h, w) ``frames`` into (ny, nx) maps, NaN where not filled.

    ``axes``: the latents in their principal axes over these frames (``principal_axes``); False where the
    frames are one part of a scan whose latents are turned together afterwards (``rrstem.scaleout_model``).

    ``recon_error`` and ``recon_sigma`` are computed for ``recon_index`` (scan indices; default all
    filled) on the model pixels ``recon_pixels`` (default all); other entries are NaN. ``anomaly``
    weighs the errors with the model's ``noise_weight`` (set it for this scan's mean first).
    """
    model.eval()
    ny, nx = scan_shape
    d = model.cfg.latent_dim
    idx = np.flatnonzero(filled)
    rotation = np.full(ny * nx, np.nan, dtype=np.float32)
    latent = np.full((d, ny * nx), np.nan, dtype=np.float32)
    recon_error = np.full(ny * nx, np.nan, dtype=np.float32)
    sigma = np.full(ny * nx, np.nan, dtype=np.float32)
    w = model.noise_weight if recon_pixels is None else model.noise_weight[recon_pixels]  # (k,)
    means = {}
    for lo in range(0, len(idx), chunk):
        part = idx[lo:lo + chunk]
        mu, _ = model.encode(prepare(model, frames[part], mean, gain, device))  # (b, 1 + n_shift + d)
        mu_np = mu.cpu().numpy()
        rotation[part] = mu_np[:, 0]
        latent[:, part] = mu_np[:, 1 + model.n_shift:].T
        means.update(zip(part.tolist(), mu))
    if len(idx) and axes:
        latent[:, idx] = (principal_axes(latent[:, idx].T) @ latent[:, idx]).astype(np.float32)
    todo = idx if recon_index is None else np.intersect1d(idx, recon_index)
    n_dec = max(1, ROWS // (model.n_pixels if recon_pixels is None else len(recon_pixels)))
    for lo in range(0, len(todo), n_dec):
        part = todo[lo:lo + n_dec]
        x = prepare(model, frames[part], mean, gain, device)  # (b, P)
        mu = torch.stack([means[int(i)] for i in part])  # (b, n_lat)
        target = x if recon_pixels is None else x[:, recon_pixels]
        sq = (model.decode(mu, recon_pixels) - target) ** 2  # (b, k)
        recon_error[part] = sq.mean(1).cpu().numpy()
        sigma[part] = (sq * w).mean(1).sqrt().cpu().numpy()
    return {ROTATION: rotation.reshape(ny, nx), LATENT: latent.reshape(d, ny, nx),  # (N,) -> (ny, nx)
            RECON_ERROR: recon_error.reshape(ny, nx), RECON_SIGMA: sigma.reshape(ny, nx)}
