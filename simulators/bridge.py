"""The simulated microscope bridge: obeys the service's rescan requests (docs/steering.md).

``Bridge`` subscribes to a service's steering socket. A listener thread
takes each ``RescanRequest``, asks ``make`` for the subscan's source (the
synthetic scan computes the region at the finer step and higher dose; a
replayed file re-sends the region's frames, or cannot refine), answers the
service at once with control ``rescan_answer`` (accepted, or refused and
why), and queues the accepted ones. The caller takes them from
``next_subscan`` and streams each like any scan, so the whole loop runs on
one machine. A real bridge does the same with its microscope's scan API.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import numpy as np
import zmq

from rrstem.simulators.source import Source
from rrstem.stream.control import ControlClient, ControlError
from rrstem.stream.protocol import Start
from rrstem.stream.steering import RescanRequest

log = logging.getLogger("rrstem.bridge")


class CannotRescan(ValueError):
    """This bridge cannot acquire the subscan asked for; the message says why."""


class Bridge:
    def __init__(self, steering: str, make: Callable[[RescanRequest], Source], context: zmq.Context | None = None,
                 answer_timeout: float = 5.0):
        self.endpoint, self._make, self.answer_timeout = steering, make, answer_timeout
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"rescan")
        self._sub.connect(steering)
        self._queue: queue.Queue[Source] = queue.Queue()
        self._stop = threading.Event()
        self.answered: list[tuple[str, bool, str | None]] = []  # (request id, accepted, reason)
        self._requests: dict[str, RescanRequest] = {}  # subscan id -> its request
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._listen, name="rrstem-bridge", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sub.poll(100):
                    continue
                parts = self._sub.recv_multipart()
                try:
                    req = RescanRequest.decode(parts)
                except Exception as exc:  # not ours to crash on: say so and go on
                    log.warning("bridge: ignored a message on %s that is no rescan request: %s", self.endpoint, exc)
                    continue
                self._take(req)
        except BaseException as exc:
            self.error = exc
            log.exception("bridge: listener failed")
        finally:
            self._sub.close(linger=0)

    def _take(self, req: RescanRequest) -> None:
        try:
            source, reason = self._make(req), None
        except CannotRescan as exc:
            source, reason = None, str(exc)
        log.info("bridge: rescan %s of %s region %s: %s", req.request_id, req.parent_scan_id, req.region,
                 "accepted" if source is not None else f"refused ({reason})")
        self.answered.append((req.request_id, source is not None, reason))
        if req.answer_to:
            try:
                with ControlClient(req.answer_to, timeout=self.answer_timeout, context=self._ctx) as ctl:
                    ctl.request("rescan_answer", request_id=req.request_id, accepted=source is not None,
                                reason=reason)
            except ControlError as exc:
                log.warning("bridge: could not answer rescan %s at %s: %s", req.request_id, req.answer_to, exc)
        if source is not None:
            self._requests[req.scan_id] = req
            self._queue.put(source)

    def next_subscan(self, timeout: float) -> Source | None:
        """The next accepted subscan's source, or None if none came within ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_parent_ended(self, sub: Source, timeout: float = 10.0) -> bool:
        """Wait until the service has ended the subscan's parent (control ``status``), so the subscan's start,
        sent over a new connection, cannot overtake the parent's last frames; False on timeout."""
        req = self._requests.get(sub.start.scan_id)
        if req is None or not req.answer_to:
            return True
        deadline = time.monotonic() + timeout
        with ControlClient(req.answer_to, timeout=min(2.0, timeout), context=self._ctx) as ctl:
            while time.monotonic() < deadline:
                try:
                    st = ctl.request("status")["status"]
                    if st.get("scan_id") != req.parent_scan_id or st.get("state") != "acquiring":
                        return True
                except ControlError:
                    pass
                time.sleep(0.05)
        log.warning("bridge: scan %s still acquiring after %g s; sending subscan %s anyway", req.parent_scan_id,
                    timeout, sub.start.scan_id)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rescan_metadata(req: RescanRequest) -> dict:
    """What a subscan's start message says about the request it answers (kept in the results file)."""
    return {"rescan": req.model_dump(mode="json", exclude={"answer_to"})}


def graphene_subscans(parent) -> Callable[[RescanRequest], Source]:
    """``make`` for a synthetic ``GrapheneSource``: the region computed at the finer step and higher dose."""
    made = []

    def make(req: RescanRequest) -> Source:
        if req.parent_scan_id != parent.start.scan_id:
            raise CannotRescan(f"this simulator scanned {parent.start.scan_id}, not {req.parent_scan_id}")
        made.append(req.request_id)  # each subscan its own noise
        return parent.subscan(req.region, req.step_factor, req.dose_factor, req.scan_id,
                              seed=parent.seed + 1000 * len(made), metadata=rescan_metadata(req))
    return make


class RegionSource(Source):
    """The frames of a region of a recorded scan, re-sent as a scan of their own."""

    def __init__(self, parent: Source, req: RescanRequest):
        self.parent, self.region = parent, req.region
        y0, y1, x0, x1 = req.region
        s = parent.start
        self.start = Start(scan_id=req.scan_id, scan_shape=(y1 - y0, x1 - x0), frame_shape=s.frame_shape,
                           dtype=s.dtype, calibration=s.calibration, metadata={**s.metadata, **rescan_metadata(req)})

    def chunk(self, first: int, count: int) -> np.ndarray:
        self._check_range(first, count)
        y0, _, x0, _ = self.region
        nx, pnx = self.start.scan_shape[1], self.parent.start.scan_shape[1]
        idx = np.arange(first, first + count)
        parent_idx = (y0 + idx // nx) * pnx + x0 + idx % nx
        return np.ascontiguousarray(np.concatenate([self.parent.chunk(int(i), 1) for i in parent_idx]))


def replay_subscans(parent: Source) -> Callable[[RescanRequest], Source]:
    """``make`` for a replayed file: the region's recorded frames again; a finer step or another dose cannot be."""
    def make(req: RescanRequest) -> Source:
        if req.parent_scan_id != parent.start.scan_id:
            raise CannotRescan(f"this replay sent {parent.start.scan_id}, not {req.parent_scan_id}")
        if (req.step_factor, req.dwell_factor, req.dose_factor) != (1.0, 1.0, 1.0):
            raise CannotRescan(f"a recorded scan cannot be refined (step_factor {req.step_factor:g}, dwell_factor "
                               f"{req.dwell_factor:g}, dose_factor {req.dose_factor:g}); ask with all factors 1 "
                               "to have the region's frames re-sent")
        return RegionSource(parent, req)
    return make
