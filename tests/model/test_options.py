"""Options beyond the paper: the vector angle head and PCA-denoised inputs (known answers)."""

import math
import time

import numpy as np
import pytest
import torch

from feeder import streamed_scan
from rrstem.model import checkpoint, encode
from rrstem.model.rrvae import RRVAE, RRVAEConfig
from rrstem.model.trainer import OnlineTrainer, TrainerConfig
from rrstem.stream.store import ScanData
from test_trainer import FAST, tilted_discs


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
    data, feeder = streamed_scan(tilted_discs())
    feeder.feed(40)
    tr = OnlineTrainer(TrainerConfig(**{**FAST, "pca": 4, "angle_head": "vector", "consolidate_seconds": 1.0}))
    tr._begin(data)
    assert tr._try_build()
    first = tr.model.basis.clone()
    assert torch.allclose(first.T @ first, torch.eye(4), atol=1e-4)
    feeder.feed(100)
    tr.step()
    tr.refresh_basis()
    assert not torch.allclose(tr.model.basis, first)  # recomputed from the frames that arrived since
    data.ended.set()
    tr._begin_consolidation()
    frozen = tr.model.basis.clone()
    for _ in range(3):
        tr.step()
    assert torch.equal(tr.model.basis, frozen)
    x = encode.prepare(tr.model, data.frames[:5], tr._mean, tr._gain, "cpu")  # the input contract applies it
    assert torch.allclose(tr.model.denoise(x), x, atol=1e-4)


def test_learning_rate_falls_linearly_over_the_consolidation():
    data = ScanData.from_array("done", tilted_discs())  # ended: consolidation from the first step
    cfg = TrainerConfig(**{**FAST, "lr": 1e-3, "lr_final": 0.1, "consolidate_seconds": 10.0})
    tr = OnlineTrainer(cfg)
    tr._begin(data)
    assert tr._try_build()
    tr._begin_consolidation()
    for elapsed, expect in ((5.0, 1e-3 * (1 - 0.9 * 0.5)), (20.0, 1e-4)):  # half-way, then past the deadline
        tr._consolidation_t0 = time.monotonic() - elapsed
        tr.step()
        assert tr.opt.param_groups[0]["lr"] == pytest.approx(expect, rel=1e-3)
