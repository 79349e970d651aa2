"""What the model package needs from a scan, and what every encoder offers in return.

``model/`` imports nothing from the rest of rrstem. It defines the read-only
view of a scan it trains on (``ScanView``); the service's scan implements it,
and tests implement it over plain arrays. Every encoder of scans
(``OnlineTrainer``, which trains, and ``FixedEncoder``, which applies a
trained model) implements ``ScanEncoder``, so the service drives both alike.

The names of the maps and training histories an encoder produces are
declared here, once; the snapshot schema (``stream/snapshot.py``) publishes
them under these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args, runtime_checkable

import numpy as np

# --- the maps an encoder produces (all (ny, nx) float32 but ``LATENT``, NaN where no frame is) ---
ROTATION = "rotation"  #: the angle latent's posterior mean phi, rad (sign convention: ``rrvae.py``)
LATENT = "latent"  #: (d, ny, nx) content latents' posterior means
RECON_ERROR = "recon_error"  #: mean squared reconstruction error per pixel, in input units
RECON_SIGMA = "recon_sigma"  #: RMS reconstruction error in units of the expected Poisson noise (1 = noise level)
#: how unlike the rest of the scan the model finds each position, robust standard deviations (``anomaly.py``);
#: an auxiliary map: the product's defect map, ``anomaly``, and its alarms come from ``stream/defects.py``
RRVAE_ANOMALY = "rrvae_anomaly"
MAPS = (ROTATION, LATENT, RECON_ERROR, RECON_SIGMA, RRVAE_ANOMALY)
#: everything an encoder's maps hold
OUTPUTS = MAPS

# --- the COM maps a scan gives the model (``ScanView.com_maps``), to judge its maps against ---
COM_MAGNITUDE = "com_magnitude"  #: (ny, nx) COM deflection magnitude
COM_ANGLE = "com_angle"  #: (ny, nx) COM deflection direction, rad

# --- training histories, 1-D float64; each is plotted against its axis (HISTORY_AXIS) ---
STEP, TIME, IMAGES_SEEN = "step", "time", "images_seen"
LOSS, RECONSTRUCTION, CONTENT_KL, ANGLE_KL = "loss", "reconstruction", "content_kl", "angle_kl"
EVAL_STEP, HELDOUT_ELBO, ROTATION_R, LATENT_R_MAX = "eval_step", "heldout_elbo", "rotation_r", "latent_r_max"
#: one value per logged training step
STEP_HISTORIES = (STEP, TIME, IMAGES_SEEN, LOSS, RECONSTRUCTION, CONTENT_KL, ANGLE_KL)
#: one value per held-out evaluation
EVAL_HISTORIES = (EVAL_STEP, HELDOUT_ELBO, ROTATION_R, LATENT_R_MAX)
HISTORIES = STEP_HISTORIES + EVAL_HISTORIES
#: the abscissae: histories that are bookkeeping, never curves
HISTORY_AXES = (STEP, EVAL_STEP, TIME, IMAGES_SEEN)
#: the step axis each curve is plotted against
HISTORY_AXIS = {**{k: STEP for k in STEP_HISTORIES if k not in HISTORY_AXES},
                **{k: EVAL_STEP for k in EVAL_HISTORIES if k not in HISTORY_AXES}}
#: curves that are losses (the others are correlation metrics)
LOSS_HISTORIES = (LOSS, RECONSTRUCTION, CONTENT_KL, ANGLE_KL, HELDOUT_ELBO)

#: encoder states, as ``status()["state"]`` reports them
EncoderState = Literal["waiting", "running", "paused", "consolidating", "done", "failed"]
STATES: tuple[str, ...] = get_args(EncoderState)


@runtime_checkable
class ScanView(Protocol):
    """A scan as the model reads it: live, growing, never written through this view.

    ``frames`` rows are valid only where ``filled`` is True, and a filled row
    never changes, so a reader needs no lock to read it.
    """

    scan_id: str
    scan_shape: tuple[int, int]  #: (ny, nx)

    @property
    def binned_shape(self) -> tuple[int, int]:
        """(h, w) of the stored frames."""

    @property
    def frames(self) -> np.ndarray:
        """(ny*nx, h, w) the stored frames, in the store's dtype (the reader converts)."""

    @property
    def filled(self) -> np.ndarray:
        """(ny*nx,) bool: which positions hold a frame."""

    @property
    def ended(self) -> bool:
        """No more frames will arrive."""

    def n_filled(self) -> int:
        """How many positions hold a frame."""

    def mean_pattern(self) -> np.ndarray:
        """(h, w) float32: the running mean of the frames that have arrived (a fresh copy)."""

    def com_maps(self) -> dict[str, np.ndarray]:
        """(ny, nx) float32 maps ``COM_MAGNITUDE`` and ``COM_ANGLE`` (rad), NaN where missing (fresh copies)."""


@dataclass
class ModelMaps:
    """One encoding of a scan: the maps named in ``MAPS``, the scan and the training step they come from."""

    scan_id: str
    step: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> "ModelMaps":
        return ModelMaps(self.scan_id, self.step, {k: v.copy() for k, v in self.arrays.items()})


@runtime_checkable
class ScanEncoder(Protocol):
    """What the service asks of whatever encodes its scans: a trainer or a fixed, trained model.

    Every method may be called from any thread; none blocks longer than its timeout.
    """

    error: BaseException | None  #: the worker's failure, if any, with its traceback

    def start(self) -> "ScanEncoder":
        """Start the worker thread (idempotent)."""

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the worker; True if it ended within ``timeout``."""

    def is_alive(self) -> bool:
        """The worker thread runs (a failure on one scan does not end it)."""

    def attach(self, scan: ScanView) -> None:
        """Encode (and train on) ``scan`` from now on; whatever the previous scan was doing ends."""

    def wait_done(self, timeout: float) -> bool:
        """True once the attached scan has ended and its final maps are made."""

    def finish_now(self) -> None:
        """Make the attached (ended) scan's final maps now, with the model as it is: no more training."""

    def maps(self) -> ModelMaps | None:
        """The newest maps of the attached scan (a copy), or None before the first encoding."""

    def status(self) -> dict:
        """``state`` (one of ``STATES``), ``scan_id``, ``step`` and whatever else the encoder reports."""

    def histories(self) -> dict[str, np.ndarray]:
        """Training histories by the names in ``HISTORIES`` (empty for a fixed model)."""

    def reconstruct(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, reconstruction) of scan index ``index``, both (h, w), NaN outside the model's mask."""

    def export(self) -> dict:
        """What the results file stores: ``training``, ``metrics``, ``config``, ``state``, ``step``."""

    def pause(self) -> None:
        """Pause training; raises ValueError for an encoder that does not train."""

    def resume(self) -> None:
        """Resume training; raises ValueError for an encoder that does not train."""

    def reset_model(self) -> None:
        """Start the model again from a fresh initialisation; ValueError for one that does not train."""
