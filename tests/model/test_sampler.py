"""Which frames the trainer trains on: a uniform held-out reservoir, batches of new and replayed frames."""

import numpy as np
import pytest

from rrstem.model.sampler import FrameSampler


def test_sampler_holds_out_and_mixes_new():
    rng = np.random.default_rng(0)
    s = FrameSampler(1000, heldout=50, rng=rng)
    filled = np.zeros(1000, dtype=bool)
    for hi in range(200, 1001, 100):
        filled[:hi] = True
        s.update(filled)
        assert len(s.heldout) == 50 and s.is_heldout.sum() == 50
    idx = s.sample(4000, new_fraction=0.5, recent=100)
    assert not s.is_heldout[idx].any()
    assert (idx[:2000] >= 900).all()  # the new half comes from the newest 100 arrivals
    assert (idx[2000:] < 900).mean() > 0.8  # the replayed half from everything
    assert np.mean(np.asarray(s.heldout) < 500) == pytest.approx(0.5, abs=0.25)  # uniform reservoir


def test_sampler_trains_on_the_first_frames():
    """While the reservoir fills, a quarter of the arrivals is held out, never all (the service
    attached the trainer after 64 frames with a 128-frame reservoir: nothing was left to train on)."""
    s = FrameSampler(1000, heldout=128, rng=np.random.default_rng(0))
    filled = np.zeros(1000, dtype=bool)
    filled[:3] = True
    s.update(filled)
    assert s.n_train == 3 and not s.heldout
    filled[:64] = True
    s.update(filled)
    assert len(s.heldout) == 16 and s.n_train == 48
    assert not s.is_heldout[s.sample(200, new_fraction=0.5, recent=32)].any()
    filled[:] = True
    s.update(filled)
    assert len(s.heldout) == 128 and s.n_train == 872
