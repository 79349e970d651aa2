"""The rrVAE's outlier map (``rrvae_anomaly``; the product's defect map is stream/defects.py): the score in
Poisson-noise units on a known case, its outliers, and an injected outlier frame that a trained model ranks first."""

import math

import numpy as np
import pytest
import torch

from feeder import FAST, ArrayScan, tilted_discs
from rrstem.model import anomaly, encode
from rrstem.model.config import TrainerConfig
from rrstem.model.interface import LATENT, RECON_SIGMA, RRVAE_ANOMALY
from rrstem.model.rrvae import RRVAE, RRVAEConfig
from rrstem.model.run import TrainingRun


def test_the_anomaly_of_an_outlier_frame_in_poisson_sigma_by_hand():
    """A decoder that always says "the mean pattern": the score is the frame's distance from the mean in
    units of the mean's Poisson noise, sqrt(mean_p (f_p - m_p)^2 / m_p)."""
    c, d, n = 100.0, 50.0, 100  # counts per pixel, the outlier's excess, frames
    frames = np.full((10, 10, 4, 4), c, dtype=np.float32)
    frames[3, 7] += d
    torch.manual_seed(0)
    m = RRVAE(RRVAEConfig(image_shape=(4, 4), hidden=8))
    with torch.no_grad():
        m.decoder.out.weight.zero_()
        m.decoder.out.bias.zero_()  # reconstruction 0 in input units = the mean pattern
    flat = frames.reshape(n, 4, 4)
    mean = flat.mean(axis=0)
    scale = encode.count_scale(flat, dose_cap=1e6)
    assert scale == 1.0  # integer counts, 1,600 electrons per pattern
    m.set_noise_weight(encode.noise_weight(m, mean, gain=0.37, scale=scale))  # the gain cancels
    maps = encode.encode_scan(m, flat, np.ones(n, bool), (10, 10), mean, 0.37, "cpu")
    a = maps[RECON_SIGMA]
    m_px = c + d / n
    assert a[3, 7] == pytest.approx(d * (1 - 1 / n) / math.sqrt(m_px), rel=1e-5)  # 4.938 sigma
    others = np.delete(a.ravel(), 37)
    np.testing.assert_allclose(others, d / n / math.sqrt(m_px), rtol=1e-5)  # 0.0499 sigma
    maps[LATENT][:] = 0.0  # every latent alike: only the reconstruction error tells the outlier apart
    anomaly.add_outlier_map(maps)
    np.testing.assert_array_equal(anomaly.outliers(maps[RRVAE_ANOMALY], 8.0), [[3, 7]])
    assert maps[RRVAE_ANOMALY][3, 7] > 8.0


def test_robust_z_and_the_alarms_by_hand():
    rng = np.random.default_rng(0)
    scores = 3.0 + 0.1 * rng.standard_normal((20, 20))
    scores[5, 5], scores[6, 1] = 9.0, 7.0
    scores[0, 0] = np.nan  # no frame there
    med = np.nanmedian(scores)
    mad = np.nanmedian(np.abs(scores - med))
    z = anomaly.robust_z(scores)
    assert z[5, 5] == pytest.approx((9.0 - med) / (1.4826 * mad)) and np.isnan(z[0, 0])
    np.testing.assert_array_equal(anomaly.outliers(z, 8.0), [[5, 5], [6, 1]])  # highest first
    assert anomaly.outliers(z[:3, :3], 8.0).shape == (0, 2)  # 8 scores: too few to judge


def test_a_latent_unlike_all_others_is_the_farthest():
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((2, 30, 30))
    latent[:, 12, 4] = [6.0, -6.0]  # far from every other position's latents
    dist = anomaly.latent_distance(latent)
    assert np.unravel_index(np.argmax(dist), dist.shape) == (12, 4)
    z = (latent.reshape(2, -1).T - latent.reshape(2, -1).T.mean(0)) / latent.reshape(2, -1).T.std(0)
    d = np.sort(np.sqrt(((z[12 * 30 + 4] - z) ** 2).sum(1)))[8]  # its 8th nearest (the 0th is itself)
    assert dist[12, 4] == pytest.approx(d)


def test_a_trained_model_ranks_an_injected_outlier_frame_first():
    frames = np.round(tilted_discs(12, 12)).astype(np.float32)  # integer counts, ~4,700 per pattern
    yy, xx = np.mgrid[0:16, 0:16]
    frames[4, 9] += 60.0 * (np.hypot(yy - 4, xx - 11) < 2)  # a bright spot no other frame has
    cfg = TrainerConfig.from_dict({**FAST, "consolidate_steps": 300, "patience": 1000, "lr": 3e-3})
    run = TrainingRun(ArrayScan.complete(frames), cfg)
    while run.advance() is not None:
        pass
    maps = run.maps().arrays
    a = maps[RRVAE_ANOMALY]
    assert np.unravel_index(np.nanargmax(a), a.shape) == (4, 9)
    assert a[4, 9] > 3 * np.nanmedian(a)
    assert anomaly.outliers(a, 8.0)[0].tolist() == [4, 9]
    found = run.status()["metrics"]  # the header's training status carries the map's highest score
    assert found["rrvae_anomaly_max"] == pytest.approx(float(a[4, 9]))
