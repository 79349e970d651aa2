"""Reductions: the maps kept over a scan, each declared once (``base.py`` says how to add one).

The built-in reductions register themselves here, in this order: the centre
of mass (``com.py``), the mean pattern (``mean.py``), the virtual bright
and annular dark field (``virtual.py``) and DPC (``dpc.py``: the COM turned
into the scan's frame, descan removed, iDPC and dDPC). Installed packages add theirs
through the ``rrstem.reductions`` entry-point group.
"""

from rrstem.stream.reductions import com, dpc, mean, virtual  # noqa: F401  (registers the built-in reductions)
from rrstem.stream.reductions.base import (Buffer, MapSpec, Reduction, ScanInfo, Weight, WeightMap, register,
                                           registered, unregister)
from rrstem.stream.reductions.partial import Batch, Partial, View, bytes_per_position

__all__ = ["Batch", "Buffer", "MapSpec", "Partial", "Reduction", "ScanInfo", "View", "Weight", "WeightMap",
           "bytes_per_position", "register", "registered", "unregister"]
