"""The optimiser and its schedules: Adam (fused where torch has the kernel), the learning rate over the scan and
the consolidation, the consolidation's time bound, and torch's first-use costs paid up front."""

from __future__ import annotations

import time

import torch

from rrstem.model.config import TrainerConfig


def learning_rate(cfg: TrainerConfig, scan_progress: float, consolidation_progress: float = 0.0) -> float:
    """The learning rate ``scan_progress`` (share of the positions arrived) through the scan and
    ``consolidation_progress`` (share of ``consolidate_steps`` done) through the consolidation, both
    clipped to 0..1: ``cfg.lr`` falling linearly to ``lr * lr_scan_end`` at the last frame, then on
    to ``lr * lr_final``."""
    p, q = (min(max(v, 0.0), 1.0) for v in (scan_progress, consolidation_progress))
    at_end = 1.0 - (1.0 - cfg.lr_scan_end) * p
    return cfg.lr * (at_end - (at_end - cfg.lr_final) * q)


def consolidation_seconds(cfg: TrainerConfig, trained: float) -> float:
    """The consolidation's time bound after ``trained`` seconds of training while the scan ran: the scan
    was training time too, so ``consolidate_seconds - scan_credit * trained``, within
    ``consolidate_min_seconds .. consolidate_seconds``."""
    return min(cfg.consolidate_seconds, max(cfg.consolidate_min_seconds,
                                            cfg.consolidate_seconds - cfg.scan_credit * max(trained, 0.0)))


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, with the fused kernel where torch has one (CPU, CUDA): one kernel for all the rrVAE's tensors
    is faster than the per-tensor loop."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))


def warm_up(device) -> float:
    """Pay torch's first-use costs now, not in a scan's first seconds; returns the seconds it took.

    The first optimiser a process makes imports ``torch._dynamo``, a slow import; the first backward
    pass starts autograd's engine. The trainer thread calls this once, as the service starts.
    """
    t0 = time.perf_counter()
    p = torch.zeros(4, device=device, requires_grad=True)
    opt = adam([p], 1e-3, torch.device(device))
    torch.tanh(p).square().sum().backward()
    opt.step()
    return time.perf_counter() - t0
