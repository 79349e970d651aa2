"""The thread every encoder runs in: start, close, wait, and a failure kept as the exception itself.

``EncoderThread`` is the part of ``interface.ScanEncoder`` that the trainer and
the fixed encoder share. A subclass implements ``_work()``, the loop that
runs in the thread until ``_stop`` is set; ``_wake`` cuts its waits short and
``_done`` says the attached scan's final maps are made. An exception that
reaches ``_main`` ends the thread: it is logged, kept in ``error`` (with its
traceback, for the caller to re-raise), ``is_alive()`` is False and
``wait_done`` returns False from then on. (The encoders catch a failure on
one scan inside their loops, so that only ends that scan.)
"""

from __future__ import annotations

import logging
import threading
import traceback

import numpy as np

from rrstem.model.interface import ScanView

log = logging.getLogger("rrstem.model")


def describe(error: BaseException | None) -> str | None:
    """``"Type: message"`` of ``error``, as ``status()["error"]`` reports it (None for no error)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def check_scan(scan: ScanView) -> None:
    """Raise TypeError unless ``scan`` is a ``ScanView`` (``ended`` a bool, not an Event)."""
    if not isinstance(scan, ScanView):
        raise TypeError(f"an encoder reads a scan through a ScanView, not a {type(scan).__name__}")
    if not isinstance(scan.ended, (bool, np.bool_)):
        raise TypeError(f"ScanView.ended must be a bool, not {type(scan.ended).__name__}")


class EncoderThread:
    """A daemon thread running ``self._work()``; a context manager (start, then close)."""

    def __init__(self, name: str):
        self.error: BaseException | None = None  #: the thread's failure, with its traceback
        self._name = name
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()  # the thread should end
        self._wake = threading.Event()  # something changed: stop waiting
        self._done = threading.Event()  # the attached scan's final maps are made (or the thread failed)

    def start(self):
        """Start the thread (idempotent); returns self."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the thread; True if it ended within ``timeout``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def is_alive(self) -> bool:
        """The thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wait_done(self, timeout: float) -> bool:
        """True once the attached scan has ended and its final maps are made; False on timeout or failure
        (at once if the thread has ended)."""
        if self._thread is not None and not self._thread.is_alive():
            return False
        return self._done.wait(timeout) and self.error is None

    def _main(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # kept and reported, never lost
            self.error = exc
            log.error("%s failed: %s", self._name, describe(exc), exc_info=exc)
            traceback.clear_frames(exc.__traceback__)  # keep the traceback, not the scans in its frames
            self._done.set()

    def _work(self) -> None:
        raise NotImplementedError
