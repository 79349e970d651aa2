"""Gatan DigitalMicrograph ``.dm3`` / ``.dm4``: a minimal parser of the tag tree, the 4D data memory-mapped.

The file is a header (version 3 or 4, root length, byte order of the data)
and a tree of tags. Tag structure is big-endian; lengths and counts are 4
bytes in DM3 and 8 in DM4, where every tag also carries its byte size. A
group tag (20) holds tags; a data tag (21) is ``%%%%``, an info array (the
type: simple, string 18, struct 15, array 20) and the value in the data byte
order. ``ImageList`` holds the images; each has ``ImageData`` with ``Data``
(an array, never read here: its offset is kept and memory-mapped),
``Dimensions`` (fastest first, so the C shape is reversed) and
``Calibrations/Dimension`` (``Scale``, ``Units`` per dimension);
``ImageTags/Microscope Info/Voltage`` is the beam energy in volts. A 4D-STEM
image is ``(scan_y, scan_x, det_y, det_x)`` in C order; one whose scan axes
are the fastest (lengths on the first two dimensions, angles on the last two)
is transposed, still lazily.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rrstem.simulators.formats.common import Loaded, pick, calibration, length_nm, pixel_mrad

SIMPLE = {2: "i2", 3: "i4", 4: "u2", 5: "u4", 6: "f4", 7: "f8", 8: "u1", 9: "i1", 10: "u1", 11: "i8", 12: "u8"}
#: Arrays larger than this are not read while parsing; their offset is kept.
_READ_LIMIT = 1 << 16


@dataclass(frozen=True)
class ArrayRef:
    """An array tag's data left in the file: where it starts, its length and element dtype."""

    offset: int
    length: int
    dtype: np.dtype


class TagParser:
    """Reads a DM3/DM4 tag tree into nested dicts; unnamed tags are keyed ``#0``, ``#1``, ..."""

    def __init__(self, fh, name: str):
        self.fh, self.name = fh, name
        head = fh.read(4)
        if len(head) < 4 or struct.unpack(">l", head)[0] not in (3, 4):
            raise ValueError(f"{name} is not a DigitalMicrograph file: version {head!r} is not 3 or 4")
        self.version = struct.unpack(">l", head)[0]
        self.width = 8 if self.version == 4 else 4
        self.count_fmt = ">q" if self.version == 4 else ">l"
        self.count()  # root tag directory length
        self.order = "<" if struct.unpack(">l", self.read(4))[0] == 1 else ">"

    def read(self, n: int) -> bytes:
        raw = self.fh.read(n)
        if len(raw) < n:
            raise ValueError(f"{self.name} is truncated: its tag tree stops at byte {self.fh.tell()}")
        return raw

    def count(self) -> int:
        return struct.unpack(self.count_fmt, self.read(self.width))[0]

    def group(self) -> dict:
        self.read(2)  # sorted, open
        out = {}
        for i in range(self.count()):
            kind = self.read(1)[0]
            name = self.read(struct.unpack(">H", self.read(2))[0]).decode("latin-1") or f"#{i}"
            if self.version == 4:
                self.read(8)  # the tag's byte size
            if kind == 20:
                out[name] = self.group()
            elif kind == 21:
                out[name] = self.data(keep_in_file=name == "Data")
            else:
                raise ValueError(f"{self.name}: tag {name!r} at byte {self.fh.tell()} has kind {kind}, not 20 or 21")
        return out

    def _simple(self, code: int):
        dt = np.dtype(self.order + SIMPLE[code])
        return np.frombuffer(self.read(dt.itemsize), dt)[0].item()

    def data(self, keep_in_file: bool = False):
        """A data tag's value; a large array, or any ``keep_in_file``, as an ``ArrayRef``."""
        if self.read(4) != b"%%%%":
            raise ValueError(f"{self.name}: a data tag at byte {self.fh.tell() - 4} lacks its %%%% mark")
        info = [self.count() for _ in range(self.count())]
        kind = info[0]
        if kind in SIMPLE:
            return self._simple(kind)
        if kind == 18:  # string of info[1] bytes
            return self.read(info[1]).decode("latin-1")
        if kind == 15:  # struct: [15, name length, n fields, (name length, type) * n]
            return tuple(self._simple(t) for t in info[4:4 + 2 * info[2]:2])
        if kind == 20 and info[1] == 15:  # array of structs: [20, 15, name len, n, (len, type) * n, length]
            size = sum(np.dtype(SIMPLE[t]).itemsize for t in info[5:5 + 2 * info[3]:2])
            self.fh.seek(size * info[-1], 1)
            return None
        if kind == 20 and info[1] in SIMPLE:  # array: [20, element type, length]
            dt = np.dtype(self.order + SIMPLE[info[1]])
            ref = ArrayRef(self.fh.tell(), info[2], dt)
            if not keep_in_file and ref.length * dt.itemsize <= _READ_LIMIT:
                values = np.frombuffer(self.read(ref.length * dt.itemsize), dt)
                if info[1] == 4:  # uint16 arrays hold text (units, names)
                    return "".join(map(chr, values))
                return values
            self.fh.seek(ref.length * dt.itemsize, 1)
            return ref
        raise ValueError(f"{self.name}: unknown DM data type {info} at byte {self.fh.tell()}")


