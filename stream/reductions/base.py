"""What a reduction declares, and the registry of the reductions every scan runs.

A reduction turns the binned frames of a scan into maps, in the spirit of
LiberTEM's UDFs, but split so that the per-frame work stays one fused,
compiled loop (``stream/framepass.py``):

- ``weights``: the per-frame quantities it needs, each the dot product of the
  binned frame with a fixed weight image (``Weight``; the common ones are the
  table in ``weights.py``). The pass computes every weight of every reduction
  of the scan in one loop, generated from that table; the results are kept per
  scan position, one column per weight, in the scan's ``Partial``.
- ``buffers``: anything else it keeps, per scan position or per binned pixel,
  with the ufunc that merges two partial results (``np.add`` for sums), filled
  by ``update`` from each batch.
- ``maps``: what it derives at snapshot time (``derive``), each with its name,
  unit and description (``MapSpec``). Snapshots, the results file and the
  dashboard read these declarations; nothing else names a reduction's maps.

A new map is one module: subclass ``Reduction``, declare the above, implement
``derive`` and decorate the class with ``@register``. Every scan that starts
after that runs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np

from rrstem.stream.preprocess import Geometry

log = logging.getLogger("rrstem.reductions")

#: the entry-point group through which an installed package adds reductions
ENTRY_POINTS = "rrstem.reductions"


@dataclass(frozen=True)
class MapSpec:
    """One map a reduction derives (or another part of the service makes): how it is published and written."""

    name: str  #: the snapshot array and the results dataset ``maps/<name>``
    unit: str  #: written as the dataset's ``unit`` attribute ("" for counts and other plain numbers)
    description: str  #: one line, for the results file and the dashboard's panel title
    panel: bool = True  #: the dashboard shows it as a panel of its own
    per_position: bool = True  #: (ny, nx), or (d, ny, nx); False: another shape (a pattern, a list)


@dataclass(frozen=True)
class Weight:
    """A per-frame quantity: the sum over the binned frame of ``pixels * build(geometry)``.

    ``build`` returns an (h, w) image on the binned frame. Keep its values small integers (0/1 masks,
    pixel coordinates) where the frames are counts: then every per-frame sum is exact.
    Weights are known by ``name``: two reductions that declare the same name share one column.
    """

    name: str
    build: Callable[[Geometry], np.ndarray]


@dataclass(frozen=True)
class Buffer:
    """A buffer a reduction keeps besides its weight columns."""

    name: str
    kind: Literal["position", "pixel"]  #: (ny * nx,) per scan position, or (h, w) per binned pixel
    dtype: str = "float64"
    merge: np.ufunc = np.add  #: how two partial results combine (shards of one scan hold disjoint positions)
    fill: float = 0.0  #: initial value


@dataclass(frozen=True)
class ScanInfo:
    """What a reduction may know of its scan."""

    scan_shape: tuple[int, int]
    geometry: Geometry
    pixel_mrad: float | None = None  #: one binned detector pixel, if the start message calibrated it
    scan_step_nm: float | None = None  #: the probe's step between positions, if the start message gives it
    #: what the service keeps for a reduction from scan to scan, by reduction name (``dpc``: its calibration,
    #: ``stream/dpc/live.py``); empty outside a service
    session: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


class Reduction:
    """Base class: declare ``weights``, ``buffers``, ``maps``; implement ``derive`` (and ``update`` for buffers)."""

    name: ClassVar[str] = ""
    weights: ClassVar[tuple[Weight, ...]] = ()
    buffers: ClassVar[tuple[Buffer, ...]] = ()
    maps: ClassVar[tuple[MapSpec, ...]] = ()
    #: the sum of the valid binned frames (per pixel) and their count are given to ``derive``
    needs_frame_sum: ClassVar[bool] = False

    def __init__(self, info: ScanInfo):
        self.info = info

    def specs(self) -> tuple[MapSpec, ...]:
        """The maps as this scan publishes them (a unit may depend on the scan's calibration)."""
        return self.maps

    def update(self, buffers: dict[str, np.ndarray], batch) -> None:
        """Fill this reduction's own ``buffers`` from ``batch`` (``partial.Batch``: one pass's valid frames);
        the weight columns need nothing."""

    def derive(self, view) -> dict[str, np.ndarray]:
        """The maps, from the merged buffers (``view``: a ``partial.View``); at snapshot time, never per frame."""
        raise NotImplementedError

    def attrs(self) -> dict[str, Any]:
        """What the reduction says of its maps as last derived (JSON-able): attributes of the results file's
        ``maps`` group and the snapshot header's ``map_attrs``. None by default."""
        return {}


class WeightMap(Reduction):
    """A virtual detector: the map of one weight's per-frame sum at each position (``weights[0]``, ``maps[0]``)."""

    def derive(self, view) -> dict[str, np.ndarray]:
        return {self.maps[0].name: view.scatter(view.column(self.weights[0]))}


_registry: list[type[Reduction]] = []
_plugins_loaded = False


def register(cls: type[Reduction]) -> type[Reduction]:
    """Class decorator: every scan that starts from now on runs ``cls``."""
    if not cls.name:
        raise ValueError(f"reduction {cls.__qualname__} needs a name")
    if any(r.name == cls.name for r in _registry if r is not cls):
        raise ValueError(f"a reduction named {cls.name!r} is registered already")
    taken = {m.name for r in _registry if r is not cls for m in r.maps}
    clash = taken & {m.name for m in cls.maps}
    if clash:
        raise ValueError(f"reduction {cls.name!r} declares maps another reduction makes: {sorted(clash)}")
    if cls not in _registry:
        _registry.append(cls)
    return cls


def unregister(cls: type[Reduction]) -> None:
    """Scans that start from now on no longer run ``cls``."""
    if cls in _registry:
        _registry.remove(cls)


def registered() -> tuple[type[Reduction], ...]:
    """The reductions a new scan runs, in registration order (installed plugins loaded on the first call)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for ep in entry_points(group=ENTRY_POINTS):
            try:
                register(ep.load())
            except Exception as exc:  # a broken plugin must not stop the service
                log.error("reduction plugin %s (%s) not loaded: %s: %s", ep.name, ep.value, type(exc).__name__, exc)
    return tuple(_registry)


def load(source: str):
    """Import the module ``source`` (a dotted module name, or a ``.py`` file) so that its ``@register`` runs;
    returns the module. ValueError says what went wrong."""
    try:
        if source.endswith(".py"):
            path = Path(source).resolve()
            if not path.is_file():
                raise ValueError(f"no such file: {source}")
            name = f"rrstem_reductions_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(source)
    except ValueError:
        raise
    except Exception as exc:  # the user's module: say which, and what it raised
        raise ValueError(f"cannot load reductions from {source}: {type(exc).__name__}: {exc}") from None
