"""The online trainer on small synthetic scans: maps, states, failures, the sampler."""

import time

import numpy as np
import pytest

from feeder import streamed_scan
from rrstem.model.sampler import FrameSampler
from rrstem.model.trainer import OnlineTrainer, TrainerConfig
from rrstem.stream.store import ScanData

FAST = dict(hidden=24, min_frames=16, batch_size=8, pixels=48, heldout=8, consolidate_seconds=2.0,
            refresh_seconds=0.1, eval_seconds=0.2, eval_pixels=32, log_every=1, mask=None)


def tilted_discs(ny=10, nx=10, h=16, w=16):
    """A disc whose intensity is tilted by a smooth vector field over the scan: a known COM pattern."""
    yy, xx = np.mgrid[0:h, 0:w] - (h - 1) / 2
    disc = (np.hypot(yy, xx) < h / 4).astype(np.float32)
    out = np.empty((ny, nx, h, w), dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            gy, gx = 0.08 * np.sin(2 * np.pi * y / ny), 0.08 * np.cos(2 * np.pi * x / nx)
            out[y, x] = 100 * disc * (1 + gy * yy + gx * xx)
    return out


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_partial_scan_gives_maps_with_nan_where_missing():
    data, feeder = streamed_scan(tilted_discs())
    feeder.feed(70)
    data.ended.set()
    with OnlineTrainer(TrainerConfig(**FAST)) as tr:
        tr.attach(data)
        assert tr.wait_done(30)
        maps, st = tr.maps(), tr.status()
    filled = data.filled.reshape(10, 10)
    assert maps["scan_id"] == "streamed" and st["state"] == "done" and st["step"] > 10
    assert maps["rotation"].shape == (10, 10) and maps["latent"].shape == (2, 10, 10)
    for m in (maps["rotation"], maps["recon_error"], *maps["latent"]):
        assert np.isnan(m[~filled]).all() and np.isfinite(m[filled]).all()
    assert st["images_seen"] == st["step"] * FAST["batch_size"]
    assert np.isfinite(st["heldout_elbo"]) and "rotation_r" in st["metrics"]
    h = tr.histories()
    assert len(h["step"]) == st["step"] and len(h["eval_step"]) == len(h["heldout_elbo"]) > 1
    inp, rec = tr.reconstruct(5)
    assert inp.shape == rec.shape == (16, 16) and np.isfinite(rec).all()
    with pytest.raises(ValueError, match="no frame"):
        tr.reconstruct(99)
    ex = tr.export()
    assert ex["step"] == st["step"] and ex["config"]["image_shape"] == [16, 16] and ex["config"]["gain"] > 0
    assert set(ex["state"]) >= {"encoder.mean.weight", "decoder.coord.weight"}
    assert ex["training"]["loss"].dtype == np.float64


def test_step_returns_floats_and_loss_falls():
    tr = OnlineTrainer(TrainerConfig(**{**FAST, "lr": 3e-3}))
    tr.attach(ScanData.from_array("s", tilted_discs()))
    tr._loop_once()  # what the thread does: attach, freeze gain and mask, build, first step
    first = tr.step()
    assert set(first) == {"loss", "reconstruction", "content_kl", "angle_kl"}
    assert all(isinstance(v, float) for v in first.values())
    losses = [tr.step()["loss"] for _ in range(300)]
    assert np.mean(losses[-30:]) < 0.8 * np.mean(losses[:30])


def test_pause_resume_and_reset():
    data, feeder = streamed_scan(tilted_discs())
    feeder.feed(50)  # never ends: the trainer keeps running
    with OnlineTrainer(TrainerConfig(**FAST)) as tr:
        tr.attach(data)
        assert wait_for(lambda: tr.status()["step"] > 3)
        tr.pause()
        assert wait_for(lambda: tr.status()["state"] == "paused")
        n = tr.status()["step"]
        assert not wait_for(lambda: tr.status()["step"] > n, timeout=0.3)
        tr.resume()
        assert wait_for(lambda: tr.status()["state"] == "running" and tr.status()["step"] > n)
        tr.reset_model()
        assert wait_for(lambda: tr.status()["step"] < n)
        assert not tr.wait_done(0.05)


def test_failure_is_stored_and_reported():
    def broken():
        raise RuntimeError("boom")

    data = ScanData.from_array("s", tilted_discs())
    data._mean_pattern = broken
    with OnlineTrainer(TrainerConfig(**FAST)) as tr:
        tr.attach(data)
        assert not tr.wait_done(10)
        assert wait_for(lambda: tr.status()["state"] == "failed")
        assert isinstance(tr.error, RuntimeError) and "boom" in tr.status()["error"]


def test_attach_cuts_consolidation_short():
    with OnlineTrainer(TrainerConfig(**{**FAST, "consolidate_seconds": 120})) as tr:
        tr.attach(ScanData.from_array("first", tilted_discs()))
        assert wait_for(lambda: tr.status()["state"] == "consolidating")
        t0 = time.monotonic()
        tr.cfg.consolidate_seconds = 1.0
        tr.attach(ScanData.from_array("second", tilted_discs()))
        assert tr.wait_done(30) and time.monotonic() - t0 < 20
        assert tr.maps()["scan_id"] == "second"


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