def _find_number(tree, names: tuple[str, ...]):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in names and isinstance(v, (int, float)):
                return float(v)
        for v in tree.values():
            found = _find_number(v, names)
            if found is not None:
                return found
    return None


def _images(tags: dict) -> dict[str, dict]:
    images = tags.get("ImageList", {})
    return {k.lstrip("#"): v for k, v in images.items() if isinstance(v, dict) and "ImageData" in v}


def load(path: Path, key: str | None) -> Loaded:
    """The 4D image of a DM3/DM4 file (``key``: its index in ``ImageList`` when there are several)."""
    with open(path, "rb") as fh:
        parser = TagParser(fh, path.name)
        tags = parser.group()
    images = _images(tags)
    shapes = {}
    for k, image in images.items():
        dims = image["ImageData"].get("Dimensions", {})
        shapes[k] = tuple(int(v) for v in dims.values())[::-1]
    name = pick(shapes, key, "image", path)
    image = images[name]
    ref = image["ImageData"].get("Data")
    shape = shapes[name]
    if not isinstance(ref, ArrayRef):
        raise ValueError(f"{path.name}: image {name} has no pixel data array")
    if ref.length != int(np.prod(shape)):
        raise ValueError(f"{path.name}: image {name} has {ref.length} pixels, its dimensions {shape} need "
                         f"{int(np.prod(shape))}")
    end = ref.offset + ref.length * ref.dtype.itemsize
    if end > path.stat().st_size:
        raise ValueError(f"{path.name} is truncated: its pixel data end at byte {end}, the file at "
                         f"{path.stat().st_size}")
    data = np.memmap(path, dtype=ref.dtype, mode="r", offset=ref.offset, shape=shape)
    cals = list(image["ImageData"].get("Calibrations", {}).get("Dimension", {}).values())
    units = [str(c.get("Units", "")) for c in cals] + [""] * (4 - len(cals))
    scales = [c.get("Scale") for c in cals] + [None] * (4 - len(cals))
    energy_v = _find_number(image.get("ImageTags", {}).get("Microscope Info", {}), ("Voltage",))
    energy = energy_v / 1e3 if energy_v else None
    # DM order: dimension 0 is the fastest (the last C axis).
    scan_fast = length_nm(scales[0], units[0]) and not length_nm(scales[2], units[2])
    det, scan = ((2, 3), (0, 1)) if scan_fast else ((0, 1), (2, 3))  # DM dimension indices
    if scan_fast:
        data = data.transpose(2, 3, 0, 1)
    step = length_nm(scales[scan[0]], units[scan[0]])
    pixel = pixel_mrad(scales[det[0]], units[det[0]], energy)
    conv = _find_number(image.get("ImageTags", {}), ("Convergence Angle (mrad)", "Convergence semi-angle (mrad)",
                                                      "Probe Convergence Angle (mrad)"))
    cal = calibration(energy_kev=energy, convergence_mrad=conv, detector_pixel_mrad=pixel, scan_step_nm=step)
    meta = {"format": f"dm{parser.version}", "key": name, "dm_units": units, "scan_axes_fastest": bool(scan_fast)}
    return Loaded(data, cal, meta, None)
