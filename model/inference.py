"""A trained rrVAE applied to new scans, with no training: ``rrstem analyze --model``.

``FixedEncoder`` is an ``interface.ScanEncoder``, like the trainer, so the service
treats "train a model" and "use a trained model" alike. The model's input
contract travels with it: its intensity ``gain`` is the one the model was
trained with; the mean pattern subtracted is that of the new scan (as the
paper subtracts each scan's own mean).

It takes a model already loaded: from a ``.pt`` checkpoint with
``FixedEncoder.from_checkpoint(path)``, or from the config and weights a
results file stores with ``FixedEncoder.from_state(config, state, step, source)``
(reading the results file is the stream package's business).

States: waiting (no scan yet), running (encoding the attached scan every
``refresh_seconds``), done (the ended scan's final maps are made), failed.
A scan whose frames do not fit the model is refused: ``error`` holds the
ValueError, the state is "failed" and ``wait_done`` is False, until a scan
that fits is attached. A failure in the thread ends it, as the trainer's does.
"""

from __future__ import annotations

import logging

import math
import os
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rrstem.model import anomaly, checkpoint, encode
from rrstem.model.config import TrainerConfig
from rrstem.model.interface import ModelMaps, ScanView
from rrstem.model.rrvae import RRVAE
from rrstem.model.system import lower_priority
from rrstem.model.worker import EncoderThread, check_scan, describe

log = logging.getLogger("rrstem.model")


