"""The partial result of a scan (or of a shard of one): every reduction's buffers, mergeable and serialisable.

``Partial`` holds, for one scan's positions:

- ``sums``: (ny * nx, k) float64, the weight columns of every frame taken (``weights.weight_table``);
- ``frame_sum`` and ``count``: the sum of the valid binned frames and how many there are;
- ``filled``: which positions hold a valid frame (the one such mask: the ``Scan`` shares it);
- each reduction's own ``buffers``.

``take`` adds one batch from the fused pass; ``maps`` asks each reduction to derive its maps; ``merge`` adds
another partial of the same scan (shards hold disjoint positions, so integer sums merge bit for bit);
``to_bytes`` / ``from_bytes`` move a partial between processes (msgpack, no pickle).

Threads: one writer calls ``take``; any thread may call ``maps`` meanwhile. The pixel buffers are copied
under the lock; per-position data are read without it, because a position's sums are written before its
``filled`` flag and never change afterwards.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import msgpack
import numpy as np

from rrstem.stream.preprocess import Geometry
from rrstem.stream.reductions.base import MapSpec, Reduction, ScanInfo, Weight, registered
from rrstem.stream.reductions.weights import weight_images, weight_table

FORMAT = "rrstem-partial"
FORMAT_VERSION = 1


@dataclass
class Batch:
    """Valid frames of one pass, as ``Reduction.update`` sees them."""

    indices: np.ndarray  #: (n,) scan positions
    sums: np.ndarray  #: (n, k) weight columns
    columns: dict[str, int]  #: weight name -> column of ``sums``

    def column(self, weight: Weight | str) -> np.ndarray:
        return self.sums[:, self.columns[weight if isinstance(weight, str) else weight.name]]


class View:
    """What ``Reduction.derive`` reads: a consistent copy of the merged buffers over the ``filled`` positions."""

    def __init__(self, info: ScanInfo, filled: np.ndarray, sums: np.ndarray, columns: dict[str, int],
                 frame_sum: np.ndarray, count: int, buffers: dict[str, dict[str, np.ndarray]]):
        self.info = info
        self.filled = filled  #: (ny * nx,) bool
        self._at = sums[filled]  # (n_filled, k)
        self._columns = columns
        self.frame_sum = frame_sum  #: (h, w) sum of the valid binned frames
        self.count = count  #: how many frames that is
        self._buffers = buffers
        self._once: dict = {}

    def once(self, key, compute):
        """``compute()``, computed once for this view: what several reductions derive alike (the COM, which
        the COM and DPC maps both start from) is not derived twice per snapshot."""
        if key not in self._once:
            self._once[key] = compute()
        return self._once[key]

    def column(self, weight: Weight | str) -> np.ndarray:
        """(n_filled,) float64: the weight's per-frame sums at the filled positions, in scan order."""
        return self._at[:, self._columns[weight if isinstance(weight, str) else weight.name]]

    def buffer(self, reduction: Reduction, name: str) -> np.ndarray:
        """One of ``reduction``'s own buffers, whole."""
        return self._buffers[reduction.name][name]

    def scatter(self, values: np.ndarray) -> np.ndarray:
        """(ny, nx) float64 map: ``values`` at the filled positions, NaN elsewhere."""
        out = np.full(self.filled.shape, np.nan, dtype=np.float64)
        out[self.filled] = values
        return out.reshape(self.info.scan_shape)


#: per position, besides the reductions: the defect maps, the rrVAE's maps (a few latents, float32, twice)
#: and what a snapshot copies of them
OTHER_MAPS_BYTES = 160


def bytes_per_position(reductions: tuple[type[Reduction], ...]) -> int:
    """Memory a scan needs per position besides its frame store: the weight columns (float64) and their copy
    when maps are derived, the filled flag, each per-position map (float64, and its float32 snapshot copy, and
    as much again in temporaries), each reduction's own position buffers, and ``OTHER_MAPS_BYTES``."""
    k = len(weight_table(reductions))
    maps = sum(1 for r in reductions for m in r.maps if m.per_position)
    own = sum(np.dtype(b.dtype).itemsize for r in reductions for b in r.buffers if b.kind == "position")
    return 16 * k + 1 + 24 * maps + own + OTHER_MAPS_BYTES


