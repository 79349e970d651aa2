"""The rrVAE: rotation sign convention, loss terms with known values, speed tricks equal the plain maths."""

import math

import numpy as np
import pytest
import torch

from rrstem.model.rrvae import (RRVAE, FastTanh, RRVAEConfig, angle_kl, backward_in_chunks, coordinate_grid,
                                rotate_pattern)


def test_grid_centred_and_oriented():
    g = coordinate_grid(5, 7).reshape(5, 7, 2)
    assert g[2, 3].tolist() == [0.0, 0.0]  # array centre
    assert g[0, 0].tolist() == [-1.0, -1.0] and g[4, 6].tolist() == [1.0, 1.0]
    assert g[0, 6, 0] == 1.0 and g[4, 0, 1] == 1.0  # u along columns, v along rows (down)


def test_rotate_pattern_turns_clockwise_on_screen():
    img = np.zeros((21, 21), dtype=np.float32)
    img[10, 17] = 1.0  # right of the centre: angle 0
    out = rotate_pattern(img, math.pi / 2)
    assert np.unravel_index(out.argmax(), out.shape) == (17, 10)  # below the centre: +pi/2 = atan2(row, col)


def test_decoder_rotates_by_plus_phi():
    torch.manual_seed(0)
    m = RRVAE(RRVAEConfig(image_shape=(33, 33), hidden=32))
    lat0 = torch.zeros(1, 3)
    lat1 = lat0.clone()
    lat1[0, 0] = 0.3
    with torch.no_grad():
        a = m.unflatten(m.decode(lat0))[0].numpy()
        b = m.unflatten(m.decode(lat1))[0].numpy()
    expect = rotate_pattern(a, 0.3)
    inner = np.hypot(*np.mgrid[-16:17, -16:17]) < 14
    assert np.abs(b - expect)[inner].max() < 0.02 * np.abs(a).max()
    wrong = rotate_pattern(a, -0.3)
    assert np.abs(b - wrong)[inner].max() > 5 * np.abs(b - expect)[inner].max()


def test_loss_terms_known_values():
    m = RRVAE(RRVAEConfig(image_shape=(4, 4), hidden=8, latent_dim=2))
    x = torch.ones(3, 16)
    mean = torch.zeros(3, 3)
    out = {"mean": mean, "logsd": torch.zeros(3, 3), "recon": torch.zeros(3, 16)}
    t = m.loss(x, out)
    assert t["reconstruction"].item() == pytest.approx(0.5 * 16)
    assert t["content_kl"].item() == pytest.approx(0.0)  # N(0, 1) posterior against N(0, 1)
    s = 0.1
    assert t["angle_kl"].item() == pytest.approx(math.log(s) + 1 / (2 * s * s) - 0.5, rel=1e-6)
    out["logsd"][:, 0] = math.log(s)
    out["mean"][:, 0] = 5.0  # the angle's mean is free: no mean term
    out["mean"][:, 1] = 2.0
    t = m.loss(x, out)
    assert t["angle_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert t["content_kl"].item() == pytest.approx(0.5 * 4)
    assert t["loss"].item() == pytest.approx(8 + 2, rel=1e-6)
    assert angle_kl(torch.tensor(math.log(0.2)), 0.1).item() == pytest.approx(
        -math.log(0.2) + math.log(0.1) + 0.04 / 0.02 - 0.5, rel=1e-6)


def test_pixel_subset_loss_is_unbiased():
    m = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8))
    x = torch.randn(2, 64)
    out = {"mean": torch.zeros(2, 3), "logsd": torch.zeros(2, 3), "recon": torch.zeros(2, 64)}
    full = m.loss(x, out)["reconstruction"].item()
    g = torch.Generator().manual_seed(0)
    subs = []
    for _ in range(4000):
        px = torch.randperm(64, generator=g)[:16]
        subs.append(m.loss(x, {**out, "recon": torch.zeros(2, 16)}, px)["reconstruction"].item())
    assert np.mean(subs) == pytest.approx(full, rel=0.02)


def test_fast_tanh_matches_tanh_and_its_gradient():
    x = torch.linspace(-20, 20, 1001, requires_grad=True)
    y = FastTanh()(x)
    y.sum().backward()
    assert torch.allclose(y, torch.tanh(x.detach()), atol=3e-7)
    assert torch.allclose(x.grad, 1 - torch.tanh(x.detach()) ** 2, atol=1e-6)


def test_chunked_backward_equals_whole_batch():
    torch.manual_seed(0)
    m = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=16, mask_radius=1.0))
    x = torch.randn(6, m.n_pixels)
    with torch.no_grad():  # a deterministic posterior: the same sample whatever the chunking
        m.encoder.logsd.bias.fill_(-30.0)
    torch.manual_seed(1)
    whole = m.loss(x, m(x))
    whole["loss"].backward()
    g_whole = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    terms = backward_in_chunks(m, x, rows=2 * m.n_pixels)  # three chunks of two images
    assert terms["loss"] == pytest.approx(whole["loss"].item(), rel=1e-5)
    for a, b in zip(g_whole, (p.grad for p in m.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mask_and_translation_shapes():
    m = RRVAE(RRVAEConfig(image_shape=(16, 16), mask_radius=0.5, translation=True, latent_dim=3, hidden=8))
    assert m.n_pixels == int((np.hypot(*coordinate_grid(16, 16).T) <= 0.5).sum())
    x = m.flatten(torch.randn(2, 16, 16))
    out = m(x)
    assert out["mean"].shape == (2, 1 + 2 + 3) and out["recon"].shape == (2, m.n_pixels)
    assert torch.isnan(m.unflatten(out["recon"], math.nan)[0, 0, 0])
