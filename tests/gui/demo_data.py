"""Synthetic snapshots with a known answer, for the dashboard's tests, benchmark and screenshots.

The maps show a graphene-like honeycomb lattice; the scan fills in row by row.
Every name comes from the snapshot schema (``rrstem.stream.snapshot``): the
arrays the service sends, the training histories (``history_key`` over the
model's step and evaluation histories, each as long as its axis) and the
counters, so the tests exercise the schema the service publishes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rrstem.model.interface import (
    ANGLE_KL, CONTENT_KL, EVAL_HISTORIES, EVAL_STEP, HELDOUT_ELBO, IMAGES_SEEN, LATENT_R_MAX, LOSS,
    RECONSTRUCTION, ROTATION_R, STEP, STEP_HISTORIES, TIME,
)
from rrstem.stream.reductions.dpc import DDPC, DPC_X, DPC_Y, IDPC
from rrstem.stream.snapshot import COUNTERS, Arrays, Snapshot, SnapshotHeader, history_key

#: the DPC maps as a service declares them (scan step in nm, COM in px) and a calibration found on the data
DPC_SPECS = (DPC_X, DPC_Y, IDPC, DDPC)
DPC_ATTRS = {"dpc_rotation_deg": 36.96, "dpc_flip": True, "dpc_descan": "plane",
             "dpc_calibration": {"source": "found", "uncertainty_deg": 0.07, "curl_ratio": 0.03, "positions": 900,
                                 "settled": True, "carried_over": False}}

EVAL_EVERY = 5  #: logged steps per held-out evaluation
DEFECTS = ((9, 20), (21, 7))  #: (y, x) of the positions whose anomaly passes the threshold
ALARM_THRESHOLD = 3.0
BATCH = 64  #: images per training step


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


def training_histories(history: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every history in the schema, by name: ``history`` logged steps, one evaluation per EVAL_EVERY."""
    step = np.arange(history, dtype=np.float64) * 10
    recon = 1.0 + 3.0 * np.exp(-step / 150) + 0.05 * rng.random(history)
    content_kl = 0.5 + 0.5 * np.exp(-step / 100)
    angle_kl = 0.1 + 0.2 * np.exp(-step / 200)
    eval_step = step[EVAL_EVERY - 1 :: EVAL_EVERY]
    h = {
        STEP: step,
        TIME: step * 0.02,
        IMAGES_SEEN: step * BATCH,
        RECONSTRUCTION: recon,
        CONTENT_KL: content_kl,
        ANGLE_KL: angle_kl,
        LOSS: recon + content_kl + angle_kl,
        EVAL_STEP: eval_step,
        HELDOUT_ELBO: 1.6 + 3.9 * np.exp(-eval_step / 150),
        ROTATION_R: 0.9 * (1 - np.exp(-eval_step / 200)),
        LATENT_R_MAX: 0.7 * (1 - np.exp(-eval_step / 300)),
    }
    assert set(h) == set(STEP_HISTORIES + EVAL_HISTORIES)
    return h


def synthetic_snapshot(ny=64, nx=64, latent_dim=4, filled_rows=None, seq=0, scan_id="synthetic",
                       seed=0, detector=64, history=50, step_nm=0.05, with_model=True) -> Snapshot:
    """A snapshot of a honeycomb scan with rows ``[0, filled_rows)`` filled (all if None).

    ``history`` logged training steps, ``history // EVAL_EVERY`` evaluations;
    ``header.latest_index`` is the last position of the last filled row.
    """
    rng = np.random.default_rng(seed + seq)
    filled_rows = ny if filled_rows is None else filled_rows
    atoms = honeycomb(ny, nx)
    gy, gx = np.gradient(atoms)
    maps = {
        Arrays.VBF: 1.0 - 0.6 * atoms,
        Arrays.VADF: atoms,
        Arrays.COM_X: -gx * 4,
        Arrays.COM_Y: -gy * 4,
    }
    maps.update({Arrays.DPC_X: gx * 4, Arrays.DPC_Y: gy * 4, Arrays.IDPC: (atoms - atoms.mean()) * 4,
                 Arrays.DDPC: np.gradient(gx, axis=1) * 4 + np.gradient(gy, axis=0) * 4})
    maps[Arrays.COM_MAGNITUDE] = np.hypot(maps[Arrays.COM_X], maps[Arrays.COM_Y])
    maps[Arrays.COM_ANGLE] = np.arctan2(maps[Arrays.COM_Y], maps[Arrays.COM_X])
    if with_model:
        maps[Arrays.ROTATION] = np.angle(np.exp(1j * (maps[Arrays.COM_ANGLE] + 0.3)))
        maps[Arrays.RECON_ERROR] = 0.1 + 0.05 * atoms
        maps[Arrays.RECON_SIGMA] = 1.0 + 0.2 * atoms
        maps[Arrays.RRVAE_ANOMALY] = 1.0 + 0.2 * atoms
    maps[Arrays.ANOMALY] = 1.0 + 0.2 * atoms  # the defect map is the scan's own (stream/defects.py)
    for y, x in DEFECTS:
        if y < ny and x < nx:
            maps[Arrays.ANOMALY][y, x] = 6.0 + y / ny  # two defects, the lower one scores higher
    for name in maps:
        arr = maps[name] + 0.02 * rng.standard_normal((ny, nx))
        if name == Arrays.ROTATION:
            arr = np.angle(np.exp(1j * arr))
        maps[name] = arr.astype(np.float32)
    arrays: dict[str, np.ndarray] = dict(maps)
    if with_model:
        latent = np.stack([atoms * np.cos(i) + maps[Arrays.COM_MAGNITUDE] * np.sin(i) for i in range(latent_dim)])
        arrays[Arrays.LATENT] = (latent + 0.02 * rng.standard_normal(latent.shape)).astype(np.float32)
    for arr in arrays.values():
        arr[..., filled_rows:, :] = np.nan
    a = np.where(np.isfinite(arrays[Arrays.ANOMALY]), arrays[Arrays.ANOMALY], -np.inf)
    above = np.argwhere(a > ALARM_THRESHOLD)
    arrays[Arrays.ALARMS] = above[np.argsort(-a[tuple(above.T)])].astype(np.int32).reshape(-1, 2)
    arrays[Arrays.ALARM_THRESHOLD] = np.array(ALARM_THRESHOLD, dtype=np.float32)
    filled = np.zeros((ny, nx), np.uint8)
    filled[:filled_rows] = 1
    arrays[Arrays.FILLED] = filled
    arrays[Arrays.MEAN_PATTERN] = disc(detector, detector, detector / 5, detector / 2, detector / 2)
    histories = training_histories(history, rng)
    for name, values in histories.items():
        arrays[history_key(name)] = values  # float64, as the service sends them
    done = filled_rows * nx
    counters = dict.fromkeys(COUNTERS, 0)
    counters.update(received=done, duplicate=2, invalid=1)
    header = SnapshotHeader(
        seq=seq, scan_id=scan_id, state="acquiring" if done < ny * nx else "done",
        scan_shape=[ny, nx], frame_shape=[detector, detector], binned_shape=[detector, detector],
        expected=ny * nx, frames_per_s=1234.0, counters=counters,
        latest_index=[filled_rows - 1, nx - 1] if filled_rows else None,
        calibration={"scan_step_nm": step_nm} if step_nm else {}, com_unit="px",
        training={"state": "running", "step": int(histories[STEP][-1]), "loss": float(histories[LOSS][-1])},
        maps=[dataclasses.asdict(m) for m in DPC_SPECS], map_attrs=DPC_ATTRS,
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
