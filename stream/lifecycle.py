"""The scan lifecycle: which scan is current, and everything that decides how a scan starts and ends.

``Lifecycle`` is synchronous and owns no thread. The pipeline thread calls
``dispatch(item)`` for each decoded message and ``tick(now)`` while none
arrive; a stop calls ``stop``. It decides:

- **start**: a ``start`` begins a ``Scan``; a start the scan cannot take
  (too large, a bad shape) is refused, and that scan's frames are counted
  ``rejected_scan``. A start while a scan runs ends that one first
  (``superseded``).
- **frames** go to the current scan, through the ``AcquisitionMap`` (sync
  offset, flyback). Frames of a scan that is not current are counted: its
  refusal's reason, ``stale`` (an earlier scan, counted on the current one),
  ``no_start`` (a scan never started) or ``stale`` as an orphan.
- **end**: the sender's ``end`` (``end``; a detector's decoder sends one at
  the announced frame count), no message for the idle timeout (``idle``),
  a stop (``stopped``), a newer start (``superseded``), or a failure while
  processing it (``failed``). An ended scan goes to ``on_end`` exactly once.

Bad input that belongs to no scan is counted in ``orphans`` by reason. What
happens around a scan (events, the encoder, the results file) is the
caller's, through the ``on_*`` callbacks.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from typing import Callable

from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.config import ServiceConfig
from rrstem.stream.detectors import Item
from rrstem.stream.dpc.live import DPCSession
from rrstem.stream.protocol import Start
from rrstem.stream.scan import Scan
from rrstem.stream.snapshot import EndReason
from rrstem.stream.workers import RateLimitedLog

log = logging.getLogger("rrstem.service")

#: A gap this long between two runs of the lifecycle (it ticks every 0.1 s while idle) means the process
#: did not run: that time does not count towards a scan's idle timeout.
STALL_SECONDS = 1.0


def _noop(*_) -> None:
    return None


class Lifecycle:
    """Owns the current scan and decides every start and end (module docstring)."""

    def __init__(self, cfg: ServiceConfig, on_start: Callable[[Scan], None] = _noop,
                 on_frames: Callable[[Scan, int], None] = _noop, on_end: Callable[[Scan], None] = _noop,
                 on_failure: Callable[[str, BaseException, str | None], None] = _noop,
                 on_refused: Callable[[str], None] = _noop):
        self.cfg = cfg
        #: what the reductions keep between this service's scans (``ScanInfo.session``): the DPC calibration
        self.session = {"dpc": DPCSession.open(**cfg.dpc.model_dump())}
        self.on_start, self.on_frames, self.on_end, self.on_failure = on_start, on_frames, on_end, on_failure
        self.on_refused = on_refused  # a start was refused (its reason): a one-scan service stops there
        self.current: Scan | None = None  # the newest scan (kept, ended, until the next start)
        self.orphans: Counter[str] = Counter()  # bad input that belongs to no scan, by reason
        self.notice: str | None = None  # the latest refused start, until the next scan starts
        self._seen: dict[str, int] = {}  # every scan id started, and how many scans came with it
        self._refused: dict[str, str] = {}  # scan id -> orphan reason for its frames (rejected or failed scans)
        self._no_start_logged: str | None = None  # the scan whose frames without a start were logged last
        self._awake = time.monotonic()  # when this lifecycle last ran (dispatch or tick): see ``tick``
        self._log = RateLimitedLog(log)  # per-message warnings: at most one line per reason per second

    def detach(self) -> None:
        """Drop the callbacks (the service closes): they refer to parts that refer back to this lifecycle,
        and a cycle would keep the current scan, frame store and all, until the garbage collector ran."""
        self.on_start = self.on_frames = self.on_end = self.on_failure = self.on_refused = _noop

    # --- what drives it ---------------------------------------------------------------------

    def dispatch(self, item: Item) -> None:
        """Act on one decoded message. A failure ends the scan it concerns, marked failed; it never raises."""
        self._awake = time.monotonic()
        try:
            self._dispatch(item)
        except Exception as exc:  # a bug or bad data in one scan must not stop ingest of the next
            log.error("pipeline error on a %s message of scan %s", item.kind, item.scan_id, exc_info=exc)
            self.on_failure("pipeline", exc, item.scan_id)
            cur = self.current
            if cur is None or cur.scan_id != item.scan_id or cur.ended or cur.failure is not None:
                self._orphan("pipeline_error")
            else:
                self._fail(cur, exc)
            # Keep the exception, not the frames it ran through: their locals hold the scan and its store.
            # (This frame is still running: its own locals go by name.)
            traceback.clear_frames(exc.__traceback__)
            del cur, item

    def tick(self, now: float | None = None) -> None:
        """A scan that has had no message for its idle timeout ends here, incomplete (``idle``).

        Only time in which frames could have arrived counts: the caller ticks only when its queue is
        empty, and a gap of more than ``STALL_SECONDS`` since this lifecycle last ran (the process was
        stopped, swapped out or starved: nothing was read, whatever the sender did) is not idle time.
        """
        now = time.monotonic() if now is None else now
        stalled, self._awake = now - self._awake, now
        cur = self.current
        if cur is None or cur.ended:
            return
        if stalled > STALL_SECONDS:
            log.warning("the service did not run for %.1f s; scan %s's idle clock does not count that time",
                        stalled, cur.scan_id)
            cur.not_idle(stalled)
            return
        limit = self.cfg.idle_timeout or cur.idle_timeout()
        idle = now - cur.last_activity
        if idle > limit:
            log.warning("scan %s: no frames for %.1f s (the sender died, or the acquisition was aborted): it ends "
                        "here, incomplete", cur.scan_id, idle)
            self._end_safely(cur, "idle")

    def stop(self, failure: BaseException | None = None) -> None:
        """End the running scan: ``stopped``, or ``failed`` with ``failure`` (a part of the service died)."""
        cur = self.current
        if cur is None or cur.ended:
            return
        if failure is not None:
            log.error("scan %s: ends here, failed (%s: %s); writing what it has", cur.scan_id,
                      type(failure).__name__, failure)
            self._fail(cur, failure)
        else:
            log.warning("scan %s: stopped before its end; writing what it has", cur.scan_id)
            self._end_safely(cur, "stopped")

    # --- the messages -----------------------------------------------------------------------

    def _dispatch(self, item: Item) -> None:
        cur = self.current
        if cur is not None and item.scan_id == cur.scan_id:
            cur.touch()
        if item.kind == "start":
            self._start(item.message)
        elif item.kind == "frames":
            self._frames(item, cur)
        elif item.kind == "end":
            if cur is not None and item.scan_id == cur.scan_id and not cur.ended:
                self._end(cur, item.message.frames_sent, "end")
            else:
                reason = "end_repeated" if item.scan_id in self._seen else "end_without_start"
                self._orphan(reason)
                self._log.warning(reason, "%s for scan %s ignored", reason.replace("_", " "), item.scan_id)
        elif cur is not None and item.scan_id == cur.scan_id and not cur.ended and item.count:
            cur.invalid(item.reason, item.count, item.detail)
        else:
            self._orphan(item.reason, max(item.count, 1))
            self._log.warning(item.reason, "rejected message (%s): %s", item.reason, item.detail)

    def _start(self, start: Start) -> None:
        cur = self.current
        if self.cfg.scan_shape is not None and tuple(start.scan_shape) != self.cfg.scan_shape:
            log.info("scan %s: scan shape %s overridden to %s", start.scan_id, start.scan_shape, self.cfg.scan_shape)
            start = start.model_copy(update={"scan_shape": self.cfg.scan_shape})
        if cur is not None and not cur.ended and start.scan_id == cur.scan_id and start == cur.start:
            self._orphan("start_repeated")  # the same start again (a sender's retry): the scan goes on
            self._log.warning("start_repeated", "scan %s: its start message came again; the scan goes on with "
                              "every frame it has", start.scan_id)
            return
        if cur is not None and not cur.ended:
            log.warning("scan %s had no end message; it ends at the start of scan %s", cur.scan_id, start.scan_id)
            self._end_safely(cur, "superseded")  # should it fail, the old scan fails; the new one starts all the same
        seen = self._seen.get(start.scan_id, 0)
        name = f"{start.scan_id}.{seen + 1}" if seen else None  # a scan id seen before: stored beside, not over
        try:
            scan = Scan(start, self.cfg.preprocess, lossy=self.cfg.mode == "sub", results_name=name,
                        session=self.session)
        except ValueError as exc:  # the scan cannot be taken; its frames are counted, not processed
            self._refused[start.scan_id] = "rejected_scan"
            self._orphan("rejected_start")
            self.notice = f"scan {start.scan_id} rejected: {exc}"
            log.error("scan %s rejected: %s", start.scan_id, exc)
            self.on_refused(self.notice)
            return
        if seen:
            log.warning("scan id %s seen before: this scan's results go to scans/%s, beside the earlier one's",
                        start.scan_id, name)
        self._seen[start.scan_id] = seen + 1
        self._refused.pop(start.scan_id, None)
        self.current, self.notice = scan, None
        if cur is not None and cur.done:
            cur.release_frames()  # before this scan's store is made: it takes the same memory
        log.info("scan %s started: %s positions of %s %s", start.scan_id, start.scan_shape, start.frame_shape,
                 start.dtype)
        self.on_start(scan)

    def _frames(self, item: Item, cur: Scan | None) -> None:
        n = item.message.count
        if cur is None or item.scan_id != cur.scan_id or cur.ended:
            if item.scan_id in self._refused:
                self._orphan(self._refused[item.scan_id], n)  # the refusal was logged once, at its start
            elif cur is not None and not cur.ended and item.scan_id in self._seen:
                cur.stale(n, item.scan_id)
            elif item.scan_id not in self._seen:  # e.g. a subscriber that joined after the start was sent
                self._orphan("no_start", n)
                if self._no_start_logged != item.scan_id:  # once per scan, not per message
                    self._no_start_logged = item.scan_id
                    log.warning("frames of scan %s arrive without its start message; they are counted (no_start) "
                                "and dropped until a scan starts (did the service join a stream mid-scan?)",
                                item.scan_id)
            else:
                self._orphan("stale", n)
                self._log.warning("stale", "%d frame(s) of scan %s arrived after it ended", n, item.scan_id)
            return
        runs, discarded = AcquisitionMap(cur.scan_shape, self.cfg.sync_offset, self.cfg.flyback).place(
            item.message.first, item.frames)  # acquisition indices -> scan positions (identity by default)
        for reason, count in discarded.items():
            cur.invalid(reason, count, f"{count} frame(s) discarded ({reason.replace('_', ' ')})")
        taken = 0
        for first, frames in runs:  # a loop, not a generator: its closure would keep the scan of a failure
            taken += cur.add(first, frames)
        self.on_frames(cur, taken)

    def _orphan(self, reason: str, count: int = 1) -> None:
        """Input that belongs to no scan: counted here, and on the current scan (its results keep it)."""
        self.orphans[reason] += count
        if self.current is not None:
            self.current.orphaned(reason, count)

    # --- ends -------------------------------------------------------------------------------

    def _end(self, scan: Scan, frames_sent: int | None, reason: EndReason) -> None:
        scan.finish(frames_sent, reason)  # a scan with fewer frames than calibration needs calibrates here
        log.info("scan %s ended (%s): %s", scan.scan_id, reason,
                 ", ".join(f"{k} {v}" for k, v in scan.counter_dict().items()))
        self.on_end(scan)

    def _end_safely(self, scan: Scan, reason: EndReason) -> None:
        try:
            self._end(scan, None, reason)
        except Exception as exc:
            log.error("scan %s could not be closed", scan.scan_id, exc_info=exc)
            self.on_failure("pipeline", exc, scan.scan_id)
            if not scan.ended or scan.failure is None:
                self._fail(scan, exc)
            traceback.clear_frames(exc.__traceback__)
            del scan  # this frame is in the traceback too

    def _fail(self, scan: Scan, exc: BaseException) -> None:
        already = scan.ended
        scan.fail(exc)
        self._refused[scan.scan_id] = "failed_scan"
        if not already:
            self.on_end(scan)
