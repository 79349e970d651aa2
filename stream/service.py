"""The rrstem service: it wires the threads and serves the control API.

One frame's path: the receiver thread (``stream/receiver.py``) reads a
message and decodes it (``stream/detectors/``) into an ``Item`` on a bounded
queue; the pipeline thread hands each item to the ``Lifecycle``
(``stream/lifecycle.py``), which decides which scan is current and how each
ends, and gives ``frames`` to the current ``Scan`` (``stream/scan.py``:
validation, the fused pass, the reductions of ``stream/reductions/``, the
frame store). The encoder (``model/``: the online trainer, or a fixed
trained model) reads the scan through ``model.interface.ScanView``
(``stream/encoding.py``). An ended scan goes to the finisher thread
(``stream/finisher.py``): final maps, results file, ``scan_ended``. The
publisher thread (``stream/publisher.py``) asks for snapshots and routes
control requests here; the events thread (``stream/watch.py``) scores the
maps for anomalies.

Failures: every thread is a ``workers.Worker`` that keeps the exception that
ended it. One that dies is reported (log, ``error`` event, the snapshots'
banner), the running scan ends ``failed`` and is written, and the service
stops; ``check()`` re-raises the original (``rrstem serve`` exits 1). A
failure in one scan's processing only ends that scan, marked failed.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from rrstem.model.interface import ScanEncoder
from rrstem.stream import control
from rrstem.stream.auth import Curve, warn_if_exposed
from rrstem.stream.config import ServiceConfig, limit_blas_threads, make_encoder
from rrstem.stream.detectors import Item, decoder_for, lookup
from rrstem.stream.encoding import EncoderSlot
from rrstem.stream.events import EventPublisher, ScanStarted
from rrstem.stream.finisher import Finisher
from rrstem.stream.framepass import WarmUp
from rrstem.stream.lifecycle import Lifecycle
from rrstem.stream.publisher import Publisher
from rrstem.stream.receiver import make_receiver
from rrstem.stream.report import FailureLog, Reporter
from rrstem.stream.scan import Scan
from rrstem.stream.snapshot import Snapshot, SnapshotHeader
from rrstem.stream.steering import Steering
from rrstem.stream.watch import Watch
from rrstem.stream.workers import Failure, Worker

log = logging.getLogger("rrstem.service")


@dataclass
class ScanHooks:
    """What happens around a scan's start, frames and end (the lifecycle calls these): its events, the encoder
    taking it up, the ingest rate, the finisher."""

    events: EventPublisher
    steering: Steering
    finisher: Finisher
    reporter: Reporter
    slot: EncoderSlot | None
    failures: FailureLog

    def started(self, scan: Scan) -> None:
        start = scan.start
        self.events.publish(ScanStarted(scan_id=start.scan_id, scan_shape=start.scan_shape,
                                        frame_shape=start.frame_shape,
                                        calibration=start.calibration.model_dump(exclude_none=True),
                                        subscan=self.steering.scan_started(start)))
        self.finisher.scan_started()

    def frames(self, scan: Scan, n: int) -> None:
        self.reporter.rate.add(n)
        self.attach(scan)

    def ended(self, scan: Scan) -> None:
        try:
            self.attach(scan)  # a scan too short to calibrate before its end calibrates at its end
        finally:
            self.finisher.queue.put(scan)  # an ended scan always reaches the results file

    def attach(self, scan: Scan) -> None:
        if self.slot is not None:
            left = self.slot.attached
            failure = self.slot.attach_if_ready(scan)
            if failure is not None:
                self.slot.failed(left, failure, self.failures.report)


class Service:
    """Receives scans, keeps their maps current, trains the encoder on them, publishes and writes results."""

    def __init__(self, config: ServiceConfig, context: zmq.Context | None = None):
        limit_blas_threads()
        self.cfg = config
        self.ctx = context or zmq.Context.instance()
        self.stop_event = threading.Event()  # set: the threads end
        self._started = False
        self._stopping = threading.Event()  # a graceful stop was asked for
        self._stop_failure: BaseException | None = None  # ... because a thread died of this
        self._stop_asked = math.inf  # monotonic time of the stop
        self._pipeline_done = threading.Event()  # the pipeline has ended the last scan and takes no more input
        self._queue: queue.Queue[Item] = queue.Queue(config.queue_size)
        self.encoder: ScanEncoder | None = make_encoder(config)
        self._slot = EncoderSlot(self.encoder) if self.encoder is not None else None
        self.curve = Curve(config.keys, self.ctx) if config.keys is not None else None  # stream/auth.py
        self.receiver = make_receiver(config.protocol, self.ctx, config.listen, self._queue, self.stop_event,
                                      decoder_for(config.protocol, config.scan_shape, config.sync_offset,
                                                  config.flyback),
                                      bind=config.bind, mode=config.mode, curve=self._frames_curve(),
                                      on_failure=self._died)
        self.publisher = Publisher(self.ctx, config.publish, config.control, curve=self.curve,
                                   read_only=config.read_only_control)
        # events and steering (stream/events.py, stream/steering.py, the events thread in stream/watch.py)
        self.events = EventPublisher(self.ctx, config.events, self.curve)
        self.steering = Steering(self.ctx, config.steering, config.steer_timeout, self.curve)
        self.steering.answer_to = self.publisher.control_endpoint
        self._watch = Watch(self.events, self.steering)
        # The parts below refer to each other, never to the service: once its threads have ended, nothing
        # holds the service, and its scans' frame stores go with it (no reference cycle waits for the GC).
        self._workers: list[Worker] = [self.receiver]
        self.failure_log = FailureLog(self.events)
        self.lifecycle = Lifecycle(config, on_failure=self.failure_log.report)
        self.reporter = Reporter(self.lifecycle, self._slot, self.steering, self.failure_log, self._workers,
                                 self.publisher)
        self.finisher = Finisher(config, self._slot, self.events, self.steering, self._watch,
                                 self.failure_log.report, self.lifecycle)
        hooks = ScanHooks(self.events, self.steering, self.finisher, self.reporter, self._slot, self.failure_log)
        lc = self.lifecycle
        lc.on_start, lc.on_frames, lc.on_end = hooks.started, hooks.frames, hooks.ended
        if config.once:  # a one-scan service (analyze, serve --once) whose scan was refused has nothing to do
            lc.on_refused = lambda notice: self.stop()
        self._workers += [
            Worker("rrstem-pipeline", self._pipeline_loop, self._died),
            Worker("rrstem-finisher", self.finisher.run, self._died, args=(self.stop_event, self._pipeline_done)),
            Worker("rrstem-publisher", self.publisher.run, self._died,
                   args=(self, self.reporter, self.stop_event, config.snapshot_hz)),
            Worker("rrstem-events", self._watch.run, self._died, args=(self.reporter, self.stop_event)),
        ]

    # --- what others read ---------------------------------------------------------------

    @property
    def current(self) -> Scan | None:
        """The newest scan (kept, once ended, until the next starts)."""
        return self.lifecycle.current

    @property
    def orphans(self):
        """Bad input that belongs to no scan, by reason."""
        return self.lifecycle.orphans

    @property
    def results_written(self) -> list[tuple[str, Path]]:
        """(scan id, path) of every results write, oldest first."""
        return self.finisher.results_written

    @property
    def results_event(self) -> threading.Event:
        return self.finisher.results_event

    @property
    def writer(self):
        return self.finisher.writer

    @property
    def listen_endpoint(self) -> str:
        return self.receiver.endpoint

    @property
    def publish_endpoint(self) -> str | None:
        return self.publisher.publish_endpoint

    @property
    def control_endpoint(self) -> str | None:
        return self.publisher.control_endpoint

    def _frames_curve(self) -> Curve | None:
        """CURVE for the frames socket: with keys, where the protocol speaks it (detector firmware does not)."""
        if self.curve is None or lookup(self.cfg.protocol).curve:
            return self.curve
        log.warning("frames from the %s detector are neither encrypted nor authenticated: its firmware speaks no "
                    "CURVE (--keys secures the snapshot and control sockets); keep the detector on its own "
                    "network", self.cfg.protocol)
        return None

    def _warn_if_exposed(self) -> None:
        """A WARNING for every socket bound beyond this machine without CURVE: anyone there can use it."""
        plain_frames = self.curve is None or not lookup(self.cfg.protocol).curve
        bound = [(self.listen_endpoint, "frames")] if self.cfg.bind and plain_frames else []
        if self.curve is None:
            bound += [(self.publish_endpoint, "snapshots"), (self.control_endpoint, "control")]
            bound += [(ep, name) for ep, name in ((self.events.endpoint, "events"), (self.steering.endpoint, "steering"))
                      if ep is not None]
        warn_if_exposed(bound)

    # --- start and stop -----------------------------------------------------------------

    def start(self) -> "Service":
        """Start the threads; calling it again (e.g. ``with Service(cfg).start() as svc``) does nothing."""
        if self._started:
            return self
        self._started = True
        self.warm_up = WarmUp()  # compiles (or loads) the usual fused passes before the first frames arrive
        self.warm_up.start()
        if self.encoder is not None:
            self.encoder.start()
        for t in self._workers:
            t.start()
        log.info("listening on %s (%s, %s); snapshots on %s; control on %s", self.listen_endpoint, self.cfg.mode,
                 "bound" if self.cfg.bind else "connected", self.publish_endpoint, self.control_endpoint)
        self._warn_if_exposed()
        for scan_id, _ in self.finisher.unfinished:
            log.warning("%s holds scan %s from a service that stopped mid-scan: its maps up to its last checkpoint "
                        "are there, marked incomplete (end_reason 'running')", self.cfg.out, scan_id)
        return self

    def stop(self, failure: BaseException | None = None) -> None:
        """Stop gracefully: the running scan ends (``stopped``, or ``failed`` with ``failure``) and its results,
        with the model as it is, are written within ``stop_timeout`` (a second after a failure); then the
        threads end and ``wait()`` returns."""
        if self._stopping.is_set():
            return
        self._stop_failure = failure
        self._stop_asked = time.monotonic()
        self.finisher.stop_deadline = self._stop_asked + (min(1.0, self.cfg.stop_timeout) if failure
                                                          else self.cfg.stop_timeout)
        self._stopping.set()
        if not self._started:
            self.stop_event.set()

    def stopping_for(self) -> float:
        """Seconds since a graceful stop was asked for (0 if none)."""
        return max(0.0, time.monotonic() - self._stop_asked) if self._stopping.is_set() else 0.0

    def stop_after_scan(self) -> None:
        """Stop once the current scan is done (at once if it already is)."""
        self.finisher.once = True  # set before looking: the finisher sets ``done`` before it looks at this
        if self.current is not None and self.current.done:
            self.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the service stops (control ``stop``, ``once``, a thread's death); False on timeout."""
        return self.stop_event.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop (gracefully, so a running scan is written), then end the threads and close the sockets."""
        self.stop()
        self.stop_event.wait(min(timeout, self.cfg.stop_timeout + 1.0))
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self._workers:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        if self.encoder is not None:
            self.encoder.close(timeout=max(0.5, deadline - time.monotonic()))
        if not any(t.is_alive() for t in self._workers):  # (a thread that outlived close may still end a scan)
            self.lifecycle.detach()  # no reference cycle keeps the last scan once the service is gone
        self.publisher.close()
        self.events.close()
        self.steering.close()
        if self.curve is not None:
            self.curve.close()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the pipeline thread ------------------------------------------------------------

    def _pipeline_loop(self) -> None:
        lifecycle = self.lifecycle
        while not self.stop_event.is_set():
            if self._stopping.is_set():
                self._wind_down()
                return
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                lifecycle.tick()
                continue
            lifecycle.dispatch(item)

    def _wind_down(self) -> None:
        """On a stop: the running scan ends, the encoder makes its final maps now, the finisher writes them."""
        try:
            self.lifecycle.stop(self._stop_failure)
        finally:
            if self.encoder is not None:
                self.encoder.finish_now()
            self._pipeline_done.set()

    # --- failures -----------------------------------------------------------------------

    @property
    def failures(self) -> list[Failure]:
        """Every failure the service survived or died of, oldest first (``report.FailureLog``)."""
        return self.failure_log.recent

    def report(self, where: str, exc: BaseException, scan_id: str | None = None) -> None:
        """Record a failure the service survives (it shows in snapshots and the log, and as an ``error`` event)."""
        self.failure_log.report(where, exc, scan_id)

    def _died(self, where: str, exc: BaseException) -> None:
        """A worker thread died of ``exc``: report it, end and write the running scan (failed), stop."""
        log.error("%s died (%s: %s): the running scan ends here, failed; the service stops", where,
                  type(exc).__name__, exc)
        cur = self.current
        self.report(where, exc, cur.scan_id if cur is not None and not cur.ended else None)
        self.stop(failure=exc)
        if threading.current_thread().name == "rrstem-pipeline":  # no pipeline left to wind down: do it here
            self._wind_down()

    def worker_failures(self) -> list[Failure]:
        """Failures of threads that ended: the service cannot go on after any of these.

        (The encoder's failures on one scan are not among them: its thread goes on with the next
        scan, so they are reported, in the log, the snapshots and the scan's results. Its thread
        dying is.)
        """
        return self.reporter.dead()

    def check(self) -> None:
        """Re-raise the first worker thread's failure, the original exception with its traceback."""
        failed = self.worker_failures()
        if failed:
            raise failed[0].error

    def last_error(self) -> str | None:
        """What the dashboard's banner shows (``Reporter.last_error``)."""
        return self.reporter.last_error()

    # --- the control API (stream/control.py): what the control socket's commands call -----

    def header(self, cur: Scan | None = None) -> SnapshotHeader:
        """The state, counters and training status of ``cur`` (default: the current scan): control ``status``."""
        return self.reporter.header(cur)

    def snapshot(self) -> Snapshot:
        """The current maps, counters and training state, as published."""
        return self.reporter.snapshot()

    def save(self, scan: Scan | None = None, path: str | Path | None = None, keep: bool = True) -> Path:
        """Write the results of ``scan`` (default: the current scan) now (control ``save``; ``Finisher.save``)."""
        return self.finisher.save(scan, path, keep)

    def frame_reply(self, index: Any) -> dict[str, Any]:
        """The ``frame`` control reply for scan position ``index`` = [y, x] (arrays packed)."""
        cur = self.current
        if cur is None or not cur.ready:
            raise ValueError("no frames yet")
        out = {"index": [int(v) for v in index] if isinstance(index, (list, tuple)) else index,
               "frame": control.pack_array(cur.frame(index)), "mean": control.pack_array(cur.mean_pattern())}
        pair = self._slot.reconstruct(cur, cur.position(index)) if self._slot is not None else None
        if pair is not None:
            inp, recon = pair
            out.update(input=control.pack_array(inp), recon=control.pack_array(recon),
                       residual=control.pack_array(inp - recon))
        return out

    def _training(self, action: str) -> dict[str, Any]:
        if self.encoder is None:
            raise ValueError("training is disabled (serve was started with --no-train)")
        getattr(self.encoder, action)()
        return self.encoder.status()

    def pause_training(self) -> dict[str, Any]:
        return self._training("pause")

    def resume_training(self) -> dict[str, Any]:
        return self._training("resume")

    def reset_model(self) -> dict[str, Any]:
        return self._training("reset_model")

    # --- steering (stream/steering.py) ----------------------------------------------------

    def rescan(self, region: Any, step_factor: float = 1.0, dwell_factor: float = 1.0, dose_factor: float = 1.0,
               scan_id: str | None = None) -> dict[str, Any]:
        """Validate a rescan request and publish it for the bridge; ValueError says what is wrong."""
        cur = self.current
        req = self.steering.request(region, step_factor, dwell_factor, dose_factor, scan_id,
                                    current=cur.scan_id if cur is not None else None)
        return req.model_dump(mode="json")

    def rescan_answer(self, request_id: Any, accepted: Any, reason: Any = None) -> dict[str, Any]:
        """A bridge's answer to a rescan request."""
        out = self.steering.answer(request_id, accepted, reason)
        if accepted is False:
            self.report("steering", RuntimeError(f"the bridge refused rescan {request_id}: {reason}"))
        return out