class Partial:
    """The merged buffers of every reduction of one scan, or of one shard of it."""

    def __init__(self, info: ScanInfo, reductions: tuple[type[Reduction], ...] | None = None,
                 accumulator: np.dtype | str = "float64", filled: np.ndarray | None = None):
        classes = registered() if reductions is None else tuple(reductions)
        self.info = info
        self.reductions = tuple(cls(info) for cls in classes)
        self.table = weight_table(classes)
        self.columns = {w.name: i for i, w in enumerate(self.table)}
        n = info.scan_shape[0] * info.scan_shape[1]
        self.sums = np.zeros((n, len(self.table)), dtype=np.float64)  # zero where no frame was taken
        self.frame_sum = np.zeros(info.geometry.binned_shape, dtype=accumulator)  # float64, or int64 for huge counts
        self.count = 0
        self.filled = np.zeros(n, dtype=bool) if filled is None else filled
        self.buffers = {r.name: {b.name: np.full(n if b.kind == "position" else info.geometry.binned_shape,
                                                 b.fill, dtype=b.dtype) for b in r.buffers}
                        for r in self.reductions}
        self._lock = threading.Lock()

    # --- declarations -----------------------------------------------------------------------

    def weight_images(self) -> np.ndarray:
        """(k, h, w) float64 images of ``table``, for the fused pass."""
        return weight_images(self.table, self.info.geometry)

    def specs(self) -> tuple[MapSpec, ...]:
        return tuple(m for r in self.reductions for m in r.specs())

    # --- ingest (one writer) ----------------------------------------------------------------

    def take(self, indices: np.ndarray, sums: np.ndarray, frame_sum: np.ndarray) -> np.ndarray:
        """Add the frames ``indices`` with their (n, k) weight ``sums`` and the (h, w) sum of the valid ones
        (``frame_sum``). A frame is valid when its intensity (column 0) is finite (a frame with no counts is a
        measurement too); returns the (n,) bool mask of the valid ones, which are now ``filled``."""
        ok = np.isfinite(sums[:, 0])
        if not ok.all():
            indices, sums = indices[ok], sums[ok]
        if len(indices):
            batch = Batch(indices, sums, self.columns)
            with self._lock:
                self.frame_sum += frame_sum
                self.count += len(indices)
                self.sums[indices] = sums
                for r in self.reductions:
                    if r.buffers:
                        r.update(self.buffers[r.name], batch)
            self.filled[indices] = True  # last: a reader that sees the flag reads whole sums
        return ok

    # --- what is derived --------------------------------------------------------------------

    def maps(self, filled: np.ndarray | None = None, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Every reduction's maps (only those of the reductions that make one of ``names``, if given), over
        ``filled`` (default: a copy of this partial's mask)."""
        filled = self.filled.copy() if filled is None else filled
        chosen = [r for r in self.reductions if names is None or any(m.name in names for m in r.specs())]
        with self._lock:
            frame_sum, count = self.frame_sum.copy(), self.count
            buffers = {r.name: {k: v.copy() if v.ndim == 2 else v for k, v in self.buffers[r.name].items()}
                       for r in chosen}
        view = View(self.info, filled, self.sums, self.columns, frame_sum, count, buffers)
        out: dict[str, np.ndarray] = {}
        for r in chosen:
            out.update(r.derive(view))
        return out

    def attrs(self) -> dict:
        """Every reduction's ``attrs()``, as of its latest ``derive``."""
        out: dict = {}
        for r in self.reductions:
            out.update(r.attrs())
        return out

    # --- scale-out ----------------------------------------------------------------------------

    def merge(self, other: "Partial") -> None:
        """Add ``other``, a partial of the same scan over other positions, in place."""
        if self._layout() != other._layout():
            raise ValueError(f"cannot merge partials of different scans or reductions: {self._layout()} "
                             f"and {other._layout()}")
        both = self.filled & other.filled
        if both.any():
            raise ValueError(f"{int(both.sum())} position(s) are in both partials (first index "
                             f"{int(np.flatnonzero(both)[0])}): each position belongs to one shard")
        with self._lock:
            self.sums += other.sums
            self.frame_sum += other.frame_sum
            self.count += other.count
            for r in self.reductions:
                for b in r.buffers:
                    mine = self.buffers[r.name][b.name]
                    b.merge(mine, other.buffers[r.name][b.name], out=mine)
            self.filled |= other.filled

    def _layout(self) -> tuple:
        return (self.info.scan_shape, self.info.geometry, self.info.pixel_mrad, tuple(self.columns),
                tuple(r.name for r in self.reductions), self.frame_sum.dtype.str)

    def to_bytes(self) -> bytes:
        """msgpack: the scan's layout and every buffer (dtype, shape, raw bytes)."""
        arrays = {"sums": self.sums, "frame_sum": self.frame_sum, "filled": self.filled}
        for r in self.reductions:
            arrays.update({f"buffer/{r.name}/{k}": v for k, v in self.buffers[r.name].items()})
        with self._lock:
            packed = {k: [v.dtype.str, list(v.shape), np.ascontiguousarray(v).tobytes()] for k, v in arrays.items()}
            count = self.count
        info = self.info
        return msgpack.packb({
            "format": FORMAT, "format_version": FORMAT_VERSION, "scan_shape": list(info.scan_shape),
            "geometry": info.geometry.to_json(), "pixel_mrad": info.pixel_mrad,
            "reductions": [r.name for r in self.reductions], "weights": list(self.columns), "count": count,
            "arrays": packed}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes, reductions: tuple[type[Reduction], ...] | None = None) -> "Partial":
        """The partial ``to_bytes`` made; its reductions are looked up by name among ``reductions``
        (default: the registered ones). ValueError names what does not fit."""
        try:
            d = msgpack.unpackb(data, raw=False)
            if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not an {FORMAT} v{FORMAT_VERSION} message")
            known = {r.name: r for r in (registered() if reductions is None else reductions)}
            missing = [name for name in d["reductions"] if name not in known]
            if missing:
                raise ValueError(f"reductions {missing} are not registered here")
            info = ScanInfo(tuple(d["scan_shape"]), Geometry.from_json(d["geometry"]), d["pixel_mrad"])
            arrays = {k: np.frombuffer(raw, dtype=np.dtype(dt)).reshape(shape).copy()
                      for k, (dt, shape, raw) in d["arrays"].items()}
            out = cls(info, tuple(known[name] for name in d["reductions"]), arrays["frame_sum"].dtype)
            if list(out.columns) != d["weights"]:
                raise ValueError(f"weights {d['weights']} differ from this version's {list(out.columns)}")
            out.sums, out.frame_sum, out.filled, out.count = (arrays["sums"], arrays["frame_sum"], arrays["filled"],
                                                              int(d["count"]))
            for r in out.reductions:
                for k in out.buffers[r.name]:
                    out.buffers[r.name][k] = arrays[f"buffer/{r.name}/{k}"]
            return out
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"undecodable partial result: {exc}") from None
