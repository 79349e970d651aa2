"""The DPC calibration of a live session: given, loaded, or found from each scan as its rows come in.

- ``Choice``: the calibration a scan's DPC maps use, where it came from and how well it is known;
  ``attrs()`` is what the results file and the snapshot header say of it.
- ``DPCSession``: one per service, outliving its scans. It holds the user's settings (a given or loaded
  calibration, the descan) and the **settled** calibration found on an earlier scan, the starting
  value of the next (the rotation does not change between scans at one setting).
- ``LiveCalibration``: one per scan. It calibrates again each time another ``RECALIBRATE_EVERY`` of the
  scan has filled (maps are derived at snapshot time, so this runs on the snapshot budget, never per
  frame), and says when its own estimate has **settled**: its uncertainty is below ``SETTLED_DEG`` and
  it agrees with the previous estimate (angle within ``SETTLED_DEG``, same flip) or is the estimate of the
  whole scan. Until then a calibration carried over from an earlier scan is used, if there is one.
  The agreement rule matters: the first rows of a scan may hold only the outskirts of the scatterers'
  fields and read turned by 180 degrees (``calibration``), with a small uncertainty all the same.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import numpy as np

from rrstem.stream.dpc.calibration import Calibration, NotEnoughData, calibrate

#: a found estimate has settled when it is known to better than this, and agrees this well with the last one
SETTLED_DEG = 1.0
#: the part of the scan's positions that must fill between two estimates of one scan
RECALIBRATE_EVERY = 0.05


@dataclass(frozen=True)
class Choice:
    """The calibration one scan's DPC maps use."""

    angle_deg: float
    flip: bool
    source: str  #: "given" (options), "loaded" (a file), "found" (from the data)
    record: dict = field(default_factory=dict)  #: what else is known: uncertainty_deg, curl_ratio, file, ...

    def attrs(self) -> dict:
        """The ``maps`` group attributes (and snapshot header entries) of this choice (docs/results.md)."""
        return {"dpc_rotation_deg": self.angle_deg, "dpc_flip": self.flip,
                "dpc_calibration": {"source": self.source, **self.record}}


def found(cal: Calibration, filled: int) -> Choice:
    """The choice of a calibration found on ``filled`` positions."""
    return Choice(cal.angle_deg, cal.flip, "found", {
        "uncertainty_deg": cal.angle_uncertainty_deg, "curl_ratio": cal.curl_ratio,
        "curl_ratio_other_flip": cal.curl_ratio_other_flip, "polarity": cal.polarity,
        "positions": cal.positions, "filled": filled, "settled": False, "carried_over": False})


def _turn(a: float, b: float) -> float:
    """The smallest angle in degrees between ``a`` and ``b``."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


class DPCSession:
    """The service's DPC settings and the calibration it carries from scan to scan (thread-safe)."""

    def __init__(self, fixed: Choice | None = None, descan_order: int | None = 1,
                 reference: tuple[np.ndarray, np.ndarray, str, str] | None = None):
        if descan_order is not None and descan_order < 0:
            raise ValueError(f"--descan-order must be 0 (mean), 1 (plane) or more, not {descan_order}")
        self.fixed = fixed  #: a given or loaded calibration: no scan looks for its own
        self.descan_order = descan_order  #: the polynomial fitted and removed (None: no fit)
        self.reference = reference  #: a vacuum scan's (com_x, com_y, unit, where from), subtracted first
        self._carried: Choice | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, rotation_deg: float | None = None, flip: bool = False, calibration_file: str | None = None,
             descan_order: int | None = None, descan_reference: str | None = None) -> "DPCSession":
        """The session the options ask for (``--scan-rotation``/``--flip``, ``--dpc-calibration``,
        ``--descan-order``, ``--descan-reference``); ValueError says what is wrong with them or the files.
        The descan order defaults to 1 (a plane), or to no fit when a reference scan is given."""
        from rrstem.stream.dpc.files import load_calibration, load_reference

        if calibration_file is not None and (rotation_deg is not None or flip):
            raise ValueError("give the calibration either as --scan-rotation/--flip or as --dpc-calibration, not both")
        fixed = None
        if calibration_file is not None:
            angle, mirrored, earlier = load_calibration(calibration_file)
            record = {"file": str(calibration_file)}
            if "uncertainty_deg" in earlier:
                record["uncertainty_deg"] = earlier["uncertainty_deg"]
            if "source" in earlier:
                record["loaded_source"] = earlier["source"]
            fixed = Choice(angle % 360.0, mirrored, "loaded", record)
        elif rotation_deg is not None or flip:
            fixed = Choice(float(rotation_deg or 0.0) % 360.0, bool(flip), "given")
        reference = load_reference(descan_reference) if descan_reference is not None else None
        order = descan_order if descan_order is not None else (None if reference is not None else 1)
        return cls(fixed, order, reference)

    def carried(self) -> Choice | None:
        """The settled calibration of the latest scan that found one, or None."""
        with self._lock:
            return self._carried

    def settle(self, choice: Choice) -> None:
        """``choice`` (found and settled on a scan) is the next scans' starting value."""
        with self._lock:
            self._carried = choice

    def descan_text(self) -> str:
        """What is taken away as descan, in words, for the results and the dashboard."""
        order = {None: "none", 0: "mean", 1: "plane"}.get(self.descan_order, f"polynomial of order {self.descan_order}")
        if self.reference is None:
            return order
        return f"reference {self.reference[3]}" + ("" if self.descan_order is None else f", then {order}")


class LiveCalibration:
    """One scan's calibration as its rows come in (module docstring); ``choose`` is called at each derive."""

    def __init__(self, session: DPCSession, positions: int):
        self.session = session
        self.positions = positions
        self._own: Choice | None = None  # the newest estimate of this scan
        self._filled = 0  # the positions it was made on
        self._lock = threading.Lock()

    def choose(self, fx: np.ndarray, fy: np.ndarray, filled: int) -> Choice | None:
        """The calibration for the descan-free detector field ``(fx, fy)`` (NaN where unknown) over ``filled``
        positions; None while none is known (too few rows, and nothing carried over)."""
        if self.session.fixed is not None:
            return self.session.fixed
        with self._lock:
            due = filled == self.positions or filled - self._filled >= RECALIBRATE_EVERY * self.positions
            if due and filled > self._filled:
                self._estimate(fx, fy, filled)
            own = self._own
        if own is not None and own.record["settled"]:
            return own
        carried = self.session.carried()
        if carried is not None:
            return replace(carried, record={**carried.record, "carried_over": True})
        return own

    def _estimate(self, fx: np.ndarray, fy: np.ndarray, filled: int) -> None:
        try:
            new = found(calibrate(fx, fy, descan_order=None), filled)
        except NotEnoughData:
            return
        last = self._own
        sure = new.record["uncertainty_deg"] < SETTLED_DEG  # False for NaN (one row of stencil)
        agrees = last is not None and last.flip == new.flip and _turn(last.angle_deg, new.angle_deg) < SETTLED_DEG
        settled = sure and (agrees or filled == self.positions)
        self._own, self._filled = replace(new, record={**new.record, "settled": settled}), filled
        if settled:
            self.session.settle(self._own)
