"""The input contract of the rrVAE and encoding whole scans into maps.

Input contract: the model sees ``(frame - mean) * gain`` on the pixels of its
mask (projected on the model's PCA ``basis`` if it has one), where ``mean``
is the current running mean pattern (subtracted when a batch is assembled,
never stored) and ``gain`` is fixed for a scan:
``input_std / std(first frames - their mean)``, frozen when training starts.

Maps (named in ``interface.MAPS``): ``rotation`` (ny, nx) = the angle's
posterior mean phi (rad, see ``rrvae.py`` for its sign), ``latent``
(d, ny, nx) = the content posterior means, ``recon_error`` (ny, nx) = mean
squared error per pixel of the reconstruction from the posterior means, in
input units, estimated on a fixed subset of pixels. NaN where no frame has
arrived.
"""

from __future__ import annotations

import numpy as np
import torch

from rrstem.model.interface import LATENT, RECON_ERROR, ROTATION
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


def input_gain(frames: np.ndarray, mean: np.ndarray, model_pixels: np.ndarray, input_std: float) -> float:
    """The fixed gain that makes the first frames' mean-subtracted pixels have std ``input_std``."""
    d = (frames.reshape(len(frames), -1)[:, model_pixels] - mean.ravel()[model_pixels]).astype(np.float64)
    std = float(d.std())
    return input_std / std if std > 0 else 1.0


def prepare(model: RRVAE, frames: np.ndarray, mean: np.ndarray, gain: float, device) -> torch.Tensor:
    """(B, h, w) raw binned frames -> (B, P) model input on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).to(device)
    m = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)).to(device)
    return model.denoise(model.flatten((x - m) * gain))


@torch.no_grad()
def encode_scan(model: RRVAE, frames: np.ndarray, filled: np.ndarray, scan_shape: tuple[int, int],
                mean: np.ndarray, gain: float, device, recon_pixels: torch.Tensor | None = None,
                recon_index: np.ndarray | None = None, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Encode the filled frames of (N, h, w) ``frames`` into (ny, nx) maps, NaN where not filled.

    ``recon_error`` is computed for ``recon_index`` (scan indices; default all
    filled) on the model pixels ``recon_pixels`` (default all); other entries are NaN.
    """
    model.eval()
    ny, nx = scan_shape
    d = model.cfg.latent_dim
    idx = np.flatnonzero(filled)
    rotation = np.full(ny * nx, np.nan, dtype=np.float32)
    latent = np.full((d, ny * nx), np.nan, dtype=np.float32)
    recon_error = np.full(ny * nx, np.nan, dtype=np.float32)
    means = {}
    for lo in range(0, len(idx), chunk):
        part = idx[lo:lo + chunk]
        mu, _ = model.encode(prepare(model, frames[part], mean, gain, device))  # (b, 1 + n_shift + d)
        mu_np = mu.cpu().numpy()
        rotation[part] = mu_np[:, 0]
        latent[:, part] = mu_np[:, 1 + model.n_shift:].T
        means.update(zip(part.tolist(), mu))
    todo = idx if recon_index is None else np.intersect1d(idx, recon_index)
    n_dec = max(1, ROWS // (model.n_pixels if recon_pixels is None else len(recon_pixels)))
    for lo in range(0, len(todo), n_dec):
        part = todo[lo:lo + n_dec]
        x = prepare(model, frames[part], mean, gain, device)  # (b, P)
        mu = torch.stack([means[int(i)] for i in part])  # (b, n_lat)
        target = x if recon_pixels is None else x[:, recon_pixels]
        err = ((model.decode(mu, recon_pixels) - target) ** 2).mean(1)
        recon_error[part] = err.cpu().numpy()
    return {ROTATION: rotation.reshape(ny, nx), LATENT: latent.reshape(d, ny, nx),  # (N,) -> (ny, nx)
            RECON_ERROR: recon_error.reshape(ny, nx)}
