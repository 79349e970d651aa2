"""The online trainer's configuration: every field has its default and a comment.

The defaults are what ``rrstem serve`` and ``rrstem demo`` use. The network's
options live in ``RRVAEConfig`` (``model/rrvae.py``) and nowhere else:
``TrainerConfig.model`` holds one, whose ``image_shape`` and ``mask_radius``
the trainer fills in from the scan when it builds the model. The comments
say why a default is what it is; the measurements behind them
(``bench/quality.py`` on the abTEM multislice scans, and offline runs of the
same scans) are in ``bench/README.md``, "Measurements behind defaults".

The service is configured with a plain dict, which ``TrainerConfig.from_dict``
turns into a config: trainer fields and model options side by side (or the
model options nested under ``"model"``); ``to_dict()`` gives that dict back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from rrstem.model.rrvae import RRVAEConfig

#: model options the trainer sets itself, from the scan (``image_shape``) and from ``mask`` (``mask_radius``)
FROM_SCAN = ("image_shape", "mask_radius")


@dataclass
class TrainerConfig:
    # the network (image_shape and mask_radius are filled in from the scan at build time)
    model: RRVAEConfig = field(default_factory=RRVAEConfig)
    pca_frames: int = 1024  # random arrived frames the model's PCA basis is computed from (if model.pca > 0)
    mask: str | float | None = "auto"  # "auto" (radius holding mask_fraction of the variance), radius, or None
    mask_fraction: float = 0.99  # variance fraction inside the auto mask
    # optimisation: the learning rate follows progress, never wall time: while the scan runs it falls linearly
    # with the share of positions arrived from lr to lr * lr_scan_end; in the consolidation it falls on from
    # there to lr * lr_final over consolidate_steps steps
    lr: float = 2e-3  # Adam learning rate (the paper: 1e-4, for hundreds of epochs)
    lr_scan_end: float = 1.0  # lr at the last frame, as a share of lr (not measured other than 1.0)
    lr_final: float = 0.05  # lr at the end of consolidate_steps, as a share of lr
    # images per step (the paper: 20) and decoded pixels per step, shared by the batch (None: all). The decoder's
    # cost goes with images x pixels, so 40 x 128 steps as fast as 20 x 256 but with twice the images per
    # gradient, which made the worst seed's latents better by the last frame
    batch_size: int = 40
    pixels: int | None = 128
    new_fraction: float = 0.5  # share of a batch drawn from the newest arrivals while the scan runs
    recent: int = 256  # how many of the newest arrivals count as new
    # 0.3 weighs the KL ~11x more than 1.0: the content latents then carry the deflection magnitude instead of
    # spreading the direction over two latents
    input_std: float = 0.3  # std of the model input over the first frames (fixes the gain; smaller = more KL weight)
    # the gain scales the signal, not the signal plus counting noise (encode.input_gain): the balance of
    # reconstruction against KL is then the same at every dose
    signal_gain: bool = True
    min_frames: int = 64  # frames before training starts (and the gain is frozen)
    heldout: int = 128  # held-out reservoir size
    seed: int = 0  # seeds the model init, the sampling and the pixel subsets
    # start each new scan from a copy of the previous scan's model, its input gain and noise scale, when the
    # binned frame shape matches (``serve --no-warm-start``: off)
    warm_start: bool = True
    # noise model (encode.count_scale): data brighter than this, or not integer counts, is treated as counts at
    # this dose (electrons per pattern); below it, integer frames are Poisson counts as they are
    dose_cap: float = 1e6
    # frames that are not counts (noise-free simulations, gain-corrected data) are trained on as Poisson draws at
    # dose_cap electrons per pattern (encode.prepare): the detail finer than that dose's noise is not fitted
    resample: bool = True
    # unused since the defect map (stream/defects.py) raises the alarms; kept so configs saved with it still load
    alarm_sigma: float = 40.0
    # consolidation (after the last frame) and cadence
    # wall-time bound of the consolidation: consolidate_seconds less scan_credit x the seconds trained while the
    # scan ran, at least consolidate_min_seconds: a scan that trained while it arrived gets its results soon after
    # its last frame, one that arrived at once gets the whole consolidation
    consolidate_seconds: float = 25.0
    consolidate_min_seconds: float = 5.0
    # each second trained during the scan takes two off the consolidation, so a scan at a detector's pace has its
    # results within 10 s of its last frame even on a loaded machine
    scan_credit: float = 2.0
    consolidate_steps: int = 2000  # step bound of the consolidation phase; the lr schedule's length
    patience: int = 4  # consolidation ends after this many held-out evaluations without a new best
    min_improvement: float = 1e-3  # a new best must beat the old by this share of its |ELBO|
    consolidate_eval_steps: int = 50  # held-out evaluation every this many steps while consolidating
    refresh_seconds: float = 0.5  # re-encode the maps this often (at least 5x the encode time)
    eval_seconds: float = 2.0  # held-out ELBO this often
    eval_pixels: int = 256  # fixed pixel subset for the held-out ELBO and recon_error
    recon_budget: int = 512  # frames whose recon_error is refreshed per map refresh
    log_every: int = 10  # steps between history points
    # torch threads on CPU: one, the trainer's core (2 threads were slower on a 2-core machine under load)
    threads: int = 1
    tune_malloc: bool = True  # glibc: keep freed activation buffers instead of unmapping them (see system.py)
    nice: int = 10  # CPU priority of the trainer thread (Linux nice, 0..19; 0 = same as ingest): ingest runs first

    def __post_init__(self):
        if not isinstance(self.model, RRVAEConfig):
            raise ValueError(f"model must be an RRVAEConfig, not {type(self.model).__name__} "
                             "(use TrainerConfig.from_dict for a plain dict)")
        if self.batch_size < 1 or (self.pixels is not None and self.pixels < 1):
            raise ValueError("batch_size and pixels must be positive (pixels=None decodes all)")
        if not (isinstance(self.mask, (int, float)) or self.mask in ("auto", None)):
            raise ValueError(f"mask must be 'auto', a radius in grid units or None, not {self.mask!r}")

    def model_config(self, image_shape: tuple[int, int], mask_radius: float | None) -> RRVAEConfig:
        """``model`` for frames of ``image_shape`` with the pixel mask ``mask_radius``."""
        return replace(self.model, image_shape=tuple(image_shape), mask_radius=mask_radius)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None) -> "TrainerConfig":
        """A config from overrides of the defaults, e.g. ``{"latent_dim": 4, "consolidate_seconds": 5.0}``.

        Model options may be given flat (as above) or nested (``{"model": {"latent_dim": 4}}``), not both
        ways at once. Raises ValueError naming any key that is neither a trainer field nor a model option.
        """
        d = dict(d or {})
        nested = d.pop("model", {})
        if isinstance(nested, RRVAEConfig):
            nested = {k: v for k, v in asdict(nested).items() if k not in FROM_SCAN}
        if not isinstance(nested, Mapping):
            raise ValueError(f"trainer option 'model' must be a dict of model options, not {nested!r}")
        model_keys = {f.name for f in fields(RRVAEConfig)} - set(FROM_SCAN)
        trainer_keys = {f.name for f in fields(cls)} - {"model"}
        flat = {k: d.pop(k) for k in list(d) if k in model_keys or k in FROM_SCAN}
        twice = sorted(set(flat) & set(nested))
        if twice:
            raise ValueError(f"model option(s) {twice} given both flat and under 'model': give each once")
        model = {**nested, **flat}
        for k in model:
            if k in FROM_SCAN:
                raise ValueError(f"model option {k!r} is set from the scan (image_shape) or from 'mask' "
                                 "(mask_radius); do not give it")
            if k not in model_keys:
                raise ValueError(f"unknown model option {k!r}; known: {sorted(model_keys)}")
        unknown = sorted(set(d) - trainer_keys)
        if unknown:
            raise ValueError(f"unknown trainer option(s) {unknown}; known: {sorted(trainer_keys | model_keys)}")
        return cls(model=RRVAEConfig(**model), **d)

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-able, as ``from_dict`` takes it: the trainer fields and the model options but those
        set from the scan. ``TrainerConfig.from_dict(cfg.to_dict()) == cfg`` for a config made by ``from_dict``."""
        model = {k: v for k, v in self.model.to_json().items() if k not in FROM_SCAN}
        return {**model, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}}
