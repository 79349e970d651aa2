"""The online trainer's configuration: every field has its default and a comment.

The defaults are what ``rrstem serve`` and ``rrstem demo`` use; how they were
chosen is in ``model/trainer.py``'s docstring and the commit log.
"""

from __future__ import annotations

from dataclasses import dataclass

from rrstem.model.rrvae import RRVAEConfig


@dataclass
class TrainerConfig:
    # model (see RRVAEConfig; image_shape comes from the scan)
    latent_dim: int = 2  # content latents
    hidden: int = 128  # units per hidden layer
    encoder_layers: int = 2  # tanh layers in the encoder
    decoder_layers: int = 2  # tanh layers after the decoder's coordinate layer
    translation: bool = False  # translation latents
    phi_prior: float = 0.1  # scale of the angle prior
    angle_head: str = "vector"  # "vector" (phi = atan2 of a 2-vector; see rrvae.Encoder) or "scalar" (paper)
    pca: int = 0  # denoise inputs by projecting on this many principal components (0 = off; see refresh_basis)
    pca_frames: int = 1024  # random arrived frames the principal components are computed from
    mask: str | float | None = "auto"  # "auto" (radius holding mask_fraction of the variance), radius, or None
    mask_fraction: float = 0.99  # variance fraction inside the auto mask
    # optimisation
    lr: float = 2e-3  # Adam learning rate (the paper: 1e-4, for hundreds of epochs)
    lr_final: float = 0.05  # the learning rate falls linearly in time to lr * lr_final over the consolidation
    batch_size: int = 20  # images per step (the paper: 20)
    pixels: int | None = 512  # decoded pixels per step, shared by the batch (None: all)
    new_fraction: float = 0.5  # share of a batch drawn from the newest arrivals while the scan runs
    recent: int = 256  # how many of the newest arrivals count as new
    input_std: float = 0.3  # std of the model input over the first frames (fixes the gain; smaller = more KL weight)
    min_frames: int = 64  # frames before training starts (and the gain is frozen)
    heldout: int = 128  # held-out reservoir size
    seed: int = 0  # seeds the model init, the sampling and the pixel subsets
    warm_start: bool = False  # keep the previous scan's model when a new scan is attached
    # consolidation and cadence
    consolidate_seconds: float = 50.0  # wall-time bound of the consolidation phase (+ final encode and save: <= 60 s)
    consolidate_steps: int = 100_000  # step bound of the consolidation phase
    refresh_seconds: float = 0.5  # re-encode the maps this often (at least 5x the encode time)
    eval_seconds: float = 2.0  # held-out ELBO this often
    eval_pixels: int = 256  # fixed pixel subset for the held-out ELBO and recon_error
    recon_budget: int = 512  # frames whose recon_error is refreshed per map refresh
    log_every: int = 10  # steps between history points
    threads: int = 1  # torch threads on CPU
    tune_malloc: bool = True  # glibc: keep freed activation buffers instead of unmapping them (see system.py)
    nice: int = 10  # CPU priority of the trainer thread (Linux nice, 0..19; 0 = same as ingest): ingest runs first

    def model_config(self, image_shape: tuple[int, int], mask_radius: float | None) -> RRVAEConfig:
        return RRVAEConfig(image_shape=tuple(image_shape), latent_dim=self.latent_dim, hidden=self.hidden,
                           encoder_layers=self.encoder_layers, decoder_layers=self.decoder_layers,
                           translation=self.translation, phi_prior=self.phi_prior, mask_radius=mask_radius,
                           angle_head=self.angle_head, pca=self.pca)

    def __post_init__(self):
        if self.batch_size < 1 or (self.pixels is not None and self.pixels < 1):
            raise ValueError("batch_size and pixels must be positive (pixels=None decodes all)")
        if not (isinstance(self.mask, (int, float)) or self.mask in ("auto", None)):
            raise ValueError(f"mask must be 'auto', a radius in grid units or None, not {self.mask!r}")
