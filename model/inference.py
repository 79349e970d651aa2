"""A trained rrVAE applied to a new scan, with no training: ``rrstem analyze --model``.

``FixedEncoder`` has the trainer's interface as far as the service uses it
(``attach``, ``wait_done``, ``maps``, ``status``, ``reconstruct``, ``export``,
...), so the service treats "train a model" and "use a trained model" alike.
The model's input contract travels with it: its intensity gain is the one the
model was trained with; the mean pattern subtracted is that of the new scan
(as the paper subtracts each scan's own mean).
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
import numpy as np
import torch

from rrstem.model import checkpoint, encode
from rrstem.model.rrvae import RRVAE, RRVAEConfig
from rrstem.model.system import lower_priority

log = logging.getLogger("rrstem.model")

_MODEL_KEYS = set(RRVAEConfig.__dataclass_fields__)


def load_model(path: str | Path, device: str = "cpu") -> tuple[RRVAE, float, int]:
    """(model, input gain, training step) from a ``.pt`` checkpoint or an rrstem results ``.h5`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file {path}")
    if path.suffix.lower() in (".h5", ".hdf5"):
        from rrstem.stream.results import read_scan

        res = read_scan(path)
        if "model" not in res or not res["model"]["state"]:
            raise ValueError(f"{path} holds no trained model (was it written with --no-train?)")
        config = res["model"]["config"]
        model = checkpoint.from_state({k: v for k, v in config.items() if k in _MODEL_KEYS}, res["model"]["state"],
                                      device)
        return model, float(config.get("gain") or 1.0), int(res["model"]["step"])
    model, info = checkpoint.load(path, device)
    return model, float(info["extra"].get("gain") or 1.0), info["step"]


class FixedEncoder:
    """Encodes each attached scan with one trained model, live and at the end; never trains."""

    def __init__(self, path: str | Path, device: str = "cpu", refresh_seconds: float = 1.0):
        self.path = Path(path)
        self.device = torch.device(device)
        self.model, self.gain, self.trained_steps = load_model(path, device)
        self.refresh_seconds = refresh_seconds
        self.error: BaseException | None = None
        self.scan = None
        self._maps: dict | None = None
        self._state = "waiting"
        self._done = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rrstem-encoder", daemon=True)

    # --- lifecycle (the trainer's interface) -----------------------------------------

    def start(self) -> "FixedEncoder":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> bool:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def attach(self, scan) -> None:
        h, w = self.model.cfg.image_shape
        if tuple(scan.binned_shape) != (h, w):
            self.error = ValueError(f"the model takes {h}x{w} frames but scan {scan.scan_id} bins to "
                                    f"{scan.binned_shape[0]}x{scan.binned_shape[1]}: choose --bin to match")
            log.error("%s", self.error)
            self._state = "failed"
            self._done.set()
            return
        with self._lock:
            self.scan, self._maps, self._state = scan, None, "running"
        self._done.clear()
        self._wake.set()

    def pause(self) -> None:
        raise ValueError("this service encodes with a fixed model (--model); there is no training to pause")

    resume = reset_model = pause

    def wait_done(self, timeout: float) -> bool:
        return self._done.wait(timeout) and self._state == "done"

    def maps(self) -> dict | None:
        with self._lock:
            return None if self._maps is None else dict(self._maps)

    def status(self) -> dict:
        return {"state": self._state, "step": self.trained_steps, "model": str(self.path),
                "error": None if self.error is None else repr(self.error)}

    def histories(self) -> dict[str, np.ndarray]:
        return {}

    def reconstruct(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        scan = self.scan
        if scan is None or not scan.filled[index]:
            raise ValueError(f"no frame at scan index {index}")
        with torch.no_grad():
            x = encode.prepare(self.model, scan.frames[index:index + 1], scan.mean_pattern(), self.gain,
                               self.device)  # (1, P)
            recon = self.model.decode(self.model.encode(x)[0])  # (1, P)
            inp, rec = self.model.unflatten(x, math.nan), self.model.unflatten(recon, math.nan)  # (1, h, w)
        return inp[0].cpu().numpy(), rec[0].cpu().numpy()

    def export(self) -> dict:
        return {"training": {}, "metrics": {}, "step": self.trained_steps,
                "state": {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()},
                "config": {**self.model.cfg.to_json(), "gain": self.gain, "source": str(self.path)}}

    # --- worker ------------------------------------------------------------------------

    def _run(self) -> None:
        lower_priority(10)  # ingest first, as for the trainer
        try:
            while not self._stop.is_set():
                self._wake.wait(self.refresh_seconds)
                self._wake.clear()
                scan = self.scan
                if scan is None or self._state != "running" or scan.n_filled() == 0:
                    continue
                ended = scan.ended.is_set()  # read before encoding: the final encode sees every frame
                maps = encode.encode_scan(self.model, scan.frames, scan.filled.copy(), scan.scan_shape,
                                          scan.mean_pattern(), self.gain, self.device)
                with self._lock:
                    if scan is self.scan:
                        self._maps = {**maps, "scan_id": scan.scan_id, "step": self.trained_steps}
                if ended and scan is self.scan:
                    self._state = "done"
                    self._done.set()
        except BaseException as exc:  # stored; the service reports it
            self.error = exc
            self._state = "failed"
            self._done.set()
            log.exception("encoder failed")
