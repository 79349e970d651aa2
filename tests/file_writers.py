"""Writers of every recorded format rrstem replays, for known-answer tests (not fixtures).

Each writes ``frames`` (ny, nx, h, w) with the format's own writer where
there is one (h5py + hdf5plugin for DECTRIS, zarr for .zspy), else byte by
byte from the layout the format documents (EMPAD raw, DM3/DM4 tag tree), and
returns the path to hand to ``open_file``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np


def write_dectris(folder: Path, frames: np.ndarray, per_file: int = 25, *, wavelength_a: float = 0.02508,
                  pixel_m: float = 75e-6, distance_m: float = 0.15, announce: int | None = None,
                  pixel_mask: np.ndarray | None = None) -> Path:
    """``scan_master.h5`` linking ``scan_data_00000N.h5`` files of ``per_file`` bitshuffle-LZ4 frames; with the
    detector's ``pixel_mask`` (uint32, non-zero = bad) where one is given."""
    flat = frames.reshape(-1, *frames.shape[2:])
    master = folder / "scan_master.h5"
    with h5py.File(master, "w") as f:
        data = f.create_group("entry/data")
        for k, a in enumerate(range(0, len(flat), per_file), start=1):
            name = f"scan_data_{k:06d}.h5"
            with h5py.File(folder / name, "w") as d:
                ds = d.create_dataset("entry/data/data", data=flat[a:a + per_file], chunks=(1, *flat.shape[1:]),
                                      **hdf5plugin.Bitshuffle(cname="lz4"))
                ds.attrs["image_nr_low"], ds.attrs["image_nr_high"] = a + 1, min(a + per_file, len(flat))
            data[f"data_{k:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
        det = f.create_group("entry/instrument/detector")
        det["x_pixel_size"] = pixel_m
        det["y_pixel_size"] = pixel_m
        det["detector_distance"] = distance_m
        det["description"] = b"Dectris ARINA Si 1M"
        det["detectorSpecific/nimages"] = announce or len(flat)
        det["detectorSpecific/ntrigger"] = 1
        if pixel_mask is not None:
            det["detectorSpecific/pixel_mask"] = pixel_mask.astype(np.uint32)
        f["entry/instrument/beam/incident_wavelength"] = wavelength_a
    return master


def write_empad(folder: Path, frames: np.ndarray, *, name: str = "scan_x{nx}_y{ny}.raw",
                xml: bool = True, high_voltage: float = 300e3, fov_m: float = 1.44e-8) -> Path:
    """An EMPAD scan: float32 frames of 128 rows + 2 metadata rows, and an .xml naming it."""
    ny, nx, h, w = frames.shape
    assert (h, w) == (128, 128)
    raw = np.full((ny * nx, 130, 128), 7e9, "<f4")  # the footer rows: junk that must never be read
    raw[:, :128] = frames.reshape(-1, 128, 128)
    path = folder / name.format(nx=nx, ny=ny)
    raw.tofile(path)
    if xml:  # the layout of EMPAD 1.2 .xml files: the search scan's shape differs from the acquired one's
        (folder / "acquisition.xml").write_text(
            f'<root name="{path.stem}"><timestamp isoformat="2026-03-25T16:47:52"/>'
            f'<software_version>1.2.2</software_version><raw_file filename="{path.name}"/>'
            f'<scan_parameters mode="search"><scan_resolution_y>64</scan_resolution_y>'
            f"<scan_resolution_x>64</scan_resolution_x></scan_parameters>"
            f'<scan_parameters mode="acquire"><scan_size>0.6</scan_size><scan_resolution_y>{ny}</scan_resolution_y>'
            f"<scan_resolution_x>{nx}</scan_resolution_x></scan_parameters>"
            f"<iom_measurements><full_scan_field_of_view><scale_factor>0.72</scale_factor><x>{fov_m}</x>"
            f"<y>{fov_m}</y></full_scan_field_of_view><nominal_camera_length>0.369</nominal_camera_length>"
            f"<high_voltage>{high_voltage}</high_voltage></iom_measurements></root>")
    return path


def write_emd_ncem(path: Path, frames: np.ndarray, step_nm=0.5, pixel_mrad=0.8) -> Path:
    """EMD 1.0 (NCEM): ``data/<name>`` with emd_group_type 1, ``data`` and ``dim1 .. dim4``."""
    with h5py.File(path, "w") as f:
        f.attrs["version_major"], f.attrs["version_minor"] = 0, 2
        g = f.create_group("data/scan")
        g.attrs["emd_group_type"] = 1
        g.create_dataset("data", data=frames, chunks=(1, 1, *frames.shape[2:]))
        for i, (scale, unit, name) in enumerate([(step_nm, "nm", "y"), (step_nm, "nm", "x"),
                                                 (pixel_mrad, "mrad", "ky"), (pixel_mrad, "mrad", "kx")]):
            d = g.create_dataset(f"dim{i + 1}", data=np.arange(frames.shape[i]) * scale)
            d.attrs["name"], d.attrs["units"] = name, unit
        f.create_group("microscope").attrs["note"] = "no 4D data here"
    return path


def write_emd_hyperspy(path: Path, frames: np.ndarray, step_nm=0.5, pixel_mrad=0.8) -> Path:
    """EMD 1.0 as HyperSpy / RosettaSciIO write it: the array reversed, ``dim1`` describing its first axis (kx)."""
    with h5py.File(path, "w") as f:
        f.attrs["version_major"], f.attrs["version_minor"] = 0, 2
        signals = f.create_group("signals")
        signals.attrs["emd_group_type"] = 1
        g = signals.create_group("scan")
        g.attrs["emd_group_type"] = 1
        data = frames.T  # (kx, ky, nx, ny)
        g.create_dataset("data", data=data, chunks=(*data.shape[:2], 1, 1))
        for i, (scale, unit, name) in enumerate([(pixel_mrad, "mrad", "kx"), (pixel_mrad, "mrad", "ky"),
                                                 (step_nm, "nm", "x"), (step_nm, "nm", "y")]):
            d = g.create_dataset(f"dim{i + 1}", data=[0.0, scale])
            d.attrs["name"], d.attrs["units"] = name, unit
    return path


def write_py4dstem(path: Path, frames: np.ndarray, r_pixel=0.3, r_units="A") -> Path:
    """py4DSTEM (emdfile): an ``array`` group (DataCube) with dim0 .. dim3 and calibration metadata."""
    with h5py.File(path, "w") as f:
        root = f.create_group("experiment")
        root.attrs["emd_group_type"], root.attrs["python_class"] = "root", "Root"
        g = root.create_group("datacube")
        g.attrs["emd_group_type"], g.attrs["python_class"] = "array", "DataCube"
        g.create_dataset("data", data=frames).attrs["units"] = "pixel intensity"
        for i in range(4):
            d = g.create_dataset(f"dim{i}", data=np.array([0, 1]))
            d.attrs["name"], d.attrs["units"] = ["Rx", "Ry", "Qx", "Qy"][i], "pixels"
        md = g.create_group("_metadata")
        md.attrs["emd_group_type"] = "metadatabundle"
        cal = md.create_group("calibration")
        cal.attrs["emd_group_type"], cal.attrs["python_class"] = "metadata", "Calibration"
        cal["R_pixel_size"], cal["R_pixel_units"] = r_pixel, r_units
        cal["Q_pixel_size"], cal["Q_pixel_units"] = 1.0, "pixels"
        other = root.create_group("mask")
        other.attrs["emd_group_type"] = "array"
        other.create_dataset("data", data=np.ones(frames.shape[2:], bool))
    return path


def _hyperspy_signal(group, frames, *, energy_kev, convergence_mrad, step, step_units, k, k_units, create):
    group.attrs["package"], group.attrs["package_version"] = "pyxem", "0.19"
    create(group, "data", frames)
    names = ["y", "x", "ky", "kx"][-frames.ndim:]
    for i in range(frames.ndim):
        a = group.create_group(f"axis-{i}")
        nav = i < frames.ndim - 2
        a.attrs.update({"name": names[i], "size": frames.shape[i], "navigate": nav, "offset": 0.0,
                        "scale": step if nav else k, "units": step_units if nav else k_units})
    tem = group.create_group("metadata/Acquisition_instrument/TEM")
    tem.attrs["beam_energy"], tem.attrs["convergence_angle"] = energy_kev, convergence_mrad
    group.create_group("metadata/Signal").attrs["signal_type"] = "electron_diffraction"
    group.create_group("metadata/General").attrs["title"] = "scan"
    group.create_group("original_metadata")


def write_hspy(path: Path, frames: np.ndarray, **cal) -> Path:
    """HyperSpy .hspy (h5py), file_format_version 3.3, one 4D signal under Experiments/scan."""
    with h5py.File(path, "w") as f:
        f.attrs["file_format"], f.attrs["file_format_version"] = "HyperSpy", "3.3"
        _hyperspy_signal(f.create_group("Experiments/scan"), frames, **cal,
                         create=lambda g, n, a: g.create_dataset(n, data=a, chunks=(1, 1, *a.shape[2:])))
    return path


def write_zspy(path: Path, frames: np.ndarray, **cal) -> Path:
    """HyperSpy .zspy: the same layout in a zarr (format 2) directory store."""
    import zarr

    def create(g, name, a):
        arr = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(2, 3, *a.shape[2:]))
        arr[...] = a

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs.update({"file_format": "HyperSpy", "file_format_version": "3.3"})
    experiments = root.create_group("Experiments")
    _hyperspy_signal(experiments.create_group("scan"), frames, **cal, create=create)
    return path


