"""The DPC panels: iDPC (a declared map, titled here) and the direction of the DPC field, with the calibration.

The calibration comes in the snapshot header's ``map_attrs`` (``dpc_rotation_deg``, ``dpc_flip``,
``dpc_calibration``), as the results file's ``maps`` group has it; ``calibration_text`` puts it in words
for the panel titles. The direction panel colours ``atan2(dpc_y, dpc_x)`` by hue and the field's
magnitude by value (``maps.direction_rgba``, the colour wheel of the COM direction panel): a display
transform, like that panel's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rrstem.gui.maps import ImagePanel, StableLevels, direction_rgba
from rrstem.stream.snapshot import Arrays, SnapshotHeader

#: the panel that shows no snapshot array of its own: Arrays.DPC_X and DPC_Y as a direction and a magnitude
DPC_DIRECTION = "dpc_direction"
DIRECTION_TITLE = "DPC direction"


def calibration_text(attrs: dict) -> str:
    """The calibration in a few words, e.g. "found 36.96±0.07°, flip"; "no calibration yet" without one."""
    if "dpc_rotation_deg" not in attrs:
        return "no calibration yet"
    record = attrs.get("dpc_calibration") or {}
    text = f"{record.get('source', '?')} {float(attrs['dpc_rotation_deg']):.2f}"
    uncertainty = record.get("uncertainty_deg")
    if isinstance(uncertainty, (int, float)) and np.isfinite(uncertainty):
        text += f"±{uncertainty:.2f}"
    text += "°"
    if attrs.get("dpc_flip"):
        text += ", flip"
    if record.get("carried_over"):
        text += ", earlier scan's"
    elif record.get("source") == "found" and not record.get("settled"):
        text += ", settling"
    return text


class DPCPanels:
    """Keeps the direction panel (made on the first DPC data, by ``add_panel``) and both panels' titles."""

    def __init__(self, add_panel: Callable[[str, str], ImagePanel]):
        self.add_panel = add_panel
        self.magnitude = StableLevels()  # the value scale of the colour wheel, steady while the scan fills

    def show(self, header: SnapshotHeader, arrays: dict, panels: dict[str, ImagePanel]) -> None:
        if Arrays.DPC_X not in arrays or Arrays.DPC_Y not in arrays:
            return
        text = calibration_text(header.map_attrs)
        direction = panels.get(DPC_DIRECTION) or self.add_panel(DPC_DIRECTION, DIRECTION_TITLE)
        fx, fy = arrays[Arrays.DPC_X], arrays[Arrays.DPC_Y]
        magnitude = np.hypot(fx, fy)
        levels = self.magnitude.update(magnitude)
        direction.set_data(direction_rgba(np.arctan2(fy, fx), magnitude, levels[1] if levels else 1.0))
        direction.set_title(f"{DIRECTION_TITLE}, {text}")
        idpc = panels.get(Arrays.IDPC)
        if idpc is not None:
            unit = next((m.get("unit") for m in header.maps if m.get("name") == Arrays.IDPC), "")
            idpc.set_title(f"iDPC{f' ({unit})' if unit else ''}, {text}")
