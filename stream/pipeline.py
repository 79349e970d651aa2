"""The pipeline thread's half of ``Service``: dispatch of decoded items and the scan lifecycle.

The pipeline thread takes each ``Item`` off the receiver's queue and acts on
it: a ``start`` begins a ``Scan`` (ending one that had no end), ``frames``
go to the current scan through the ``AcquisitionMap`` (sync offset and
flyback), an ``end`` ends it and hands it to the finisher; bad input is
counted on its scan, or as an orphan. A failure in one scan's processing ends
that scan, marked failed, and ingest goes on with the next.

``PipelineThread`` holds only methods; ``Service`` (``stream/service.py``)
owns the state they use (``current``, ``orphans``, the queues, the encoder's
slot, ...) and runs ``_pipeline_loop`` in its own thread.
"""

from __future__ import annotations

import logging
import math
import queue
import time
import traceback
from collections import deque

from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.detectors import Item
from rrstem.stream.events import ScanStarted
from rrstem.stream.scan import Scan

log = logging.getLogger("rrstem.service")


class RateMeter:
    """Frames per second over the last ``window`` seconds, from (time, running total) samples."""

    def __init__(self, window: float = 2.0):
        self.window = window
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._total = 0

    def add(self, n: int) -> None:
        self._total += n
        self._samples.append((time.monotonic(), self._total))

    def rate(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._samples) if now - t <= self.window]  # copy: the pipeline appends
        if len(recent) < 2:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / max(now - recent[0][0], 1e-3)

