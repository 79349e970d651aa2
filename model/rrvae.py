"""The rotationally invariant VAE (rrVAE) of Oxley et al. 2021, in one file.

This is the rVAE of the atomai library as the paper configured it
(``latent_dim=2``, ``translation=False``, two tanh layers of 128 units in
encoder and decoder, MSE loss, Adam at 1e-4), written so that the decoder is
fast on a CPU. ``RRVAEConfig``'s defaults are the paper's but for the angle
head (``angle_head="vector"``; ``"scalar"`` is the paper's) and the width
(``hidden=32``; the paper's 128), both better here (``bench/README.md``).

Likelihood
----------
``"mse"``: the reconstruction term is 0.5 * sum of squared errors, in input
units. ``"poisson"``: a Gaussian whose variance is the Poisson variance of
each pixel's counts, 0.5 * sum w_p (x_p - xhat_p)^2 with w_p the inverse noise
variance in input units (the ``noise_weight`` buffer, set by the trainer from
the mean pattern: ``encode.noise_weight``). Counting noise then weighs as
much as it should: bright pixels, whose counts are noisy, weigh less than
dark ones, and the balance against the KL terms follows the dose.
The encoder maps a flattened frame to the mean and log standard
deviation of 1 (+2) + d latents: the angle phi, optionally a translation, then
the content z. The decoder is a function of pixel coordinates: every pixel's
coordinate c is rotated by phi, and h1 = tanh(W_c c' + b + W_z z) is followed
by tanh layers and one output value per pixel.

Sign convention of phi
----------------------
Pixel coordinates are c = (u, v): u along columns (to the right), v along
rows (downwards, row 0 at the top as ``imshow`` and pyqtgraph display it),
both spanning [-1, 1] across the frame and centred on the array centre
((h-1)/2, (w-1)/2). An angle is measured from +u towards +v, the same sense
as the COM angle ``atan2(com_y, com_x)`` in ``stream/``: on screen with row 0
at the top, a positive angle turns *clockwise*. "A pattern rotated by +a"
(``rotate_pattern(img, a)``) moves the feature at angle t to angle t + a. The
decoder draws pixel c from its canonical pattern at R(-phi) c, so a pattern
rotated by +a encodes with phi larger by a (modulo the pattern's symmetry).

Speed
-----
Almost all the cost is the decoder's per-pixel MLP (about 0.8 GFLOP per 64x64
image step). Four things keep it down without changing the model:
- the first layer: W_c R(-phi) c = cos(phi) W_c c + sin(phi) W_c c_perp with
  c_perp = (v, -u); both (P, H) projections are computed once per step for
  all images, so layer 1 is a (B, 2) x (2, P*H) product plus a per-image bias;
- an optional circular mask (corners of a rotated square are extrapolation);
- an optional random subset of pixels per step, shared by the batch, with the
  reconstruction term rescaled by P/k so its expectation is unchanged;
- tanh computed as 2 sigmoid(2x) - 1 (``FastTanh``; equal to torch.tanh
  within 2e-7): PyTorch's CPU tanh kernel is much slower than its sigmoid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn


@dataclass
class RRVAEConfig:
    image_shape: tuple[int, int] = (64, 64)  # (h, w) of the binned frames the model sees
    latent_dim: int = 2  # content latents z (the paper: 2; "3D rrVAE" = phi + 2)
    # units per hidden layer, encoder and decoder (paper: 128). Fewer units step faster on a CPU core, which at
    # a detector's pace buys the steps that converge the maps by the last frame
    hidden: int = 32
    encoder_layers: int = 2  # [Linear, Tanh] blocks before the two heads (paper: 2)
    decoder_layers: int = 2  # [Linear(H, H), Tanh] blocks after the coordinate layer (paper: 2)
    translation: bool = False  # two translation latents shift the coordinates (paper: False)
    translation_scale: float = 0.1  # a unit translation latent shifts by this, in grid units [-1, 1]
    phi_prior: float = 0.1  # scale s of the angle's zero-mean Gaussian prior (atomai default 0.1)
    mask_radius: float | None = None  # keep pixels with |c| <= r (grid units; 1 = inscribed circle), None = all
    # "vector": phi's mean is atan2 of a 2-vector head (see ImageEncoder); "scalar": a linear head, as in the paper.
    # "vector" is the default: its content latents follow the COM magnitude more closely
    angle_head: str = "vector"
    # > 0: the encoder's input is projected on this many principal components (the ``basis`` buffer), a
    # denoising as the paper's experimental notebook did; the reconstruction target stays the raw input. 0 = off
    pca: int = 0
    # "poisson": Gaussian with each pixel's Poisson variance (``noise_weight``); "mse": plain squared error.
    # "mse" (with the trainer's signal_gain) is the default: with "poisson" the dark pixels' noise dominates
    likelihood: str = "mse"

    def __post_init__(self):
        if self.angle_head not in ("scalar", "vector"):
            raise ValueError(f"angle_head must be 'scalar' or 'vector', not {self.angle_head!r}")
        if self.likelihood not in ("poisson", "mse"):
            raise ValueError(f"likelihood must be 'poisson' or 'mse', not {self.likelihood!r}")
        if self.pca < 0 or self.latent_dim < 0 or self.hidden < 1:
            raise ValueError(f"pca and latent_dim must be >= 0 and hidden >= 1, not {self.pca}, {self.latent_dim}, "
                             f"{self.hidden}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RRVAEConfig":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


def coordinate_grid(h: int, w: int) -> np.ndarray:
    """(h*w, 2) float32 (u, v) per pixel, row-major: u along columns, v along rows, each in [-1, 1]."""
    v, u = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    return np.stack([u.ravel(), v.ravel()], axis=1).astype(np.float32)


def pixel_mask(cfg: RRVAEConfig) -> np.ndarray:
    """(h*w,) bool: the pixels the model encodes and reconstructs."""
    grid = coordinate_grid(*cfg.image_shape)
    if cfg.mask_radius is None:
        return np.ones(len(grid), dtype=bool)
    return np.hypot(grid[:, 0], grid[:, 1]) <= cfg.mask_radius


def rotate_pattern(image: np.ndarray, angle: float) -> np.ndarray:
    """``image`` rotated by ``angle`` about the array centre in phi's convention (bilinear, 0 outside)."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    c, s = math.cos(angle), math.sin(angle)
    # the output pixel at angle t takes the input value at angle t - angle
    xs = c * (xx - cx) + s * (yy - cy) + cx
    ys = -s * (xx - cx) + c * (yy - cy) + cy
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    out = np.zeros((h, w), dtype=np.float64)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + dy, x0 + dx
        ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        out[ok] += wgt[ok] * image[yi[ok], xi[ok]]
    return out.astype(image.dtype)


