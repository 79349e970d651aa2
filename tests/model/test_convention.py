"""Trained on rotated copies: phi follows the displayed rotation with a + sign; content ignores rotation."""

import math

import numpy as np
import pytest
import torch

from rrstem.model.rrvae import RRVAE, RRVAEConfig, backward_in_chunks

SIZE = 21


def pattern(angle: float, t: float) -> np.ndarray:
    """A big blob at ``angle`` and one of amplitude ``t`` at ``angle + 2.2``, angles as atan2(row, col)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] - (SIZE - 1) / 2
    out = np.zeros((SIZE, SIZE))
    for a, amp in ((angle, 1.0), (angle + 2.2, t)):
        cy, cx = 4.5 * math.sin(a), 4.5 * math.cos(a)
        out += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5 ** 2))
    return out.astype(np.float32)


def train(angle_head: str) -> RRVAE:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    angles, ts = rng.uniform(-1.2, 1.2, 2048), rng.uniform(0.2, 1.0, 2048)
    frames = torch.from_numpy(np.stack([pattern(a, t) for a, t in zip(angles, ts)]))
    model = RRVAE(RRVAEConfig(image_shape=(SIZE, SIZE), latent_dim=1, hidden=48, mask_radius=1.0,
                              angle_head=angle_head))
    x = model.flatten(frames - frames.mean(0)) * 3  # (N, P)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        idx = torch.randint(len(x), (32,), generator=g)
        pixels = torch.randperm(model.n_pixels, generator=g)[:128]
        opt.zero_grad()
        backward_in_chunks(model, x[idx], pixels)
        opt.step()
    model.eval()
    model.data_mean = frames.mean(0)
    return model


def encode(model, angle, t):
    x = model.flatten((torch.from_numpy(pattern(angle, t)) - model.data_mean)[None]) * 3
    mean, _ = model.encode(x)
    return float(mean[0, 0]), float(mean[0, 1])


@pytest.mark.parametrize("angle_head", ["vector", "scalar"])  # the default and the paper's
def test_phi_sign_and_rotation_invariant_content(angle_head):
    model = train(angle_head)
    diffs, z_rot = [], []
    for a in (-0.7, -0.5, -0.3, -0.1, 0.1, 0.3):
        phi0, z0 = encode(model, a, 0.6)
        phi1, _ = encode(model, a + 0.3, 0.6)
        diffs.append(math.remainder(phi1 - phi0, 2 * math.pi))
        if a < 0:
            z_rot.append(z0)
    # + sign: same sense as atan2(row, col); the median ignores a pair across a jump of the encoder
    assert abs(np.median(diffs) - 0.3) < 0.1 and sum(d > 0.1 for d in diffs) >= 5, diffs
    # Known limitation, seen with the scalar head: the encoder splits the rotations into two branches near a = 0
    # (z and phi jump together), so content invariance is asserted within one branch.
    z_content = [encode(model, 0.0, t)[1] for t in (0.25, 0.6, 0.95)]
    assert np.std(z_rot) < 0.25 * (max(z_content) - min(z_content)), (z_rot, z_content)
