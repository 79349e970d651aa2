"""Both encoders (the trainer and a fixed, trained model) through the one interface the service drives."""

import numpy as np
import pytest
import torch

from feeder import FAST, ArrayScan, tilted_discs, wait_for
from rrstem.model import checkpoint, encode
from rrstem.model.inference import FixedEncoder
from rrstem.model.interface import HISTORIES, LATENT, OUTPUTS, RECON_ERROR, ROTATION, STATES, ModelMaps, ScanEncoder
from rrstem.model.rrvae import RRVAE, RRVAEConfig, pixel_mask
from rrstem.model.trainer import OnlineTrainer


def trainer() -> OnlineTrainer:
    return OnlineTrainer(FAST)  # a plain dict of overrides, as ServiceConfig.trainer holds them


def fixed() -> FixedEncoder:
    torch.manual_seed(3)
    model = RRVAE(RRVAEConfig(image_shape=(16, 16), hidden=16, mask_radius=1.0))
    return FixedEncoder(model, gain=0.02, trained_steps=7, source="test", refresh_seconds=0.05)


ENCODERS = {"trainer": trainer, "fixed": fixed}


@pytest.fixture(params=sorted(ENCODERS))
def make_encoder(request):
    return ENCODERS[request.param]


class BrokenScan(ArrayScan):
    def mean_pattern(self):
        raise RuntimeError("boom")


