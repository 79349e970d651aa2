"""The encoder and the scan it works on: attaching scans, and keeping what it made of each.

There is one encoder (the online trainer, or a fixed trained model) and it
works on one scan at a time. The pipeline thread attaches each scan once it
is calibrated; a new scan cuts the previous one's consolidation short, so
what the encoder made of the scan it leaves (maps, export, failure) is kept
here first, by scan. The finisher thread waits for the encoder's final maps
of an ended scan and keeps them the same way. Attaching and
keeping happen under one lock, so a scan's results never mix with the next
scan's.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rrstem.model.interface import ScanEncoder
from rrstem.stream.scan import Scan

log = logging.getLogger("rrstem.service")


@dataclass
class Kept:
    """What the encoder made of a scan it left."""

    maps: dict[str, np.ndarray] = field(default_factory=dict)
    export: dict | None = None
    failure: BaseException | None = None  #: what stopped the rrVAE on this scan, if anything


class ModelView:
    """A scan as the rrVAE reads it (``model.interface.ScanView``): its positions whose frame has counts.

    A frame with no counts (a blanked beam, a dark region of a low-dose scan) is a measured position of the
    scan's maps, but there is nothing in it to learn or encode: the rrVAE skips it, and its maps are NaN there.
    """

    def __init__(self, scan: Scan):
        self._scan = scan
        self.scan_id, self.scan_shape = scan.scan_id, scan.scan_shape

    @property
    def binned_shape(self) -> tuple[int, int]:
        return self._scan.binned_shape

    @property
    def frames(self) -> np.ndarray:
        return self._scan.frames

    @property
    def filled(self) -> np.ndarray:
        return self._scan.counted

    @property
    def ended(self) -> bool:
        return self._scan.ended

    def n_filled(self) -> int:
        return self._scan.n_counted()

    def mean_pattern(self) -> np.ndarray:
        return self._scan.mean_pattern()

    def com_maps(self) -> dict[str, np.ndarray]:
        return self._scan.com_maps()


class EncoderSlot:
    def __init__(self, encoder: ScanEncoder):
        self.encoder = encoder
        self.attached: Scan | None = None  # the scan the encoder works on
        self._kept: weakref.WeakKeyDictionary[Scan, Kept] = weakref.WeakKeyDictionary()  # scans it left
        self._lock = threading.Lock()

    def attach_if_ready(self, scan: Scan) -> BaseException | None:
        """Give a calibrated scan to the encoder (pipeline thread); returns the failure of the scan it left, if any."""
        if not scan.ready or scan is self.attached or scan.failure is not None:
            return None
        with self._lock:
            previous, failure = self.attached, None
            if previous is not None and previous not in self._kept:
                failure = self._take(previous)  # a new scan cuts the previous one's consolidation short
            self.attached = scan
            self.encoder.attach(ModelView(scan))
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
            if self.attached is scan and scan not in self._kept:
                return self._take(scan)
        return None

    def _take(self, scan: Scan) -> BaseException | None:
        """Keep the encoder's maps, export and failure of ``scan`` (under the lock)."""
        enc = self.encoder
        kept = self._kept[scan] = Kept()
        if enc.status().get("scan_id") != scan.scan_id:  # the encoder never took it up
            return None
        maps = enc.maps()
        if maps is not None and maps.scan_id == scan.scan_id:
            kept.maps, kept.export = maps.arrays, enc.export()
        kept.failure = enc.error
        return enc.error

    def failed(self, scan: Scan | None, exc: BaseException, report: Callable) -> None:
        """Report the encoder's failure ``exc`` on ``scan`` (the scan's maps are written without the model)."""
        report(f"rrVAE {type(self.encoder).__name__}", exc, scan.scan_id if scan is not None else None)
        log.error("scan %s: the rrVAE failed (%s: %s); its maps are written without the model",
                  scan.scan_id if scan is not None else "-", type(exc).__name__, exc)

    def failure(self, scan: Scan) -> BaseException | None:
        """What stopped the rrVAE on ``scan``, once the encoder left it."""
        kept = self._kept.get(scan)
        return kept.failure if kept is not None else None

    def model(self, scan: Scan, export: bool = True) -> tuple[dict[str, np.ndarray], dict | None]:
        """The model's maps of ``scan`` and (if ``export``) its export: kept once the encoder left it, else
        the encoder's newest; ({}, None) if there are none."""
        kept = self._kept.get(scan)
        if kept is not None:
            return kept.maps, kept.export
        if scan is not self.attached:
            return {}, None
        with self._lock:
            maps = self.encoder.maps()
            if maps is None or maps.scan_id != scan.scan_id:
                return {}, None
            return maps.arrays, (self.encoder.export() if export else None)

    def histories(self, scan: Scan) -> dict[str, Any]:
        """The training histories of ``scan``."""
        kept = self._kept.get(scan)
        if kept is not None:
            return (kept.export or {}).get("training", {})
        return self.encoder.histories() if scan is self.attached else {}

    def reconstruct(self, scan: Scan, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(input, reconstruction) of scan index ``index`` while the encoder works on ``scan`` and has maps of it."""
        if scan is not self.attached or not self.model(scan, export=False)[0]:
            return None
        return self.encoder.reconstruct(index)
