"""Worker threads that keep the exception that ended them, and the record of a failure."""

from __future__ import annotations

import logging
import threading
import time
import traceback
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


class Worker(threading.Thread):
    """A daemon thread that stores the exception that ended it and hands it to ``on_failure``."""

    def __init__(self, name: str, target: Callable[..., None], on_failure: Callable[[str, BaseException], None],
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
