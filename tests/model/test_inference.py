"""The fixed encoder: loading a trained model, refusing a scan it cannot encode, encoding while the scan runs."""

import numpy as np
import pytest
import torch

from feeder import ArrayScan, tilted_discs, wait_for
from rrstem.model import checkpoint
from rrstem.model.inference import FixedEncoder
from rrstem.model.interface import LATENT, ROTATION
from rrstem.model.rrvae import RRVAE, RRVAEConfig


def model(size=16) -> RRVAE:
    torch.manual_seed(3)
    return RRVAE(RRVAEConfig(image_shape=(size, size), hidden=16, mask_radius=1.0))


def test_from_a_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path / "m.pt", model(), step=321, extra={"gain": 0.25})
    enc = FixedEncoder.from_checkpoint(path)
    assert enc.gain == 0.25 and enc.trained_steps == 321 and enc.source == str(path)
    assert enc.status() == {"state": "waiting", "scan_id": None, "step": 321, "model": str(path), "error": None}
    x = torch.randn(3, enc.model.n_pixels)
    assert torch.equal(enc.model.encode(x)[0], model().eval().encode(x)[0])
    with pytest.raises(FileNotFoundError, match="no model file"):
        FixedEncoder.from_checkpoint(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an rrstem rrVAE checkpoint"):
        FixedEncoder.from_checkpoint(tmp_path / "x.pt")


def test_from_the_state_a_results_file_stores():
    m = model()
    config = {**m.cfg.to_json(), "trainer": {"lr": 1e-3}, "gain": 0.5, "best_step": 10}  # as export() writes it
    state = {k: v.numpy().copy() for k, v in m.state_dict().items()}
    enc = FixedEncoder.from_state(config, state, step=12, source="run.h5")
    assert enc.gain == 0.5 and enc.trained_steps == 12 and enc.model.cfg == m.cfg
    assert enc.export()["config"] == {**m.cfg.to_json(), "gain": 0.5, "source": "run.h5"}
    with pytest.raises(ValueError, match="holds no trained model"):
        FixedEncoder.from_state(config, {}, step=0, source="run.h5")
    with pytest.raises(ValueError, match="no input gain"):
        FixedEncoder.from_state({**config, "gain": None}, state, step=12, source="run.h5")
    with pytest.raises(ValueError, match="positive"):
        FixedEncoder(m, gain=0.0, trained_steps=1, source="x")


def test_it_does_not_train():
    enc = FixedEncoder(model(), gain=1.0, trained_steps=1, source="x")
    for call, verb in ((enc.pause, "pause"), (enc.resume, "resume"), (enc.reset_model, "reset")):
        with pytest.raises(ValueError, match=f"fixed model.*no training to {verb}"):
            call()
    assert enc.histories() == {}


def test_a_scan_of_another_frame_size_is_refused_until_one_fits():
    with FixedEncoder(model(16), gain=0.02, trained_steps=1, source="x", refresh_seconds=0.05) as enc:
        enc.attach(ArrayScan.complete(tilted_discs(h=8, w=8), "small"))
        assert not enc.wait_done(1)
        assert isinstance(enc.error, ValueError) and enc.error.__traceback__ is not None
        assert enc.status()["state"] == "failed" and enc.status()["scan_id"] == "small"
        assert enc.status()["error"] == ("ValueError: the model takes 16x16 frames but scan small bins to 8x8: "
                                         "choose --bin to match")
        enc.attach(ArrayScan.complete(tilted_discs(), "fits"))
        assert enc.wait_done(30) and enc.error is None
        assert enc.status()["state"] == "done" and enc.maps().scan_id == "fits"


def test_it_encodes_while_the_scan_runs():
    scan = ArrayScan(tilted_discs())
    scan.feed(30)
    with FixedEncoder(model(), gain=0.02, trained_steps=1, source="x", refresh_seconds=0.05) as enc:
        enc.attach(scan)
        assert wait_for(lambda: enc.maps() is not None)
        assert enc.status()["state"] == "running" and not enc.wait_done(0.05)
        assert np.isfinite(enc.maps().arrays[ROTATION]).sum() == 30
        scan.feed(100)
        scan.end()
        assert enc.wait_done(30)
        maps = enc.maps()
    expect = enc.encode(scan)  # the synchronous encoding of the whole scan
    assert np.isfinite(maps.arrays[ROTATION]).all()
    for k in (ROTATION, LATENT):
        np.testing.assert_allclose(maps.arrays[k], expect.arrays[k], rtol=0, atol=1e-6)


def test_an_empty_scan_is_done_with_no_maps():
    scan = ArrayScan(tilted_discs())
    scan.end()
    with FixedEncoder(model(), gain=0.02, trained_steps=1, source="x", refresh_seconds=0.05) as enc:
        enc.attach(scan)
        assert enc.wait_done(30) and enc.maps() is None and enc.status()["state"] == "done"