class PipelineThread:
    """The pipeline thread's methods of ``Service`` (which holds the state they use)."""

    def _pipeline_loop(self) -> None:
        while not self.stop_event.is_set():
            if self._stopping.is_set():
                self._wind_down()
                return
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                self._close_if_idle()
                continue
            try:
                self.dispatch(item)
            except Exception as exc:  # a bug or bad data in one scan must not stop ingest of the next
                self._dispatch_failed(item, exc)
                # Keep the exception, not the frames it ran through: their locals hold the scan and
                # its frame store. (This loop's own frame cannot be cleared, and holds nothing old.)
                traceback.clear_frames(exc.__traceback__)

    def _close_if_idle(self) -> None:
        """A scan that has had no message for its idle timeout ends here, incomplete ('idle')."""
        cur = self.current
        if cur is None or cur.ended:
            return
        limit = self.cfg.idle_timeout or cur.idle_timeout()
        idle = time.monotonic() - cur.last_activity
        if idle > limit:
            log.warning("scan %s: no frames for %.1f s (the sender died, or the acquisition was aborted): it ends "
                        "here, incomplete", cur.scan_id, idle)
            try:
                self._end_scan(cur, None, "idle")
            except Exception as exc:
                self.report("pipeline", exc, cur.scan_id)
                self._fail_scan(cur, exc)
                traceback.clear_frames(exc.__traceback__)

    def _wind_down(self) -> None:
        """On a stop: the running scan ends ('stopped'), the encoder makes its final maps now."""
        cur = self.current
        try:
            if cur is not None and not cur.ended:
                log.warning("scan %s: stopped before its end; writing what it has", cur.scan_id)
                self._end_scan(cur, None, "stopped")
        except Exception as exc:
            self.report("pipeline", exc, cur.scan_id)
            self._fail_scan(cur, exc)
            traceback.clear_frames(exc.__traceback__)
        finally:
            if self.encoder is not None:
                self.encoder.finish_now()
            self._pipeline_done.set()

    def dispatch(self, item: Item) -> None:
        """Act on one decoded message (pipeline thread)."""
        cur = self.current
        if cur is not None and item.scan_id == cur.scan_id:
            cur.touch()
        if item.kind == "start":
            self._start_scan(item.message)
        elif item.kind == "frames":
            self._frames(item, cur)
        elif item.kind == "end":
            self._end(item, cur)
        elif cur is not None and item.scan_id == cur.scan_id and not cur.ended and item.count:
            cur.invalid(item.reason, item.count, item.detail)
        else:
            self.orphans[item.reason] += max(item.count, 1)
            log.warning("rejected message (%s): %s", item.reason, item.detail)

    def _dispatch_failed(self, item: Item, exc: Exception) -> None:
        """``dispatch`` raised: the scan the message belongs to ends, marked failed; the service goes on."""
        log.error("pipeline error on a %s message of scan %s", item.kind, item.scan_id, exc_info=exc)
        self.report("pipeline", exc, item.scan_id)
        scan = self.current if self.current is not None and self.current.scan_id == item.scan_id else None
        if scan is None or scan.ended or scan.failure is not None:
            self.orphans["pipeline_error"] += 1
            return
        self._fail_scan(scan, exc)

    def _fail_scan(self, scan: Scan, exc: BaseException) -> None:
        scan.fail(exc)
        self._refused[scan.scan_id] = "failed_scan"
        self._finish_q.put(scan)

    def _start_scan(self, start) -> None:
        cur = self.current
        if self.cfg.scan_shape is not None and tuple(start.scan_shape) != self.cfg.scan_shape:
            log.info("scan %s: scan shape %s overridden to %s", start.scan_id, start.scan_shape, self.cfg.scan_shape)
            start = start.model_copy(update={"scan_shape": self.cfg.scan_shape})
        if cur is not None and not cur.ended:
            log.warning("scan %s had no end message; it ends at the start of scan %s", cur.scan_id, start.scan_id)
            try:
                self._end_scan(cur, None, "superseded")
            except Exception as exc:  # the old scan fails; the new one starts all the same
                log.error("scan %s could not be closed", cur.scan_id, exc_info=exc)
                self.report("pipeline", exc, cur.scan_id)
                self._fail_scan(cur, exc)
                traceback.clear_frames(exc.__traceback__)
        try:
            scan = Scan(start, self.cfg.preprocess, lossy=self.cfg.mode == "sub")
        except ValueError as exc:  # the scan cannot be taken; its frames are counted, not processed
            self._refused[start.scan_id] = "rejected_scan"
            self.orphans["rejected_start"] += 1
            self.notice = f"scan {start.scan_id} rejected: {exc}"
            log.error("scan %s rejected: %s", start.scan_id, exc)
            return
        if start.scan_id in self._seen_ids:
            log.warning("scan id %s seen before: its results will be replaced", start.scan_id)
        self._seen_ids.add(start.scan_id)
        self._refused.pop(start.scan_id, None)
        self.current, self.notice = scan, None
        self.events.publish(ScanStarted(scan_id=start.scan_id, scan_shape=start.scan_shape, frame_shape=start.frame_shape,
                                        calibration=start.calibration.model_dump(exclude_none=True),
                                        subscan=self.steering.scan_started(start)))
        self._next_checkpoint = time.monotonic() + self.cfg.checkpoint_seconds if self.cfg.checkpoint_seconds else math.inf
        log.info("scan %s started: %s positions of %s %s", start.scan_id, start.scan_shape, start.frame_shape,
                 start.dtype)

    def _frames(self, item: Item, cur: Scan | None) -> None:
        n = item.message.count
        if cur is None or item.scan_id != cur.scan_id or cur.ended:
            if item.scan_id in self._refused:
                self.orphans[self._refused[item.scan_id]] += n  # the refusal was logged once, at its start
            elif cur is not None and not cur.ended and item.scan_id in self._seen_ids:
                cur.stale(n, item.scan_id)
            elif item.scan_id not in self._seen_ids:  # e.g. a subscriber that joined after the start was sent
                self.orphans["no_start"] += n
                if self._no_start_logged != item.scan_id:  # once per scan, not per message
                    self._no_start_logged = item.scan_id
                    log.warning("frames of scan %s arrive without its start message; they are counted (no_start) "
                                "and dropped until a scan starts (did the service join a stream mid-scan?)",
                                item.scan_id)
            else:
                self.orphans["stale"] += n
                log.warning("%d frame(s) of scan %s arrived after it ended", n, item.scan_id)
            return
        runs, discarded = AcquisitionMap(cur.scan_shape, self.cfg.sync_offset, self.cfg.flyback).place(
            item.message.first, item.frames)  # acquisition indices -> scan positions (identity by default)
        for reason, count in discarded.items():
            cur.invalid(reason, count, f"{count} frame(s) discarded ({reason.replace('_', ' ')})")
        for first, frames in runs:
            self._rate.add(cur.add(first, frames))
        self._attach_if_ready(cur)

    def _attach_if_ready(self, scan: Scan) -> None:
        left = self._slot.attached if self._slot is not None else None
        failure = self._slot.attach_if_ready(scan) if self._slot is not None else None
        if failure is not None:
            self._model_failed(left, failure)

    def _model_failed(self, scan: Scan, exc: BaseException) -> None:
        self.report(f"rrVAE {type(self.encoder).__name__}", exc, scan.scan_id)
        log.error("scan %s: the rrVAE failed (%s: %s); its maps are written without the model", scan.scan_id,
                  type(exc).__name__, exc)

    def _end(self, item: Item, cur: Scan | None) -> None:
        if cur is not None and item.scan_id == cur.scan_id and not cur.ended:
            self._end_scan(cur, item.message.frames_sent, "end")
        else:
            reason = "end_repeated" if item.scan_id in self._seen_ids else "end_without_start"
            self.orphans[reason] += 1
            log.warning("%s for scan %s ignored", reason.replace("_", " "), item.scan_id)

    def _end_scan(self, scan: Scan, frames_sent: int | None, reason: str) -> None:
        scan.finish(frames_sent, reason)  # a scan with fewer frames than calibration needs calibrates here
        log.info("scan %s ended (%s): %s", scan.scan_id, reason,
                 ", ".join(f"{k} {v}" for k, v in scan.counter_dict().items()))
        try:
            self._attach_if_ready(scan)
        finally:
            self._finish_q.put(scan)  # an ended scan always reaches the results file