def encode_partial_scan(enc) -> tuple[ModelMaps, dict, ArrayScan]:
    """Attach an ended scan holding 70 of its 100 frames and check the final maps against the exported model."""
    assert isinstance(enc, ScanEncoder)
    scan = ArrayScan(tilted_discs(), "partial")
    scan.feed(70)
    scan.end()
    with enc:
        st = enc.status()
        assert st["state"] == "waiting" and st["scan_id"] is None and enc.maps() is None
        enc.attach(scan)
        assert enc.wait_done(60)
        st, maps, ex = enc.status(), enc.maps(), enc.export()
        assert st["state"] == "done" and st["scan_id"] == "partial" and st["error"] is None
        assert isinstance(maps, ModelMaps) and maps.scan_id == "partial" and maps.step == st["step"] == ex["step"]
        assert set(maps.arrays) == set(OUTPUTS) and ex["config"]["image_shape"] == [16, 16]
        # the maps are the posterior means, under the exported model, of (frame - the scan's mean) * gain
        model, gain, mean = checkpoint.from_state(ex["config"], ex["state"]), ex["config"]["gain"], scan.mean_pattern()
        filled = scan.filled
        x = model.flatten(torch.from_numpy((scan.frames[filled] - mean) * gain))  # (70, P)
        mu = model.encode(x)[0].numpy()
        d = model.cfg.latent_dim
        assert maps.arrays[ROTATION].shape == maps.arrays[RECON_ERROR].shape == (10, 10)
        assert maps.arrays[LATENT].shape == (d, 10, 10)
        rot, lat, err = (maps.arrays[ROTATION].ravel(), maps.arrays[LATENT].reshape(d, -1),
                         maps.arrays[RECON_ERROR].ravel())
        np.testing.assert_allclose(rot[filled], mu[:, 0], atol=1e-5)
        np.testing.assert_allclose(lat[:, filled], encode.principal_axes(mu[:, 1:]) @ mu[:, 1:].T, atol=1e-5)
        assert np.isnan(rot[~filled]).all() and np.isnan(lat[:, ~filled]).all() and np.isnan(err[~filled]).all()
        assert np.isfinite(err[filled]).all() and (err[filled] >= 0).all()
        # a reconstruction: the input in input units and the decoded posterior mean, NaN outside the mask
        inp, rec = enc.reconstruct(5)
        assert inp.shape == rec.shape == (16, 16)
        inside = pixel_mask(model.cfg).reshape(16, 16)
        np.testing.assert_allclose(inp[inside], ((scan.frames[5] - mean) * gain)[inside], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            expect = model.unflatten(model.decode(model.encode(x[5:6])[0]))[0].numpy()
        np.testing.assert_allclose(rec[inside], expect[inside], atol=1e-5)
        assert np.isnan(inp[~inside]).all() and np.isnan(rec[~inside]).all()
        with pytest.raises(ValueError, match="no frame"):
            enc.reconstruct(99)
        maps.arrays[ROTATION][:] = 0.0  # maps() hands out a copy
        assert np.isnan(enc.maps().arrays[ROTATION]).sum() == 30
        assert set(enc.histories()) <= set(HISTORIES)
        return enc.maps(), st, scan


def test_both_are_encoders_with_the_same_lifecycle(make_encoder):
    encode_partial_scan(make_encoder())


def test_the_trainer_reports_its_training():
    enc = trainer()
    _, st, _ = encode_partial_scan(enc)
    assert st["step"] > 10 and st["images_seen"] == st["step"] * FAST["batch_size"]
    assert np.isfinite(st["heldout_elbo"]) and 0.0 <= st["metrics"]["rotation_r"] <= 1.0
    h = enc.histories()
    assert set(h) == set(HISTORIES) and all(v.dtype == np.float64 for v in h.values())
    assert len(h["step"]) == st["step"] and len(h["eval_step"]) == len(h["heldout_elbo"]) > 1
    ex = enc.export()
    assert set(ex["state"]) >= {"encoder.mean.weight", "decoder.coord.weight"} and ex["config"]["gain"] > 0


def test_a_fixed_model_reproduces_the_trainers_maps():
    enc = trainer()
    maps, st, scan = encode_partial_scan(enc)
    ex = enc.export()
    with FixedEncoder.from_state(ex["config"], ex["state"], ex["step"], source="memory") as again:
        again.attach(scan)
        assert again.wait_done(30)
        other = again.maps()
    assert other.step == st["step"] and again.status()["step"] == st["step"]
    for k in (ROTATION, LATENT):  # the same frames and the same model: the same maps, NaN at the same places
        np.testing.assert_allclose(other.arrays[k], maps.arrays[k], atol=1e-5)
    # recon_error: the trainer's on its fixed subset of pixels, the fixed model's on all of them
    np.testing.assert_array_equal(np.isfinite(other.arrays[RECON_ERROR]), np.isfinite(maps.arrays[RECON_ERROR]))


def test_a_failure_is_kept_as_the_exception(make_encoder):
    scan = BrokenScan(tilted_discs(), "broken")  # its mean pattern raises
    scan.feed(100)
    scan.end()
    with make_encoder() as enc:
        enc.attach(scan)
        assert wait_for(lambda: enc.status()["state"] == "failed")
        assert not enc.wait_done(1)
        assert isinstance(enc.error, RuntimeError) and str(enc.error) == "boom"
        assert enc.error.__traceback__ is not None  # the original, for the caller to re-raise
        assert enc.status()["error"] == "RuntimeError: boom" and enc.status()["state"] in STATES
        good = ArrayScan(tilted_discs(), "good")  # the next scan is encoded as if nothing had happened
        good.feed(100)
        good.end()
        enc.attach(good)
        assert enc.wait_done(30) and enc.error is None and enc.status()["state"] == "done"
        assert enc.maps().scan_id == "good" and np.isfinite(enc.maps().arrays[ROTATION]).all()


class EventScan(ArrayScan):
    """The old contract: ``ended`` an Event (always true as a bool)."""

    @property
    def ended(self):
        import threading

        return threading.Event()


def test_a_scan_must_be_a_scan_view(make_encoder):
    enc = make_encoder()
    with pytest.raises(TypeError, match="ended must be a bool"):
        enc.attach(EventScan(tilted_discs()))
    with pytest.raises(TypeError, match="ScanView"):
        enc.attach(np.zeros((10, 10, 16, 16)))
