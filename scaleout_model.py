"""The rrVAE of a scan reduced on Dask workers (``scaleout.py``): trained here on frames sampled across the
partitions, its final encode on the workers with the weights sent to them.

Training: each partition task sends back a random sample of its binned frames (``scaleout.sample``: seeded by
the partition's first position, so a task run again sends the same), at most ``TRAIN_FRAMES`` over the scan (every
frame of a smaller scan). ``SampledScan`` holds them with the scan's own mean pattern and COM maps, and the
trainer's synchronous core (``model.run.TrainingRun``) trains on it as on a scan that has ended: the
consolidation phase of the in-process trainer, to its bounds (``consolidate_seconds``, ``consolidate_steps``, a
held-out ELBO that stops improving). The model it keeps then encodes every frame, as below.

What a ``FixedEncoder`` does to an ended scan in-process (``model.inference.FixedEncoder.encode``), split:

- the driver fixes what is the scan's own: the mean pattern, the noise scale of its first frames (which it
  holds: the frames it calibrated on) and from them the model's noise weights;
- each partition task reads its frames again, bins them with the same pass (``scaleout.read_partition``),
  rebuilds the model from its weights (NumPy arrays, sent by Dask; nothing is unpickled into torch) and
  encodes them: rotation, latents, reconstruction errors per position; msgpack back;
- the driver gathers the maps and turns the latents into their principal axes over the whole scan, as
  ``encode.encode_scan`` does over all frames, then adds the outlier map.
"""

from __future__ import annotations

import msgpack
import numpy as np

from rrstem.model import anomaly, checkpoint, encode, metrics
from rrstem.model.config import TrainerConfig
from rrstem.model.inference import FixedEncoder
from rrstem.model.interface import LATENT, RECON_ERROR, RECON_SIGMA, ROTATION
from rrstem.model.run import TrainingRun
from rrstem.stream.scan import Scan
from rrstem.stream.store import store_dtype

#: frames the noise scale is estimated on, as ``FixedEncoder.encode`` does
SCALE_FRAMES = 64
#: frames of a scan the rrVAE trains on at most, sampled across its partitions
TRAIN_FRAMES = 16384


class SampledScan:
    """The ``model.interface.ScanView`` the rrVAE trains on: the sampled binned frames at their positions, in an
    array of the scan's size (only the sampled rows are written, so only their pages take memory), with the
    whole scan's mean pattern and COM maps. It has ended: every sample is in before training starts."""

    ended = True

    def __init__(self, scan: Scan):
        self._scan = scan
        self.scan_id, self.scan_shape = scan.scan_id, scan.scan_shape
        n = scan.scan_shape[0] * scan.scan_shape[1]
        g = scan.geometry
        self.frames = np.zeros((n, *g.binned_shape), dtype=store_dtype(scan.start.dtype, g.bin))
        self.filled = np.zeros(n, dtype=bool)

    @property
    def binned_shape(self) -> tuple[int, int]:
        return self._scan.binned_shape

    def add(self, positions: np.ndarray, frames: np.ndarray) -> None:
        self.frames[positions] = frames
        self.filled[positions] = True

    def n_filled(self) -> int:
        return int(self.filled.sum())

    def mean_pattern(self) -> np.ndarray:
        return self._scan.mean_pattern()

    def com_maps(self) -> dict[str, np.ndarray]:
        return self._scan.com_maps()


def train(view: SampledScan, trainer: dict, device: str) -> tuple[FixedEncoder, dict]:
    """Train the rrVAE on ``view`` (``trainer``: ``TrainerConfig`` overrides) to the consolidation's end;
    (the model it kept as an encoder, the trainer's export for the results file)."""
    cfg = TrainerConfig.from_dict(trainer)
    run = TrainingRun(view, cfg, device)
    while run.phase != "done":
        run.advance()
    export = run.export()
    if not export["state"]:
        raise ValueError(f"too few frames to train the rrVAE on ({view.n_filled()})")
    return FixedEncoder.from_state(export["config"], export["state"], export["step"], "trained on this scan",
                                   device, noise=cfg), export


