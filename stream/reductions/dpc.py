"""Differential phase contrast (DPC), live: the COM turned into the scan's frame, descan removed, iDPC and dDPC.

It reads the COM's weights (intensity and the two first moments), so it adds no per-frame work to the
fused pass. At each derive (snapshot time, within the snapshot budget) it:

1. forms the COM field over the filled positions (``com.com_at``, the one COM computation);
2. takes the descan away: a vacuum scan's COM maps (``--descan-reference``) and/or a polynomial fitted to
   the field (``--descan-order``; a plane by default, none with a reference only);
3. takes the calibration (``stream/dpc/live.py``): the given or loaded one, else the one found on the
   rows scanned so far, re-estimated as the scan fills, or the settled one of an earlier scan;
4. turns the field into the scan's frame (``dpc_x``, ``dpc_y``), integrates it (``idpc``) and takes its
   divergence (``ddpc``) (``stream/dpc/maps.py``). ``idpc`` integrates this same field, descan removed,
   so its gradient is what ``dpc_x``/``dpc_y`` show.

Units: the COM's (mrad, or binned detector px) for ``dpc_x``/``dpc_y``; times the scan step in nm for
``idpc`` (per scan step, "px", when the start message gives no step), divided by it for ``ddpc``.
Until a calibration is known (fewer than 3 rows, nothing given or carried), the maps are NaN.
"""

from __future__ import annotations

import threading

import numpy as np

from rrstem.stream.dpc import DESCRIPTIONS, dpc_maps, remove_descan
from rrstem.stream.dpc.live import DPCSession, LiveCalibration
from rrstem.stream.reductions.base import MapSpec, Reduction, register
from rrstem.stream.reductions.com import com_at
from rrstem.stream.reductions.weights import INTENSITY, MOMENT_X, MOMENT_Y

DPC_X = MapSpec("dpc_x", "mrad", DESCRIPTIONS["dpc_x"], panel=False)
DPC_Y = MapSpec("dpc_y", "mrad", DESCRIPTIONS["dpc_y"], panel=False)
IDPC = MapSpec("idpc", "mrad*nm", "iDPC: integrated DPC, proportional to the phase")
DDPC = MapSpec("ddpc", "mrad/nm", DESCRIPTIONS["ddpc"], panel=False)
#: the attribute that says what was taken away as descan (beside those of ``live.Choice.attrs``)
DESCAN_ATTR = "dpc_descan"


@register
class DifferentialPhaseContrast(Reduction):
    name = "dpc"
    weights = (INTENSITY, MOMENT_X, MOMENT_Y)
    maps = (DPC_X, DPC_Y, IDPC, DDPC)

    def __init__(self, info):
        super().__init__(info)
        self.session: DPCSession = info.session.get(self.name) or DPCSession()
        self.live = LiveCalibration(self.session, info.scan_shape[0] * info.scan_shape[1])
        self.descan_order, self.reference, self.descan = self._descan()
        self._attrs: dict = {DESCAN_ATTR: self.descan}
        self._last: tuple | None = None  # ((filled count, carried calibration), maps) of the last derive
        self._lock = threading.Lock()

    @property
    def units(self) -> tuple[str, str]:
        """(the deflection's unit, the length unit of the scan step)."""
        return "mrad" if self.info.pixel_mrad else "px", "nm" if self.info.scan_step_nm else "px"

    def specs(self):
        unit, length = self.units
        return (MapSpec(DPC_X.name, unit, DPC_X.description, DPC_X.panel),
                MapSpec(DPC_Y.name, unit, DPC_Y.description, DPC_Y.panel),
                MapSpec(IDPC.name, f"{unit}*{length}", IDPC.description, IDPC.panel),
                MapSpec(DDPC.name, f"{unit}/{length}", DDPC.description, DDPC.panel))

    def _descan(self) -> tuple[int | None, tuple[np.ndarray, np.ndarray] | None, str]:
        """(polynomial order, reference maps, in words) for this scan: a reference on another grid or in another
        unit cannot be subtracted; a plane is fitted instead, and the words say why."""
        ref, order = self.session.reference, self.session.descan_order
        if ref is None:
            return order, None, self.session.descan_text()
        rx, ry, unit, origin = ref
        if rx.shape != tuple(self.info.scan_shape) or unit != self.units[0]:
            why = f"{rx.shape[0]}x{rx.shape[1]} in {unit}, this scan {self.info.scan_shape[0]}x" \
                  f"{self.info.scan_shape[1]} in {self.units[0]}"
            return 1, None, f"plane (reference {origin} not used: {why})"
        return order, (rx, ry), self.session.descan_text()

    def derive(self, view):
        filled = int(np.count_nonzero(view.filled))
        # a filled position's sums never change, so the filled count and the calibration carried in from
        # other scans say whether anything changed since the last derive (a scan that waits, a scan that ended)
        key = (filled, self.session.carried())
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return dict(self._last[1])
        cx, cy = com_at(view, self.info.pixel_mrad)
        com_x, com_y = view.scatter(cx), view.scatter(cy)  # (ny, nx) in the detector's frame
        fx, fy = remove_descan(com_x, com_y, self.descan_order, self.reference)
        choice = self.live.choose(fx, fy, filled)
        if choice is None:
            maps = {m.name: np.full(com_x.shape, np.nan) for m in self.maps}
            attrs = {DESCAN_ATTR: self.descan}
        else:
            unit, length = self.units
            found = dpc_maps(fx, fy, choice.angle_deg, choice.flip, descan_order=None, step=self.info.scan_step_nm,
                             unit=unit)
            maps = {DPC_X.name: found.dpc_x, DPC_Y.name: found.dpc_y, IDPC.name: found.idpc, DDPC.name: found.ddpc}
            attrs = {**choice.attrs(), DESCAN_ATTR: self.descan}
        for m in maps.values():
            m.setflags(write=False)  # shared by every caller until the scan changes
        with self._lock:
            self._attrs, self._last = attrs, (key, maps)
        return dict(maps)

    def attrs(self) -> dict:
        with self._lock:
            return dict(self._attrs)
