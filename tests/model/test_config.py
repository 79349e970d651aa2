"""TrainerConfig: one default per model option, built from the plain dict the service is configured with."""

import json

import pytest

from rrstem.model.config import TrainerConfig
from rrstem.model.rrvae import RRVAEConfig


def test_the_model_defaults_are_rrvaeconfigs():
    cfg = TrainerConfig()
    assert cfg.model == RRVAEConfig()
    assert cfg.model.angle_head == "vector"  # measured better than the paper's scalar head
    assert TrainerConfig.from_dict({}) == cfg == TrainerConfig.from_dict(None)


def test_flat_and_nested_model_options():
    flat = TrainerConfig.from_dict({"latent_dim": 4, "hidden": 32, "consolidate_seconds": 5.0})
    nested = TrainerConfig.from_dict({"model": {"latent_dim": 4, "hidden": 32}, "consolidate_seconds": 5.0})
    assert flat == nested
    assert flat.model.latent_dim == 4 and flat.model.hidden == 32 and flat.consolidate_seconds == 5.0
    assert flat.model.phi_prior == RRVAEConfig().phi_prior and flat.lr == TrainerConfig().lr  # the rest: defaults
    assert TrainerConfig.from_dict({"angle_head": "scalar"}).model.angle_head == "scalar"


def test_model_config_fills_in_what_comes_from_the_scan():
    cfg = TrainerConfig.from_dict({"latent_dim": 3})
    m = cfg.model_config((32, 24), 0.8)
    assert m == RRVAEConfig(image_shape=(32, 24), mask_radius=0.8, latent_dim=3)


def test_to_dict_is_flat_json_and_round_trips():
    cfg = TrainerConfig.from_dict({"latent_dim": 3, "pca": 2, "lr": 1e-3, "mask": 0.9})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["latent_dim"] == 3 and d["pca"] == 2 and d["lr"] == 1e-3 and "model" not in d
    assert "image_shape" not in d and "mask_radius" not in d
    assert TrainerConfig.from_dict(d) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"latent_dims": 4}, r"unknown trainer option\(s\) \['latent_dims'\]"),
    ({"model": {"hiden": 4}}, "unknown model option 'hiden'"),
    ({"latent_dim": 4, "model": {"latent_dim": 3}}, r"\['latent_dim'\] given both flat and under 'model'"),
    ({"image_shape": [8, 8]}, "'image_shape' is set from the scan"),
    ({"model": {"mask_radius": 0.5}}, "'mask_radius' is set from the scan .* or from 'mask'"),
    ({"model": 3}, "must be a dict of model options"),
    ({"angle_head": "polar"}, "angle_head must be 'scalar' or 'vector'"),
    ({"mask": "disc"}, "mask must be 'auto', a radius"),
    ({"batch_size": 0}, "batch_size and pixels must be positive"),
])
def test_bad_options_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainerConfig.from_dict(bad)


def test_the_model_field_must_be_a_model_config():
    with pytest.raises(ValueError, match="model must be an RRVAEConfig.*from_dict"):
        TrainerConfig(model={"latent_dim": 2})
