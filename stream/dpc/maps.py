"""The DPC maps of a scan from its COM maps and a calibration: dpc_x, dpc_y, idpc, ddpc."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rrstem.stream.dpc.field import divergence, remove_descan, to_scan_frame
from rrstem.stream.dpc.integrate import integrate_gradient

#: what each map is, for a results file or a dashboard; ``DPCMaps.units`` gives the unit of each
DESCRIPTIONS = {
    "dpc_x": "beam deflection along scan x (columns), in the scan frame, descan removed",
    "dpc_y": "beam deflection along scan y (rows), in the scan frame, descan removed",
    "idpc": "integrated DPC: the map whose gradient is (dpc_x, dpc_y); proportional to the phase",
    "ddpc": "differentiated DPC: divergence of (dpc_x, dpc_y); negative on atoms",
}


@dataclass(frozen=True)
class DPCMaps:
    """The four DPC maps, each ``(ny, nx)`` with NaN where the COM was not known."""

    dpc_x: np.ndarray   #: deflection along scan x, in ``unit`` (the COM's unit: mrad, or detector px)
    dpc_y: np.ndarray   #: deflection along scan y, in ``unit``
    idpc: np.ndarray    #: integral of the deflection over the scan, in ``unit * length_unit``; mean 0
    ddpc: np.ndarray    #: divergence of the deflection, in ``unit / length_unit``
    unit: str           #: the unit of the COM maps given
    length_unit: str    #: the unit of the scan step ("px": one scan step)

    @property
    def units(self) -> dict[str, str]:
        """Map name -> unit, e.g. ``{"idpc": "mrad*nm", ...}``."""
        return {"dpc_x": self.unit, "dpc_y": self.unit, "idpc": f"{self.unit}*{self.length_unit}",
                "ddpc": f"{self.unit}/{self.length_unit}"}


def dpc_maps(com_x: np.ndarray, com_y: np.ndarray, angle_deg: float, flip: bool, *,
             descan_order: int | None = 1, reference: tuple[np.ndarray, np.ndarray] | None = None,
             step: float | None = None, step_unit: str = "nm", unit: str = "mrad",
             cutoff: float | None = None) -> DPCMaps:
    """The DPC maps from detector-frame COM maps ``(com_x, com_y)`` (``(ny, nx)``, NaN where unknown).

    ``angle_deg``, ``flip``: the calibration (``calibrate`` finds them; see ``field`` for the
    convention). ``descan_order``, ``reference``: the descan taken away before turning
    (``field.remove_descan``). ``step``: the scan step in ``step_unit``; None gives maps per scan step
    (length unit "px"). ``unit``: the COM maps' unit, only recorded. ``cutoff``: the integration's
    low-frequency regulariser in cycles per scan step (``integrate.integrate_gradient``).

    To turn idpc into a phase in radians: ``phase = 2 pi / wavelength * idpc`` with the deflection in
    rad and the step in the wavelength's unit (mrad * nm: multiply by ``2 pi 1e-3 / wavelength_nm``).
    """
    if step is not None and not step > 0:
        raise ValueError(f"the scan step must be a positive length, not {step}")
    fx, fy = remove_descan(com_x, com_y, descan_order, reference)
    sx, sy = to_scan_frame(fx, fy, angle_deg, flip)
    length = 1.0 if step is None else float(step)
    return DPCMaps(dpc_x=sx, dpc_y=sy, idpc=integrate_gradient(sx, sy, step=length, cutoff=cutoff),
                   ddpc=divergence(sx, sy) / length, unit=unit,
                   length_unit="px" if step is None else step_unit)
