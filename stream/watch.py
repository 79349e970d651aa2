"""The events thread: watches the current scan and its model maps, and says what happened.

Every ``period`` (0.1 s) it asks the service for the current scan's maps
(``EventSource.event_view``). When the model maps changed (a refresh) or new
rows are complete, it scores them (``events.score_map``) and publishes the
anomalies found (``events.AnomalyFinder``), so an anomaly goes out within
``period`` plus the scoring time of the refresh that found it; it publishes
``model_converged`` once the held-out ELBO stops improving, and reports
rescan requests that no bridge answered in time (``steering.Steering``).
The thread holds no reference to the service between calls.

Scoring reads the whole scan (its maps, an FFT of the VADF map), so its cost
grows with the scan. New rows are scored within a CPU budget
(``workers.Budget``, ``share`` of one core): at 512x512 positions and detector
rate a row completes every few ms, and scoring each would compete with ingest.
While frames arrive faster than ``fast_fps`` the share is ``share_fast``, as
for the defect map (``defects.DefectMap``): then ingest needs every cycle and
the scan is over within seconds. A model refresh and the
scan's end are scored at the next tick.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import numpy as np

from rrstem.model import interface as names
from rrstem.stream.events import AnomalyFinder, Convergence, ErrorEvent, EventPublisher, score_map
from rrstem.stream.steering import Steering
from rrstem.stream.workers import Budget

log = logging.getLogger("rrstem.events")


class EventSource(Protocol):
    def event_view(self) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """(scan, the model's maps of it, training histories) of the current scan, or None; the scan's own
        maps come from ``scan.maps()``, which the events thread calls only when something new can be scored."""

    def report(self, where: str, exc: BaseException, scan_id: str | None = None) -> None:
        """Record a failure the service survives."""


class Watch:
    def __init__(self, events: EventPublisher, steering: Steering, period: float = 0.1, share: float = 0.05,
                 share_fast: float = 0.01, fast_fps: float = 5000.0):
        self.events, self.steering, self.period = events, steering, period
        # for scoring new rows: the work grows with the scan
        self.budget = Budget(share, floor=period, fast_share=share_fast, fast_fps=fast_fps)
        self.convergence = Convergence()
        self._finders: dict[str, AnomalyFinder] = {}  # by scan id, the last few (a scan's final scoring may
        # come after the events thread took up the next scan)
        self._last: tuple | None = None  # (scan, rows done, ended, model maps' identity) scored last
        self._lock = threading.Lock()  # the events thread's tick and the finisher's final scoring
        self._closed: str | None = None  # the last scan whose final scoring is done: its scan_ended is out

    def run(self, service: EventSource, stop: threading.Event) -> None:
        while not stop.wait(self.period):
            self.tick(service)

    def tick(self, service: EventSource) -> None:
        for req in self.steering.expired():
            msg = (f"the bridge did not answer rescan request {req.request_id} ({req.scan_id}) within "
                   f"{self.steering.timeout:g} s: is a bridge subscribed to {self.steering.endpoint}?")
            log.warning("%s", msg)
            service.report("steering", TimeoutError(msg), req.parent_scan_id)
        try:
            with self._lock:
                view = service.event_view()
                if view is not None and view[0].scan_id != self._closed:
                    self._scan(*view)
        except Exception as exc:  # a bad map must not end the events: report it and go on
            log.exception("events: scoring failed")
            service.report("events", exc)

    def final(self, service: EventSource, scan, model_maps: dict[str, np.ndarray],
              histories: dict[str, np.ndarray]) -> None:
        """Score an ended scan's final maps (finisher thread, before its ``scan_ended``), so every ``anomaly``
        of a scan is published before its ``scan_ended`` and none after."""
        try:
            with self._lock:
                self._closed = scan.scan_id
                self._scan(scan, model_maps, histories, force=True)
        except Exception as exc:
            log.exception("events: scoring the final maps of scan %s failed", scan.scan_id)
            service.report("events", exc, scan.scan_id)

    def _scan(self, scan, model_maps: dict[str, np.ndarray], histories: dict[str, np.ndarray],
              force: bool = False) -> None:
        if scan.scan_id not in self._finders:
            sub = self.steering.subscan_of(scan.scan_id)
            self._finders[scan.scan_id] = AnomalyFinder(
                scan.scan_id, scan.scan_shape, scan.start.calibration.scan_step_nm,
                parent_scan_id=sub.parent_scan_id if sub is not None else None)
            for old in list(self._finders)[:-4]:
                del self._finders[old]
        filled = scan.filled.reshape(scan.scan_shape)
        rows = int(np.argmin(np.r_[filled.all(axis=1), False]))  # complete rows from the top
        model = model_maps.get(names.RECON_ERROR)
        key = (scan.scan_id, rows, scan.ended, None if model is None else float(np.nansum(model)))
        # the whole scan's maps only when there is something new to score; new rows only within the budget
        only_rows = self._last is not None and key[:1] + key[2:] == self._last[:1] + self._last[2:]
        if force:
            self._last = key
            self._score(scan, model_maps, rows)
        elif key != self._last and not (only_rows and not self.budget.due()):
            self._last = key
            self.budget.run(self._score, scan, model_maps, rows, rate=scan.frame_rate())
        elbo = histories.get(names.HELDOUT_ELBO)
        if elbo is not None and len(elbo):
            event = self.convergence.check(scan.scan_id, elbo, histories.get(names.EVAL_STEP))
            if event is not None:
                self.events.publish(event)

    def _score(self, scan, model_maps: dict[str, np.ndarray], rows: int) -> None:
        arrays = {**scan.maps(score_defects=True), **model_maps}
        scored = score_map(arrays)
        if scored is not None:
            for event in self._finders[scan.scan_id].update(*scored, arrays, rows_done=rows, ended=scan.ended):
                self.events.publish(event)
                log.info("anomaly in scan %s at %s: %s %.1f > %.1f", event.scan_id, event.position,
                         event.score_name, event.score, event.threshold)


def error_event(where: str, exc: BaseException, scan_id: str | None) -> ErrorEvent:
    return ErrorEvent(where=where, message=f"{type(exc).__name__}: {exc}", scan_id=scan_id)
