"""A shard of a scan: some of its positions, reduced with a geometry fixed elsewhere.

A recorded scan split across Dask workers (``rrstem.scaleout``) is calibrated
once, by the ``Scan`` on the driver, from the same first frames the service
would calibrate on. Each worker then runs a ``Shard`` over its partition: the
same fused pass (``framepass.FramePass``) and the same reductions
(``reductions.Partial``) as ``Scan``, with that geometry, into a store the
size of the partition only. ``to_bytes`` sends the partial result and the
counters back (msgpack, no pickle); the driver's ``Scan.merge`` adds it.
Shards hold disjoint positions, so integer sums merge bit for bit.

``feed`` places acquisition frames on scan positions (``acquisition.AcquisitionMap``: sync offset, flyback)
and adds them, for a ``Scan`` and a ``Shard`` alike, as the service's lifecycle does.
"""

from __future__ import annotations

from collections import Counter

import msgpack
import numpy as np

from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.framepass import FramePass, accumulator
from rrstem.stream.preprocess import Geometry, PreprocessConfig
from rrstem.stream.protocol import Start
from rrstem.stream.reductions import Partial, ScanInfo, registered
from rrstem.stream.store import narrow_dtype, store_dtype

FORMAT = "rrstem-shard"
FORMAT_VERSION = 1


def feed(target, placement: AcquisitionMap, first: int, frames: np.ndarray) -> int:
    """Add the acquisition frames ``first ..`` to ``target`` (a ``Scan`` or a ``Shard``) at their scan positions;
    frames of no position (sync offset, flyback) are counted invalid by reason. Returns how many were taken."""
    runs, discarded = placement.place(first, frames)
    for reason, count in discarded.items():
        target.invalid(reason, count, f"{count} frame(s) discarded ({reason.replace('_', ' ')})")
    return sum(target.add(index, run) for index, run in runs)


class Shard:
    """The reductions of the positions of one partition of a scan (module docstring)."""

    def __init__(self, start: Start, cfg: PreprocessConfig, geometry: Geometry, frames: int):
        """``frames``: at most how many frames this shard takes (the rows of its store)."""
        cal = start.calibration
        info = ScanInfo(tuple(start.scan_shape), geometry,
                        cal.detector_pixel_mrad * geometry.bin if cal.detector_pixel_mrad else None, cal.scan_step_nm)
        raw = np.dtype(start.dtype)
        self.raw_dtype, self.cfg, self.geometry = raw, cfg, geometry
        self.partial = Partial(info, registered(), accumulator(raw, geometry.bin, geometry.binned_shape))
        self.frames = np.empty((frames, *geometry.binned_shape), narrow_dtype(raw, geometry.bin))
        self._pass = self._frame_pass()
        self._rows = 0  # store rows used
        self._positions = np.empty(frames, dtype=np.int64)  # the scan position of each store row
        self.reasons: Counter[str] = Counter()  # invalid frames by reason
        self.duplicate = 0

    def _frame_pass(self) -> FramePass:
        return FramePass(self.geometry, self.raw_dtype, self.frames, self.cfg.mask_saturated,
                         self.partial.weight_images())

    def invalid(self, reason: str, count: int, detail: str = "") -> None:
        self.reasons[reason] += count

    def add(self, first: int, frames: np.ndarray) -> int:
        """Reduce ``frames`` (n, h, w) of scan positions first .. first + n - 1; returns how many were taken."""
        idx = np.arange(first, first + len(frames))
        dup = self.partial.filled[idx]
        if dup.any():
            self.duplicate += int(dup.sum())
            idx, frames = idx[~dup], frames[~dup]
        rows = np.arange(self._rows, self._rows + len(idx))
        if len(rows) and rows[-1] >= len(self.frames):
            raise ValueError(f"this shard holds {len(self.frames)} frames; frame {idx[-1]} is one too many")
        self._positions[rows] = idx
        self._rows += len(idx)
        sums, total, over = self._pass(rows, frames)
        if over is None:
            return self._take(idx, sums, total)
        # frame ``over`` has a binned count the narrow store cannot hold: it and the rest go to a wide one
        taken = self._take(idx[:over], sums, total)
        self.frames = self.frames.astype(store_dtype(self.raw_dtype, self.geometry.bin))
        self._pass = self._frame_pass()
        sums, total, again = self._pass(rows[over:], frames[over:])
        assert again is None, "the wide store holds any binned sum"
        return taken + self._take(idx[over:], sums, total)

    def _take(self, idx: np.ndarray, sums: np.ndarray, total: np.ndarray) -> int:
        ok = self.partial.take(idx, sums, total)
        if not ok.all():
            self.invalid("nan_or_inf", int((~ok).sum()))
        return int(ok.sum())

    def binned(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, binned frames) of the valid frames this shard took, in the order it took them."""
        rows = self.partial.filled[self._positions[:self._rows]]
        return self._positions[:self._rows][rows], self.frames[:self._rows][rows]

    def to_bytes(self) -> bytes:
        """msgpack: the partial result (``Partial.to_bytes``), invalid frames by reason, duplicates."""
        return msgpack.packb({"format": FORMAT, "format_version": FORMAT_VERSION, "partial": self.partial.to_bytes(),
                              "invalid": dict(self.reasons), "duplicate": self.duplicate}, use_bin_type=True)

    @staticmethod
    def from_bytes(data: bytes) -> tuple[Partial, dict[str, int], int]:
        """(partial, invalid frames by reason, duplicates) of a shard's ``to_bytes``; ValueError if it is not one."""
        try:
            d = msgpack.unpackb(data, raw=False)
            if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not an {FORMAT} v{FORMAT_VERSION} message")
            invalid = {str(k): int(v) for k, v in d["invalid"].items()}
            return Partial.from_bytes(d["partial"]), invalid, int(d["duplicate"])
        except (KeyError, TypeError, AttributeError, ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"undecodable shard result: {exc}") from None
