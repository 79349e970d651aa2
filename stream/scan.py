"""One scan: its start, counters, calibration, reductions, frame store and the one filled mask.

A ``Scan`` owns everything about one scan, and everything published or
written about it is derived from what it owns: ``maps()`` from the merged
sums and the ``filled`` mask; ``results.scan_results`` from the same, plus
counters and geometry. It is also the read-only view the rrVAE trains on
(``model.interface.ScanView``).

Threads: only the pipeline thread calls ``add``, ``invalid``, ``stale``,
``finish`` and ``fail``. Any thread may call the readers (``maps``,
``results``, ``frame``, ...), also while the pipeline writes; they take the
lock only to copy the sums, and read the counters as they are. The frame store is read without a lock: a row is written before its
``filled`` flag is set, and never changes afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from rrstem.stream.badpixels import known_reasons, load_mask
from rrstem.stream.defects import DEFECT_SPECS, DefectMap
from rrstem.stream.framepass import FramePass, accumulator
from rrstem.stream.preprocess import Geometry, PreprocessConfig, calibrate
from rrstem.stream.protocol import Start
from rrstem.stream.reductions import MapSpec, Partial, ScanInfo, bytes_per_position, registered
from rrstem.stream.snapshot import COUNTERS, FILLED_MAP, Arrays, EndReason
from rrstem.stream.store import FrameStore, check_memory, narrow_dtype, store_dtype
from rrstem.stream.workers import RateLimitedLog

log = logging.getLogger("rrstem.scan")

#: Frames per call of the fused pass (the pass runs outside the scan's lock and without the GIL).
_PASS_FRAMES = 4096


class Scan:
    """One scan in the service; implements ``model.interface.ScanView``."""

    def __init__(self, start: Start, cfg: PreprocessConfig, lossy: bool = False, results_name: str | None = None,
                 session: dict | None = None):
        self._reductions = registered()  # the reductions this scan runs, fixed at its start
        self._session = session or {}  # what the service keeps for the reductions between scans (ScanInfo.session)
        check_memory(start, cfg, per_position=bytes_per_position(self._reductions))
        self.start = start
        self.cfg = cfg
        #: (h, w) uint8 reasons of the pixels known bad before any frame: the user's mask, the detector's
        self.known_bad = self.check_mask(start, cfg)
        self.lossy = lossy  # SUB mode: positions that never arrived were dropped, not missing
        self.scan_id = start.scan_id
        #: its group in the results file: the scan id, or ``<id>.<n>`` for the n-th scan that came with an id
        #: seen before, so no scan's results replace another's
        self.results_name = results_name or start.scan_id
        self.scan_shape = tuple(start.scan_shape)
        n = start.n_positions
        self.counters: Counter[str] = Counter({k: 0 for k in COUNTERS})
        self.reasons: Counter[str] = Counter()  # invalid frames by reason
        self._filled = np.zeros(n, dtype=bool)  # THE mask: a valid frame for this position is in the store
        self._n_filled = 0
        self._counted = np.zeros(n, dtype=bool)  # filled with a frame that has counts (the rrVAE's positions)
        self._n_counted = 0
        self.zero_counts = 0  # valid frames with no counts (a blanked beam, a dark region): filled, no COM
        self.orphans: Counter[str] = Counter()  # input that belonged to no scan while this one was current
        self.frames_sent: int | None = None
        self.unaccounted: int | None = None  # frames_sent minus the frames of this scan that arrived, once ended
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.end_reason: EndReason | None = None  # ``snapshot.END_REASONS``
        self.failure: BaseException | None = None  # what stopped this scan's processing, if anything
        self.results_path: Path | None = None  # where the results went, once written (``written``)
        self.done = False  # results made (and written, if the service writes results): ``done_with``
        self.first_frame_at: float | None = None  # perf_counter of the first and last frames taken
        self.last_frame_at: float | None = None
        self.latest_index: int | None = None  # scan index of the newest frame taken
        self.last_activity = time.monotonic()  # the newest message of this scan (idle timeout)
        self._gap: float | None = None  # running mean of the time between its messages, s
        self.geometry: Geometry | None = None
        self._pass: FramePass | None = None
        self._partial: Partial | None = None  # their merged buffers (stream/reductions/), made at calibration
        self._store: FrameStore | None = None
        self._retired: list[FrameStore] = []  # a narrow store after a move to a wider one (``_widen``)
        self._ready = False  # geometry fixed, store and reductions exist (set last)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # frames before calibration
        self._pending_positions: set[int] = set()  # their distinct positions (at most calibration_frames)
        self._highest = -1
        self._defects = DefectMap()  # the defect map of the VADF map (stream/defects.py), redone as rows complete
        self._lock = threading.Lock()
        self.log = RateLimitedLog(log)

    @staticmethod
    def check_mask(start: Start, cfg: PreprocessConfig) -> np.ndarray:
        """The (h, w) uint8 reasons of the pixels known bad before any frame (``cfg.mask_file``, the start's
        ``bad_pixels``); a ValueError that says what to fix where the mask does not fit the frames."""
        given = load_mask(cfg.mask_file) if cfg.mask_file else None
        return known_reasons(start.frame_shape, given, start.bad_pixels)

    # --- state --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Calibrated: geometry, reductions and frame store exist."""
        return self._ready

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def complete(self) -> bool:
        """Ended, with a valid frame at every position (``missing`` is 0): exactly then."""
        return self.ended and self.counters["missing"] == 0

    def touch(self) -> None:
        """A message of this scan arrived (pipeline thread)."""
        now = time.monotonic()
        gap = now - self.last_activity
        self._gap = gap if self._gap is None else 0.9 * self._gap + 0.1 * gap
        self.last_activity = now

    def not_idle(self, seconds: float) -> None:
        """``seconds`` in which the service did not run do not count towards this scan's idle time."""
        self.last_activity += seconds

    def idle_timeout(self) -> float:
        """How long this scan may go without a message before it is closed as idle: 30 times the
        usual gap between its messages, within 5 s .. 300 s; 60 s before its first frames."""
        if self._gap is None or self.first_frame_at is None:
            return 60.0
        return min(300.0, max(5.0, 30.0 * self._gap))

    def counter_dict(self) -> dict[str, int]:
        """Counters so far; ``missing`` is known only once the scan has ended."""
        return {k: int(self.counters[k]) for k in COUNTERS}

    # --- ingest (pipeline thread) -------------------------------------------------------

    def add(self, first: int, frames: np.ndarray) -> int:
        """Validate and take ``frames`` (n, h, w) for scan indices first .. first + n - 1; returns how many were taken."""
        if self.first_frame_at is None:
            self.first_frame_at = time.perf_counter()
        before = self.counters["received"]
        n_pos = self.start.n_positions
        idx = np.arange(first, first + len(frames))
        inside = idx < n_pos
        if not inside.all():
            bad = idx[~inside]
            self.invalid("out_of_range", len(bad), f"indices {bad[0]}..{bad[-1]} outside the {n_pos}-position scan")
            idx, frames = idx[inside], frames[inside]
        if self.lossy and len(idx) and idx[0] > self._highest + 1:
            gap = int(idx[0] - self._highest - 1)
            self.counters["dropped"] += gap
            self.log.warning("gap", "scan %s: %d frame(s) dropped before index %d", self.scan_id, gap, idx[0])
        if not len(idx):
            return 0
        self._highest = max(self._highest, int(idx[-1]))
        if self._pass is None:
            self._pending.append((idx, np.array(frames)))  # copy: the socket buffer is released after this
            self._pending_positions.update(idx.tolist())
            if len(self._pending_positions) >= min(self.cfg.calibration_frames, n_pos):
                self._calibrate()
        else:
            self._take(idx, frames)
        return self.counters["received"] - before

    def invalid(self, reason: str, count: int, detail: str) -> None:
        self.counters["invalid"] += count
        self.reasons[reason] += count
        self.log.warning(reason, "scan %s: %d invalid frame(s): %s", self.scan_id, count, detail)

    def stale(self, count: int, other: str) -> None:
        """``count`` frames of an earlier scan ``other`` arrived during this one."""
        self.counters["stale"] += count
        self.log.warning("stale", "scan %s: %d stale frame(s) of earlier scan %s", self.scan_id, count, other)

    def _calibrate(self) -> None:
        pending, self._pending = self._pending, []
        self._pending_positions = set()
        raw = np.concatenate([f for _, f in pending])
        if raw.dtype.kind == "f":
            finite = np.isfinite(raw.reshape(len(raw), -1).sum(axis=1))
            raw = np.nan_to_num(raw[finite] if finite.any() else raw, nan=0.0, posinf=0.0, neginf=0.0)
        g = calibrate(raw, self.cfg, self.known_bad)
        cal = self.start.calibration
        pixel_mrad = cal.detector_pixel_mrad * g.bin if cal.detector_pixel_mrad else None
        with self._lock:
            self.geometry = g
            raw = np.dtype(self.start.dtype)
            info = ScanInfo(self.scan_shape, g, pixel_mrad, cal.scan_step_nm, session=self._session)
            self._partial = Partial(info, self._reductions,
                                    accumulator(raw, g.bin, g.binned_shape), filled=self._filled)
            self._store = FrameStore(self.start.n_positions, g.binned_shape, narrow_dtype(raw, g.bin))
            self._pass = self._frame_pass(self._store)
        log.info("scan %s: disc at (%.1f, %.1f) r=%.1f binned px, binned %s, %d masked pixel(s)",
                 self.scan_id, *g.center, g.radius, g.binned_shape, len(g.masked))
        self._ready = True
        for idx, frames in pending:  # in arrival order, so a repeat among them counts as a duplicate
            self._take(idx, frames)

    def _take(self, idx: np.ndarray, frames: np.ndarray) -> None:
        dup = self._filled[idx]
        if dup.any():
            self.counters["duplicate"] += int(dup.sum())
            self.log.warning("duplicate", "scan %s: %d duplicate frame(s), first index %d",
                             self.scan_id, int(dup.sum()), idx[dup][0])
            idx, frames = idx[~dup], frames[~dup]
        for lo in range(0, len(idx), _PASS_FRAMES):
            self._take_batch(idx[lo:lo + _PASS_FRAMES], frames[lo:lo + _PASS_FRAMES])

    def _take_batch(self, idx: np.ndarray, raw: np.ndarray) -> None:
        # One pass: bin, mask and copy into the store rows, the per-frame sums and the sum of the valid frames.
        # Rows of invalid frames are written but never flagged in ``filled``.
        products, total, over = self._pass(idx, raw)
        if over is not None:  # frame idx[over] has a binned count the narrow store cannot hold
            self._accept(idx[:over], products, total)
            self._widen(int(idx[over]))
            idx, raw = idx[over:], raw[over:]
            products, total, over = self._pass(idx, raw)
            assert over is None, "the wide store holds any binned sum"
        self._accept(idx, products, total)

    def _widen(self, index: int) -> None:
        """Move the store to ``store_dtype``, which holds any binned sum, before frame ``index`` is stored.

        The filled rows are copied; the narrow store is kept until the scan is gone, for a reader that took
        ``frames`` before the move (it only reads rows flagged before it, which the narrow store holds).
        """
        old, g = self._store, self.geometry
        dtype = store_dtype(self.start.dtype, g.bin)
        t0 = time.perf_counter()
        new = FrameStore(self.start.n_positions, g.binned_shape, dtype)
        rows = np.flatnonzero(self._filled)
        new.frames[rows] = old.frames[rows]
        with self._lock:
            self._retired.append(old)
            self._store = new
            self._pass = self._frame_pass(new)
        log.warning("scan %s: frame %d has a binned count above %d, the most %s holds; the frames are stored as "
                    "%s from here on (%d stored frame(s) copied in %.2f s, %.1f GiB more)", self.scan_id, index,
                    np.iinfo(old.dtype).max, old.dtype, dtype, len(rows), time.perf_counter() - t0,
                    new.frames.nbytes / 2**30)

    def _frame_pass(self, store: FrameStore) -> FramePass:
        return FramePass(self.geometry, np.dtype(self.start.dtype), store.frames, self.cfg.mask_saturated,
                         self._partial.weight_images())

    def _accept(self, idx: np.ndarray, products: np.ndarray, total: np.ndarray) -> None:
        """Count the frames ``idx`` just stored, with their weight sums ``products`` and their valid ``total``;
        the reductions take (and flag as ``filled``) the valid ones."""
        if not len(idx):
            return
        totals = products[:, 0]
        ok = self._partial.take(idx, products, total)
        if not ok.all():
            self.invalid("nan_or_inf", int((~ok).sum()), f"NaN or Inf pixels, first index {idx[~ok][0]}")
            idx, totals = idx[ok], totals[ok]
            if not len(idx):
                return
        counted = idx[totals != 0]
        self.zero_counts += len(idx) - len(counted)  # measured, with no counts: filled, but nothing to learn from
        self._counted[counted] = True  # after the store, as ``filled``
        self._n_counted += len(counted)
        self._n_filled += len(idx)
        self.counters["received"] += len(idx)
        self.latest_index = int(idx[-1])
        self.last_frame_at = time.perf_counter()

    def merge(self, part: Partial, invalid: dict[str, int], duplicate: int = 0) -> None:
        """Add the result of a shard of this scan (``stream/shard.py``: positions a Dask worker reduced with this
        scan's geometry), with the frames it found invalid, by reason, and its duplicates; its frames count as
        received here, as if this scan had taken them. Pipeline thread only, once calibrated. ValueError where
        the shard is of another scan or holds a position this scan has."""
        new = part.filled.copy()
        self._partial.merge(part)  # sets ``filled``: this scan's mask is the partial's
        counted = new & (part.sums[:, 0] != 0)
        self._counted |= counted
        n_new, n_counted = int(new.sum()), int(counted.sum())
        self._n_counted += n_counted
        self._n_filled += n_new
        self.zero_counts += n_new - n_counted
        self.counters["received"] += n_new
        self.counters["duplicate"] += duplicate
        for reason, count in invalid.items():
            self.invalid(reason, count, "found by a worker")
        if n_new:
            self.latest_index = max(self.latest_index or 0, int(np.flatnonzero(new)[-1]))
            self.last_frame_at = time.perf_counter()

    def finish(self, frames_sent: int | None, reason: EndReason = "end") -> None:
        """The scan ended (``reason``): calibrate if it never did, and count what never arrived.

        The accounting identity: ``received + missing`` is the number of positions (a position whose only
        frames were invalid is missing); over SUB, ``dropped`` says how many of the missing the tap is known
        to have lost (gaps in the indices). ``frames_sent`` (the sender's count), where known, is compared with
        the frames of this scan that arrived (received, duplicate or invalid): ``unaccounted`` is the rest.
        """
        if self._pass is None and self._pending:
            self._calibrate()
        self.frames_sent = frames_sent
        missing = int(self.start.n_positions - self._n_filled)
        self.counters["missing"] = missing
        if missing:
            dropped = self.counters["dropped"]
            log.warning("scan %s ended with %d of %d positions missing%s", self.scan_id, missing,
                        self.start.n_positions, f" ({dropped} of them dropped by the tap)" if dropped else "")
        if frames_sent is not None:
            c = self.counters
            self.unaccounted = frames_sent - (c["received"] + c["duplicate"] + c["invalid"])
            if self.unaccounted:
                log.warning("scan %s: its sender says it sent %d frame(s); %d arrived", self.scan_id, frames_sent,
                            frames_sent - self.unaccounted)
        self.end_reason = reason
        self.ended_at = time.time()

    def orphaned(self, reason: str, count: int) -> None:
        """``count`` messages or frames that belong to no scan arrived while this scan was current."""
        self.orphans[reason] += count

    def written(self, path: Path) -> None:
        """Its results (or a checkpoint of them) are in the file at ``path`` (finisher thread)."""
        self.results_path = path

    def done_with(self) -> None:
        """Its results are made, and written where the service writes results (finisher thread, last)."""
        self.done = True

    def release_frames(self) -> None:
        """Give the frame store back (pipeline thread, as a newer scan starts): a done scan's frames are read
        by no one, and the next scan of its size then takes the same memory (``store._Spare``) instead of
        mapping new pages, seconds at a large scan, while another thread may still hold this scan a moment."""
        if not self.done:
            raise ValueError(f"scan {self.scan_id} is not done: its frames are still read")
        with self._lock:
            self._store, self._retired, self._pass = None, [], None

    def fail(self, exc: BaseException) -> None:
        """Processing this scan raised ``exc``: it ends here, marked failed; what it has is kept."""
        self.failure = exc
        if not self.ended:
            try:
                self.finish(None, reason="failed")
            except Exception:  # the scan is already broken; the counters stay as they were
                log.exception("scan %s: could not close it after its failure", self.scan_id)
                self.end_reason, self.ended_at = "failed", time.time()

    # --- the model's view (model.interface.ScanView) ------------------------------------

    @property
    def binned_shape(self) -> tuple[int, int]:
        return self.geometry.binned_shape

    @property
    def frames(self) -> np.ndarray:
        """(ny*nx, h, w) binned frames in the store's dtype (``store.narrow_dtype``, or ``store_dtype`` once counts
        outgrew it: counts stay integers; the model converts when it builds a batch); rows are valid where
        ``filled``, which a reader takes first."""
        if self._store is None:
            raise ValueError(f"scan {self.scan_id} has no frames: " + ("they were released when a newer scan "
                             "started" if self.done else "it is not calibrated yet"))
        return self._store.frames

    @property
    def filled(self) -> np.ndarray:
        """(ny*nx,) bool, live: which positions hold a frame. Read-only for everyone but this scan."""
        return self._filled

    def n_filled(self) -> int:
        return self._n_filled

    @property
    def counted(self) -> np.ndarray:
        """(ny*nx,) bool, live: the filled positions whose frame has counts (``filled`` but for the empty ones)."""
        return self._counted

    def n_counted(self) -> int:
        return self._n_counted

    def mean_pattern(self) -> np.ndarray:
        return self._partial.maps(names=(Arrays.MEAN_PATTERN,))[Arrays.MEAN_PATTERN]

    def com_maps(self) -> dict[str, np.ndarray]:
        maps = self.maps()
        return {k: maps[k].astype(np.float32) for k in (Arrays.COM_MAGNITUDE, Arrays.COM_ANGLE)}

    # --- what is published and written --------------------------------------------------

    def maps(self, score_defects: bool = False) -> dict[str, np.ndarray]:
        """The scan maps (float64, NaN where missing), ``filled`` (ny, nx) bool, the mean pattern and the defect
        maps (``Arrays.DEFECT_MAPS``: redone for ``score_defects``, as the events thread and ``results.scan_results`` ask,
        within ``DefectMap``'s budget until the scan ends; the last ones otherwise, at once); {} before
        calibration."""
        if not self._ready:
            return {}
        filled = self._filled.copy()
        out = self._partial.maps(filled)
        out[Arrays.FILLED] = filled.reshape(self.scan_shape)
        out.update(self._defects.maps(out, self.ended, refresh=score_defects, rate=self.frame_rate()))
        return out

    def frame_rate(self) -> float:
        """Frames taken per second since the first (0 before two frames)."""
        if self.first_frame_at is None:
            return 0.0
        dt = time.perf_counter() - self.first_frame_at
        return self.counters["received"] / dt if dt > 0 else 0.0

    def map_specs(self) -> dict[str, MapSpec]:
        """Name -> declaration of every map this scan publishes: its reductions', ``filled`` and the defect maps."""
        specs = self._partial.specs() if self._partial is not None else ()
        return {m.name: m for m in (*specs, FILLED_MAP, *DEFECT_SPECS)}

    def map_attrs(self) -> dict:
        """What the reductions say of their maps as last derived (``Reduction.attrs``: the DPC calibration)."""
        return self._partial.attrs() if self._partial is not None else {}

    @property
    def com_unit(self) -> str:
        spec = self.map_specs().get(Arrays.COM_X)
        return spec.unit if spec is not None else "px"

    def position(self, index) -> int:
        """The scan index of position ``index`` = [y, x]; ValueError if it is not one."""
        ny, nx = self.scan_shape
        if not (isinstance(index, (list, tuple)) and len(index) == 2
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in index)):
            raise ValueError(f"index must be [y, x] integers, got {index!r}")
        y, x = (int(v) for v in index)
        if not (0 <= y < ny and 0 <= x < nx):
            raise ValueError(f"position ({y}, {x}) is outside the {ny}x{nx} scan")
        return y * nx + x

    def frame(self, index) -> np.ndarray:
        """The binned frame at position ``index`` = [y, x], as float32; ValueError if there is none."""
        i = self.position(index)
        if not self._ready or not self._filled[i]:
            raise ValueError(f"no frame at ({index[0]}, {index[1]}) yet")
        return self.frames[i].astype(np.float32)

    def header_fields(self) -> dict:
        """This scan's fields of the snapshot header."""
        s = self.start
        fields = dict(scan_id=s.scan_id, scan_shape=list(s.scan_shape), frame_shape=list(s.frame_shape),
                      expected=s.n_positions, counters=self.counter_dict(),
                      calibration=s.calibration.model_dump(mode="json", exclude_none=True))
        if self.latest_index is not None:
            fields["latest_index"] = list(divmod(self.latest_index, self.scan_shape[1]))
        if self._ready:
            geometry = self.geometry.to_json()
            geometry.pop("masked")
            fields.update(binned_shape=list(self.geometry.binned_shape), geometry=geometry, com_unit=self.com_unit)
        return fields
