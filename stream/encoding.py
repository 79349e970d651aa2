"""The encoder and the scan it works on: attaching scans, and keeping what it made of each.

There is one encoder (the online trainer, or a fixed trained model) and it
works on one scan at a time. The pipeline thread attaches each scan once it
is calibrated; a new scan cuts the previous one's consolidation short, so
what the encoder made of the scan it leaves (maps, export, failure) is kept
on that scan first. The finisher thread waits for the encoder's final maps
of an ended scan and keeps them on the scan the same way. Attaching and
keeping happen under one lock, so a scan's results never mix with the next
scan's.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from rrstem.model.interface import Encoder
from rrstem.stream.scan import Scan

log = logging.getLogger("rrstem.service")


class EncoderSlot:
    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.attached: Scan | None = None  # the scan the encoder works on
        self._lock = threading.Lock()

    def attach_if_ready(self, scan: Scan) -> BaseException | None:
        """Give a calibrated scan to the encoder (pipeline thread); returns the failure of the scan it left, if any."""
        if not scan.ready or scan is self.attached or scan.failure is not None:
            return None
        with self._lock:
            previous, failure = self.attached, None
            if previous is not None and not previous.model_taken:
                failure = self._take(previous)  # a new scan cuts the previous one's consolidation short
            self.attached = scan
            self.encoder.attach(scan)
        return failure

    def finish(self, scan: Scan, deadline: Callable[[], float]) -> BaseException | None:
        """Wait (finisher thread) until the encoder's final maps of ``scan`` are made, it fails, it moves on
        to another scan or ``deadline()`` (monotonic; it may move closer, e.g. on a stop) passes; then keep
        them on the scan. Returns the encoder's failure."""
        enc = self.encoder
        while self.attached is scan:
            if enc.wait_done(0.2) or not enc.is_alive():
                break
            if enc.error is not None and enc.status().get("scan_id") == scan.scan_id:
                break
            if time.monotonic() > deadline():
                log.warning("scan %s: the rrVAE did not finish in time; writing what it has", scan.scan_id)
                break
        with self._lock:
            if self.attached is scan and not scan.model_taken:
                return self._take(scan)
        return None

    def _take(self, scan: Scan) -> BaseException | None:
        """Keep the encoder's maps, export and failure of ``scan`` on the scan (under the lock)."""
        enc = self.encoder
        scan.model_taken = True
        if enc.status().get("scan_id") != scan.scan_id:  # the encoder never took it up
            return None
        maps = enc.maps()
        if maps is not None and maps.scan_id == scan.scan_id:
            scan.model_maps, scan.model_export = maps.arrays, enc.export()
        scan.model_failure = enc.error
        return enc.error

    def model(self, scan: Scan, export: bool = True) -> tuple[dict[str, np.ndarray], dict | None]:
        """The model's maps of ``scan`` and (if ``export``) its export: kept on the scan once the encoder
        left it, else the encoder's newest; ({}, None) if there are none."""
        if scan.model_taken:
            return scan.model_maps or {}, scan.model_export
        if scan is not self.attached:
            return {}, None
        with self._lock:
            maps = self.encoder.maps()
            if maps is None or maps.scan_id != scan.scan_id:
                return {}, None
            return maps.arrays, (self.encoder.export() if export else None)

    def histories(self, scan: Scan) -> dict[str, Any]:
        """The training histories of ``scan``."""
        if scan.model_taken:
            return (scan.model_export or {}).get("training", {})
        return self.encoder.histories() if scan is self.attached else {}

    def reconstruct(self, scan: Scan, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(input, reconstruction) of scan index ``index`` while the encoder works on ``scan`` and has maps of it."""
        if scan is not self.attached or not self.model(scan, export=False)[0]:
            return None
        return self.encoder.reconstruct(index)
