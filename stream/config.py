"""What ``rrstem serve`` can be told (``ServiceConfig``), and the encoder it asks for (``make_encoder``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rrstem.model.interface import ScanEncoder
from rrstem.stream.preprocess import PreprocessConfig


class DPCOptions(BaseModel):
    """How the DPC maps are made (``stream/reductions/dpc.py``, README "DPC: rotation, descan, iDPC")."""

    model_config = ConfigDict(extra="forbid")

    rotation_deg: float | None = Field(None, description="The scan-detector rotation, degrees (given); None: "
                                       "found from the data, unless calibration_file is given.")
    flip: bool = Field(False, description="The detector's rows are mirrored against the scan (given).")
    calibration_file: str | None = Field(None, description="Load the calibration: a results file (FILE or "
                                         "FILE:SCAN_ID) or a JSON file {\"rotation_deg\": ..., \"flip\": ...}.")
    descan_order: int | None = Field(None, ge=0, description="Polynomial fitted to the COM field and removed as "
                                     "descan: 0 mean, 1 plane, ...; None: a plane, or no fit with a reference.")
    descan_reference: str | None = Field(None, description="A vacuum scan's results (FILE or FILE:SCAN_ID): its "
                                         "COM maps are subtracted as descan.")


class ServiceConfig(BaseModel):
    """Everything ``rrstem serve`` can be told. Endpoints may use port 0 when bound."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    listen: str = Field("tcp://127.0.0.1:5555", description="Frames endpoint (detector or simulator).")
    bind: bool = Field(False, description="Bind the frames socket instead of connecting to the sender.")
    mode: Literal["pull", "sub"] = Field("pull", description="pull: lossless; sub: tap a PUB stream.")
    protocol: str = Field("rrstem", description="Wire protocol of the sender (see stream/detectors/).")
    publish: str | None = Field("tcp://127.0.0.1:5556", description="Snapshot PUB endpoint (bound); None: off.")
    control: str | None = Field("tcp://127.0.0.1:5557", description="Control REP endpoint (bound); None: off.")
    out: Path | None = Field(Path("rrstem-results.h5"), description="Results file; None: do not write.")
    keys: Path | None = Field(None, description="CURVE keys folder (`rrstem keys`): the bound sockets are CURVE "
                              "servers that let in only its authorized/ clients, a connecting frames socket a CURVE "
                              "client (stream/auth.py); None: no authentication.")
    read_only_control: bool = Field(False, description="Refuse control commands that change the service "
                                    "(stop, training commands, save to a path).")
    events: str | None = Field(None, description="Events PUB endpoint (bound; stream/events.py); None: off "
                               "(events are still kept in EventPublisher.recent). serve: tcp://127.0.0.1:5558.")
    steering: str | None = Field(None, description="Steering PUB endpoint (bound), where rescan requests go to "
                                 "the microscope bridge; None: off. serve: tcp://127.0.0.1:5559.")
    steer_timeout: float = Field(30.0, gt=0, description="A rescan request the bridge neither answers nor starts "
                                 "within this many seconds is reported, s.")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    dpc: DPCOptions = Field(default_factory=DPCOptions)
    scan_shape: tuple[int, int] | None = Field(None, description="Override the start message's scan shape.")
    sync_offset: int = Field(0, description="Frames to skip at the start of an acquisition; negative: frames "
                             "missing there (stream/acquisition.py).")
    flyback: int = Field(0, ge=0, description="Extra frames at the end of each scan line, discarded.")
    queue_size: int = Field(32, ge=1, description="Messages buffered between receiver and pipeline.")
    snapshot_hz: float = Field(10.0, gt=0, le=10.0, description="Snapshot rate limit.")
    train: bool = Field(True, description="Train the rrVAE online.")
    trainer: dict[str, Any] = Field(default_factory=dict, description="TrainerConfig fields (flat or nested).")
    device: str = Field("cpu", description="Torch device for the trainer (cpu, cuda, cuda:1, mps).")
    model: Path | None = Field(None, description="Encode with this trained rrVAE (.pt or results .h5); no training.")
    finish_timeout: float = Field(120.0, gt=0, description="Longest wait for the trainer at scan end, s.")
    once: bool = Field(False, description="Stop after the first scan's results are written.")
    idle_timeout: float | None = Field(None, gt=0, description="Seconds without frames after which a scan with no "
                                       "end is closed, incomplete ('idle'); None: from the frame interval seen.")
    save_frames: bool = Field(False, description="Keep each scan's binned frames beside the results file, as "
                              "an EMD 1.0 / py4DSTEM DataCube <results>.<scan>.binned.emd (for `rrstem export`).")
    checkpoint_seconds: float = Field(30.0, ge=0, description="Write the running scan's partial results this "
                                      "often (atomically); 0: no checkpoints.")
    stop_timeout: float = Field(10.0, gt=0, description="Longest time from a stop (control, SIGTERM, Ctrl-C) to "
                                "the running scan's results in the file, s.")
    retry_seconds: float = Field(5.0, gt=0, description="Retry a failed results write this often, s.")


def limit_blas_threads() -> None:
    """One BLAS thread for the whole process.

    The service budgets its cores explicitly (ingest on one, the trainer on the
    other). OpenBLAS's own pool would spin on both cores for the small
    per-batch products and starve the ZeroMQ I/O thread, which slows ingest.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def make_encoder(cfg: ServiceConfig) -> ScanEncoder | None:
    """The encoder ``cfg`` asks for: a fixed trained model (``model``), the online trainer (``train``), or none."""
    if cfg.model is not None:
        from rrstem.model.inference import FixedEncoder

        path = Path(cfg.model)
        if path.suffix.lower() in (".h5", ".hdf5"):
            from rrstem.stream.results import read_model

            return FixedEncoder.from_state(*read_model(path), str(path), device=cfg.device)
        return FixedEncoder.from_checkpoint(path, cfg.device)
    if cfg.train:
        from rrstem.model.trainer import OnlineTrainer

        return OnlineTrainer(cfg.trainer, device=cfg.device)
    return None
