"""The trainer's synchronous core, ``TrainingRun``, driven one public call at a time (no thread)."""

import numpy as np
import pytest
import torch

from feeder import FAST, ArrayScan, FakeClock, tilted_discs
from rrstem.model import checkpoint, encode
from rrstem.model.config import TrainerConfig
from rrstem.model.interface import EVAL_STEP, HELDOUT_ELBO, LATENT, RECON_ERROR, ROTATION, STEP_HISTORIES, ModelMaps
from rrstem.model.rrvae import RRVAE
from rrstem.model.optim import adam, learning_rate, warm_up
from rrstem.model.run import TrainingRun


def config(**kw) -> TrainerConfig:
    return TrainerConfig.from_dict({**FAST, **kw})


def test_build_waits_for_min_frames_then_freezes_the_gain():
    scan = ArrayScan(tilted_discs())
    scan.feed(10)
    run = TrainingRun(scan, config(input_std=0.5))
    assert not run.build() and run.phase == "waiting" and run.model is None
    assert run.advance() is None
    with pytest.raises(ValueError, match="no model yet"):
        run.step()
    scan.feed(40)
    assert run.build() and run.phase == "running" and run.built
    first = tilted_discs().reshape(100, 16, 16)[:16].astype(np.float64)  # the first min_frames frames
    assert run.gain == pytest.approx(0.5 / (first - first.mean(axis=0)).std(), rel=1e-5)
    assert run.model.n_pixels == 256 and run.model.cfg.image_shape == (16, 16)  # mask=None: every pixel
    assert run.model.cfg.angle_head == "vector" and run.model.cfg.hidden == 24
    np.testing.assert_allclose(run.mean, tilted_discs().reshape(100, 16, 16)[:40].mean(axis=0), rtol=1e-5)
    scan.feed(100)
    scan.end()
    assert run.build()  # built once: the gain stays
    assert run.gain == pytest.approx(0.5 / (first - first.mean(axis=0)).std(), rel=1e-5)


def test_a_scan_that_ends_with_one_frame_is_done_without_a_model():
    scan = ArrayScan(tilted_discs())
    scan.feed(1)
    scan.end()
    run = TrainingRun(scan, config())
    assert not run.build() and run.phase == "done" and run.model is None
    assert run.advance() is None and run.maps() is None and run.export()["state"] == {}


def test_a_scan_that_ends_early_trains_on_what_arrived():
    scan = ArrayScan(tilted_discs())
    scan.feed(5)  # fewer than min_frames, but ended: 5 frames are all there will be
    scan.end()
    run = TrainingRun(scan, config())
    assert run.build() and run.phase == "running"
    first = tilted_discs().reshape(100, 16, 16)[:5].astype(np.float64)
    assert run.gain == pytest.approx(0.3 / (first - first.mean(axis=0)).std(), rel=1e-5)


