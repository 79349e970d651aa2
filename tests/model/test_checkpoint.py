"""Checkpoint round trip with weights_only loading."""

import numpy as np
import pytest
import torch

from rrstem.model import checkpoint
from rrstem.model.rrvae import RRVAE, RRVAEConfig


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = RRVAEConfig(image_shape=(16, 16), latent_dim=3, hidden=16, mask_radius=0.9, translation=True)
    model = RRVAE(cfg)
    path = checkpoint.save(tmp_path / "m.pt", model, step=123, extra={"gain": 0.5})
    loaded, meta = checkpoint.load(path)
    assert meta["step"] == 123 and meta["extra"] == {"gain": 0.5}
    assert loaded.cfg == cfg
    x = torch.randn(4, model.n_pixels)
    assert torch.equal(loaded.encode(x)[0], model.encode(x)[0])
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["format"] == "rrstem-rrvae"


def test_from_numpy_state_as_in_results_file():
    model = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8))
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    again = checkpoint.from_state(model.cfg.to_json(), state)
    for k, v in again.state_dict().items():
        assert np.array_equal(v.numpy(), state[k])


def test_not_a_checkpoint(tmp_path):
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an rrstem rrVAE checkpoint"):
        checkpoint.load(tmp_path / "x.pt")


def test_from_state_reads_a_results_files_model_config():
    model = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8, latent_dim=3))
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    stored = {**model.cfg.to_json(), "trainer": {"lr": 1e-3}, "gain": 0.5, "best_step": 3}  # as export() writes it
    assert checkpoint.from_state(stored, state).cfg == model.cfg
    with pytest.raises(ValueError, match="no image_shape"):
        checkpoint.from_state({"gain": 0.5}, state)


def test_a_config_from_before_angle_head_is_the_papers_scalar_head():
    model = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8, angle_head="scalar"))
    old = {k: v for k, v in model.cfg.to_json().items() if k not in ("angle_head", "pca")}
    again = checkpoint.from_state(old, model.state_dict())
    assert again.cfg.angle_head == "scalar" and again.cfg == model.cfg
