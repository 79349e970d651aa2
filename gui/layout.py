"""The dashboard's layout: the map panels it always shows, in order, and how panels are named.

A map that a reduction of the service declares as a panel (``header.maps``)
and that is not among ``FIXED_MAPS`` gets a panel of its own when its first
data arrive (``Dashboard._add_declared_maps``).
"""

from __future__ import annotations

from rrstem.stream.snapshot import Arrays

#: the one map panel that shows no snapshot array of its own: it colours Arrays.COM_ANGLE by Arrays.COM_MAGNITUDE
COM_DIRECTION = "com_direction"
#: (panel name, title); a panel is named after the snapshot array it shows
FIXED_MAPS = [
    (Arrays.VBF, "virtual bright field"),
    (Arrays.VADF, "virtual annular dark field"),
    (Arrays.COM_MAGNITUDE, "COM magnitude"),
    (COM_DIRECTION, "COM direction"),
    (Arrays.ROTATION, "rrVAE rotation (rad)"),
    (Arrays.RECON_ERROR, "reconstruction error"),
    (Arrays.ANOMALY, "defect map"),
]
#: maps that only the rrVAE makes; their panels say so until the first arrives
MODEL_PANELS = (Arrays.ROTATION, Arrays.RECON_ERROR)
#: one panel per channel of Arrays.LATENT, named LATENT_PANEL + channel
LATENT_PANEL = Arrays.LATENT + "/"
#: the frame inspector's title while it follows the newest frame
NEWEST_TITLE = "newest frame"


def latent_panel(i: int) -> str:
    """Panel name of content latent ``i``."""
    return f"{LATENT_PANEL}{i}"


def scan_step(calibration: dict) -> tuple[float, float] | None:
    """(sy, sx) in nm from ``calibration['scan_step_nm']`` (a number or [sy, sx])."""
    step = calibration.get("scan_step_nm")
    if step is None:
        return None
    if isinstance(step, (list, tuple)):
        return float(step[0]), float(step[1])
    return float(step), float(step)