# --- DigitalMicrograph, byte by byte -------------------------------------------------------------

_DM_CODES = {np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("uint16"): 4, np.dtype("uint32"): 5,
             np.dtype("float32"): 6, np.dtype("float64"): 7, np.dtype("int8"): 9, np.dtype("uint8"): 10}
_DM_IMAGE_TYPES = {np.dtype("int16"): 1, np.dtype("float32"): 2, np.dtype("uint8"): 6, np.dtype("int32"): 7,
                   np.dtype("uint16"): 10, np.dtype("uint32"): 11, np.dtype("float64"): 12}


class _DMWriter:
    def __init__(self, version: int):
        self.v = version

    def count(self, n: int) -> bytes:
        return struct.pack(">q" if self.v == 4 else ">l", n)

    def group(self, entries) -> bytes:
        items = entries.items() if isinstance(entries, dict) else [("", e) for e in entries]
        return b"\x00\x01" + self.count(len(items)) + b"".join(self.tag(n, v) for n, v in items)

    def tag(self, name: str, value) -> bytes:
        kind, body = (20, self.group(value)) if isinstance(value, (dict, list)) else (21, self.data(value))
        raw = name.encode("latin-1")
        head = bytes([kind]) + struct.pack(">H", len(raw)) + raw
        return head + (struct.pack(">q", len(body)) if self.v == 4 else b"") + body

    def data(self, value) -> bytes:
        if isinstance(value, bool) or isinstance(value, int):
            info, payload = [3], struct.pack("<l", int(value))
        elif isinstance(value, float):
            info, payload = [7], struct.pack("<d", value)
        elif isinstance(value, str):
            info, payload = [20, 4, len(value)], value.encode("utf-16-le")
        elif isinstance(value, tuple):  # a struct of doubles
            info = [15, 0, len(value)] + [x for _ in value for x in (0, 7)]
            payload = struct.pack(f"<{len(value)}d", *value)
        else:
            a = np.ascontiguousarray(value)
            info, payload = [20, _DM_CODES[a.dtype], a.size], a.astype(a.dtype.newbyteorder("<")).tobytes()
        return b"%%%%" + self.count(len(info)) + b"".join(self.count(i) for i in info) + payload


