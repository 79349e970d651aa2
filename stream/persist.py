"""Getting every scan into the results file: the path checked up front, failed writes kept and retried.

``results.py`` knows the file's layout and writes it atomically; this module
decides where and when. ``check_results_path`` refuses, at start-up, a path
that cannot be written (no folder, no permission, not a results file, a full
disk), with a message that says what to fix. ``ResultsWriter`` writes scans
there; a write that fails (disk full, permissions changed) is logged and
its results are kept in memory, the maps and the model only, not the frame
store, and retried until a write succeeds, or written wherever ``move_to``
points the writer next.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import h5py

from rrstem.stream.results import FORMAT, ScanResults, write_scan

log = logging.getLogger("rrstem.results")

#: Free space below which the results path is refused at start-up.
MIN_FREE_BYTES = 64 << 20


def check_results_path(path: Path) -> None:
    """Raise ValueError, saying what to fix, unless results can be written to ``path``."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write results to {path}: the folder {folder} does not exist; create it "
                         f"(mkdir -p {folder}) or choose another --out")
    if path.is_dir():
        raise ValueError(f"cannot write results to {path}: it is a folder; give a file name such as {path}/results.h5")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write results to {path}: cannot create files in {folder} ({exc.strerror or exc}); "
                         "choose another --out") from None
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                fmt = f.attrs.get("format")
        except OSError:
            fmt = None
        if fmt != FORMAT:
            raise ValueError(f"cannot write results to {path}: the file exists and is not an rrstem results file; "
                             "choose another --out (rrstem adds scans to its own results files only)")
        if not os.access(path, os.W_OK):
            raise ValueError(f"cannot write results to {path}: the file is not writable; choose another --out")
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ValueError(f"cannot write results to {path}: only {free / 2**20:.0f} MiB free on its disk; free some "
                         "space or choose another --out")


def unfinished_scans(path: Path) -> list[tuple[str, str]]:
    """(scan id, end reason) of the scans in ``path`` that a checkpoint wrote and nothing finished."""
    path = Path(path)
    if not path.is_file():
        return []
    with h5py.File(path, "r") as f:
        return [(name, str(g.attrs.get("end_reason", ""))) for name, g in f.get("scans", {}).items()
                if str(g.attrs.get("end_reason", "")) == "running"]


class ResultsWriter:
    """Writes scans' results to one path; keeps those that could not be written and retries them."""

    def __init__(self, path: Path, retry_seconds: float = 5.0):
        self.path = Path(path)
        self.retry_seconds = retry_seconds
        self._pending: dict[str, ScanResults] = {}  # scan id -> results not yet written
        self._next_retry = 0.0
        self._lock = threading.Lock()

    @property
    def pending(self) -> list[str]:
        """Ids of the scans whose results wait in memory for a write that succeeds."""
        with self._lock:
            return list(self._pending)

    def write(self, results: ScanResults, keep: bool = True) -> Path:
        """Write ``results`` now; if that fails, keep them for ``retry`` (unless not ``keep``) and re-raise."""
        try:
            path = write_scan(self.path, results)
        except Exception:
            if keep:
                with self._lock:
                    self._pending[results.scan_id] = results
                    self._next_retry = time.monotonic() + self.retry_seconds
            raise
        with self._lock:
            if self._pending.get(results.scan_id) is results:
                del self._pending[results.scan_id]
        return path

    def retry(self, force: bool = False) -> list[tuple[str, Path]]:
        """Try the kept results again, if a retry is due (or ``force``); returns those written."""
        with self._lock:
            if not self._pending or (not force and time.monotonic() < self._next_retry):
                return []
            todo = list(self._pending.values())
            self._next_retry = time.monotonic() + self.retry_seconds
        written = []
        for results in todo:
            try:
                path = write_scan(self.path, results)
            except Exception as exc:
                log.warning("scan %s: its results still cannot be written to %s (%s); kept in memory, next try in "
                            "%.0f s", results.scan_id, self.path, exc, self.retry_seconds)
                break
            with self._lock:
                if self._pending.get(results.scan_id) is results:
                    del self._pending[results.scan_id]
            log.info("scan %s: results written to %s on a retry", results.scan_id, path)
            written.append((results.scan_id, path))
        return written

    def move_to(self, path: Path) -> None:
        """Write to ``path`` from now on (checked as at start-up); kept results go there at the next retry."""
        check_results_path(Path(path))
        self.path = Path(path)
        self._next_retry = 0.0
