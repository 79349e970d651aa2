"""Options beyond the paper: the vector angle head and PCA-denoised inputs (known answers)."""

import math

import pytest
import torch

from feeder import FAST, ArrayScan, tilted_discs
from rrstem.model import checkpoint, encode
from rrstem.model.config import TrainerConfig
from rrstem.model.rrvae import RRVAE, RRVAEConfig
from rrstem.model.run import TrainingRun


def test_vector_angle_head_is_atan2_of_two_outputs():
    torch.manual_seed(0)
    m = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8, latent_dim=2, angle_head="vector"))
    enc = m.encoder
    assert enc.mean.out_features == 1 + 1 + 2 and enc.logsd.out_features == 1 + 2
    with torch.no_grad():  # mean head = bias only: (u, w, z1, z2) = (-1, 1, 0.5, -2)
        enc.mean.weight.zero_()
        enc.mean.bias.copy_(torch.tensor([-1.0, 1.0, 0.5, -2.0]))
    mean, _ = m.encode(torch.randn(3, 64))
    assert torch.allclose(mean[0], torch.tensor([3 * math.pi / 4, 0.5, -2.0]))


def test_vector_angle_head_gradient_is_finite_at_the_origin():
    m = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8, angle_head="vector"))
    with torch.no_grad():
        m.encoder.mean.weight.zero_()
        m.encoder.mean.bias.zero_()  # (u, w) = (0, 0): atan2's own gradient is 0/0
    mean, _ = m.encoder(torch.randn(2, 64))
    mean[:, 0].sum().backward()
    assert torch.isfinite(m.encoder.mean.bias.grad).all()


def test_bad_angle_head():
    with pytest.raises(ValueError, match="angle_head must be"):
        RRVAE(RRVAEConfig(image_shape=(8, 8), angle_head="polar"))


def test_pca_projects_on_the_principal_subspace():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    m = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8, pca=2))
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(m.denoise(x), x)  # no basis yet: unchanged
    signal = torch.randn(500, 2, generator=g) @ torch.randn(2, 64, generator=g)  # rank 2
    m.set_basis(signal + 0.01 * torch.randn(500, 64, generator=g))
    b = m.basis
    assert torch.allclose(b.T @ b, torch.eye(2), atol=1e-5)  # orthonormal
    assert torch.allclose(m.denoise(signal[:5]), signal[:5], atol=0.05 * signal.abs().max())
    noise = torch.randn(200, 64, generator=g)
    assert m.denoise(noise).pow(2).sum() < 0.1 * noise.pow(2).sum()  # ~2/64 of white noise survives


def test_pca_basis_travels_with_the_checkpoint(tmp_path):
    m = RRVAE(RRVAEConfig(image_shape=(8, 8), hidden=8, pca=3, angle_head="vector"))
    m.set_basis(torch.randn(50, 64))
    loaded, _ = checkpoint.load(checkpoint.save(tmp_path / "m.pt", m, step=1))
    assert torch.equal(loaded.basis, m.basis) and loaded.cfg == m.cfg
    state = {k: v.numpy() for k, v in m.state_dict().items()}  # as the results file stores it
    assert torch.equal(checkpoint.from_state(m.cfg.to_json(), state).basis, m.basis)


def test_trainer_refreshes_the_basis_while_running_and_freezes_it_at_scan_end():
    scan = ArrayScan(tilted_discs())
    scan.feed(40)
    run = TrainingRun(scan, TrainerConfig.from_dict({**FAST, "pca": 4, "consolidate_seconds": 1.0}))
    assert run.build()
    first = run.model.basis.clone()
    assert torch.allclose(first.T @ first, torch.eye(4), atol=1e-4)
    scan.feed(100)
    run.step()
    run.refresh_basis()
    assert not torch.allclose(run.model.basis, first)  # recomputed from the frames that arrived since
    scan.end()
    run.begin_consolidation()
    frozen = run.model.basis.clone()
    for _ in range(3):
        run.step()
    assert torch.equal(run.model.basis, frozen)
    x = encode.prepare(run.model, scan.frames[:5], run.mean, run.gain, "cpu")  # the raw input, the target
    assert torch.allclose(run.model.denoise(x), x, atol=1e-4)  # these frames lie in the span
    noisy = x + torch.randn_like(x)  # these do not: the encoder sees their projection
    assert not torch.allclose(run.model.denoise(noisy), noisy, atol=0.1)
    assert torch.allclose(run.model.encode(noisy)[0], run.model.encoder(run.model.denoise(noisy))[0])