def final_metrics(maps: dict[str, np.ndarray], scan: Scan) -> dict:
    """The trainer's metrics of the final maps of every position (``OnlineTrainer`` reports them for its own)."""
    found = metrics.com_metrics(maps, scan.com_maps())
    found.update(anomaly.summary(maps))
    return found


def weights_for_workers(encoder: FixedEncoder, scan: Scan, own: np.ndarray) -> dict:
    """What every encode task needs (plain Python and NumPy): the model's config and weights, its noise weights
    for this scan, the gain and the mean pattern. ``own``: the positions whose frames the driver holds (the
    first of the scan, where the noise scale is estimated, as in-process)."""
    mean = scan.mean_pattern()
    first = np.flatnonzero(own & scan.filled)[:SCALE_FRAMES]
    scale = encode.count_scale(np.asarray(scan.frames[first], dtype=np.float32), encoder.noise.dose_cap)
    model = encoder.model
    model.set_noise_weight(encode.noise_weight(model, mean, encoder.gain, scale))
    return {"config": model.cfg.to_json(), "gain": encoder.gain, "mean": mean,
            "state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
            "noise_weight": model.noise_weight.detach().cpu().numpy()}


def encode_frames(weights: dict, positions: np.ndarray, frames: np.ndarray) -> bytes:
    """msgpack: ``positions`` and the rotation, raw latents (not yet in principal axes) and reconstruction errors
    of their binned ``frames`` (n, h, w), with the model of ``weights``."""
    import torch

    torch.set_num_threads(1)  # one core per worker, as its Dask thread
    model = checkpoint.from_state(weights["config"], weights["state"], "cpu")
    model.set_noise_weight(torch.from_numpy(np.asarray(weights["noise_weight"], dtype=np.float32)))
    n = len(positions)
    arrays = encode.encode_scan(model, frames, np.ones(n, dtype=bool), (1, n), weights["mean"], weights["gain"],
                                torch.device("cpu"), axes=False)
    packed = {name: [a.dtype.str, list(a.shape), np.ascontiguousarray(a).tobytes()] for name, a in arrays.items()}
    return msgpack.packb({"positions": np.asarray(positions, dtype=np.int64).tobytes(), "arrays": packed},
                         use_bin_type=True)


def unpack(data: bytes) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(positions, arrays) of ``encode_frames``' bytes: each (1, n), the latents (d, 1, n)."""
    d = msgpack.unpackb(data, raw=False)
    arrays = {k: np.frombuffer(raw, dtype=np.dtype(dt)).reshape(shape) for k, (dt, shape, raw) in d["arrays"].items()}
    return np.frombuffer(d["positions"], dtype=np.int64), arrays


class ModelMapsOfScan:
    """The encoder's maps of the whole scan, filled in as the partitions' encodings come back."""

    def __init__(self, scan: Scan, latent_dim: int):
        n = scan.scan_shape[0] * scan.scan_shape[1]
        self.scan_shape = scan.scan_shape
        self.flat = {ROTATION: np.full(n, np.nan, np.float32), RECON_ERROR: np.full(n, np.nan, np.float32),
                     RECON_SIGMA: np.full(n, np.nan, np.float32)}
        self.latent = np.full((latent_dim, n), np.nan, np.float32)
        self.done = np.zeros(n, dtype=bool)

    def add(self, data: bytes) -> None:
        positions, arrays = unpack(data)
        for name, flat in self.flat.items():
            flat[positions] = arrays[name].reshape(-1)
        self.latent[:, positions] = arrays[LATENT].reshape(len(self.latent), -1)
        self.done[positions] = True

    def maps(self) -> dict[str, np.ndarray]:
        """The (ny, nx) maps, the latents in their principal axes over every encoded position, the outlier map."""
        ny, nx = self.scan_shape
        latent = self.latent.copy()
        idx = np.flatnonzero(self.done)
        if len(idx):
            latent[:, idx] = (encode.principal_axes(latent[:, idx].T) @ latent[:, idx]).astype(np.float32)
        out = {name: flat.reshape(ny, nx) for name, flat in self.flat.items()}
        out[LATENT] = latent.reshape(len(latent), ny, nx)
        return anomaly.add_outlier_map(out)