def test_warm_up_pays_the_optimisers_first_use_and_adam_is_fused_on_cpu():
    import sys
    assert warm_up(torch.device("cpu")) >= 0.0
    assert "torch._dynamo" in sys.modules  # what the first optimiser imports (1.35 s in a scan's first seconds)
    p = torch.ones(3, requires_grad=True)
    opt = adam([p], 0.1, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    p.sum().backward()
    opt.step()  # Adam's first step moves each parameter by lr against its gradient's sign
    np.testing.assert_allclose(p.detach().numpy(), 0.9, rtol=1e-6)


def test_step_returns_floats_and_loss_falls():
    run = TrainingRun(ArrayScan.complete(tilted_discs()), config(lr=3e-3))
    assert run.build()
    first = run.step()
    assert set(first) == {"loss", "reconstruction", "content_kl", "angle_kl"}
    assert all(isinstance(v, float) for v in first.values())
    assert first["loss"] == pytest.approx(first["reconstruction"] + first["content_kl"] + first["angle_kl"])
    losses = [run.step()["loss"] for _ in range(300)]
    assert np.mean(losses[-30:]) < 0.8 * np.mean(losses[:30])
    assert run.step_count == 301 and run.images_seen == 301 * FAST["batch_size"]
    h = run.histories()
    assert set(STEP_HISTORIES) <= set(h) and len(h["step"]) == 301  # log_every=1
    np.testing.assert_array_equal(h["step"], np.arange(1, 302))
    assert h["loss"][-1] == pytest.approx(losses[-1])


def test_learning_rate_follows_the_scan_then_the_consolidation_steps():
    cfg = config(lr=1e-3, lr_scan_end=0.5, lr_final=0.1, consolidate_steps=10)
    assert learning_rate(cfg, 0.0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 0.5) == pytest.approx(1e-3 * (1 - 0.5 * 0.5))  # half the positions in
    assert learning_rate(cfg, 1.0) == pytest.approx(5e-4)  # the last frame
    assert learning_rate(cfg, 1.0, 0.5) == pytest.approx(1e-3 * (0.5 - 0.4 * 0.5))
    assert learning_rate(cfg, 1.0, 3.0) == pytest.approx(1e-4)  # clipped past the end
    clock = FakeClock(100.0)  # wall time plays no part
    scan = ArrayScan(tilted_discs())
    scan.feed(50)
    run = TrainingRun(scan, cfg, clock=clock)
    assert run.build()
    run.step()
    assert run.scan_progress() == 0.5 and run.lr == pytest.approx(7.5e-4)
    scan.feed(100)
    scan.end()
    run.begin_consolidation()
    for done, expect in ((0, 5e-4), (5, 3e-4), (20, 1e-4)):  # start, half-way, past the end
        while run.step_count - 1 < done:
            run.step()
        clock.t += 1000.0
        run.step()
        assert run.lr == pytest.approx(expect, rel=1e-6)


def test_consolidation_stops_once_the_heldout_elbo_stops_improving():
    clock = FakeClock()
    run = TrainingRun(ArrayScan.complete(tilted_discs()), config(lr=0.0, patience=2, consolidate_eval_steps=1),
                      clock=clock)
    while run.advance() is not None:
        pass
    # with lr 0 nothing improves: the evaluation at the start is the best, the next two are not
    assert run.phase == "done" and run.step_count == 2
    assert len(run.histories()[HELDOUT_ELBO]) == 3 + 1  # start, two stalled, finish()


def test_consolidation_ends_at_the_step_bound_with_the_best_model():
    clock = FakeClock()  # stands still: only the step bound ends the consolidation
    run = TrainingRun(ArrayScan.complete(tilted_discs()),
                      config(consolidate_steps=25, lr=3e-3, consolidate_eval_steps=4, patience=100), clock=clock)
    n = 0
    while run.advance() is not None:
        n += 1  # an evaluation every 4 steps
    assert run.phase == "done" and n == run.step_count == 25
    h = run.histories()
    elbos, at = h[HELDOUT_ELBO], h[EVAL_STEP]
    assert len(elbos) >= 6 and np.isfinite(elbos).all()
    assert run.best_step == at[np.argmin(elbos)]
    assert run.evaluate() == pytest.approx(elbos.min(), rel=1e-6)  # the best model is the one kept
    assert run.maps().step == 25


def test_the_consolidation_deadline_ends_it():
    clock = FakeClock()
    run = TrainingRun(ArrayScan.complete(tilted_discs()), config(consolidate_seconds=5.0), clock=clock)
    for _ in range(3):
        run.advance()
    assert run.phase == "consolidating"
    clock.t = 5.0
    run.advance()
    assert run.phase == "done" and run.step_count == 4
    assert run.advance() is None and run.step_count == 4


def test_refresh_updates_recon_error_for_a_rotating_slice_and_all_at_the_end():
    run = TrainingRun(ArrayScan.complete(tilted_discs()), config(recon_budget=30), clock=FakeClock())
    assert run.build()
    run.step()
    counts = [np.isfinite(run.refresh().arrays[RECON_ERROR]).sum() for _ in range(4)]
    assert counts == [30, 60, 90, 100]  # the slices keep the values already computed
    run.begin_consolidation()
    final = run.finish()
    assert np.isfinite(final.arrays[RECON_ERROR]).all() and (final.arrays[RECON_ERROR] >= 0).all()


def test_maps_are_the_models_posterior_means_and_encode_publishes_nothing():
    scan = ArrayScan(tilted_discs())
    scan.feed(60)
    run = TrainingRun(scan, config())
    assert run.build()
    for _ in range(5):
        run.step()
    maps = run.encode()
    assert isinstance(maps, ModelMaps) and run.maps() is None  # not published
    model, filled = run.model, scan.filled
    x = model.flatten(torch.from_numpy((scan.frames[filled] - run.mean) * run.gain))  # (60, P)
    mu = model.encode(x)[0].numpy()
    np.testing.assert_allclose(maps.arrays[ROTATION].ravel()[filled], mu[:, 0], atol=1e-5)
    np.testing.assert_allclose(maps.arrays[LATENT].reshape(2, -1)[:, filled], encode.principal_axes(mu[:, 1:]) @ mu[:, 1:].T,
                               atol=1e-5)
    assert np.isnan(maps.arrays[ROTATION].ravel()[~filled]).all()
    published = run.refresh()
    np.testing.assert_allclose(published.arrays[ROTATION], maps.arrays[ROTATION], atol=1e-6, equal_nan=True)
    assert run.maps().scan_id == "streamed" and run.maps().step == 5
    assert 0.0 <= run.status()["metrics"]["rotation_r"] <= 1.0


def test_warm_start_copies_the_previous_model_if_the_frame_size_fits():
    first = TrainingRun(ArrayScan.complete(tilted_discs(), "a"), config())
    assert first.build()
    for _ in range(20):
        first.step()
    second = ArrayScan.complete(2 * tilted_discs(), "b")  # twice as bright: a gain of its own would differ
    warm = TrainingRun(second, config(), previous=first)
    assert warm.build() and warm.model is not first.model and warm.warm
    for k, v in first.model.state_dict().items():
        assert torch.equal(warm.model.state_dict()[k], v), k
    assert warm.gain == first.gain  # the input contract the model was trained with
    other = TrainingRun(ArrayScan.complete(tilted_discs(h=8, w=8), "c"), config(), previous=first)
    assert other.build() and other.model.cfg.image_shape == (8, 8) and not other.warm
    torch.manual_seed(FAST.get("seed", 0))  # a fresh model: the seeded initialisation
    fresh = RRVAE(other.model.cfg)
    assert torch.equal(other.model.encoder.body[0].weight, fresh.encoder.body[0].weight)


def test_export_carries_what_reloading_needs():
    run = TrainingRun(ArrayScan.complete(tilted_discs()), config(latent_dim=3), clock=FakeClock())
    assert run.export()["state"] == {} and run.export()["config"]["gain"] is None  # before the model
    assert run.build()
    run.step()
    ex = run.export()
    cfg = ex["config"]
    assert cfg["image_shape"] == [16, 16] and cfg["latent_dim"] == 3 and cfg["gain"] == run.gain
    assert TrainerConfig.from_dict(cfg["trainer"]) == run.cfg  # the trainer config, JSON-able and reloadable
    again = checkpoint.from_state(cfg, ex["state"])  # as the stream side reloads a results file's model
    x = torch.randn(4, again.n_pixels)
    assert torch.equal(again.encode(x)[0], run.model.eval().encode(x)[0])
    assert ex["step"] == 1 and ex["training"]["loss"].dtype == np.float64
    assert run.status()["heldout_elbo"] is None  # no evaluation yet


def test_the_consolidation_is_shorter_the_longer_the_scan_trained():
    from rrstem.model.optim import consolidation_seconds

    cfg = config(consolidate_seconds=25.0, consolidate_min_seconds=5.0, scan_credit=1.5)
    assert consolidation_seconds(cfg, 0.0) == 25.0  # a scan that arrived at once
    assert consolidation_seconds(cfg, 8.0) == pytest.approx(13.0)
    assert consolidation_seconds(cfg, 60.0) == 5.0  # a long scan: the floor
    clock = FakeClock()
    scan = ArrayScan(tilted_discs())
    scan.feed(50)
    run = TrainingRun(scan, cfg, clock=clock)
    assert run.build()
    clock.t = 8.0  # eight seconds of training while the scan ran
    scan.feed(100)
    scan.end()
    run.begin_consolidation()
    clock.t = 8.0 + 12.9
    run.advance()
    assert run.phase == "consolidating"
    clock.t = 8.0 + 13.0
    run.advance()
    assert run.phase == "done"


def test_only_frames_that_are_not_counts_are_resampled():
    smooth = tilted_discs()  # expected intensities, not counts
    run = TrainingRun(ArrayScan.complete(smooth), config())
    assert run.build() and run.resample == run.scale and 0 < run.scale
    counted = np.random.default_rng(0).poisson(smooth * 50).astype(np.float32)
    run = TrainingRun(ArrayScan.complete(counted), config())
    assert run.build() and run.resample is None
    off = TrainingRun(ArrayScan.complete(smooth), config(resample=False))
    assert off.build() and off.resample is None
