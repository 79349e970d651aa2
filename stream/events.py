"""Events: typed, versioned messages that say something happened, on the service's events socket.

Beside its snapshots (the state, ten times a second), the service publishes
events, each once, when it happens: ``scan_started``, ``scan_ended``,
``anomaly``, ``model_converged`` and ``error``. The events socket is a PUB
socket of its own (``serve --events``, default ``tcp://127.0.0.1:5558``), so
a dashboard's snapshot subscription never sees them and a slow snapshot
reader never costs an event. Every event is a two-part ZeroMQ message:

- part 0, the topic: ``event.<type>`` in ASCII (subscribe to ``event.`` for
  all, to ``event.anomaly`` for one type);
- part 1, a msgpack map validated by the pydantic model of that type below
  (the one source of truth for the schema; ``decode_event`` checks it).

``EventPublisher`` owns the socket and may be called from any thread.
``AnomalyFinder`` turns a score map into ``anomaly`` events, once per
position; ``score_map`` picks the score: the scan's defect map
(``stream/defects.py``), the same one the snapshots and results carry. ``Convergence`` says when the
held-out ELBO has stopped improving. ``docs/steering.md`` documents all of it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Annotated, Any, Literal, Union

import msgpack
import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rrstem.stream.auth import Curve
from rrstem.stream.defects import ALARM_THRESHOLD, ANOMALY

log = logging.getLogger("rrstem.events")

#: Version of the events schema; changes when a field changes meaning or goes away.
EVENTS_PROTOCOL = "rrstem-events/1"
TOPIC_PREFIX = b"event."
#: Default events endpoint of ``rrstem serve``.
DEFAULT_EVENTS = "tcp://127.0.0.1:5558"
#: Events queued per subscriber before the newest are dropped (and counted): events are rare and small.
EVENTS_HWM = 10_000


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["rrstem-events/1"] = Field(EVENTS_PROTOCOL, description="Events schema version.")
    seq: int = Field(0, ge=0, description="Increases by one per event the service published (gaps: dropped).")
    time: float = Field(default_factory=time.time, description="Unix time the service published the event.")

    @property
    def topic(self) -> bytes:
        return TOPIC_PREFIX + self.type.encode()  # type: ignore[attr-defined]

    def encode(self) -> list[bytes]:
        """The two message parts: topic, msgpack body."""
        return [self.topic, msgpack.packb(self.model_dump(mode="json"), use_bin_type=True)]


class Subscan(BaseModel):
    """Where a subscan lies on its parent scan (from the rescan request that asked for it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(description="The rescan request this scan answers.")
    parent_scan_id: str = Field(description="The scan whose region was rescanned.")
    region: tuple[int, int, int, int] = Field(description="(y0, y1, x0, x1) on the parent scan's positions, "
                                                          "half-open.")
    step_factor: float = Field(description="Subscan step / parent step (0.5: twice as fine).")
    dwell_factor: float = Field(description="Subscan dwell per position / parent dwell.")
    dose_factor: float = Field(description="Subscan dose per position / parent dose.")
    step_nm: float | None = Field(None, description="Subscan step in nm, if the parent's is known.")
    dose: float | None = Field(None, description="Subscan electrons per position, if the parent's is known.")


class ScanStarted(_Event):
    """A scan's start message was accepted."""

    type: Literal["scan_started"] = "scan_started"
    scan_id: str = Field(description="The new scan.")
    scan_shape: tuple[int, int] = Field(description="(ny, nx) positions.")
    frame_shape: tuple[int, int] = Field(description="(h, w) detector pixels.")
    calibration: dict[str, Any] = Field(default_factory=dict, description="The start message's calibration.")
    subscan: Subscan | None = Field(None, description="Set when this scan answers a rescan request.")


class ScanEnded(_Event):
    """A scan's results are written (or could not be: then ``results_path`` is None and an ``error`` came)."""

    type: Literal["scan_ended"] = "scan_ended"
    scan_id: str = Field(description="The scan that ended.")
    complete: bool = Field(description="Every position arrived and the scan ended normally.")
    end_reason: str = Field(description="snapshot.END_REASONS: end | idle | superseded | stopped | failed.")
    results_path: str | None = Field(description="The results file holding the scan's group, None if unwritten.")
    counters: dict[str, int] = Field(default_factory=dict, description="The scan's COUNTERS.")


class Anomaly(_Event):
    """A cluster of positions whose anomaly score passed the threshold, named by its highest position.

    Each position is reported once: the cluster and a margin around it are not reported again in this scan.
    """

    type: Literal["anomaly"] = "anomaly"
    scan_id: str = Field(description="The scan the anomaly is in.")
    scan_shape: tuple[int, int] = Field(description="(ny, nx) positions of that scan.")
    parent_scan_id: str | None = Field(None, description="Set when that scan is a subscan: the scan it refines.")
    position: tuple[int, int] = Field(description="(y, x) scan position of the cluster's highest score.")
    position_nm: tuple[float, float] | None = Field(None, description="(y, x) of ``position`` in nm from position "
                                                                      "(0, 0), if the scan step is known.")
    score: float = Field(description="The anomaly score at ``position``.")
    threshold: float = Field(description="The alarm threshold the score passed.")
    score_name: str = Field(description="Which map the score comes from (see events.score_map).")
    size: int = Field(description="Positions in the cluster above the threshold.")
    bbox: tuple[int, int, int, int] = Field(description="(y0, y1, x0, x1) half-open box around the cluster.")
    latent: list[float] = Field(default_factory=list, description="The rrVAE content latents at ``position`` "
                                                                  "(empty without a model).")
    rotation: float | None = Field(None, description="The rrVAE angle at ``position``, rad.")
    model_step: int | None = Field(None, description="Training step of the model maps the score was made from.")


class ModelConverged(_Event):
    """The held-out ELBO has not improved for ``patience`` evaluations (fires once per scan)."""

    type: Literal["model_converged"] = "model_converged"
    scan_id: str = Field(description="The scan the model trains on.")
    step: int = Field(description="Training step of the last evaluation.")
    heldout_elbo: float = Field(description="Best held-out loss (negative ELBO per pixel; lower is better).")
    evaluations: int = Field(description="Held-out evaluations so far.")


class ErrorEvent(_Event):
    """Something failed that the service survived (or a thread died); also a rescan the bridge never answered."""

    type: Literal["error"] = "error"
    where: str = Field(description="What failed: pipeline, results, checkpoint, steering, rrVAE ..., a thread.")
    message: str = Field(description="The exception type and message.")
    scan_id: str | None = Field(None, description="The scan it hit, if any.")


Event = Annotated[Union[ScanStarted, ScanEnded, Anomaly, ModelConverged, ErrorEvent], Field(discriminator="type")]
EVENT_TYPES = ("scan_started", "scan_ended", "anomaly", "model_converged", "error")
_adapter: TypeAdapter = TypeAdapter(Event)


def decode_event(parts: list) -> ScanStarted | ScanEnded | Anomaly | ModelConverged | ErrorEvent:
    """Validate one events message (topic, body); raises ``ValueError`` with the reason."""
    if len(parts) != 2:
        raise ValueError(f"an event has 2 parts (topic, body), this one {len(parts)}")
    try:
        obj = msgpack.unpackb(bytes(parts[1]), raw=False)
        event = _adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"invalid event: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    except Exception as exc:
        raise ValueError(f"event body is not msgpack ({type(exc).__name__}: {exc})") from None
    if bytes(parts[0]) != event.topic:
        raise ValueError(f"event topic {bytes(parts[0])!r} does not match its type {event.type!r}")
    return event


def bind_pub(context: zmq.Context, endpoint: str, hwm: int, curve: "Curve | None" = None) -> tuple[zmq.Socket, str]:
    """A bound PUB socket and its actual endpoint (port 0 resolved): the one place the events and steering
    sockets are made, so authentication (``curve``: the CURVE server, stream/auth.py) applies to both."""
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.secure(sock, server=True)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        raise ValueError(f"cannot bind {endpoint} ({exc}): is another rrstem serve running? pick another port "
                         "(port 0: any free one)") from None
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


class EventPublisher:
    """Publishes events on a bound PUB socket, from any thread (one lock around the socket)."""

    def __init__(self, context: zmq.Context, endpoint: str | None, curve: "Curve | None" = None):
        self._sock, self.endpoint = bind_pub(context, endpoint, EVENTS_HWM, curve) if endpoint else (None, None)
        self._lock = threading.Lock()
        self.seq = 0
        self.dropped = 0  # events no subscriber could take (its queue full)
        self.recent: deque = deque(maxlen=200)  # the newest events, for in-process readers and tests

    def publish(self, event: _Event) -> _Event:
        with self._lock:
            self.seq += 1
            event = event.model_copy(update={"seq": self.seq, "time": time.time()})
            self.recent.append(event)
            if self._sock is not None:
                try:
                    self._sock.send_multipart(event.encode(), flags=zmq.NOBLOCK)
                except zmq.Again:
                    self.dropped += 1
        log.debug("event %s", event.type)
        return event

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None


# --- anomaly scores --------------------------------------------------------------------------

#: Rows past a cluster that must be complete before it is reported (the defect map's smoothing reaches them).
BORDER = 2


def score_map(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, float, str] | None:
    """(score, threshold, name) of a snapshot's arrays: the defect map ``anomaly`` and its
    ``anomaly_threshold`` (stream/defects.py: the VADF lattice residual), the same map and threshold as the
    snapshots, the results file and the dashboard show; None without one.

    Why the lattice residual and not the rrVAE's outlier map (``rrvae_anomaly``): on the abTEM multislice
    scans it found every defect and raised no alarm on pristine scans, which the rrVAE's map did not
    (docs/steering.md, "The defect map"; bench/README.md).
    """
    if ANOMALY not in arrays:
        return None
    return (np.asarray(arrays[ANOMALY], dtype=np.float64), float(arrays.get(ALARM_THRESHOLD, np.inf)), ANOMALY)


class AnomalyFinder:
    """One scan's anomalies: clusters of positions above threshold, each reported once.

    A cluster is reported when it is complete: every position next to it has a score (so the scan, which
    fills row by row, has moved past it). Its highest position names it; the cluster grown by
    ``margin`` positions is never reported again.
    """

    def __init__(self, scan_id: str, scan_shape: tuple[int, int], step_nm: float | None = None, margin: int = 3,
                 parent_scan_id: str | None = None):
        self.scan_id, self.step_nm, self.margin, self.parent = scan_id, step_nm, margin, parent_scan_id
        self.reported = np.zeros(scan_shape, dtype=bool)

    def update(self, score: np.ndarray, threshold: float, name: str, arrays: dict[str, np.ndarray],
               rows_done: int, ended: bool = False, model_step: int | None = None) -> list[Anomaly]:
        """The anomalies newly found in ``score``. ``rows_done``: how many rows, from the top, are complete
        (a cluster waits until the rows below it are complete and scored, unless the scan has ``ended``)."""
        known = np.isfinite(score)
        scored = np.flatnonzero(known.any(axis=1))
        # the score may lag the scan (the defect map is redone at most a few times a second): count only the
        # rows it was made from
        rows_done = min(rows_done, int(scored[-1]) + 1 if len(scored) else 0)
        above = known & (np.where(known, score, -np.inf) > threshold) & ~self.reported
        out = []
        for cluster in clusters(above):
            ys, xs = cluster[:, 0], cluster[:, 1]
            if not ended and ys.max() + 2 + BORDER > rows_done:
                continue  # the scan has not moved past it yet: wait for the rest of it
            peak = int(np.argmax(score[ys, xs]))
            y, x = int(ys[peak]), int(xs[peak])
            m = self.margin
            self.reported[max(ys.min() - m, 0):ys.max() + m + 1, max(xs.min() - m, 0):xs.max() + m + 1] = True
            latent = arrays.get("latent")
            rot = arrays.get("rotation")
            out.append(Anomaly(
                scan_id=self.scan_id, scan_shape=score.shape, parent_scan_id=self.parent, position=(y, x), score=float(score[y, x]), threshold=float(threshold),
                position_nm=(y * self.step_nm, x * self.step_nm) if self.step_nm else None, score_name=name,
                size=len(cluster), bbox=(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1),
                latent=[float(v) for v in latent[:, y, x]] if latent is not None and latent.ndim == 3 else [],
                rotation=float(rot[y, x]) if rot is not None and math.isfinite(rot[y, x]) else None,
                model_step=model_step))
        return out


def clusters(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected clusters of True positions, each an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    ny, nx = mask.shape
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, members = [(int(y), int(x))], []
        while stack:
            cy, cx = stack.pop()
            members.append((cy, cx))
            for ny_ in range(max(cy - 1, 0), min(cy + 2, ny)):
                for nx_ in range(max(cx - 1, 0), min(cx + 2, nx)):
                    if mask[ny_, nx_] and not seen[ny_, nx_]:
                        seen[ny_, nx_] = True
                        stack.append((ny_, nx_))
        out.append(np.array(members))
    return out


class Convergence:
    """Whether the held-out ELBO (a loss: lower is better) has stopped improving; says so once per scan.

    Converged: at least ``patience + 1`` evaluations, and the best of the last ``patience`` is no better
    than the best before them by more than ``rel_tol`` of its magnitude.
    """

    def __init__(self, patience: int = 5, rel_tol: float = 0.002):
        self.patience, self.rel_tol = patience, rel_tol
        self.fired: set[str] = set()

    def check(self, scan_id: str, elbo: np.ndarray, steps: np.ndarray | None) -> ModelConverged | None:
        elbo = np.asarray(elbo, dtype=np.float64)
        elbo = elbo[np.isfinite(elbo)]
        p = self.patience
        if scan_id in self.fired or len(elbo) < p + 1:
            return None
        before, recent = elbo[:-p].min(), elbo[-p:].min()
        if recent < before - self.rel_tol * abs(before):
            return None
        self.fired.add(scan_id)
        step = int(steps[-1]) if steps is not None and len(steps) else 0
        return ModelConverged(scan_id=scan_id, step=step, heldout_elbo=float(min(before, recent)),
                              evaluations=len(elbo))
