"""The counting likelihood: the noise model's scale and weights, and the loss on a known pattern (by hand)."""

import math

import numpy as np
import pytest
import torch

from rrstem.model import encode
from rrstem.model.rrvae import RRVAE, RRVAEConfig, angle_kl


def test_count_scale_trusts_integer_counts_up_to_the_dose_cap():
    counts = np.full((4, 10, 10), 1000.0)  # 1e5 electrons per pattern, integers
    assert encode.count_scale(counts, dose_cap=1e6) == 1.0
    assert encode.count_scale(counts * 100, dose_cap=1e6) == pytest.approx(0.1)  # 1e7: treated as 1e6
    assert encode.count_scale(counts + 0.25, dose_cap=1e6) == pytest.approx(1e6 / 100025)  # not counts
    assert encode.count_scale(np.full((2, 4, 4), 1 / 16), dose_cap=1e6) == pytest.approx(1e6)  # normalised
    assert encode.count_scale(np.zeros((2, 4, 4)), dose_cap=1e6) == 1.0  # no signal: nothing to scale


def test_noise_weight_is_the_inverse_poisson_variance_in_input_units():
    m = RRVAE(RRVAEConfig(image_shape=(1, 3), hidden=4))
    mean = np.array([[0.5, 4.0, 100.0]], dtype=np.float32)  # counts; below one count the variance is one
    w = encode.noise_weight(m, mean, gain=2.0, scale=1.0)
    np.testing.assert_allclose(w.numpy(), [0.25 / 1, 0.25 / 4, 0.25 / 100], rtol=1e-6)
    w = encode.noise_weight(m, mean, gain=2.0, scale=0.5)  # half a count per stored unit
    np.testing.assert_allclose(w.numpy(), np.array([0.0625 / 1, 0.0625 / 2, 0.0625 / 50]), rtol=1e-6)


def test_the_poisson_loss_of_a_known_pattern_by_hand():
    cfg = RRVAEConfig(image_shape=(1, 3), hidden=4, latent_dim=1, phi_prior=0.5, likelihood="poisson")
    m = RRVAE(cfg)
    m.set_noise_weight(torch.tensor([1.0, 0.25, 4.0]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    out = {"recon": torch.tensor([[0.0, 0.0, 2.0]]),  # errors -1, -2, -1
           "mean": torch.tensor([[0.3, 1.0]]), "logsd": torch.tensor([[math.log(0.5), 0.0]])}
    terms = m.loss(x, out)
    assert float(terms["reconstruction"]) == pytest.approx(0.5 * (1 * 1 + 0.25 * 4 + 4 * 1))  # 3.0
    assert float(terms["content_kl"]) == pytest.approx(0.5 * 1.0)  # z ~ N(1, 1) against N(0, 1)
    # angle: sd 0.5 against the prior's 0.5, no mean term: KL 0
    assert float(terms["angle_kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(terms["loss"]) == pytest.approx(3.5)
    # two of the three pixels decoded: their weighted errors, rescaled by 3/2
    sub = m.loss(x, {**out, "recon": out["recon"][:, [0, 2]]}, torch.tensor([0, 2]))
    assert float(sub["reconstruction"]) == pytest.approx(0.5 * (1 + 4) * 3 / 2)
    mse = RRVAE(RRVAEConfig(image_shape=(1, 3), hidden=4, latent_dim=1, phi_prior=0.5, likelihood="mse"))
    assert float(mse.loss(x, out)["reconstruction"]) == pytest.approx(0.5 * (1 + 4 + 1))  # unweighted
    assert float(angle_kl(torch.tensor(0.0), 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_an_unknown_likelihood_is_refused():
    with pytest.raises(ValueError, match="likelihood must be 'poisson' or 'mse'"):
        RRVAEConfig(likelihood="gauss")


def test_pca_denoises_the_encoder_input_only():
    torch.manual_seed(0)
    m = RRVAE(RRVAEConfig(image_shape=(4, 4), hidden=8, pca=2))
    signal = torch.randn(200, 2) @ torch.randn(2, 16)  # a rank-2 signal
    m.set_basis(signal)
    noise = 0.3 * torch.randn(5, 16)
    x = signal[:5] + noise
    # the encoder sees the projection; the loss compares the decoder's output with x itself
    assert torch.allclose(m.encode(x)[0], m.encoder(m.denoise(x))[0])
    with torch.no_grad():
        out = m(x)
    by_hand = 0.5 * (m.noise_weight * (out["recon"] - x) ** 2).sum(1).mean()
    assert float(m.loss(x, out)["reconstruction"]) == pytest.approx(float(by_hand), rel=1e-6)


def test_the_signal_gain_takes_the_counting_noise_off_the_variance():
    frames = np.array([[[120.0, 80.0]], [[80.0, 120.0]]])  # (2, 1, 2): deviations +-20 around 100 counts
    mean = frames.mean(axis=0)
    pixels = np.arange(2)
    assert encode.is_counts(frames) and not encode.is_counts(frames + 0.5)
    assert encode.input_gain(frames, mean, pixels, 0.3) == pytest.approx(0.3 / 20)  # variance 400
    assert encode.input_gain(frames, mean, pixels, 0.3, counts=True) == pytest.approx(0.3 / math.sqrt(300))
    assert encode.input_gain(frames, mean + 1000, pixels, 0.3, counts=True) == pytest.approx(0.3 / math.sqrt(20))
