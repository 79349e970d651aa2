"""Which frames the online trainer trains on: arrival order, a held-out reservoir, new + replayed batches.

The store only says which positions are filled. ``FrameSampler.update()``
notices new arrivals (in scan-index order within one update), appends them to
an arrival list, and keeps a uniform held-out reservoir of the arrivals
(reservoir sampling: every frame that arrived so far is held out with the same
probability). Until the reservoir is full it takes every ``1 / HELDOUT_FRACTION``-th
arrival, so at most that share of the arrivals is held out and training can
start on the first frames. Held-out frames are never trained on; a frame
evicted from the reservoir goes back to the training pool.

A batch mixes the newest arrivals (so the maps follow the scan) with frames
replayed uniformly from everything that arrived (so early regions are not
forgotten).
"""

from __future__ import annotations

import numpy as np

HELDOUT_FRACTION = 0.25  #: at most this share of the arrivals is held out while the reservoir fills


class FrameSampler:
    def __init__(self, n_positions: int, heldout: int, rng: np.random.Generator):
        self.order = np.empty(n_positions, dtype=np.int64)  # scan indices in arrival order
        self.n = 0  # arrivals so far
        self._known = np.zeros(n_positions, dtype=bool)
        self.is_heldout = np.zeros(n_positions, dtype=bool)
        self.heldout: list[int] = []
        self.heldout_size = int(heldout)
        self.heldout_changed = False  # set when the reservoir changes; the caller clears it
        self.rng = rng

    def update(self, filled: np.ndarray) -> int:
        """Register positions that became filled; returns how many are new."""
        new = np.flatnonzero(filled & ~self._known)
        if not len(new):
            return 0
        self._known[new] = True
        self.order[self.n:self.n + len(new)] = new
        for k, i in enumerate(new, start=self.n + 1):  # reservoir sampling, k = arrivals so far
            if len(self.heldout) < self.heldout_size:
                if len(self.heldout) >= int(k * HELDOUT_FRACTION):
                    continue  # filling: keep at least 1 - HELDOUT_FRACTION of the arrivals for training
                self.heldout.append(int(i))
            else:
                j = int(self.rng.integers(k))
                if j >= self.heldout_size:
                    continue
                self.is_heldout[self.heldout[j]] = False
                self.heldout[j] = int(i)
            self.is_heldout[i] = True
            self.heldout_changed = True
        self.n += len(new)
        return len(new)

    @property
    def n_train(self) -> int:
        return self.n - len(self.heldout)

    def sample(self, size: int, new_fraction: float = 0.0, recent: int = 0) -> np.ndarray:
        """``size`` training indices: ``new_fraction`` of them from the newest ``recent`` arrivals."""
        if self.n_train < 1:
            raise ValueError("no training frames have arrived yet")
        n_new = int(round(size * new_fraction)) if recent > 0 else 0
        parts = [self._draw(max(0, self.n - recent), n_new), self._draw(0, size - n_new)]
        return np.concatenate(parts)

    def _draw(self, lo: int, size: int) -> np.ndarray:
        """``size`` non-held-out indices drawn uniformly from arrivals lo..n (falls back to all)."""
        if size <= 0:
            return np.empty(0, dtype=np.int64)
        out = np.empty(0, dtype=np.int64)
        for _ in range(8):
            cand = self.order[self.rng.integers(lo, self.n, size=2 * size)]
            out = np.concatenate([out, cand[~self.is_heldout[cand]]])
            if len(out) >= size:
                return out[:size]
            lo = 0  # the recent window is (nearly) all held out: draw from everything
        pool = self.order[:self.n][~self.is_heldout[self.order[:self.n]]]
        return self.rng.choice(pool, size=size)
