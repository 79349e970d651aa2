"""The rrstem service: receiver -> pipeline -> maps/store -> trainer, publisher, control, results.

Threads (each stores its exception; the service reports it in every snapshot
and ``check()`` re-raises it):

- receiver: socket -> decoded items -> bounded queue (``stream/receiver.py``)
- pipeline: items -> ``ScanState`` (validation, binning, reductions, store)
- trainer: the rrVAE, reading the store (``model/trainer.py``); never blocks ingest
- finisher: at scan end waits for the trainer's consolidation, writes results
- publisher: snapshots on PUB at <= ``snapshot_hz`` and the REP control socket (``stream/publisher.py``)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field

from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.protocol import Start
from rrstem.stream.receiver import Item, Receiver
from rrstem.stream.results import write_scan
from rrstem.stream.scan import ScanState
from rrstem.stream.detectors import decoder_for
from rrstem.stream.publisher import Publisher
from rrstem.stream.snapshot import Snapshot, SnapshotHeader

log = logging.getLogger("rrstem.service")


class ServiceConfig(BaseModel):
    """Everything ``rrstem serve`` can be told. Endpoints may use port 0 when bound."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    listen: str = Field("tcp://127.0.0.1:5555", description="Frames endpoint (detector or simulator).")
    bind: bool = Field(False, description="Bind the frames socket instead of connecting to the sender.")
    mode: Literal["pull", "sub"] = Field("pull", description="pull: lossless; sub: tap a PUB stream.")
    protocol: str = Field("rrstem", description="Wire protocol of the sender (see stream/detectors.py).")
    publish: str | None = Field("tcp://127.0.0.1:5556", description="Snapshot PUB endpoint (bound); None: off.")
    control: str | None = Field("tcp://127.0.0.1:5557", description="Control REP endpoint (bound); None: off.")
    out: Path | None = Field(Path("rrstem-results.h5"), description="Results file; None: do not write.")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    scan_shape: tuple[int, int] | None = Field(None, description="Override the start message's scan shape.")
    queue_size: int = Field(32, ge=1, description="Messages buffered between receiver and pipeline.")
    snapshot_hz: float = Field(10.0, gt=0, le=10.0, description="Snapshot rate limit.")
    train: bool = Field(True, description="Train the rrVAE online.")
    trainer: dict[str, Any] = Field(default_factory=dict, description="TrainerConfig fields.")
    device: str = Field("cpu", description="Torch device for the trainer (cpu, cuda, cuda:1, mps).")
    model: Path | None = Field(None, description="Encode with this trained rrVAE (.pt or results .h5); no training.")
    finish_timeout: float = Field(120.0, gt=0, description="Longest wait for the trainer at scan end, s.")
    once: bool = Field(False, description="Stop after the first scan's results are written.")


