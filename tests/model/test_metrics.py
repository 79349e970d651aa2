"""Metrics on inputs with known answers."""

import numpy as np
import pytest

from rrstem.model import metrics


@pytest.fixture
def angles():
    rng = np.random.default_rng(0)
    return rng.uniform(-np.pi, np.pi, size=(32, 32))


def wrap(a):
    return np.angle(np.exp(1j * a))


def test_rotation_against_itself_offset_is_one(angles):
    out = metrics.rotation_correlation(wrap(angles + 1.0), angles)
    assert out["r"] == pytest.approx(1.0, abs=1e-9)
    assert out["fold"] == 1 and out["sign"] == 1
    assert out["offset"] == pytest.approx(1.0, abs=1e-6)


def test_sign_flip_found(angles):
    out = metrics.rotation_correlation(wrap(-angles + 0.5), angles)
    assert out["r"] == pytest.approx(1.0, abs=1e-9)
    assert out["sign"] == -1 and out["fold"] == 1


def test_n_fold_wrap_found(angles):
    rot = np.mod(angles + 0.2, 2 * np.pi / 3)  # only defined modulo 120 degrees
    out = metrics.rotation_correlation(rot, angles)
    assert out["fold"] == 3 and out["r"] == pytest.approx(1.0, abs=1e-9)
    assert out["by_fold"][0] < 0.5  # at n = 1 the wrap destroys the correlation


def test_noise_lowers_it_and_unrelated_is_near_zero(angles):
    rng = np.random.default_rng(1)
    noisy = metrics.rotation_correlation(angles + rng.normal(0, 0.5, angles.shape), angles)["r"]
    assert 0.6 < noisy < 0.95
    unrelated = metrics.rotation_correlation(rng.uniform(-np.pi, np.pi, angles.shape), angles, max_fold=1)["r"]
    assert unrelated < 0.1


def test_pearson_is_wrong_for_angles_but_circular_is_right(angles):
    shifted = wrap(angles + 2.0)
    assert abs(metrics.pearson(shifted, angles)) < 0.7
    assert metrics.rotation_correlation(shifted, angles)["r"] == pytest.approx(1.0, abs=1e-9)


def test_weights_and_nan_are_respected(angles):
    rot = angles.copy()
    rot[:16] = np.random.default_rng(2).uniform(-np.pi, np.pi, (16, 32))  # garbage where weight is 0
    w = np.ones_like(angles)
    w[:16] = 0
    assert metrics.rotation_correlation(rot, angles, weights=w)["r"] == pytest.approx(1.0, abs=1e-9)
    rot[:16] = np.nan
    assert metrics.rotation_correlation(rot, angles)["r"] == pytest.approx(1.0, abs=1e-9)


def test_latent_pearson_nan_aware_and_filled():
    mag = np.arange(16.0).reshape(4, 4)
    lat = np.stack([2 * mag + 1, -mag, np.full((4, 4), np.nan)])
    lat[0, 0, 0] = np.nan
    filled = np.ones((4, 4), dtype=bool)
    filled[3] = False
    r = metrics.latent_pearson(lat, mag, filled)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[2])
    found = metrics.com_metrics({"rotation": np.zeros((4, 4)), "latent": lat},
                                {"com_magnitude": mag, "com_angle": np.zeros((4, 4))})
    assert found["latent_r_max"] == pytest.approx(1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.rotation_correlation(np.zeros((3, 3)), np.zeros((3, 4)))


def test_fisher_lee_equals_its_definition_over_pairs():
    rng = np.random.default_rng(3)
    a, b, w = rng.uniform(-np.pi, np.pi, 40), rng.uniform(-np.pi, np.pi, 40), rng.uniform(0, 2, 40)
    b = wrap(0.7 * a + b * 0.5)
    da, db = a[:, None] - a[None], b[:, None] - b[None]  # (40, 40) all pairs
    ww = w[:, None] * w[None]
    pairs = (ww * np.sin(da) * np.sin(db)).sum() / np.sqrt((ww * np.sin(da) ** 2).sum() * (ww * np.sin(db) ** 2).sum())
    assert metrics.fisher_lee(a, b, w) == pytest.approx(pairs, abs=1e-12)


def test_angles_round_a_vortex_agree_whatever_their_mean():
    # the COM angle goes round every atom: its circular mean is undefined. A map that follows it to +-0.1 rad
    # (plus an offset) agrees at about exp(-0.1^2) whatever that mean would be
    y, x = np.mgrid[-20:21, -20:21].astype(float)
    com = np.arctan2(y, x)
    mag = np.hypot(x, y)
    rot = wrap(com + 2.5 + np.random.default_rng(4).normal(0, 0.1, com.shape))
    out = metrics.rotation_correlation(rot, com, weights=mag)
    assert out["fold"] == 1 and out["sign"] == 1 and 0.97 < out["r"] < 1.0
    assert out["offset"] == pytest.approx(2.5, abs=0.01)
