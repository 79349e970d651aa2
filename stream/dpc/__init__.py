"""Differential phase contrast (DPC) from the centre-of-mass maps: calibration, descan, iDPC and dDPC.

Plain NumPy in, NumPy and dataclasses out; nothing here knows about the service.

    cal = calibrate(com_x, com_y)                      # the scan-detector rotation and flip
    maps = dpc_maps(com_x, com_y, cal.angle_deg, cal.flip, step=0.05)
    maps.idpc, maps.units["idpc"]                      # e.g. the integrated DPC in mrad*nm

Axis, angle and sign conventions: ``field``; the calibration's method and its sign convention:
``calibration``; the integration: ``integrate``. docs/dpc.md explains them for users.
"""

from rrstem.stream.dpc.calibration import Calibration, NotEnoughData, calibrate
from rrstem.stream.dpc.field import curl, divergence, fit_descan, remove_descan, to_scan_frame
from rrstem.stream.dpc.integrate import integrate_gradient
from rrstem.stream.dpc.maps import DESCRIPTIONS, DPCMaps, dpc_maps

__all__ = ["Calibration", "NotEnoughData", "calibrate", "curl", "divergence", "fit_descan", "remove_descan",
           "to_scan_frame", "integrate_gradient", "DESCRIPTIONS", "DPCMaps", "dpc_maps"]
