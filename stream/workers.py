"""Worker threads that keep the exception that ended them, the record of a failure, and two meters of time:
``Budget`` (a whole-scan computation kept to a share of a core) and ``RateMeter`` (frames per second)."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("rrstem.service")


@dataclass
class Failure:
    """Something that failed: where, the original exception (with its traceback), and the scan it hit."""

    where: str
    error: BaseException
    scan_id: str | None = None
    time: float = field(default_factory=time.time)  #: Unix time it was recorded

    def __str__(self) -> str:
        on = f" on scan {self.scan_id}" if self.scan_id else ""
        return f"{self.where} failed{on}: {type(self.error).__name__}: {self.error}"


#: what a worker calls with its name and the exception that ended it
FailureHandler = Callable[[str, BaseException], None]


def ignore_failure(name: str, exc: BaseException) -> None:
    """A worker's default ``on_failure``: the exception stays in its ``error`` (and the log) only."""


class Worker(threading.Thread):
    """A daemon thread that stores the exception that ended it and hands it to ``on_failure``.

    Every thread of the service is one (receivers included), so a thread that dies is reported one way."""

    def __init__(self, name: str, target: Callable[..., None], on_failure: FailureHandler = ignore_failure,
                 args: tuple = ()):
        super().__init__(name=name, daemon=True)
        self._body, self._body_args, self._on_failure = target, args, on_failure
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._body(*self._body_args)
        except BaseException as exc:
            self.error = exc
            log.exception("%s failed", self.name)
            traceback.clear_frames(exc.__traceback__)  # the frames' locals (scans, stores) go; the traceback stays
            self._on_failure(self.name, exc)
        finally:
            del self._body, self._body_args, self._on_failure  # no reference to the service once ended


class Budget:
    """Keeps a repeated whole-scan computation (maps, scores, snapshots) to a ``share`` of one core.

    Such work grows with the scan, not with the batch: a snapshot of a large
    scan derives every map of it. After a run that took ``t`` seconds the
    next one is due ``t / share`` after that run started, and never sooner
    than ``floor`` seconds, so the work costs at most ``share`` of a core
    whatever the scan's size and the ingest rate. By default ``t`` is wall
    time: under load a run takes longer and the pause grows with it, so the
    work backs off further. With ``cpu`` it is the CPU time of the thread
    that ran it (``time.thread_time``): the share is then exactly the CPU
    the work takes from the rest, and time spent waiting for a core or for
    the GIL, which costs the other threads nothing, does not lengthen the
    pause. While frames arrive faster than ``fast_fps`` (the ``rate`` a run
    is told) the share is ``fast_share``: then ingest needs every cycle and
    the scan is over within seconds.
    """

    def __init__(self, share: float = 0.1, floor: float = 0.0, fast_share: float | None = None,
                 fast_fps: float = 5000.0, cpu: bool = False):
        fast_share = share if fast_share is None else fast_share
        for value in (share, fast_share):
            if not 0 < value <= 1:
                raise ValueError(f"a budget's share of a core is in (0, 1], not {value}")
        self.share, self.floor, self.fast_share, self.fast_fps = share, floor, fast_share, fast_fps
        self._clock = time.thread_time if cpu else time.monotonic
        self.next = 0.0  # time.monotonic() when the next run is due
        self.last_seconds = 0.0  # what the last run took

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.next

    def spent(self, started: float, seconds: float, rate: float = 0.0) -> None:
        """A run that began at ``started`` (monotonic) took ``seconds`` while frames arrived at ``rate`` per
        second: set when the next one is due."""
        self.last_seconds = seconds
        share = self.fast_share if rate > self.fast_fps else self.share
        self.next = started + max(self.floor, seconds / share)

    def run(self, fn: Callable, *args, rate: float = 0.0):
        """``fn(*args)``, timed (wall or thread CPU time, see the class): its cost (and ``rate``, see ``spent``)
        decides when the next run is due.
        Returns what ``fn`` returned."""
        t0, c0 = time.monotonic(), self._clock()
        try:
            return fn(*args)
        finally:
            self.spent(t0, self._clock() - c0, rate)


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


class RateLimitedLog:
    """At most one log line per reason per ``period`` seconds, so bad input cannot flood the log: the first
    occurrence of a reason is logged at once, later ones when ``period`` has passed since that reason's last
    line, saying how many of that reason there have been and how many went unlogged."""

    def __init__(self, logger: logging.Logger, period: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._log, self._period, self._clock = logger, period, clock
        self._seen: Counter[str] = Counter()  # occurrences, by reason
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (time of its last line, occurrences then)

    def warning(self, reason: str, msg: str, *args) -> None:
        self.log(logging.WARNING, reason, msg, *args)

    def log(self, level: int, reason: str, msg: str, *args) -> None:
        self._seen[reason] += 1
        k, now = self._seen[reason], self._clock()
        last = self._logged.get(reason)
        if last is not None and now - last[0] < self._period:
            return
        skipped = k - 1 - (last[1] if last is not None else 0)
        suffix = f" [{reason} #{k}; {skipped} more not logged]" if skipped else (f" [{reason} #{k}]" if k > 1 else "")
        self._logged[reason] = (now, k)
        self._log.log(level, msg + suffix, *args)
