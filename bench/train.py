"""Training speed of the rrVAE step: rrstem's model against a plain reference.

Measures training image-steps per second (images in a batch x optimiser steps
per second: forward, loss, backward, Adam) on one torch thread (the trainer's
budget on CPU), on random float32 64x64 frames (the cost does not depend on
the content), fixed seeds, after warm-up steps. Cases:

- ``reference``: the paper's configuration written plainly, as atomai does it:
  rotate a (B, P, 2) coordinate grid per image, concatenate the content latents
  to every pixel, run the full MLP decoder over all 4096 pixels;
- ``rrstem_full``: ``model/rrvae.py`` with the same configuration (the
  paper's scalar angle head, no mask, all pixels): the rotation folded into
  the first layer;
- ``rrstem_mask``: with the circular mask (radius 1: 3,228 of 4,096 pixels);
- ``rrstem_sub<k>``: with the mask and ``k`` random pixels per step.

Each case runs at batch 20 (the paper's setting) and 128. Prints JSON with
image-steps/s, ms per step and the ratio to the reference at the same batch,
plus a breakdown of where the reference step's time goes (encoder vs decoder
forward+backward).

    python bench/train.py [--seconds 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

from rrstem.model.rrvae import RRVAE, RRVAEConfig, angle_kl, backward_in_chunks, coordinate_grid
from rrstem.model.system import tune_malloc


class ReferenceRVAE(nn.Module):
    """The paper's rVAE without optimisations: concatenated coordinates, full decoder."""

    def __init__(self, h=64, w=64, latent_dim=2, hidden=128, phi_prior=0.1):
        super().__init__()
        self.phi_prior = phi_prior
        self.register_buffer("grid", torch.from_numpy(coordinate_grid(h, w)))
        self.enc = nn.Sequential(nn.Linear(h * w, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.enc_mean = nn.Linear(hidden, 1 + latent_dim)
        self.enc_logsd = nn.Linear(hidden, 1 + latent_dim)
        self.dec = nn.Sequential(nn.Linear(2 + latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def loss(self, x):
        B = x.shape[0]
        h = self.enc(x)
        mean, logsd = self.enc_mean(h), self.enc_logsd(h)
        lat = mean + torch.exp(logsd) * torch.randn_like(mean)
        phi, z = lat[:, 0], lat[:, 1:]
        rot = torch.stack([torch.cos(phi), torch.sin(phi), -torch.sin(phi), torch.cos(phi)], 1).view(B, 2, 2)
        coords = self.grid.expand(B, -1, -1) @ rot  # (B, P, 2): R(-phi) c per pixel
        zz = z[:, None, :].expand(-1, coords.shape[1], -1)  # (B, P, d)
        recon = self.dec(torch.cat([coords, zz], dim=-1)).squeeze(-1)  # (B, P)
        rec = 0.5 * ((recon - x) ** 2).sum(1).mean()
        kl_z = (0.5 * (mean[:, 1:] ** 2 + torch.exp(2 * logsd[:, 1:]) - 1) - logsd[:, 1:]).sum(1).mean()
        return rec + kl_z + angle_kl(logsd[:, 0], self.phi_prior).mean()


def time_steps(step, seconds: float, warmup: int = 3) -> float:
    """Seconds per call of ``step``, after ``warmup`` calls, over at least ``seconds``."""
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return (time.perf_counter() - t0) / n


def make_step(model, loss_fn, x):
    """The reference step: one forward and backward over the whole batch, then Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        opt.step()
    return step


def make_rrstem_step(model: RRVAE, frames: torch.Tensor, k: int | None):
    """The trainer's step: masked input, optional pixel subset, gradients accumulated in chunks."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = model.flatten(frames)

    def step():
        pixels = None if k is None else torch.randperm(model.n_pixels, device=x.device)[:k]
        opt.zero_grad(set_to_none=True)
        backward_in_chunks(model, x, pixels)
        opt.step()
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per case, s")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the trainer uses 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--subsample", type=int, nargs="*", default=[1024, 512])
    ap.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    args = ap.parse_args(argv)
    malloc = False if args.no_tune_malloc else tune_malloc()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    out = {"device": args.device, "threads": args.threads, "tuned_malloc": malloc, "image_shape": [64, 64], "cases": {}}
    for batch in (20, 128):
        torch.manual_seed(0)
        frames = torch.randn(batch, 64, 64, device=dev)
        ref = ReferenceRVAE().to(dev)
        t_ref = time_steps(make_step(ref, lambda f: ref.loss(f.reshape(batch, -1)), frames), args.seconds)
        cases = {"reference": t_ref}
        for name, mask, k in [("rrstem_full", None, None), ("rrstem_mask", 1.0, None)] + [
                (f"rrstem_sub{k}", 1.0, k) for k in args.subsample]:
            torch.manual_seed(0)
            m = RRVAE(RRVAEConfig(mask_radius=mask, angle_head="scalar")).to(dev)  # the paper's head, as the reference
            cases[name] = time_steps(make_rrstem_step(m, frames, k), args.seconds)
        for name, t in cases.items():
            out["cases"][f"{name}_b{batch}"] = {
                "batch": batch, "image_steps_per_s": round(batch / t, 1), "ms_per_step": round(1e3 * t, 2),
                "ratio_to_reference": round(t_ref / t, 2)}
    out["reference_breakdown_b20"] = breakdown(dev, args.seconds)
    print(json.dumps(out, indent=1))
    return out


def breakdown(dev, seconds: float) -> dict:
    """Share of the reference step (batch 20) spent in the encoder vs the decoder, forward + backward."""
    torch.manual_seed(0)
    ref = ReferenceRVAE().to(dev)
    x = torch.randn(20, 64 * 64, device=dev)
    t_total = time_steps(make_step(ref, ref.loss, x), seconds / 2)
    t_enc = time_steps(lambda: ref.enc_mean(ref.enc(x)).sum().backward(), seconds / 2)
    return {"step_ms": round(1e3 * t_total, 2), "encoder_fwd_bwd_ms": round(1e3 * t_enc, 2),
            "decoder_share": round(1 - t_enc / t_total, 3)}


if __name__ == "__main__":
    main()
