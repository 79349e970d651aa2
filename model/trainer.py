"""The online trainer: one background thread that trains the rrVAE on a scan as it streams in.

It only reads the scan (``ScanData``: the live frames store, its running mean
and COM), so ingest never waits for it. Per scan:

1. waiting: until ``min_frames`` have arrived. Then the input gain and the
   pixel mask are frozen from those frames and a fresh model is made.
2. running: minibatches of new + replayed frames, the *current* running mean
   subtracted when a batch is assembled. Every ``refresh_seconds`` all filled
   frames are re-encoded into the maps and the metrics against the COM are
   computed; every ``eval_seconds`` the held-out ELBO is computed.
3. consolidating (after ``scan.ended``): uniform batches over all frames,
   bounded by ``consolidate_seconds`` and ``consolidate_steps``; the best
   model by held-out ELBO is kept and used for the final encode.
4. done: ``wait_done()`` returns True; the maps, histories and ``export()``
   are final. A new ``attach()`` cuts a running consolidation short.

A failure in the thread is stored in ``error`` (state "failed"), never lost.

Defaults chosen by measurement (``bench/quality.py`` and offline runs of the
same scan, graphene 64x64, 2,000 frames/s, seeds 0 and 1; see the commit log):
- ``angle_head="vector"``: with the paper's scalar angle head the latent vs COM
  magnitude reached |r| 0.56-0.58 (both doses); with phi = atan2 of two outputs
  0.73-0.82.
- ``input_std=0.3`` (the KL weighs ~11x more than at 1.0): the content
  latents then carry the deflection magnitude instead of spreading the
  direction over two latents; |r| 0.85-0.98 (1.0: 0.73-0.82; 0.1: 0.26-0.74).
- ``lr_final``: without a decay one seed in two ended in a mixed-fold
  rotation (0.942 noise-free); lr 1e-3 falling to 0.1x gave 0.968-0.994.
  ``lr=2e-3`` falling to 0.05x (seeds 0-2, offline): rotation 0.993-0.997 /
  0.973-0.993 and latent 0.852-0.877 / 0.968-0.983 (noise-free / 1e6),
  against latent 0.817-0.875 noise-free for 1e-3 -> 0.1x.
- ``pca=0``: projecting on 8 principal components gave the best rotation
  (0.997) but content latents with |r| < 0.02, so it stays off.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import asdict

import numpy as np
import torch

from rrstem.model import encode, metrics
from rrstem.model.config import TrainerConfig
from rrstem.model.rrvae import RRVAE, backward_in_chunks
from rrstem.model.sampler import FrameSampler
from rrstem.model.system import lower_priority, tune_malloc

STATES = ("waiting", "running", "paused", "consolidating", "done", "failed")


class OnlineTrainer:
    def __init__(self, config: TrainerConfig | None = None, device: str = "cpu"):
        self.cfg = config or TrainerConfig()
        self.device = torch.device(device)
        self.error: BaseException | None = None
        self.scan = None
        self.model: RRVAE | None = None
        self._lock = threading.Lock()  # guards the published state below
        self._model_lock = threading.Lock()  # guards the model's weights
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._paused = False
        self._pending = None  # (scan,) waiting to be attached by the worker
        self._reset_requested = False
        self._thread: threading.Thread | None = None
        self._new_scan_state()

    # --- public API (any thread) ----------------------------------------------------------

    def start(self) -> "OnlineTrainer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rrvae-trainer", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the thread; True if it ended within ``timeout``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def attach(self, scan) -> None:
        """Train on ``scan`` from now on; a previous scan's consolidation is cut short."""
        with self._lock:
            self._pending = scan
            self._done.clear()
        self._wake.set()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def reset_model(self) -> None:
        """Start the current scan's model again from a fresh initialisation."""
        self._reset_requested = True
        self._wake.set()

    def wait_done(self, timeout: float) -> bool:
        """True once the attached, ended scan is consolidated and finally encoded."""
        return self._done.wait(timeout) and self.error is None

    def maps(self) -> dict | None:
        with self._lock:
            return None if self._maps is None else {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                                    for k, v in self._maps.items()}

    def status(self) -> dict:
        with self._lock:
            return {"state": self.state, "scan_id": getattr(self.scan, "scan_id", None), "step": self.step_count,
                    "images_seen": self.images_seen, "loss": self._last.get("loss"),
                    "heldout_elbo": self._last_elbo, "metrics": dict(self._metrics),
                    "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}"}

    def histories(self) -> dict[str, np.ndarray]:
        """1-D arrays. Per logged step: step, time, images_seen, loss, reconstruction, content_kl,
        angle_kl. Per evaluation: eval_step, heldout_elbo, rotation_r, latent_r_max."""
        with self._lock:
            return {k: np.asarray(v, dtype=np.float64) for k, v in self._hist.items()}

    def reconstruct(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, reconstruction), both (h, w) in input units, NaN outside the model's mask."""
        if self.model is None or self.scan is None or not self.scan.filled[index]:
            raise ValueError(f"no trained model or no frame at scan index {index}")
        with self._model_lock, torch.no_grad():
            m = self.model.eval()
            x = encode.prepare(m, self.scan.frames[index:index + 1], self._mean, self._gain, self.device)  # (1, P)
            recon = m.decode(m.encode(x)[0])  # (1, P)
            inp, rec = m.unflatten(x, math.nan), m.unflatten(recon, math.nan)  # (1, h, w)
        return inp[0].cpu().numpy(), rec[0].cpu().numpy()

    def export(self) -> dict:
        """Everything the results file stores: training histories, metrics, model config, weights, step."""
        with self._model_lock:
            state = {} if self.model is None else {k: v.detach().cpu().numpy().copy()
                                                   for k, v in self.model.state_dict().items()}
            config = {} if self.model is None else self.model.cfg.to_json()
        with self._lock:
            metrics_now = dict(self._metrics)
        return {"training": self.histories(), "metrics": metrics_now, "step": self.step_count, "state": state,
                "config": {**config, "trainer": asdict(self.cfg), "gain": self._gain,
                           "best_step": self._best_step}}

    # --- one training step (worker thread, or a test driving it directly) -----------------

    def step(self) -> dict[str, float]:
        """One minibatch step on the attached scan; returns the loss terms as floats."""
        s, cfg = self.sampler, self.cfg
        s.update(self.scan.filled)
        running = not self.scan.ended.is_set()
        idx = s.sample(cfg.batch_size, cfg.new_fraction if running else 0.0, cfg.recent)
        if running:
            self._mean = self.scan.mean_pattern()
        x = encode.prepare(self.model, self.scan.frames[idx], self._mean, self._gain, self.device)  # (B, P)
        pixels = None
        if cfg.pixels is not None and cfg.pixels < self.model.n_pixels:
            pixels = torch.randperm(self.model.n_pixels, generator=self._gen)[:cfg.pixels].to(self.device)
        if not running and self.state == "consolidating" and cfg.lr_final != 1.0:
            done = min(1.0, (time.monotonic() - self._consolidation_t0) / max(cfg.consolidate_seconds, 1e-9))
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * (1.0 - (1.0 - cfg.lr_final) * done)
        with self._model_lock:
            self.model.train()
            self.opt.zero_grad(set_to_none=True)
            out = backward_in_chunks(self.model, x, pixels)
            self.opt.step()
        with self._lock:
            self.step_count += 1
            self.images_seen += len(idx)
            self._last = out
            if self.step_count % cfg.log_every == 0:
                for k, v in (("step", self.step_count), ("time", time.monotonic() - self._t0),
                             ("images_seen", self.images_seen), *out.items()):
                    self._hist[k].append(v)
        return out

    # --- worker ---------------------------------------------------------------------------

    def _new_scan_state(self) -> None:
        self.state = "waiting"
        self.step_count = 0
        self.images_seen = 0
        self._maps = None
        self._metrics: dict = {}
        self._last: dict = {}
        self._last_elbo = None
        self._best = None
        self._best_elbo = math.inf
        self._best_step = None
        self._gain = None
        self._mean = None
        self._t0 = time.monotonic()
        self._hist = {k: [] for k in ("step", "time", "images_seen", "loss", "reconstruction", "content_kl",
                                      "angle_kl", "eval_step", "heldout_elbo", "rotation_r", "latent_r_max")}

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.tune_malloc:
            tune_malloc()
        lower_priority(self.cfg.nice)
        try:
            while not self._stop.is_set():
                self._loop_once()
        except BaseException as exc:  # stored and reported, never lost
            self.error = exc
            with self._lock:
                self.state = "failed"
            self._done.set()

    def _loop_once(self) -> None:
        with self._lock:
            scan, self._pending = self._pending, None
        if scan is not None:
            self._begin(scan)
        if self._reset_requested and self.scan is not None:
            self._reset_requested = False
            self._begin(self.scan, keep_model=False)
        if self.scan is None or self.state == "done" or (self._paused and self.state != "consolidating"):
            if self._paused and self.state in ("running", "waiting"):
                self.state = "paused"
            self._wake.wait(0.05)
            self._wake.clear()
            return
        if self.state == "paused":
            self.state = "running" if self.model is not None else "waiting"
        if self.model is None and not self._try_build():
            return
        if self.state == "running" and self.scan.ended.is_set():
            self._begin_consolidation()
        self.step()
        now = time.monotonic()
        if now >= self._next_eval:
            if self.state == "running":
                self.refresh_basis()
            self._evaluate()
            self._next_eval = time.monotonic() + self.cfg.eval_seconds
        if now >= self._next_refresh:
            self._refresh(final=False)
        if self.state == "consolidating" and (now >= self._deadline or self.step_count >= self._step_limit):
            self._finish()

    def _begin(self, scan, keep_model: bool = True) -> None:
        self.scan = scan
        self._new_scan_state()
        self._done.clear()
        if not (keep_model and self.cfg.warm_start and self.model is not None
                and self.model.cfg.image_shape == tuple(scan.binned_shape)):
            self.model = None
        self.sampler = FrameSampler(len(scan.filled), self.cfg.heldout, np.random.default_rng(self.cfg.seed))
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        self._pca_rng = np.random.default_rng(self.cfg.seed + 2)

    def _try_build(self) -> bool:
        """Freeze the gain and mask from the first frames and make the model, once enough have arrived."""
        scan, cfg = self.scan, self.cfg
        n = scan.n_filled()
        if n < cfg.min_frames and not (scan.ended.is_set() and n >= 2):
            if scan.ended.is_set():  # ended with (almost) nothing: no model, nothing to wait for
                self.state = "done"
                self._done.set()
            self._wake.wait(0.01)
            return False
        idx = np.flatnonzero(scan.filled)[:max(cfg.min_frames, 2)]
        frames, mean = scan.frames[idx], scan.mean_pattern()
        first_mean = frames.mean(axis=0)
        radius = cfg.mask
        if radius == "auto":
            radius = encode.auto_mask_radius(frames, first_mean, cfg.mask_fraction)
        if self.model is None:
            torch.manual_seed(cfg.seed)
            self.model = RRVAE(cfg.model_config(scan.binned_shape, radius)).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self._gain = encode.input_gain(frames, first_mean, self.model.mask_index.cpu().numpy(), cfg.input_std)
        self._mean = mean
        self.refresh_basis()
        self._eval_pixels = torch.randperm(self.model.n_pixels, generator=self._gen)[:cfg.eval_pixels].to(self.device)
        self._next_eval = self._next_refresh = time.monotonic()
        self._recon_cursor = 0
        self.state = "running"
        return True

    def refresh_basis(self) -> None:
        """Recompute the model's PCA basis (if it has one) from up to ``pca_frames`` random arrived frames.

        Mean-subtracted with the current running mean and scaled by the gain,
        like every input; nothing derived is stored per frame. While the scan
        runs this is redone at every held-out evaluation; at scan end once,
        and then frozen, so held-out ELBOs during consolidation are comparable.
        """
        if self.model is None or self.cfg.pca <= 0:
            return
        idx = np.flatnonzero(self.scan.filled)
        if len(idx) > self.cfg.pca_frames:
            idx = np.sort(self._pca_rng.choice(idx, self.cfg.pca_frames, replace=False))
        x = torch.from_numpy(np.ascontiguousarray(self.scan.frames[idx], dtype=np.float32)).to(self.device)
        m = torch.from_numpy(np.ascontiguousarray(self._mean, dtype=np.float32)).to(self.device)
        x = self.model.flatten((x - m) * self._gain)  # (N, P)
        with self._model_lock:
            self.model.set_basis(x)

    def _begin_consolidation(self) -> None:
        self._mean = self.scan.mean_pattern()
        self.sampler.update(self.scan.filled)
        self.refresh_basis()
        self.state = "consolidating"
        self._consolidation_t0 = time.monotonic()
        self._deadline = self._consolidation_t0 + self.cfg.consolidate_seconds
        self._step_limit = self.step_count + self.cfg.consolidate_steps
        self._best, self._best_elbo = None, math.inf
        self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Held-out ELBO (fixed noise, fixed pixels); keeps the best model while consolidating."""
        s = self.sampler
        if s.heldout_changed or not hasattr(self, "_eval_eps"):
            s.heldout_changed = False
            self._heldout_idx = np.asarray(s.heldout)
            g = torch.Generator().manual_seed(self.cfg.seed + 1)
            self._eval_eps = torch.randn(len(s.heldout), 1 + self.model.n_shift + self.cfg.latent_dim, generator=g)
        if not len(self._heldout_idx):
            return
        with self._model_lock:
            m = self.model.eval()
            x = encode.prepare(m, self.scan.frames[self._heldout_idx], self._mean, self._gain, self.device)  # (H, P)
            mean, logsd = m.encoder(x)
            lat = mean + torch.exp(logsd) * self._eval_eps.to(self.device)
            n = max(1, encode.ROWS // len(self._eval_pixels))
            recon = torch.cat([m.decode(lat[i:i + n], self._eval_pixels) for i in range(0, len(lat), n)])
            elbo = float(m.loss(x, {"mean": mean, "logsd": logsd, "recon": recon}, self._eval_pixels)["loss"])
            if self.state == "consolidating" and elbo < self._best_elbo:
                self._best, self._best_elbo, self._best_step = copy.deepcopy(m.state_dict()), elbo, self.step_count
        with self._lock:
            self._last_elbo = elbo
            self._hist["eval_step"].append(self.step_count)
            self._hist["heldout_elbo"].append(elbo)
            self._hist["rotation_r"].append(self._metrics.get("rotation_r", math.nan))
            self._hist["latent_r_max"].append(self._metrics.get("latent_r_max", math.nan))

    def _refresh(self, final: bool) -> None:
        """Re-encode all filled frames into maps; recon_error for a rotating slice (all if final)."""
        t = time.monotonic()
        filled = self.scan.filled.copy()
        idx = np.flatnonzero(filled)
        if final:
            todo = idx
        else:
            lo = self._recon_cursor % max(len(idx), 1)
            todo = idx[lo:lo + self.cfg.recon_budget]
            self._recon_cursor = lo + len(todo)
        with self._model_lock:
            new = encode.encode_scan(self.model, self.scan.frames, filled, self.scan.scan_shape, self._mean,
                                     self._gain, self.device, self._eval_pixels, todo)
        old = self._maps
        if not final and old is not None and old["recon_error"].shape == new["recon_error"].shape:
            keep = np.isnan(new["recon_error"]) & filled.reshape(new["recon_error"].shape)
            new["recon_error"][keep] = old["recon_error"][keep]
        found = metrics.com_metrics(new, self.scan.com_maps())
        new.update(scan_id=self.scan.scan_id, step=self.step_count)
        with self._lock:
            self._maps, self._metrics = new, found
        cost = time.monotonic() - t
        self._next_refresh = time.monotonic() + max(self.cfg.refresh_seconds, 5 * cost)

    def _finish(self) -> None:
        self._evaluate()
        if self._best is not None:
            with self._model_lock:
                self.model.load_state_dict(self._best)
        self._refresh(final=True)
        with self._lock:
            self.state = "done"
        self._done.set()
