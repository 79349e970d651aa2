"""The latents' principal axes, on latents with known directions."""

import numpy as np
import pytest

from rrstem.model import encode, metrics


def test_a_quantity_along_a_diagonal_of_two_latents_becomes_latent_0():
    rng = np.random.default_rng(0)
    magnitude = rng.uniform(0, 1, 400)
    other = rng.normal(0, 0.25, 400)  # a second quantity, varying less
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    z = np.stack([c * magnitude - s * other, s * magnitude + c * other], axis=1)  # (N, 2): magnitude on the diagonal
    assert max(abs(metrics.pearson(z[:, k], magnitude)) for k in range(2)) < 0.8
    axes = encode.principal_axes(z)
    np.testing.assert_allclose(axes @ axes.T, np.eye(2), atol=1e-12)  # a rotation (or reflection): lengths kept
    np.testing.assert_allclose(axes[0], [c, s], atol=0.05)  # the diagonal first, its larger component positive
    rotated = axes @ z.T  # (2, N)
    assert metrics.pearson(rotated[0], magnitude) > 0.99
    assert np.var(rotated[0]) > np.var(rotated[1])


def test_axes_need_two_latents_and_two_positions():
    np.testing.assert_array_equal(encode.principal_axes(np.ones((5, 1))), np.eye(1))
    np.testing.assert_array_equal(encode.principal_axes(np.ones((1, 3))), np.eye(3))
    with pytest.raises(IndexError):
        encode.principal_axes(np.ones(3))


def test_resampling_gives_the_frames_the_counting_noise_of_the_dose():
    from rrstem.model.rrvae import RRVAE, RRVAEConfig
    import torch
    model = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=4))
    frames = np.full((4000, 8, 8), 2.5, dtype=np.float32)  # noise-free: 2.5 per pixel, 160 per pattern
    mean = frames[0]
    scale = 4.0  # counts per stored unit: 10 counts per pixel
    assert np.all(encode.prepare(model, frames[:3], mean, 0.5, "cpu").numpy() == 0)  # as they are: no noise
    torch.manual_seed(0)
    x = encode.prepare(model, frames, mean, 0.5, "cpu", resample=scale).numpy()  # (4000, 64)
    counts = x / 0.5 * scale + 10  # back to counts
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)  # whole counts
    assert abs(counts.mean() - 10) < 0.02  # unbiased: 256000 draws, sd of the mean 0.006
    assert abs(counts.var() - 10) < 0.2  # Poisson: variance = mean
    integer = np.random.default_rng(1).poisson(3.0, (2, 8, 8)).astype(np.float32)  # counts are left alone
    np.testing.assert_array_equal(encode.prepare(model, integer, mean, 0.5, "cpu").numpy(),
                                  ((integer - mean) * 0.5).reshape(2, -1))