def limit_blas_threads() -> None:
    """One BLAS thread for the whole process.

    The service budgets its cores explicitly (ingest on one, the trainer on the
    other). OpenBLAS's own pool would spin on both cores for the small
    per-batch products and starve the ZeroMQ I/O thread: with it, ingest ran
    2-3x slower on a 2-core machine.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class Service:
    def __init__(self, config: ServiceConfig, context: zmq.Context | None = None):
        limit_blas_threads()
        self.cfg = config
        self.ctx = context or zmq.Context.instance()
        self.stop_event = threading.Event()
        self.queue: queue.Queue[Item] = queue.Queue(config.queue_size)
        self.current: ScanState | None = None
        self.finished: deque[str] = deque(maxlen=64)  # ids of scans whose results are written (not the scans:
        # a finished scan's frame store is freed once the next scan replaces it)
        self.seen_ids: set[str] = set()
        self.rejected: set[str] = set()  # scans whose start was refused
        self.notice: str | None = None  # the latest refused input, shown until the next scan starts
        self.orphans: Counter[str] = Counter()  # bad input that belongs to no scan, by reason
        self.errors: list[str] = []
        self.results_written: list[tuple[str, Path]] = []
        self.results_event = threading.Event()
        self._started = False
        self._finish_q: queue.Queue[ScanState] = queue.Queue()
        self.rate_window: deque[tuple[float, int]] = deque(maxlen=64)
        self._received_total = 0
        self.trainer = None
        if config.model is not None:
            from rrstem.model.inference import FixedEncoder

            self.trainer = FixedEncoder(config.model, device=config.device)
        elif config.train:
            from rrstem.model.trainer import OnlineTrainer, TrainerConfig

            self.trainer = OnlineTrainer(TrainerConfig(**config.trainer), device=config.device)
        self.receiver = Receiver(self.ctx, config.listen, self.queue, self.stop_event, bind=config.bind,
                                 mode=config.mode, decoder=decoder_for(config.protocol, config.scan_shape))
        self.publisher = Publisher(self, self.ctx, config.publish, config.control)
        self._threads = [
            self.receiver,
            threading.Thread(target=self._guard, args=(self._pipeline_loop,), name="rrstem-pipeline", daemon=True),
            threading.Thread(target=self._guard, args=(self._finish_loop,), name="rrstem-finisher", daemon=True),
            threading.Thread(target=self._guard, args=(self.publisher.run,), name="rrstem-publisher", daemon=True),
        ]

    # --- lifecycle ------------------------------------------------------------------

    @property
    def listen_endpoint(self) -> str:
        return self.receiver.endpoint

    @property
    def publish_endpoint(self) -> str | None:
        return self.publisher.publish_endpoint

    @property
    def control_endpoint(self) -> str | None:
        return self.publisher.control_endpoint

    def start(self) -> "Service":
        """Start the threads; calling it again (e.g. ``with Service(cfg).start() as svc``) does nothing."""
        if self._started:
            return self
        self._started = True
        if self.trainer is not None:
            self.trainer.start()
        for t in self._threads:
            t.start()
        log.info("listening on %s (%s, %s); snapshots on %s; control on %s", self.listen_endpoint, self.cfg.mode,
                 "bound" if self.cfg.bind else "connected", self.publish_endpoint, self.control_endpoint)
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the service stops (control ``stop``, ``once``); False on timeout."""
        return self.stop_event.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        if self.trainer is not None:
            self.trainer.close(timeout=max(0.5, deadline - time.monotonic()))
        self.publisher.close()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self) -> None:
        """Re-raise a worker thread's failure, if any."""
        if self.receiver.error is not None:
            raise RuntimeError("receiver thread failed") from self.receiver.error
        if self.trainer is not None and getattr(self.trainer, "error", None) is not None:
            raise RuntimeError("trainer thread failed") from self.trainer.error
        if self.errors:
            raise RuntimeError(self.errors[-1])

    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as exc:
            self.report(f"{threading.current_thread().name} failed: {exc!r}")
            log.exception("worker failed")
            self.stop_event.set()

    def last_error(self) -> str | None:
        """The newest worker failure, else the latest refused scan, for the dashboard's banner."""
        if self.errors:
            return self.errors[-1]
        err = getattr(self.trainer, "error", None)
        if err is not None:
            return f"rrVAE {type(self.trainer).__name__} failed: {err!r}"
        return self.notice

    def report(self, message: str) -> None:
        self.errors.append(message)
        del self.errors[:-20]

    # --- pipeline thread ----------------------------------------------------------------

    def _pipeline_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._handle(item)
            except Exception as exc:  # a bug on one message must not stop ingest of the next
                log.exception("pipeline error on a %s message", item.kind)
                self.report(f"pipeline error on a {item.kind} message: {exc!r}")
                self.orphans["pipeline_error"] += 1

    def _handle(self, item: Item) -> None:
        cur = self.current
        if item.kind == "start":
            start: Start = item.message
            if self.cfg.scan_shape is not None and tuple(start.scan_shape) != self.cfg.scan_shape:
                log.info("scan %s: scan shape %s overridden to %s", start.scan_id, start.scan_shape, self.cfg.scan_shape)
                start = start.model_copy(update={"scan_shape": self.cfg.scan_shape})
            if cur is not None and not cur.ended:
                log.warning("scan %s had no end message; it ends at the start of scan %s", cur.scan_id, start.scan_id)
                self._end_scan(cur, None)
            try:
                state = ScanState(start, self.cfg.preprocess, lossy=self.cfg.mode == "sub")
            except ValueError as exc:  # the scan cannot be taken; its frames are counted, not processed
                self.rejected.add(start.scan_id)
                self.orphans["rejected_start"] += 1
                self.notice = f"scan {start.scan_id} rejected: {exc}"
                log.error("scan %s rejected: %s", start.scan_id, exc)
                return
            if start.scan_id in self.seen_ids:
                log.warning("scan id %s seen before: its results will be replaced", start.scan_id)
            self.seen_ids.add(start.scan_id)
            self.rejected.discard(start.scan_id)
            self.current, self.notice = state, None
            log.info("scan %s started: %s positions of %s %s", start.scan_id, start.scan_shape, start.frame_shape,
                     start.dtype)
        elif item.kind == "frames":
            if cur is None or item.scan_id != cur.scan_id or cur.ended:
                self._stale(item, cur)
                return
            was_ready = cur.ready.is_set()
            before = cur.counters["received"]
            cur.add(item.message.first, item.frames)
            self._count(cur.counters["received"] - before)
            if not was_ready and cur.ready.is_set() and self.trainer is not None:
                self.trainer.attach(cur.data)
        elif item.kind == "end":
            if cur is not None and item.scan_id == cur.scan_id and not cur.ended:
                self._end_scan(cur, item.message.frames_sent)
            else:
                reason = "end_repeated" if item.scan_id in self.seen_ids else "end_without_start"
                self.orphans[reason] += 1
                log.warning("%s for scan %s ignored", reason.replace("_", " "), item.scan_id)
        else:
            if cur is not None and item.scan_id == cur.scan_id and not cur.ended and item.count:
                cur.invalid(item.reason, item.count, item.detail)
            else:
                self.orphans[item.reason] += max(item.count, 1)
                log.warning("rejected message (%s): %s", item.reason, item.detail)

    def _stale(self, item: Item, cur: ScanState | None) -> None:
        n = item.message.count
        if item.scan_id in self.rejected:
            self.orphans["rejected_scan"] += n
            return  # the rejection was logged once, at its start
        if cur is not None and not cur.ended and item.scan_id in self.seen_ids:
            cur.counters["stale"] += n
            cur.log.warning("stale", "scan %s: %d stale frame(s) of earlier scan %s", cur.scan_id, n, item.scan_id)
        else:
            self.orphans["stale"] += n
            log.warning("%d frame(s) of scan %s arrived after it ended", n, item.scan_id)

    def _count(self, n: int) -> None:
        self._received_total += n
        self.rate_window.append((time.monotonic(), self._received_total))

    def _end_scan(self, state: ScanState, frames_sent: int | None) -> None:
        state.finish(frames_sent)
        c = state.counter_dict()
        log.info("scan %s ended: %s", state.scan_id, ", ".join(f"{k} {v}" for k, v in c.items()))
        self._finish_q.put(state)

    # --- finisher thread -------------------------------------------------------------

    def _finish_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                state = self._finish_q.get(timeout=0.1)
            except queue.Empty:
                continue
            if self.trainer is not None and state.ready.is_set():
                if not self.trainer.wait_done(self.cfg.finish_timeout):
                    err = getattr(self.trainer, "error", None)
                    if err is not None:
                        log.error("scan %s: the rrVAE failed (%r); writing the maps without it", state.scan_id, err)
                    else:
                        log.warning("scan %s: rrVAE did not finish within %.0f s; writing what it has",
                                    state.scan_id, self.cfg.finish_timeout)
            self.finished.append(state.scan_id)
            if self.cfg.out is not None:
                path = self.save(state)
                self.results_written.append((state.scan_id, path))
            self.results_event.set()
            if self.cfg.once:
                self.stop_event.set()

    def save(self, state: ScanState | None = None) -> Path:
        """Write the results of ``state`` (default: the current scan) now."""
        state = state or self.current
        if state is None:
            raise ValueError("no scan yet: nothing to save")
        if self.cfg.out is None:
            raise ValueError("the service was started without a results file (--out)")
        maps = state.snapshot()
        model = None
        tmaps = self._trainer_maps(state)
        if tmaps:
            maps.update(tmaps)
            model = self.trainer.export()
        g = state.geometry
        mask = None
        if g is not None:
            mask = np.zeros(g.frame_shape, dtype=bool)
            for i, j in g.masked:
                mask[i, j] = True
        attrs = {
            "scan_shape": list(state.start.scan_shape),
            "frame_shape": list(state.start.frame_shape),
            "binned_shape": list(g.binned_shape) if g else [0, 0],
            "dtype": state.start.dtype,
            "counters": state.counter_dict(),
            "invalid_reasons": dict(state.reasons),
            "frames_sent": -1 if state.frames_sent is None else state.frames_sent,
            "complete": state.ended,
            "geometry": g.to_json() if g else {},
            "calibration": state.start.calibration.model_dump(mode="json"),
            "config": self.cfg.model_dump(mode="json"),
            "metadata": state.start.metadata,
        }
        unit = state.positions.unit if state.positions else "px"
        path = write_scan(self.cfg.out, state.scan_id, attrs=attrs, maps=maps, com_unit=unit, pixel_mask=mask,
                          model=model)
        log.info("scan %s: results written to %s", state.scan_id, path)
        return path

    def _trainer_maps(self, state: ScanState) -> dict[str, np.ndarray]:
        if self.trainer is None or not state.ready.is_set():
            return {}
        maps = self.trainer.maps()
        if not maps or maps.get("scan_id", state.scan_id) != state.scan_id:
            return {}
        return {k: v for k, v in maps.items() if isinstance(v, np.ndarray)}

    # --- views for callers (the publisher thread builds these too) ---------------------------

    def snapshot(self) -> Snapshot:
        """The current maps, counters and training state, as published."""
        return self.publisher.snapshot()

    def header(self) -> SnapshotHeader:
        """The current scan's state, counters and training status, without the arrays."""
        return self.publisher.header()

    def stop_after_scan(self) -> None:
        """Stop once the current scan's results are written (at once if they already are)."""
        self.cfg.once = True
        if self.results_written:
            self.stop()

    def frame_reply(self, index: Any) -> dict[str, Any]:
        """The ``frame`` control reply for scan position ``index`` = [y, x] (arrays packed)."""
        return self.publisher.frame_reply(index)
