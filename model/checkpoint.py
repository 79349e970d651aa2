"""rrVAE checkpoints: the weights with the model config, the step count and the input contract.

A checkpoint is one ``torch.save`` file holding only tensors and plain
Python values, so it loads with ``torch.load(..., weights_only=True)``:
``{"format": "rrstem-rrvae", "version": 1, "config": RRVAEConfig JSON,
"step": int, "state": state_dict, "extra": {...}}``. ``extra`` carries what
the trainer needs to reuse a model on new frames (the intensity scale, the
trainer config) and must be JSON-like.
"""

from __future__ import annotations

import os
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


def from_state(config: dict, state: dict[str, Any], device: str | torch.device = "cpu") -> RRVAE:
    """A model from a config JSON and a state dict of tensors or NumPy arrays (as in a results file)."""
    model = RRVAE(RRVAEConfig.from_json(config))
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    return model.to(device).eval()