def _dm_image(data: np.ndarray, units: list[str], scales: list[float]) -> dict:
    dims = list(data.shape[::-1])  # DM lists dimensions fastest first
    return {
        "ImageData": {
            "Calibrations": {"Brightness": {"Origin": 0.0, "Scale": 1.0, "Units": ""},
                             "Dimension": [{"Origin": 0.0, "Scale": float(s), "Units": u} for s, u in zip(scales, units)],
                             "DisplayCalibratedUnits": 1},
            "Data": data.reshape(-1),
            "DataType": _DM_IMAGE_TYPES[data.dtype],
            "Dimensions": [int(d) for d in dims],
            "PixelDepth": data.dtype.itemsize,
        },
        "ImageTags": {"Microscope Info": {"Voltage": 200000.0, "Name": "ARM"}, "Meta Data": {"Format": "Diffraction image"}},
        "Name": "4D scan",
        "UniqueID": (1.0, 2.0, 3.0, 4.0),
    }


def write_dm(path: Path, frames: np.ndarray, version: int = 4, *, pixel_mrad=0.5, step_nm=0.2,
             scan_fastest: bool = False) -> Path:
    """A DM3/DM4 file: a thumbnail (2D) then the 4D image, with calibrations and the voltage."""
    w = _DMWriter(version)
    if scan_fastest:  # scan axes fastest: C shape (det_y, det_x, ny, nx)
        data = np.ascontiguousarray(frames.transpose(2, 3, 0, 1))
        units, scales = ["nm", "nm", "mrad", "mrad"], [step_nm, step_nm, pixel_mrad, pixel_mrad]
    else:
        data = frames
        units, scales = ["mrad", "mrad", "nm", "nm"], [pixel_mrad, pixel_mrad, step_nm, step_nm]
    thumb = np.zeros((8, 8), np.uint8)
    tree = {"ApplicationBounds": (0.0, 0.0, 1.0, 1.0),
            "ImageList": [_dm_image(thumb, ["", ""], [1.0, 1.0]), _dm_image(data, units, scales)],
            "ImageSourceList": [{"ClassName": "ImageSource:Simple", "ImageRef": 1}]}
    body = w.group(tree)
    head = struct.pack(">l", version) + w.count(len(body)) + struct.pack(">l", 1)
    path.write_bytes(head + body + b"\x00" * 8)
    return path