class _TanhFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x * 2.0).mul_(2.0).sub_(1.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


class FastTanh(nn.Module):
    """tanh as 2 sigmoid(2x) - 1, with tanh's gradient 1 - y^2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TanhFn.apply(x)


class _Atan2Fn(torch.autograd.Function):
    """atan2(w, u) whose gradient has ``eps`` added to u^2 + w^2, so it stays finite near the origin."""

    @staticmethod
    def forward(ctx, w, u, eps: float):
        ctx.save_for_backward(w, u)
        ctx.eps = eps
        return torch.atan2(w, u)

    @staticmethod
    def backward(ctx, grad):
        w, u = ctx.saved_tensors
        r2 = u * u + w * w + ctx.eps
        return grad * u / r2, -grad * w / r2, None


class ImageEncoder(nn.Module):
    """Flattened (masked) frame -> mean and log std of [phi, (tx, ty), z].

    With ``angle_vector`` the mean head gives a 2-vector (u, w) for the angle
    and phi's mean is atan2(w, u): an angle that wraps continuously, so the
    encoder can follow a direction round the whole circle with a smooth
    (even linear) map instead of a scalar that must jump somewhere by 2 pi.
    """

    def __init__(self, n_in: int, n_out: int, hidden: int, layers: int, angle_vector: bool = False):
        super().__init__()
        blocks, width = [], n_in
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), FastTanh()]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.angle_vector = angle_vector
        self.mean = nn.Linear(width, n_out + int(angle_vector))
        self.logsd = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (B, H)
        mean = self.mean(h)  # (B, n_out) or (B, 1 + n_out): [u, w, rest] with phi = atan2(w, u)
        if self.angle_vector:
            mean = torch.cat([_Atan2Fn.apply(mean[:, 1], mean[:, 0], 1e-4)[:, None], mean[:, 2:]], dim=1)
        return mean, self.logsd(h)


class Decoder(nn.Module):
    """(phi, shift, z) and pixel coordinates -> one value per pixel."""

    def __init__(self, n_z: int, hidden: int, layers: int):
        super().__init__()
        self.coord = nn.Linear(2, hidden)  # W_c and b
        self.latent = nn.Linear(n_z, hidden, bias=False)  # W_z
        blocks = []
        for _ in range(layers):
            blocks += [nn.Linear(hidden, hidden), FastTanh()]
        self.body = nn.Sequential(*blocks)
        self.out = nn.Linear(hidden, 1)

    def forward(self, grid: torch.Tensor, phi: torch.Tensor, z: torch.Tensor,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """grid (P, 2), phi (B,), z (B, d), shift (B, 2) or None -> (B, P)."""
        B, P, H = phi.shape[0], grid.shape[0], self.coord.out_features
        perp = torch.stack([grid[:, 1], -grid[:, 0]], dim=1)  # (P, 2) c_perp = (v, -u)
        proj = torch.cat([grid, perp]) @ self.coord.weight.T  # (2P, H): W_c c, W_c c_perp
        cs = torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)  # (B, 2)
        bias = self.coord.bias + self.latent(z)  # (B, H)
        if shift is not None:
            bias = bias + shift @ self.coord.weight.T  # W_c t, t applied after the rotation
        h = (cs @ proj.view(2, P * H)).view(B, P, H)  # (B, P, H) = cos W_c c + sin W_c c_perp
        h = _TanhFn.apply(h + bias[:, None, :])
        h = self.body(h)  # (B, P, H)
        return self.out(h).squeeze(-1)  # (B, P)


class RRVAE(nn.Module):
    def __init__(self, cfg: RRVAEConfig):
        super().__init__()
        self.cfg = cfg
        mask = pixel_mask(cfg)
        self.n_pixels = int(mask.sum())
        self.n_shift = 2 if cfg.translation else 0
        self.register_buffer("mask_index", torch.from_numpy(np.flatnonzero(mask)), persistent=False)
        self.register_buffer("grid", torch.from_numpy(coordinate_grid(*cfg.image_shape)[mask]), persistent=False)
        if cfg.pca > 0:  # orthonormal columns spanning the kept components; part of the input contract
            self.register_buffer("basis", torch.zeros(self.n_pixels, cfg.pca))
        # (P,) inverse noise variance per model pixel, in input units (likelihood "poisson"; ones until set)
        self.register_buffer("noise_weight", torch.ones(self.n_pixels), persistent=False)
        n_lat = 1 + self.n_shift + cfg.latent_dim
        self.encoder = ImageEncoder(self.n_pixels, n_lat, cfg.hidden, cfg.encoder_layers, cfg.angle_head == "vector")
        self.decoder = Decoder(cfg.latent_dim, cfg.hidden, cfg.decoder_layers)

    def flatten(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, h, w) frames -> (B, P) the masked pixels the model works on."""
        return frames.reshape(frames.shape[0], -1)[:, self.mask_index]  # (B, h*w) -> (B, P)

    def set_noise_weight(self, weight: torch.Tensor) -> None:
        """Set the (P,) inverse noise variances the ``"poisson"`` likelihood weighs each pixel's error with."""
        if weight.shape != self.noise_weight.shape:
            raise ValueError(f"noise weight must have shape {tuple(self.noise_weight.shape)}, not {tuple(weight.shape)}")
        self.noise_weight.copy_(weight)

    def weights(self, pixels: torch.Tensor | None = None) -> torch.Tensor | None:
        """The per-pixel weights of the squared error at ``pixels`` (all if None); None for ``"mse"``."""
        if self.cfg.likelihood == "mse":
            return None
        return self.noise_weight if pixels is None else self.noise_weight[pixels]

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, P) projected on the span of ``basis`` (unchanged if PCA is off or no basis is set yet)."""
        if self.cfg.pca <= 0 or not bool(self.basis.any()):
            return x
        return (x @ self.basis) @ self.basis.T  # (B, k) -> (B, P)

    def set_basis(self, frames: torch.Tensor) -> None:
        """Set ``basis`` to the leading ``pca`` principal directions of (N, P) model inputs (mean-subtracted)."""
        k = min(self.cfg.pca, frames.shape[0] - 1, frames.shape[1])
        if k < 1:
            return
        a = frames - frames.mean(0)  # (N, P)
        q = min(k + 8, *a.shape)
        _, _, v = torch.svd_lowrank(a, q=q, niter=3)  # v: (P, q), randomised: ~(2 niter + 2) N P q flops
        basis = torch.zeros_like(self.basis)
        basis[:, :k] = v[:, :k]
        self.basis.copy_(basis)

    def unflatten(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, P) -> (B, h, w), ``fill`` outside the mask."""
        h, w = self.cfg.image_shape
        out = x.new_full((x.shape[0], h * w), fill)
        out[:, self.mask_index] = x
        return out.view(-1, h, w)  # (B, h*w) -> (B, h, w)

    def split(self, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(B, 1 + n_shift + d) -> phi (B,), shift (B, 2) or None, z (B, d)."""
        shift = lat[:, 1:3] * self.cfg.translation_scale if self.n_shift else None
        return lat[:, 0], shift, lat[:, 1 + self.n_shift:]

    def decode(self, lat: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, 1 + n_shift + d) -> (B, P) or (B, k) at the masked-pixel indices ``pixels``."""
        grid = self.grid if pixels is None else self.grid[pixels]
        phi, shift, z = self.split(lat)
        return self.decoder(grid, phi, z, shift)

    def forward(self, x: torch.Tensor, pixels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, P) flattened frames -> posterior, one reparameterised sample, its reconstruction."""
        mean, logsd = self.encoder(self.denoise(x))
        lat = mean + torch.exp(logsd) * torch.randn_like(mean)
        return {"mean": mean, "logsd": logsd, "recon": self.decode(lat, pixels)}

    def loss(self, x: torch.Tensor, out: dict[str, torch.Tensor],
             pixels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The negative ELBO (averaged over the batch) and its three terms.

        reconstruction: 0.5 * sum over pixels of the squared error (weighted by
        ``noise_weight`` for the ``"poisson"`` likelihood), rescaled by P/k when
        only k of the P pixels were decoded; content KL: KL of the
        content (and translation) latents against N(0, 1); angle KL: against
        N(0, s^2) without the mean term, so the angle's mean is free.
        """
        target = x if pixels is None else x[:, pixels]
        sq = (out["recon"] - target) ** 2  # (B, k)
        w = self.weights(pixels)
        recon = 0.5 * (sq if w is None else sq * w).sum(1) * (x.shape[1] / target.shape[1])
        mean, logsd = out["mean"][:, 1:], out["logsd"][:, 1:]
        kl_z = (0.5 * (mean ** 2 + torch.exp(2 * logsd) - 1) - logsd).sum(1)
        kl_phi = angle_kl(out["logsd"][:, 0], self.cfg.phi_prior)
        terms = {"reconstruction": recon.mean(), "content_kl": kl_z.mean(), "angle_kl": kl_phi.mean()}
        terms["loss"] = terms["reconstruction"] + terms["content_kl"] + terms["angle_kl"]
        return terms

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) -> posterior means and log std (B, 1 + n_shift + d)."""
        return self.encoder(self.denoise(x))


def backward_in_chunks(model: RRVAE, x: torch.Tensor, pixels: torch.Tensor | None = None,
                       rows: int = 16384) -> dict[str, float]:
    """Loss terms of batch ``x`` (B, P) with their gradients accumulated, a few images at a time.

    Chunks of images keep each (images x pixels, H) activation under ``rows``
    rows (8 MB at H=128), small enough to stay in cache and in reused heap
    memory; the gradients equal those of the whole batch.
    """
    B = x.shape[0]
    k = model.n_pixels if pixels is None else len(pixels)
    step = max(1, rows // k)
    total: dict[str, float] = {}
    for lo in range(0, B, step):
        part = x[lo:lo + step]
        terms = model.loss(part, model(part, pixels), pixels)
        (terms["loss"] * (len(part) / B)).backward()
        for name, v in terms.items():
            total[name] = total.get(name, 0.0) + float(v.detach()) * len(part) / B
    return total


def angle_kl(logsd: torch.Tensor, prior: float) -> torch.Tensor:
    """KL of N(mu, sd^2) against N(0, prior^2) without the mu^2 term."""
    return -logsd + math.log(prior) + torch.exp(2 * logsd) / (2 * prior ** 2) - 0.5