class FixedEncoder(EncoderThread):
    """Encodes each attached scan with one trained ``model``, live and at the end; never trains.

    ``gain``: the input gain the model was trained with; ``trained_steps``: its training steps (reported as
    ``step``); ``source``: where it came from (a path), for the status and the results file.
    """

    def __init__(self, model: RRVAE, gain: float, trained_steps: int, source: str, device: str = "cpu",
                 refresh_seconds: float = 1.0, nice: int = 10, noise: TrainerConfig | None = None):
        super().__init__("rrstem-encoder")
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"the input gain must be a positive number, not {gain!r}")
        if refresh_seconds <= 0:
            raise ValueError(f"refresh_seconds must be positive, not {refresh_seconds!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.gain, self.trained_steps, self.source = float(gain), int(trained_steps), str(source)
        self.refresh_seconds, self.nice = refresh_seconds, nice
        self.noise = noise or TrainerConfig()  # dose_cap, as the trainer has it
        self.scan: ScanView | None = None
        self._maps: ModelMaps | None = None
        self._state = "waiting"
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", **kw) -> "FixedEncoder":
        """The model of a ``.pt`` checkpoint (``checkpoint.save``; loaded with ``weights_only=True``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file {path}")
        model, info = checkpoint.load(path, device)
        return cls(model, float(info["extra"].get("gain") or 1.0), info["step"], str(path), device, **kw)

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, Any], step: int, source: str,
                   device: str = "cpu", **kw) -> "FixedEncoder":
        """The model a trainer's ``export()`` describes, as a results file stores it: ``config`` (the model
        config JSON with ``gain``), ``state`` (name -> array) and ``step``."""
        if not state:
            raise ValueError(f"{source} holds no trained model (was it written with --no-train?)")
        if config.get("gain") is None:
            raise ValueError(f"{source}: the model config has no input gain ('gain')")
        return cls(checkpoint.from_state(config, state, device), float(config["gain"]), step, source, device, **kw)

    # --- requests (any thread) ------------------------------------------------------------

    def attach(self, scan: ScanView) -> None:
        """Encode ``scan`` from now on; one whose binned frames differ from the model's is refused (``error``)."""
        check_scan(scan)
        h, w = self.model.cfg.image_shape
        if tuple(scan.binned_shape) != (h, w):
            try:
                raise ValueError(f"the model takes {h}x{w} frames but scan {scan.scan_id} bins to "
                                 f"{scan.binned_shape[0]}x{scan.binned_shape[1]}: choose --bin to match")
            except ValueError as exc:
                refusal = exc
            with self._lock:
                self.error = refusal
                self.scan, self._maps, self._state = scan, None, "failed"
                self._done.set()
            return
        with self._lock:
            self.error = None  # a scan that fits: an earlier scan's failure is over
            self.scan, self._maps, self._state = scan, None, "running"
            self._done.clear()
        self._wake.set()

    def finish_now(self) -> None:
        """Encode the attached scan now (its final maps, once it has ended)."""
        self._wake.set()

    def pause(self) -> None:
        raise ValueError("this service encodes with a fixed model (--model); there is no training to pause")

    def resume(self) -> None:
        raise ValueError("this service encodes with a fixed model (--model); there is no training to resume")

    def reset_model(self) -> None:
        raise ValueError("this service encodes with a fixed model (--model); there is no training to reset")

    # --- readers (any thread) -------------------------------------------------------------

    def maps(self) -> ModelMaps | None:
        with self._lock:
            return None if self._maps is None else self._maps.copy()

    def status(self) -> dict:
        """``state``, ``scan_id``, ``step`` (the model's training steps), ``model`` (its source), ``error``."""
        with self._lock:
            state = "failed" if self.error is not None else self._state
            return {"state": state, "scan_id": getattr(self.scan, "scan_id", None), "step": self.trained_steps,
                    "model": self.source, "error": describe(self.error)}

    def histories(self) -> dict[str, np.ndarray]:
        return {}

    def reconstruct(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, reconstruction) of scan index ``index``, both (h, w), NaN outside the model's mask."""
        scan, m = self.scan, self.model
        if scan is None or self._state == "failed" or not scan.filled[index]:
            raise ValueError(f"no frame at scan index {index}")
        with torch.no_grad():
            x = encode.prepare(m, scan.frames[index:index + 1], scan.mean_pattern(), self.gain, self.device)  # (1, P)
            recon = m.decode(m.encode(x)[0])  # (1, P)
            inp, rec = m.unflatten(x, math.nan), m.unflatten(recon, math.nan)  # (1, h, w)
        return inp[0].cpu().numpy(), rec[0].cpu().numpy()

    def export(self) -> dict:
        """As the trainer's: no histories or metrics; ``config`` is the model's JSON with ``gain`` and ``source``."""
        return {"training": {}, "metrics": {}, "step": self.trained_steps,
                "state": {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()},
                "config": {**self.model.cfg.to_json(), "gain": self.gain, "source": self.source}}

    def encode(self, scan: ScanView) -> ModelMaps:
        """The maps of the frames of ``scan`` filled now, with its current mean pattern and noise."""
        filled, mean = scan.filled.copy(), scan.mean_pattern()
        first = np.flatnonzero(filled)[:64]
        scale = encode.count_scale(np.asarray(scan.frames[first], dtype=np.float32), self.noise.dose_cap)
        self.model.set_noise_weight(encode.noise_weight(self.model, mean, self.gain, scale))
        arrays = encode.encode_scan(self.model, scan.frames, filled, scan.scan_shape, mean, self.gain, self.device)
        anomaly.add_outlier_map(arrays)
        return ModelMaps(scan.scan_id, self.trained_steps, arrays)

    # --- worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        lower_priority(self.nice)  # ingest first, as for the trainer
        while not self._stop.is_set():
            self._wake.wait(self.refresh_seconds)
            self._wake.clear()
            with self._lock:
                scan, state = self.scan, self._state
            if scan is None or state != "running":
                continue
            ended = scan.ended  # read before encoding: the final encode sees every frame
            try:
                maps = self.encode(scan) if scan.n_filled() else None
            except Exception as exc:  # this scan fails; the thread waits for the next one
                log.error("encoding scan %s failed: %s", scan.scan_id, describe(exc), exc_info=exc)
                traceback.clear_frames(exc.__traceback__)  # keep the traceback, not the frames' locals
                with self._lock:
                    if scan is self.scan:
                        self.error, self._state = exc, "failed"
                        self._done.set()
                continue
            with self._lock:
                if scan is self.scan and self._state == "running":
                    self._maps = maps if maps is not None else self._maps
                    if ended:
                        self._state = "done"
                        self._done.set()
