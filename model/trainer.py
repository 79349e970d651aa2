"""The online trainer: a thin thread that trains the rrVAE on each attached scan as it streams in.

``OnlineTrainer`` is an ``interface.ScanEncoder``. Its thread makes one
``run.TrainingRun`` per attached scan and calls its ``advance()`` in a
loop; all the training is there, in public methods a test can call one by
one. The thread adds what needs a thread:

- ``attach(scan)`` from any thread: the worker starts a new run at its next
  iteration, which cuts a running consolidation of the previous scan short;
  with ``warm_start`` the new run starts from a copy of the previous model.
- ``pause()`` / ``resume()``: a paused trainer idles in state "paused", unless
  it is consolidating (a consolidation always runs to its end);
  ``reset_model()`` starts the current scan again from a fresh model.
- ``wait_done(timeout)``: True once the attached scan has ended and its final
  maps are made.
- a failure while training one scan is kept in ``error`` (the exception,
  with its traceback), the state is "failed" and ``wait_done`` returns False;
  the thread lives on, and the next attached scan trains afresh (and clears
  ``error``). A failure outside a scan's training ends the thread (``worker.py``).

The states (``status()["state"]``, ``interface.STATES``) are the run's phase
(waiting, running, consolidating, done), "paused" while the worker idles for
a pause, and "failed".
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Any, Mapping

import numpy as np
import torch

from rrstem.model.config import TrainerConfig
from rrstem.model.interface import HELDOUT_ELBO, LOSS, STATES, ModelMaps, ScanView
from rrstem.model.system import lower_priority, tune_malloc
from rrstem.model.optim import warm_up
from rrstem.model.run import TrainingRun, empty_export
from rrstem.model.worker import EncoderThread, check_scan, describe

__all__ = ["OnlineTrainer", "TrainerConfig", "STATES"]

log = logging.getLogger("rrstem.model")


class OnlineTrainer(EncoderThread):
    """Trains the rrVAE on each attached scan in a background thread.

    ``config``: a ``TrainerConfig``, or a plain dict of overrides for ``TrainerConfig.from_dict``
    (as ``ServiceConfig.trainer`` holds them); ``device``: the torch device the model trains on.
    """

    def __init__(self, config: TrainerConfig | Mapping[str, Any] | None = None, device: str = "cpu"):
        super().__init__("rrvae-trainer")
        self.cfg = config if isinstance(config, TrainerConfig) else TrainerConfig.from_dict(config)
        self.device = torch.device(device)
        self.run: TrainingRun | None = None  #: the current scan's training (replaced by the worker)
        self._lock = threading.Lock()  # guards _pending and the done flag against a racing attach
        self._pending: ScanView | None = None  # attached, not yet taken up by the worker
        self._paused = False  # asked for
        self._idle_paused = False  # the worker idles because of the pause
        self._reset_requested = False
        self._failed: TrainingRun | None = None  # the run whose training raised ``error``
        self._finish_requested = False

    # --- requests (any thread) ------------------------------------------------------------

    def attach(self, scan: ScanView) -> None:
        """Train on ``scan`` from now on; a previous scan's consolidation is cut short."""
        check_scan(scan)
        with self._lock:
            self._pending = scan
            self._done.clear()
        self._wake.set()

    def finish_now(self) -> None:
        """End the attached scan's training now: its final maps with the model as it is (no consolidation)."""
        with self._lock:
            self._finish_requested = True
        self._wake.set()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def reset_model(self) -> None:
        """Start the current scan's training again from a fresh initialisation."""
        with self._lock:
            self._reset_requested = True
            self._done.clear()  # now, so that a wait_done() right after waits for the fresh run
        self._wake.set()

    # --- readers (any thread) -------------------------------------------------------------

    def maps(self) -> ModelMaps | None:
        run = self.run
        return None if run is None else run.maps()

    def status(self) -> dict:
        """``state``, ``scan_id``, ``step``, ``images_seen``, ``loss``, ``heldout_elbo``, ``metrics``, ``error``."""
        run = self.run
        st = run.status() if run is not None else {"state": "waiting", "scan_id": None, "step": 0, "images_seen": 0,
                                                   LOSS: None, HELDOUT_ELBO: None, "metrics": {}}
        if self.error is not None:
            st["state"] = "failed"
        elif self._idle_paused:
            st["state"] = "paused"
        st["error"] = describe(self.error)
        return st

    def histories(self) -> dict[str, np.ndarray]:
        run = self.run
        return empty_export(self.cfg)["training"] if run is None else run.histories()

    def reconstruct(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        run = self.run
        if run is None:
            raise ValueError(f"no scan attached: no frame at scan index {index}")
        return run.reconstruct(index)

    def export(self) -> dict:
        run = self.run
        return empty_export(self.cfg) if run is None else run.export()

    # --- worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.tune_malloc:
            tune_malloc()
        lower_priority(self.cfg.nice)
        log.debug("torch warmed up in %.2f s", warm_up(self.device))
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception as exc:  # this scan's training fails; the thread waits for the next scan
                self.error, self._failed = exc, self.run
                scan_id = self.run.scan.scan_id if self.run is not None else None
                log.error("rrVAE training of scan %s failed: %s", scan_id, describe(exc), exc_info=exc)
                traceback.clear_frames(exc.__traceback__)  # keep the traceback, not the frames' locals
                self._done.set()

    def _iterate(self) -> None:
        """One turn of the worker: take requests, then advance the current run or idle."""
        self._take_requests()
        run = self.run
        if self._finish_requested:
            self._finish_requested = False
            if run is not None and run.phase != "done" and run is not self._failed:
                if run.built:
                    run.finish()  # the final encode of every frame, the best model so far if consolidating
                else:
                    run.phase = "done"  # too few frames for a model: done without maps
        self._idle_paused = self._paused and (run is None or run.phase in ("waiting", "running"))
        if run is None or run.phase == "done" or self._idle_paused or run is self._failed:
            self._idle(0.05)
        elif run.advance() is None and run.phase != "done":
            self._idle(0.01)  # too few frames yet
        if run is not None and run.phase == "done":
            with self._lock:
                if self._pending is None and run is self.run:
                    self._done.set()

    def _take_requests(self) -> None:
        with self._lock:
            scan, self._pending = self._pending, None
        if scan is not None:
            previous = self.run if self.cfg.warm_start and self._failed is None else None
            self.run = TrainingRun(scan, self.cfg, self.device, previous=previous)
            self.error = self._failed = None
        if self._reset_requested:
            self._reset_requested = False
            if self.run is not None:
                with self._lock:
                    self._done.clear()
                self.run = TrainingRun(self.run.scan, self.cfg, self.device)
                self.error = self._failed = None  # a fresh start of the same scan

    def _idle(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()
