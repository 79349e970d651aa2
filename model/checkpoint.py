"""rrVAE checkpoints: the weights with the model config, the step count and the input contract.

A checkpoint is one ``torch.save`` file holding only tensors and plain
Python values, so it loads with ``torch.load(..., weights_only=True)``:
``{"format": "rrstem-rrvae", "version": 1, "config": RRVAEConfig JSON,
"step": int, "state": state_dict, "extra": {...}}``. ``extra`` carries what
the trainer needs to reuse a model on new frames (the input ``gain``, the
trainer config) and must be JSON-like. ``from_state`` also makes the model
stored in a results file (its config and a state dict of NumPy arrays).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rrstem.model.rrvae import RRVAE, RRVAEConfig

FORMAT = "rrstem-rrvae"
VERSION = 1


def save(path: str | os.PathLike, model: RRVAE, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` atomically (temporary file, then rename)."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_json(), "step": int(step),
               "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": extra or {}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[RRVAE, dict[str, Any]]:
    """(model on ``device`` in eval mode, {"step", "config", "extra"}) from a checkpoint file."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rrstem rrVAE checkpoint (format {FORMAT!r} expected)")
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"{path} has checkpoint version {payload['version']}; this rrstem reads <= {VERSION}")
    model = from_state(payload["config"], payload["state"], device)
    return model, {"step": int(payload["step"]), "config": payload["config"], "extra": payload.get("extra", {})}


def model_config(config: dict[str, Any]) -> RRVAEConfig:
    """The ``RRVAEConfig`` in a checkpoint's config or a results file's model config.

    A results file stores the model's options beside the trainer's (``trainer``,
    ``gain``, ``best_step``, ...): only the model's are read. A config written
    before ``angle_head`` existed is the paper's scalar head, as those models had; one written before
    ``likelihood`` existed was trained on the squared error.
    """
    names = {f.name for f in fields(RRVAEConfig)}
    if "image_shape" not in config:
        raise ValueError(f"not an rrVAE model config (no image_shape): keys {sorted(config)}")
    return RRVAEConfig.from_json({"angle_head": "scalar", "likelihood": "mse", **{k: v for k, v in config.items() if k in names}})


def from_state(config: dict[str, Any], state: dict[str, Any], device: str | torch.device = "cpu") -> RRVAE:
    """A model on ``device``, in eval mode, from a config JSON and a state dict of tensors or NumPy arrays.

    ``config`` is a checkpoint's ``config`` or a results file's ``/model`` config (see ``model_config``).
    """
    model = RRVAE(model_config(config))
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    return model.to(device).eval()
