"""Synthetic snapshots with a known answer, for the dashboard's tests, benchmark and screenshots.

The maps show a graphene-like honeycomb lattice; the scan fills in row by row.
Nothing here is used by the running dashboard.
"""

from __future__ import annotations

import numpy as np

from rrstem.stream.snapshot import Snapshot, SnapshotHeader


def honeycomb(ny: int, nx: int, period: float = 12.0) -> np.ndarray:
    """Bright spots on a honeycomb lattice, values in [0, 1]. (ny, nx) float32."""
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    k = 4 * np.pi / (np.sqrt(3) * period)
    f = sum(np.cos(k * (x * np.cos(t) + y * np.sin(t))) for t in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3,
                                                                    np.pi / 2 + 4 * np.pi / 3))
    return np.exp(-(f + 1.5) / 0.4).astype(np.float32)  # f = -1.5 on both sublattices


def disc(h: int, w: int, radius: float, cy: float, cx: float) -> np.ndarray:
    """A soft-edged bright-field disc, (h, w) float32."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot(y - cy, x - cx)
    return (1.0 / (1.0 + np.exp((r - radius) / 0.8))).astype(np.float32)


def synthetic_snapshot(ny=64, nx=64, latent_dim=4, filled_rows=None, seq=0, scan_id="synthetic",
                       seed=0, detector=64, history=50, step_nm=0.05, with_model=True) -> Snapshot:
    """A snapshot of a honeycomb scan with rows ``[0, filled_rows)`` filled (all if None)."""
    rng = np.random.default_rng(seed + seq)
    filled_rows = ny if filled_rows is None else filled_rows
    atoms = honeycomb(ny, nx)
    gy, gx = np.gradient(atoms)
    maps = {
        "vbf": 1.0 - 0.6 * atoms,
        "vadf": atoms,
        "com_x": -gx * 4,
        "com_y": -gy * 4,
    }
    maps["com_magnitude"] = np.hypot(maps["com_x"], maps["com_y"])
    maps["com_angle"] = np.arctan2(maps["com_y"], maps["com_x"])
    if with_model:
        maps["rotation"] = np.angle(np.exp(1j * (maps["com_angle"] + 0.3)))
        maps["recon_error"] = 0.1 + 0.05 * atoms
    for name in maps:
        arr = maps[name] + 0.02 * rng.standard_normal((ny, nx))
        if name == "rotation":
            arr = np.angle(np.exp(1j * arr))
        maps[name] = arr.astype(np.float32)
    arrays: dict[str, np.ndarray] = dict(maps)
    if with_model:
        latent = np.stack([atoms * np.cos(i) + maps["com_magnitude"] * np.sin(i) for i in range(latent_dim)])
        arrays["latent"] = (latent + 0.02 * rng.standard_normal(latent.shape)).astype(np.float32)
    for arr in arrays.values():
        arr[..., filled_rows:, :] = np.nan
    filled = np.zeros((ny, nx), np.uint8)
    filled[:filled_rows] = 1
    arrays["filled"] = filled
    arrays["mean_pattern"] = disc(detector, detector, detector / 5, detector / 2, detector / 2)
    steps = np.arange(history, dtype=np.float32) * 10
    arrays["training/step"] = steps
    arrays["training/loss"] = (1.0 + 4.0 * np.exp(-steps / 150) + 0.05 * rng.random(history)).astype(np.float32)
    arrays["training/heldout_loss"] = (arrays["training/loss"] * 1.05).astype(np.float32)
    arrays["training/corr_latent_com_magnitude"] = (0.9 * (1 - np.exp(-steps / 200))).astype(np.float32)
    arrays["training/corr_rotation_com_angle"] = (0.7 * (1 - np.exp(-steps / 300))).astype(np.float32)
    done = filled_rows * nx
    header = SnapshotHeader(
        seq=seq, scan_id=scan_id, state="acquiring" if done < ny * nx else "done",
        scan_shape=[ny, nx], frame_shape=[detector, detector], binned_shape=[detector, detector],
        expected=ny * nx, frames_per_s=1234.0,
        counters={"received": done, "missing": 0, "duplicate": 2, "invalid": 1, "dropped": 0},
        calibration={"scan_step_nm": step_nm} if step_nm else {}, com_unit="px",
        training={"state": "running", "step": int(steps[-1]), "loss": float(arrays["training/loss"][-1])},
    )
    return Snapshot(header=header, arrays=arrays)


def synthetic_frame_reply(y: int, x: int, detector: int = 64, with_model=True) -> dict:
    """A ``frame`` control reply (arrays unpacked): a disc shifted by the position."""
    frame = disc(detector, detector, detector / 5, detector / 2 + (y % 7) - 3, detector / 2 + (x % 5) - 2)
    mean = disc(detector, detector, detector / 5, detector / 2, detector / 2)
    reply = {"ok": True, "frame": frame, "mean": mean}
    if with_model:
        reply["recon"] = (frame - mean) * 0.9
        reply["residual"] = (frame - mean) - reply["recon"]
    return reply
