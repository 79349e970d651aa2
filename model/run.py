"""The online trainer's synchronous core: one scan's training, one public call at a time.

``TrainingRun`` trains the rrVAE on one scan, which it only reads, through a
``ScanView`` (the live frames, their running mean and COM), so ingest never
waits for it. Its phases (``phase``):

1. waiting: until ``min_frames`` have arrived. ``build()`` then freezes the
   input gain, the noise scale (``encode.count_scale``) and the pixel mask
   from those frames and makes the model (a fresh one; or, with
   ``warm_start``, a copy of the previous scan's, with its gain and PCA basis).
2. running: ``step()`` trains on a minibatch of new + replayed frames, the
   *current* running mean subtracted when the batch is assembled;
   ``refresh()`` re-encodes all filled frames into the maps and computes the
   metrics against the COM; ``evaluate()`` computes the held-out ELBO.
3. consolidating (``begin_consolidation()``, once the scan has ended):
   uniform batches over all frames, the learning rate falling on with the
   steps (``learning_rate``), a held-out evaluation every
   ``consolidate_eval_steps``; ``evaluate()`` keeps the best model by held-out
   ELBO, and the consolidation ends once ``patience`` evaluations in a row
   brought no new best (or at ``consolidate_steps``, or ``consolidate_seconds``).
4. done (``finish()``): the best model is loaded and every frame encoded.

``advance()`` does whatever is due next, as the worker thread
(``trainer.OnlineTrainer``) calls it in a loop. The learning rate follows
progress (positions arrived, then consolidation steps); map refreshes, the
held-out evaluations while the scan runs and the consolidation's time bound
follow ``clock`` (monotonic seconds), which a test may replace. The training methods belong to one
thread; ``maps``, ``status``, ``histories``, ``reconstruct`` and ``export``
may be called from any thread.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from typing import Callable

import numpy as np
import torch

from rrstem.model import anomaly, encode, metrics
from rrstem.model.config import TrainerConfig
from rrstem.model.interface import (EVAL_STEP, HELDOUT_ELBO, HISTORIES, IMAGES_SEEN, LATENT_R_MAX, LOSS,
                                    RECON_ERROR, RECON_SIGMA, ROTATION_R, STEP, TIME, ModelMaps, ScanView)
from rrstem.model.rrvae import RRVAE, backward_in_chunks
from rrstem.model.optim import adam, consolidation_seconds, learning_rate
from rrstem.model.sampler import FrameSampler


def empty_export(cfg: TrainerConfig) -> dict:
    """``export()`` before any model: no weights, no histories."""
    return {"training": {k: np.zeros(0) for k in HISTORIES}, "metrics": {}, "step": 0, "state": {},
            "config": {"trainer": cfg.to_dict(), "gain": None, "best_step": None}}


class TrainingRun:
    """The training on one scan.

    ``previous``: the run of the scan before, to start from (warm start): its model (copied) and input
    gain are taken if its binned frame shape matches this scan's (the noise scale is always this scan's).
    """

    def __init__(self, scan: ScanView, config: TrainerConfig, device: str | torch.device = "cpu",
                 previous: "TrainingRun | None" = None, clock: Callable[[], float] = time.monotonic):
        self.scan, self.cfg, self.device, self.clock = scan, config, torch.device(device), clock
        fits = previous is not None and previous.warm_startable(scan)
        self.model: RRVAE | None = copy.deepcopy(previous.model).to(self.device) if fits else None
        self.warm = fits  #: started from the previous scan's model
        self.optimizer: torch.optim.Adam | None = None  # made by build()
        self.phase = "waiting"  #: waiting, running, consolidating or done
        self.step_count = 0
        self.images_seen = 0
        self.gain: float | None = previous.gain if fits else None  #: the input gain, frozen by build()
        self.scale: float | None = None  #: counts per stored unit, this scan's own (build())
        self.resample: float | None = None  #: the scale training batches are Poisson-resampled at (not counts)
        self.mean: np.ndarray | None = None  #: (h, w) the mean pattern subtracted from the inputs now
        self.best_step: int | None = None  #: the step of the best model while consolidating
        self.sampler = FrameSampler(len(scan.filled), config.heldout, np.random.default_rng(config.seed))
        self._gen = torch.Generator().manual_seed(config.seed)
        self._pca_rng = np.random.default_rng(config.seed + 2)
        self._lock = threading.Lock()  # guards the published state: maps, metrics, histories, last terms
        self._model_lock = threading.Lock()  # guards the model's weights
        self._maps: ModelMaps | None = None
        self._metrics: dict = {}
        self._last: dict[str, float] = {}
        self._last_elbo: float | None = None
        self._hist: dict[str, list] = {k: [] for k in HISTORIES}
        self._best, self._best_elbo = None, math.inf
        self._evals_since_best = 0
        self._eval_pixels = self._eval_eps = self._heldout_idx = None
        self._next_eval = self._next_refresh = math.inf
        self._recon_cursor = 0
        self._consolidation_t0 = self._deadline = math.inf
        self._consolidation_step0 = 0
        self._step_limit = 0
        self._t0 = self._t_built = clock()

    @property
    def built(self) -> bool:
        return self.optimizer is not None

    def warm_startable(self, scan: ScanView) -> bool:
        """This run has a trained model a run on ``scan`` can start from (same binned frame shape)."""
        return (self.built and self.model is not None and self.step_count > 0
                and self.model.cfg.image_shape == tuple(scan.binned_shape))

    @property
    def lr(self) -> float:
        """The optimiser's learning rate now."""
        if self.optimizer is None:
            return self.cfg.lr
        return self.optimizer.param_groups[0]["lr"]

    # --- the training (one thread) -----------------------------------------------------------

    def build(self) -> bool:
        """Freeze the gain and mask from the first frames and make the model, once enough frames have arrived.

        True once built (now or before); False while too few frames have arrived. A scan that ended with
        fewer than two frames is done without a model.
        """
        if self.built:
            return True
        scan, cfg = self.scan, self.cfg
        ended = scan.ended  # read first: once ended, every frame is in
        n = scan.n_filled()
        if self.phase == "done" or (n < cfg.min_frames and not (ended and n >= 2)):
            if ended:
                self.phase = "done"
            return False
        idx = np.flatnonzero(scan.filled)[:max(cfg.min_frames, 2)]
        frames, mean = np.asarray(scan.frames[idx], dtype=np.float32), scan.mean_pattern()
        first_mean = frames.mean(axis=0)
        radius = cfg.mask
        if radius == "auto":
            radius = encode.auto_mask_radius(frames, first_mean, cfg.mask_fraction)
        if self.model is None:
            torch.manual_seed(cfg.seed)
            model = RRVAE(cfg.model_config(scan.binned_shape, radius)).to(self.device)
            with self._model_lock:
                self.model = model
        if self.gain is None:
            self.gain = encode.input_gain(frames, first_mean, self.model.mask_index.cpu().numpy(), cfg.input_std,
                                          counts=cfg.signal_gain and encode.is_counts(frames))
        if self.scale is None:
            self.scale = encode.count_scale(frames, cfg.dose_cap)
        self.resample = self.scale if cfg.resample and not encode.is_counts(frames) else None
        self.set_mean(mean)
        if not self.warm:
            self.refresh_basis()
        self._eval_pixels = torch.randperm(self.model.n_pixels, generator=self._gen)[:cfg.eval_pixels].to(self.device)
        self._next_eval = self._next_refresh = self.clock()
        self.optimizer = adam(self.model.parameters(), cfg.lr, self.device)
        self.phase = "running"
        self._t_built = self.clock()
        return True

    def step(self) -> dict[str, float]:
        """One minibatch step; returns the loss terms (``loss``, ``reconstruction``, ``content_kl``, ``angle_kl``)."""
        if not self.built:
            raise ValueError("no model yet: step() needs build() to have succeeded (min_frames arrived)")
        s, cfg = self.sampler, self.cfg
        s.update(self.scan.filled)
        running = not self.scan.ended
        idx = s.sample(cfg.batch_size, cfg.new_fraction if running else 0.0, cfg.recent)
        if running:
            self.set_mean(self.scan.mean_pattern())
        x = encode.prepare(self.model, self.scan.frames[idx], self.mean, self.gain, self.device,
                           self.resample)  # (B, P)
        pixels = None
        if cfg.pixels is not None and cfg.pixels < self.model.n_pixels:
            pixels = torch.randperm(self.model.n_pixels, generator=self._gen)[:cfg.pixels].to(self.device)
        rate = learning_rate(cfg, self.scan_progress(), self.consolidation_progress())
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        with self._model_lock:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            out = backward_in_chunks(self.model, x, pixels)
            self.optimizer.step()
        with self._lock:
            self.step_count += 1
            self.images_seen += len(idx)
            self._last = out
            if self.step_count % cfg.log_every == 0:
                for k, v in ((STEP, self.step_count), (TIME, self.clock() - self._t0),
                             (IMAGES_SEEN, self.images_seen), *out.items()):
                    self._hist[k].append(v)
        return out

    def set_mean(self, mean: np.ndarray) -> None:
        """Subtract ``mean`` (h, w) from the inputs from now on, and weigh the likelihood by its Poisson noise."""
        self.mean = mean
        weight = encode.noise_weight(self.model, mean, self.gain, self.scale)
        with self._model_lock:
            self.model.set_noise_weight(weight)

    def scan_progress(self) -> float:
        """The share of the scan's positions that have arrived (1 once it has ended)."""
        if self.scan.ended:
            return 1.0
        return self.scan.n_filled() / max(len(self.scan.filled), 1)

    def refresh_basis(self) -> None:
        """Recompute the model's PCA basis (if it has one) from up to ``pca_frames`` random arrived frames.

        Mean-subtracted with the current mean and scaled by the gain, like every
        input; nothing derived is stored per frame. While the scan runs this is
        redone at every held-out evaluation; at scan end once, and then frozen,
        so held-out ELBOs during consolidation are comparable.
        """
        if self.model is None or self.model.cfg.pca <= 0 or self.gain is None:
            return
        idx = np.flatnonzero(self.scan.filled)
        if len(idx) > self.cfg.pca_frames:
            idx = np.sort(self._pca_rng.choice(idx, self.cfg.pca_frames, replace=False))
        x = torch.from_numpy(np.ascontiguousarray(self.scan.frames[idx], dtype=np.float32)).to(self.device)
        m = torch.from_numpy(np.ascontiguousarray(self.mean, dtype=np.float32)).to(self.device)
        x = self.model.flatten((x - m) * self.gain)  # (N, P)
        with self._model_lock:
            self.model.set_basis(x)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The held-out ELBO (fixed noise, fixed pixels), also in the histories; None with no held-out frame.

        While consolidating, the best model so far by this ELBO is kept for ``finish()``, and
        ``stalled()`` says whether ``patience`` evaluations in a row brought no new best.
        """
        s = self.sampler
        if s.heldout_changed or self._eval_eps is None:
            s.heldout_changed = False
            self._heldout_idx = np.asarray(s.heldout, dtype=np.int64)
            g = torch.Generator().manual_seed(self.cfg.seed + 1)
            n_lat = 1 + self.model.n_shift + self.model.cfg.latent_dim
            self._eval_eps = torch.randn(len(s.heldout), n_lat, generator=g).to(self.device)
        if not len(self._heldout_idx):
            return None
        with self._model_lock:
            m = self.model.eval()
            x = encode.prepare(m, self.scan.frames[self._heldout_idx], self.mean, self.gain, self.device)  # (H, P)
            mean, logsd = m.encode(x)
            lat = mean + torch.exp(logsd) * self._eval_eps
            n = max(1, encode.ROWS // len(self._eval_pixels))
            recon = torch.cat([m.decode(lat[i:i + n], self._eval_pixels) for i in range(0, len(lat), n)])
            elbo = float(m.loss(x, {"mean": mean, "logsd": logsd, "recon": recon}, self._eval_pixels)["loss"])
            if self.phase == "consolidating":
                if elbo < self._best_elbo - self.cfg.min_improvement * abs(self._best_elbo if
                                                                        math.isfinite(self._best_elbo) else 0.0):
                    self._best, self._best_elbo, self.best_step = copy.deepcopy(m.state_dict()), elbo, self.step_count
                    self._evals_since_best = 0
                else:
                    self._evals_since_best += 1
        with self._lock:
            self._last_elbo = elbo
            for k, v in ((EVAL_STEP, self.step_count), (HELDOUT_ELBO, elbo),
                         (ROTATION_R, self._metrics.get(ROTATION_R, math.nan)),
                         (LATENT_R_MAX, self._metrics.get(LATENT_R_MAX, math.nan))):
                self._hist[k].append(v)
        return elbo

    def encode(self, filled: np.ndarray | None = None, recon_index: np.ndarray | None = None) -> ModelMaps:
        """The maps of the ``filled`` frames (default: all filled now) with the current model, published nowhere.

        ``recon_error`` is computed for the scan indices ``recon_index`` (default: all) on the fixed
        evaluation pixels; NaN elsewhere.
        """
        if not self.built:
            raise ValueError("no model yet: encode() needs build() to have succeeded")
        filled = self.scan.filled.copy() if filled is None else filled
        with self._model_lock:
            arrays = encode.encode_scan(self.model, self.scan.frames, filled, self.scan.scan_shape, self.mean,
                                        self.gain, self.device, self._eval_pixels, recon_index)
        return ModelMaps(self.scan.scan_id, self.step_count, arrays)

    def refresh(self, final: bool = False) -> ModelMaps:
        """Re-encode all filled frames into the published maps and metrics; returns a copy of the maps.

        ``recon_error`` is refreshed for a rotating slice of ``recon_budget`` frames (all if ``final``); the
        others keep their previous value.
        """
        t = self.clock()
        filled = self.scan.filled.copy()
        idx = np.flatnonzero(filled)
        if final:
            todo = idx
        else:
            lo = self._recon_cursor % max(len(idx), 1)
            todo = idx[lo:lo + self.cfg.recon_budget]
            self._recon_cursor = lo + len(todo)
        new = self.encode(filled, todo)
        old = self._maps
        for name in (RECON_ERROR, RECON_SIGMA):  # the frames not refreshed now keep their last value
            err = new.arrays[name]
            if not final and old is not None and old.arrays[name].shape == err.shape:
                keep = np.isnan(err) & filled.reshape(err.shape)
                err[keep] = old.arrays[name][keep]
        anomaly.add_outlier_map(new.arrays)
        found = metrics.com_metrics(new.arrays, self.scan.com_maps())
        found.update(anomaly.summary(new.arrays))
        with self._lock:
            self._maps, self._metrics = new, found
        cost = self.clock() - t
        self._next_refresh = self.clock() + max(self.cfg.refresh_seconds, 5 * cost)
        return new.copy()

    def begin_consolidation(self) -> None:
        """At scan end: take in the last frames and the final mean, freeze the PCA basis, and from now on train
        on uniform batches over all frames, keeping the best model by held-out ELBO."""
        if not self.built:
            raise ValueError("no model yet: begin_consolidation() needs build() to have succeeded")
        if not self.scan.ended:
            raise ValueError(f"scan {self.scan.scan_id} has not ended: the consolidation starts at scan end")
        self.mean = self.scan.mean_pattern()
        self.sampler.update(self.scan.filled)
        self.refresh_basis()
        self.phase = "consolidating"
        self._consolidation_t0 = self.clock()
        self._deadline = self._consolidation_t0 + consolidation_seconds(self.cfg, self._consolidation_t0 - self._t_built)
        self._step_limit = self.step_count + self.cfg.consolidate_steps
        self._best, self._best_elbo, self._evals_since_best = None, math.inf, 0
        self._consolidation_step0 = self.step_count
        self.evaluate()

    def consolidation_progress(self) -> float:
        """The share of ``consolidate_steps`` done since ``begin_consolidation()`` (0 before it)."""
        if self.phase != "consolidating":
            return 0.0
        return min(1.0, (self.step_count - self._consolidation_step0) / max(self.cfg.consolidate_steps, 1))

    def stalled(self) -> bool:
        """While consolidating: ``patience`` held-out evaluations in a row brought no new best."""
        return self.phase == "consolidating" and self._evals_since_best >= self.cfg.patience

    def finish(self) -> ModelMaps:
        """End the consolidation: load the best model and encode every frame; returns the final maps."""
        self.evaluate()
        if self._best is not None:
            with self._model_lock:
                self.model.load_state_dict(self._best)
        maps = self.refresh(final=True)
        self.phase = "done"
        return maps

    def advance(self) -> dict[str, float] | None:
        """Do what is due next, as the worker thread does: build, consolidate once the scan has ended, one
        ``step()``, then whichever of the held-out evaluation, the map refresh and ``finish()`` is due.

        Returns the step's loss terms, or None if no step was possible (too few frames yet, or done).
        """
        if self.phase == "done" or not self.build():
            return None
        if self.phase == "running" and self.scan.ended:
            self.begin_consolidation()
        out = self.step()
        now = self.clock()
        if self.phase == "running" and now >= self._next_eval:
            if not self.warm:
                self.refresh_basis()
            self.evaluate()
            self._next_eval = self.clock() + self.cfg.eval_seconds
        elif self.phase == "consolidating" and (self.step_count - self._consolidation_step0) % \
                max(self.cfg.consolidate_eval_steps, 1) == 0:
            self.evaluate()
        if now >= self._next_refresh:
            self.refresh(final=False)
        if self.phase == "consolidating" and (now >= self._deadline or self.step_count >= self._step_limit
                                              or self.stalled()):
            self.finish()
        return out

    # --- readers (any thread) -------------------------------------------------------------------

    def maps(self) -> ModelMaps | None:
        """A copy of the newest published maps, or None before the first refresh."""
        with self._lock:
            return None if self._maps is None else self._maps.copy()

    def status(self) -> dict:
        with self._lock:
            return {"state": self.phase, "scan_id": self.scan.scan_id, "step": self.step_count,
                    "images_seen": self.images_seen, LOSS: self._last.get(LOSS),
                    HELDOUT_ELBO: self._last_elbo, "metrics": dict(self._metrics)}

    def histories(self) -> dict[str, np.ndarray]:
        """1-D float64 arrays by the names in ``interface.HISTORIES``."""
        with self._lock:
            return {k: np.asarray(v, dtype=np.float64) for k, v in self._hist.items()}

    def reconstruct(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, reconstruction) of scan index ``index``, both (h, w) in input units, NaN outside the mask."""
        model = self.model
        if not self.built or not self.scan.filled[index]:
            raise ValueError(f"no trained model or no frame at scan index {index}")
        with self._model_lock, torch.no_grad():
            model.eval()
            x = encode.prepare(model, self.scan.frames[index:index + 1], self.mean, self.gain, self.device)  # (1, P)
            recon = model.decode(model.encode(x)[0])  # (1, P)
            inp, rec = model.unflatten(x, math.nan), model.unflatten(recon, math.nan)  # (1, h, w)
        return inp[0].cpu().numpy(), rec[0].cpu().numpy()

    def export(self) -> dict:
        """What the results file stores: ``training`` histories, ``metrics``, ``step``, the weights (``state``)
        and ``config``: the model's config JSON (with ``image_shape``) beside ``trainer`` (``to_dict()``),
        ``gain`` and ``best_step``."""
        if not self.built:
            return {**empty_export(self.cfg), "step": self.step_count}
        with self._model_lock:
            state = {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
            config = self.model.cfg.to_json()
        with self._lock:
            found = dict(self._metrics)
        return {"training": self.histories(), "metrics": found, "step": self.step_count, "state": state,
                "config": {**config, "trainer": self.cfg.to_dict(), "gain": self.gain, "scale": self.scale,
                           "best_step": self.best_step, "warm_start": self.warm}}

