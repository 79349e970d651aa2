"""The rrstem service: receiver -> pipeline -> maps/store -> trainer, publisher, control, results.

Threads (each stores its exception; the service reports it in every snapshot
and ``check()`` re-raises it):

- receiver: socket -> decoded items -> bounded queue (``stream/receiver.py``)
- pipeline: items -> ``ScanState`` (validation, binning, reductions, store)
- trainer: the rrVAE, reading the store (``model/trainer.py``); never blocks ingest
- finisher: at scan end waits for the trainer's consolidation, writes results
- publisher: snapshots on PUB at <= ``snapshot_hz`` and the REP control socket
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

from rrstem.stream import control as ctl
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.protocol import Start
from rrstem.stream.receiver import Item, Receiver
from rrstem.stream.results import write_scan
from rrstem.stream.scan import ScanState
from rrstem.stream.snapshot import Snapshot, SnapshotHeader

log = logging.getLogger("rrstem.service")


class ServiceConfig(BaseModel):
    """Everything ``rrstem serve`` can be told. Endpoints may use port 0 when bound."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    listen: str = Field("tcp://127.0.0.1:5555", description="Frames endpoint (detector or simulator).")
    bind: bool = Field(False, description="Bind the frames socket instead of connecting to the sender.")
    mode: Literal["pull", "sub"] = Field("pull", description="pull: lossless; sub: tap a PUB stream.")
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
        self.finished: deque[ScanState] = deque(maxlen=8)
        self.seen_ids: set[str] = set()
        self.orphans: Counter[str] = Counter()  # bad input that belongs to no scan, by reason
        self.errors: list[str] = []
        self.results_written: list[tuple[str, Path]] = []
        self.results_event = threading.Event()
        self._finish_q: queue.Queue[ScanState] = queue.Queue()
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._received_total = 0
        self._seq = 0
        self.trainer = None
        if config.model is not None:
            from rrstem.model.inference import FixedEncoder

            self.trainer = FixedEncoder(config.model, device=config.device)
        elif config.train:
            from rrstem.model.trainer import OnlineTrainer, TrainerConfig

            self.trainer = OnlineTrainer(TrainerConfig(**config.trainer), device=config.device)
        self.receiver = Receiver(self.ctx, config.listen, self.queue, self.stop_event, bind=config.bind,
                                 mode=config.mode)
        self._pub = self._rep = None
        self._publish_ep = self._control_ep = None  # actual endpoints (port 0 resolved); kept after close
        if config.publish:
            self._pub = self.ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, 4)  # slow subscribers lose snapshots, never slow us
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(config.publish)
            self._publish_ep = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        if config.control:
            self._rep = self.ctx.socket(zmq.REP)
            self._rep.setsockopt(zmq.LINGER, 0)
            self._rep.bind(config.control)
            self._control_ep = self._rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self._threads = [
            self.receiver,
            threading.Thread(target=self._guard, args=(self._pipeline_loop,), name="rrstem-pipeline", daemon=True),
            threading.Thread(target=self._guard, args=(self._finish_loop,), name="rrstem-finisher", daemon=True),
            threading.Thread(target=self._guard, args=(self._publish_loop,), name="rrstem-publisher", daemon=True),
        ]

    # --- lifecycle ------------------------------------------------------------------

    @property
    def listen_endpoint(self) -> str:
        return self.receiver.endpoint

    @property
    def publish_endpoint(self) -> str | None:
        return self._publish_ep

    @property
    def control_endpoint(self) -> str | None:
        return self._control_ep

    def start(self) -> "Service":
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
        for sock in (self._pub, self._rep):
            if sock is not None:
                sock.close(linger=0)

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
            self._report(f"{threading.current_thread().name} failed: {exc!r}")
            log.exception("worker failed")
            self.stop_event.set()

    def _report(self, message: str) -> None:
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
                self._report(f"pipeline error on a {item.kind} message: {exc!r}")
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
            if start.scan_id in self.seen_ids:
                log.warning("scan id %s seen before: its results will be replaced", start.scan_id)
            self.seen_ids.add(start.scan_id)
            self.current = ScanState(start, self.cfg.preprocess, lossy=self.cfg.mode == "sub")
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
        if cur is not None and not cur.ended and item.scan_id in self.seen_ids:
            cur.counters["stale"] += n
            cur.log.warning("stale", "scan %s: %d stale frame(s) of earlier scan %s", cur.scan_id, n, item.scan_id)
        else:
            self.orphans["stale"] += n
            log.warning("%d frame(s) of scan %s arrived after it ended", n, item.scan_id)

    def _count(self, n: int) -> None:
        self._received_total += n
        self._rate.append((time.monotonic(), self._received_total))

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
                    log.warning("scan %s: trainer did not finish within %.0f s; writing what it has",
                                state.scan_id, self.cfg.finish_timeout)
            self.finished.append(state)
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

    # --- publisher / control thread --------------------------------------------------------

    def frames_per_s(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= 2.0]
        if len(recent) < 2 or now - recent[0][0] <= 0:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / max(now - recent[0][0], 1e-3)

    def header(self) -> SnapshotHeader:
        cur = self.current
        h = SnapshotHeader(seq=self._seq, error=self.errors[-1] if self.errors else None,
                           frames_per_s=self.frames_per_s(),
                           control=self.control_endpoint, orphans=dict(self.orphans))
        if self.trainer is not None:
            h.training = self.trainer.status()
        if cur is None:
            return h
        h.scan_id, h.scan_shape, h.frame_shape = cur.scan_id, list(cur.start.scan_shape), list(cur.start.frame_shape)
        h.expected, h.counters = cur.start.n_positions, cur.counter_dict()
        h.calibration = cur.start.calibration.model_dump(mode="json", exclude_none=True)
        if cur.geometry is not None:
            h.binned_shape, h.geometry = list(cur.geometry.binned_shape), cur.geometry.to_json()
            h.geometry.pop("masked")
            h.com_unit = cur.positions.unit
        training_state = h.training.get("state") if h.training else None
        if not cur.ended:
            h.state = "acquiring"
        elif cur not in self.finished:
            h.state = "consolidating" if training_state == "consolidating" else "finishing"
        else:
            h.state = "done"
        return h

    def snapshot(self) -> Snapshot:
        self._seq += 1
        header = self.header()
        arrays: dict[str, np.ndarray] = {}
        if self.current is not None:
            # float32 is plenty for display and halves what every subscriber receives
            arrays.update({k: v.astype(np.float32) if v.dtype == np.float64 else v
                           for k, v in self.current.snapshot().items()})
            arrays.update(self._trainer_maps(self.current))
            if self.trainer is not None and self.current.ready.is_set():
                arrays.update({f"training/{k}": np.asarray(v) for k, v in self.trainer.histories().items()})
        return Snapshot(header, arrays)

    def _publish_loop(self) -> None:
        period = 1.0 / self.cfg.snapshot_hz
        next_pub, last_key, last_sent = 0.0, None, 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if self._rep is not None and self._rep.poll(max(1, int(min(next_pub - now, 0.1) * 1000))):
                self._rep.send(ctl.pack(self._control(self._rep.recv())))
                continue
            now = time.monotonic()
            if now < next_pub:
                if self._rep is None:
                    time.sleep(min(next_pub - now, 0.1))
                continue
            next_pub = now + period
            key = self._change_key()
            if self._pub is not None and (key != last_key or now - last_sent >= 1.0):  # 1 Hz heartbeat when idle
                self._pub.send_multipart(self.snapshot().encode(), copy=False)
                last_key, last_sent = key, now

    def _change_key(self) -> tuple:
        cur = self.current
        step = self.trainer.status().get("step") if self.trainer is not None else None
        return (id(cur), cur and sum(cur.counters.values()), cur and cur.ended, step, len(self.errors),
                sum(self.orphans.values()), cur in self.finished if cur else None)

    def _control(self, raw: bytes) -> dict[str, Any]:
        try:
            req = ctl.unpack(raw)
            cmd = req.get("cmd")
            if cmd not in ctl.COMMANDS:
                return {"ok": False, "error": f"unknown command {cmd!r}; commands: {', '.join(ctl.COMMANDS)}"}
            return {"ok": True, **self._command(cmd, req)}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _command(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return {"status": self.header().model_dump(mode="json")}
        if cmd == "save":
            return {"path": str(self.save())}
        if cmd == "stop":
            self.stop_event.set()
            return {}
        if cmd == "frame":
            return self.frame_reply(req.get("index"))
        if self.trainer is None:
            raise ValueError("training is disabled (serve was started with --no-train)")
        getattr(self.trainer, {"pause_training": "pause", "resume_training": "resume",
                               "reset_model": "reset_model"}[cmd])()
        return {"training": self.trainer.status()}

    def frame_reply(self, index: Any) -> dict[str, Any]:
        """The ``frame`` control reply for scan position ``index`` = [y, x] (arrays packed)."""
        cur = self.current
        if cur is None or not cur.ready.is_set():
            raise ValueError("no frames yet")
        ny, nx = cur.start.scan_shape
        if not (isinstance(index, (list, tuple)) and len(index) == 2
                and all(isinstance(v, (int, np.integer)) for v in index)):
            raise ValueError(f"index must be [y, x] integers, got {index!r}")
        y, x = (int(v) for v in index)
        if not (0 <= y < ny and 0 <= x < nx):
            raise ValueError(f"position ({y}, {x}) is outside the {ny}x{nx} scan")
        i = y * nx + x
        if not cur.store.filled[i]:
            raise ValueError(f"no frame at ({y}, {x}) yet")
        out = {"index": [y, x], "frame": ctl.pack_array(cur.store.frames[i]),
               "mean": ctl.pack_array(cur.data.mean_pattern())}
        if self._trainer_maps(cur):
            inp, recon = self.trainer.reconstruct(i)
            out.update(input=ctl.pack_array(inp), recon=ctl.pack_array(recon), residual=ctl.pack_array(inp - recon))
        return out
