"""The finisher: owns the end of every scan, and the results file.

The finisher thread takes each ended scan from ``queue`` (``Lifecycle``'s
``on_end`` puts it there, exactly once), waits for the encoder's final maps
within ``finish_timeout`` (or the stop's deadline), writes the results
atomically (``persist.ResultsWriter``, which keeps a failed write and
retries it), scores the final maps for anomalies and publishes
``scan_ended``; only then is the scan ``done``. Between scans it retries
kept results and writes a checkpoint of the running scan every
``checkpoint_seconds``. ``save`` writes a scan now (control ``save``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from rrstem.stream import emd
from rrstem.stream.config import ServiceConfig
from rrstem.stream.encoding import EncoderSlot
from rrstem.stream.events import EventPublisher, ScanEnded
from rrstem.stream.lifecycle import Lifecycle
from rrstem.stream.persist import ResultsWriter, check_results_path, unfinished_scans
from rrstem.stream.results import scan_results
from rrstem.stream.scan import Scan
from rrstem.stream.snapshot import MODEL_SPECS
from rrstem.stream.steering import Steering
from rrstem.stream.watch import Watch

log = logging.getLogger("rrstem.service")


class Finisher:
    """The end of each scan and every write of the results file (module docstring)."""

    def __init__(self, cfg: ServiceConfig, slot: EncoderSlot | None, events: EventPublisher, steering: Steering,
                 watch: Watch, report: Callable[[str, BaseException, str | None], None], lifecycle: Lifecycle):
        self.cfg, self.slot, self.events, self.steering, self.watch = cfg, slot, events, steering, watch
        self.report, self._lifecycle = report, lifecycle
        self.queue: queue.Queue[Scan] = queue.Queue()
        self.writer: ResultsWriter | None = None
        self.unfinished: list[tuple[str, str]] = []  # scans a checkpoint left unfinished in the results file
        if cfg.out is not None:
            check_results_path(cfg.out)  # fail now, with what to fix, not at the end of the first scan
            self.writer = ResultsWriter(cfg.out, cfg.retry_seconds)
            self.unfinished = unfinished_scans(cfg.out)
        self.results_written: list[tuple[str, Path]] = []
        self.results_event = threading.Event()
        self.once = cfg.once  # stop the service after the first scan is done
        self.stop_deadline = math.inf  # monotonic: a stop's deadline for the running scan's results
        self._scan_deadline = math.inf
        self._next_checkpoint = math.inf
        self._stop: threading.Event | None = None

    def scan_started(self) -> None:
        """A scan started (pipeline thread): its first checkpoint is due in ``checkpoint_seconds``."""
        seconds = self.cfg.checkpoint_seconds
        self._next_checkpoint = time.monotonic() + seconds if seconds else math.inf

    def run(self, stop: threading.Event, pipeline_done: threading.Event) -> None:
        """The finisher thread: until ``stop``, or until the pipeline is done and every scan is finished."""
        self._stop = stop
        while not stop.is_set():
            try:
                scan = self.queue.get(timeout=0.1)
            except queue.Empty:
                if pipeline_done.is_set():  # stopping, and every scan is finished
                    if self.writer is not None:
                        self._written(self.writer.retry(force=True))
                    stop.set()
                    return
                self._between_scans()
                continue
            self.finish(scan)
            del scan  # a done scan is the lifecycle's until the next start: this thread must not keep its store
            if self.once:
                stop.set()

    def _deadline(self) -> float:
        """When the encoder's final maps of an ended scan are due: ``finish_timeout``, or the stop's deadline."""
        stopped = self._stop is not None and self._stop.is_set()
        return -math.inf if stopped else min(self._scan_deadline, self.stop_deadline)

    def finish(self, scan: Scan) -> None:
        """The final maps, the results, the last anomalies, then ``scan_ended``; the scan is then ``done``."""
        if self.slot is not None:
            self._scan_deadline = time.monotonic() + self.cfg.finish_timeout
            failure = self.slot.finish(scan, self._deadline)
            if failure is not None:
                self.slot.failed(scan, failure, self.report)
        if self.writer is not None:
            try:
                self._written([(scan.results_name, self.save(scan))])
            except Exception as exc:
                log.error("scan %s: writing its results to %s failed (%s); they are kept in memory and written "
                          "when a write succeeds (or to the path a control 'save' names)", scan.scan_id,
                          self.writer.path, exc)
                self.report("results", exc, scan.scan_id)
        model_maps, histories = ((self.slot.model(scan, export=False)[0], self.slot.histories(scan))
                                 if self.slot is not None else ({}, {}))
        self.watch.final(self, scan, model_maps, histories)  # its last anomalies go out before scan_ended
        scan.done_with()
        self.events.publish(ScanEnded(scan_id=scan.scan_id, complete=scan.complete, end_reason=scan.end_reason or "end",
                                      results_path=str(scan.results_path) if scan.results_path else None,
                                      counters=scan.counter_dict()))
        self.results_event.set()

    def _save_frames(self, scan: Scan, attrs: dict) -> Path:
        """``--save-frames``: the scan's binned frames beside its results, as a py4DSTEM DataCube."""
        path = emd.binned_path(self.writer.path, scan.results_name)
        emd.write_binned(path, scan.results_name, attrs, scan.frames, scan.filled.reshape(scan.scan_shape))
        log.info("scan %s: binned frames written to %s", scan.scan_id, path)
        return path

    def _written(self, pairs: list[tuple[str, Path]]) -> None:
        if pairs:
            self.results_written.extend(pairs)
            self.results_event.set()

    def _between_scans(self) -> None:
        """While no scan ends: retry kept results, checkpoint the running scan."""
        if self.writer is None:
            return
        self._written(self.writer.retry())
        cur = self._lifecycle.current
        if cur is None or cur.ended or not cur.ready or time.monotonic() < self._next_checkpoint:
            return
        self._next_checkpoint = time.monotonic() + self.cfg.checkpoint_seconds
        try:
            self.save(cur, keep=False)  # a failed checkpoint is not kept: the next one replaces it
        except Exception as exc:
            log.warning("scan %s: checkpoint to %s failed: %s", cur.scan_id, self.writer.path, exc)
            self.report("checkpoint", exc, cur.scan_id)

    def save(self, scan: Scan | None = None, path: str | Path | None = None, keep: bool = True) -> Path:
        """Write the results of ``scan`` (default: the current scan) now; to ``path`` (and from then on
        every scan) if given. Results that fail to write are kept and retried (unless not ``keep``)."""
        if path is not None:
            if self.writer is None:
                check_results_path(Path(path))
                self.writer = ResultsWriter(Path(path), self.cfg.retry_seconds)
            else:
                self.writer.move_to(Path(path))
            self._written(self.writer.retry(force=True))
        scan = scan or self._lifecycle.current
        if scan is None:
            raise ValueError("no scan yet: nothing to save")
        if self.writer is None:
            raise ValueError("the service was started without a results file (--out): name one with save's 'path'")
        results = scan_results(scan)
        if not scan.ended:
            results.attrs["checkpoint_time"] = time.time()
        results.attrs["config"] = self.cfg.model_dump(mode="json")
        sub = self.steering.subscan_of(scan.scan_id)
        if sub is not None:  # a subscan: where it lies on its parent, so its maps can be placed there
            results.attrs.update({k: v for k, v in sub.model_dump(mode="json").items() if v is not None})
        if self.slot is not None:
            model_maps, export = self.slot.model(scan)
            if model_maps:
                results.maps.update(model_maps)
                results.specs.update(MODEL_SPECS)
                results.model = export
            failure = self.slot.failure(scan)
            if failure is not None:
                results.attrs["model_error"] = f"{type(failure).__name__}: {failure}"
        if self.cfg.save_frames and scan.ended and scan.ready:
            results.attrs["binned_frames"] = self._save_frames(scan, results.attrs).name
        path = self.writer.write(results, keep=keep)
        scan.written(path)
        log.info("scan %s: results written to %s", scan.scan_id, path)
        return path
