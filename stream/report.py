"""What the service says about itself: the failure log, snapshots, and the events thread's view of the scan.

``FailureLog`` is the one place a failure is recorded: every thread that
fails, every scan whose processing fails, every refused rescan goes through
``report``, which keeps it (the newest 50), logs nothing more, and publishes
an ``error`` event. ``Reporter`` builds what the publisher thread publishes
(``header``, ``snapshot``, and the keys that say when a new one is due) and
what the events thread scores (``event_view``), from the lifecycle's
current scan, the encoder, the steering requests and the failure log. It
holds no state of its own but the ingest rate.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable

from rrstem.model.interface import ScanEncoder
from rrstem.stream.encoding import EncoderSlot
from rrstem.stream.events import EventPublisher
from rrstem.stream.lifecycle import Lifecycle
from rrstem.stream.publisher import Publisher
from rrstem.stream.scan import Scan
from rrstem.stream.snapshot import MODEL_SPECS, ScanState, Snapshot, SnapshotHeader, history_key
from rrstem.stream.steering import Steering
from rrstem.stream.watch import error_event
from rrstem.stream.workers import Failure, RateMeter, Worker


class FailureLog:
    """Every failure the service survived or died of, oldest first (the newest ``keep``), each published as an
    ``error`` event."""

    def __init__(self, events: EventPublisher, keep: int = 50):
        self.events, self.keep = events, keep
        self.recent: list[Failure] = []
        self.count = 0  # failures ever reported

    def report(self, where: str, exc: BaseException, scan_id: str | None = None) -> None:
        """Record a failure (it shows in snapshots, the dashboard's banner and an ``error`` event)."""
        self.recent.append(Failure(where, exc, scan_id))
        del self.recent[:-self.keep]
        self.count += 1
        self.events.publish(error_event(where, exc, scan_id))


class Reporter:
    """Snapshots and the events thread's view, derived from the service's parts (module docstring)."""

    def __init__(self, lifecycle: Lifecycle, slot: EncoderSlot | None, steering: Steering, failures: FailureLog,
                 threads: list[Worker], publisher: Publisher):
        self.lifecycle, self.slot, self.steering, self.failures = lifecycle, slot, steering, failures
        self.encoder: ScanEncoder | None = slot.encoder if slot is not None else None
        self._threads, self._publisher = threads, publisher  # the service's threads (filled in as it builds them)
        self.rate = RateMeter()  # frames taken per second, over the last seconds (the pipeline adds)

    def dead(self) -> list[Failure]:
        """Failures of threads that ended: the service cannot go on after any of these.

        (The encoder's failures on one scan are not among them: its thread goes on with the next scan, so
        they are reported, in the log, the snapshots and the scan's results. Its thread dying is.)
        """
        out = [Failure(t.name, t.error) for t in self._threads if t.error is not None]
        enc = self.encoder
        if enc is not None and enc.error is not None and not enc.is_alive():
            out.append(Failure(f"rrVAE {type(enc).__name__}", enc.error))
        return out

    def report(self, where: str, exc: BaseException, scan_id: str | None = None) -> None:
        self.failures.report(where, exc, scan_id)

    def last_error(self) -> str | None:
        """What the dashboard's banner shows: a dead thread, else the newest failure that concerns the
        current scan (its own, or the service's since it started), else the encoder's, else the latest
        refused scan. A failure of an earlier scan stays in ``failures`` and its results, not on the banner."""
        cur = self.lifecycle.current
        since = cur.started_at if cur is not None else 0.0
        failed = self.dead() or [f for f in self.failures.recent if (cur is not None and f.scan_id == cur.scan_id)
                                  or (f.scan_id is None and f.time >= since)]
        if failed:
            return str(failed[-1])
        if self.encoder is not None and self.encoder.error is not None:
            return str(Failure(f"rrVAE {type(self.encoder).__name__}", self.encoder.error))
        return self.lifecycle.notice

    def state(self, scan: Scan) -> ScanState:
        """``acquiring``, ``finishing``, ``consolidating`` (the rrVAE's last phase) or ``done``."""
        if not scan.ended:
            return "acquiring"
        if scan.done:
            return "done"
        training = self.encoder.status() if self.encoder is not None else {}
        if training.get("state") == "consolidating" and training.get("scan_id") == scan.scan_id:
            return "consolidating"
        return "finishing"

    def header(self, cur: Scan | None = None) -> SnapshotHeader:
        """The state, counters and training status of ``cur`` (default: the current scan), without the arrays."""
        h = SnapshotHeader(error=self.last_error(), frames_per_s=self.rate.rate(), control=self._publisher.control_endpoint,
                           orphans=dict(self.lifecycle.orphans))
        if self.encoder is not None:
            h.training = self.encoder.status()
        cur = cur or self.lifecycle.current
        if cur is not None:
            for key, value in cur.header_fields().items():
                setattr(h, key, value)
            h.state = self.state(cur)
            specs = {**cur.map_specs(), **(MODEL_SPECS if self.encoder is not None else {})}
            h.maps = [dataclasses.asdict(m) for m in specs.values()]
            h.rescans = self.steering.requests(parent=cur.scan_id)
            sub = self.steering.subscan_of(cur.scan_id)
            h.subscan = sub.model_dump(mode="json") if sub is not None else None
        return h

    def snapshot(self) -> Snapshot:
        """The current maps, counters and training state, as published."""
        cur = self.lifecycle.current  # once: header and arrays describe the same scan
        header = self.header(cur)
        if cur is None:
            return Snapshot(header)
        # float32 is plenty for display and halves what every subscriber receives
        arrays = {k: v.astype("float32") if v.dtype == "float64" else v for k, v in cur.maps().items()}
        header.map_attrs = cur.map_attrs()  # after the maps: the attributes of these maps
        if self.slot is not None:
            arrays.update(self.slot.model(cur, export=False)[0])
            arrays.update({history_key(k): v for k, v in self.slot.histories(cur).items()})
        return Snapshot(header, arrays)

    def snapshot_key(self) -> Hashable:
        """Changes whenever a new snapshot would differ from the last one."""
        cur = self.lifecycle.current
        step = self.encoder.status().get("step") if self.encoder is not None else None
        scan = (id(cur), sum(cur.counters.values()), cur.ended, cur.done) if cur is not None else None
        return scan, step, self.failures.count, sum(self.lifecycle.orphans.values())

    def frame_rate(self) -> float:
        """Frames per second the current scan is taking (0 when none is being acquired)."""
        cur = self.lifecycle.current
        return cur.frame_rate() if cur is not None and not cur.ended else 0.0

    def snapshot_milestone(self) -> Hashable:
        """Changes only at the moments a user waits for: a scan starts, has every position, ends, is done."""
        cur = self.lifecycle.current
        if cur is None:
            return None
        return id(cur), cur.n_filled() == cur.filled.size, cur.ended, cur.done

    def event_view(self):
        """The events thread's view of the current scan: (scan, the model's maps of it, histories)."""
        cur = self.lifecycle.current
        if cur is None or not cur.ready:
            return None
        if self.slot is not None:
            return cur, self.slot.model(cur, export=False)[0], self.slot.histories(cur)
        return cur, {}, {}
