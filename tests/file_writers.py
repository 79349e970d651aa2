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
                xml: bool = True, high_voltage: float = 300e3, fov_m: float = 1.44e-8, layout: str = "1.2") -> Path:
    """An EMPAD scan: float32 frames of 128 rows + 2 metadata rows, and an .xml naming it.

    ``layout``: "1.2", the .xml of EMPAD software 1.2 (the scan shape in the raw file's name and in
    ``scan_parameters mode="acquire"``); "0.51", that of older software (``pix_x``/``pix_y``; its acquire
    parameters say 128x128, whatever was acquired; the field of view as ``[x, y]``); "series", a series of
    ny * nx images (``type`` series, ``series_count``).
    """
    ny, nx, h, w = frames.shape
    assert (h, w) == (128, 128)
    raw = np.full((ny * nx, 130, 128), 7e9, "<f4")  # the footer rows: junk that must never be read
    raw[:, :128] = frames.reshape(-1, 128, 128)
    path = folder / name.format(nx=nx, ny=ny)
    raw.tofile(path)
    if xml:
        (folder / "acquisition.xml").write_text(f'<root name="{path.stem}">{EMPAD_XML[layout](ny, nx, high_voltage, fov_m)}'
                                                f'<raw_file filename="{path.name}"/></root>')
    return path


def _empad_1_2(ny, nx, high_voltage, fov_m):  # the search scan's shape differs from the acquired one's
    return (f'<timestamp isoformat="2026-03-25T16:47:52"/><software_version>1.2.2</software_version>'
            f'<scan_parameters mode="search"><scan_resolution_y>64</scan_resolution_y>'
            f"<scan_resolution_x>64</scan_resolution_x></scan_parameters>"
            f'<scan_parameters mode="acquire"><scan_size>0.6</scan_size><scan_resolution_y>{ny}</scan_resolution_y>'
            f"<scan_resolution_x>{nx}</scan_resolution_x></scan_parameters>"
            f"<iom_measurements><full_scan_field_of_view><scale_factor>0.72</scale_factor><x>{fov_m}</x>"
            f"<y>{fov_m}</y></full_scan_field_of_view><nominal_camera_length>0.369</nominal_camera_length>"
            f"<high_voltage>{high_voltage}</high_voltage></iom_measurements>")


def _empad_0_51(ny, nx, high_voltage, fov_m):
    return (f"<software_version>0.51 211118</software_version><type>scan</type><pix_x>{nx}</pix_x>"
            f"<pix_y>{ny}</pix_y><scan_parameters mode=\"acquire\"><scan_resolution_x>128</scan_resolution_x>"
            f"<scan_resolution_y>128</scan_resolution_y></scan_parameters><iom_measurements>"
            f"<optics.get_cameralength>0.7225</optics.get_cameralength><source.get_voltage>{high_voltage}"
            f"</source.get_voltage><optics.get_full_scan_field_of_view>[{fov_m}, {fov_m}]"
            f"</optics.get_full_scan_field_of_view><calibrated_pixelsize>2e-10</calibrated_pixelsize>"
            f"</iom_measurements>")


def _empad_series(ny, nx, high_voltage, fov_m):
    return (f"<software_version>0.51 211118</software_version><type>series</type><count>{ny * nx}</count>"
            f"<scan_parameters><series_count>{ny * nx}</series_count></scan_parameters>")


EMPAD_XML = {"1.2": _empad_1_2, "0.51": _empad_0_51, "series": _empad_series}


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


def write_velox(path: Path, images: int = 2, spectra: int = 1) -> Path:
    """A Velox (Thermo Fisher) EMD file without 4D data: its ``Version`` JSON, (16, 16, 1) images under
    ``Data/Image/<uuid>/Data`` and 4096-channel spectra under ``Data/Spectrum/<uuid>/Data``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("Version", data=np.array([b'{"version": "11", "format": "Velox"}'], dtype=object),
                         dtype=h5py.string_dtype())
        for n in range(images):
            f[f"Data/Image/{n:032x}/Data"] = np.zeros((16, 16, 1), np.uint16)
        for n in range(spectra):
            f[f"Data/Spectrum/{n + 100:032x}/Data"] = np.zeros((4096, 1), np.uint32)
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


def write_stempy_events(path: Path, rows, scan_shape: tuple[int, int], frame_shape: tuple[int, int] = (576, 576),
                        *, version: int = 3, scan_positions=None, metadata: dict | None = None) -> Path:
    """stempy's electron-counted HDF5: ``rows``, one array of flat pixel indices per detector frame.

    Version 3: ``rows`` holds every position's frames, position by position, and ``scan_positions`` is
    ``arange(ny*nx)``; versions 1 and 2: ``scan_positions`` gives each row's position. Frame attributes
    ``Nx, Ny`` are ``frame_shape`` (stempy's order), scan attributes ``Nx`` the width and ``Ny`` the height.
    ``metadata`` becomes attributes of ``/metadata`` (a dict value, a subgroup).
    """
    ny, nx = scan_shape
    if scan_positions is None:
        scan_positions = np.arange(ny * nx)
    with h5py.File(path, "w") as f:
        f.attrs["version"] = version
        group = f.create_group("electron_events")
        positions = group.create_dataset("scan_positions", data=np.asarray(scan_positions, np.uint32))
        positions.attrs["Nx"], positions.attrs["Ny"] = nx, ny
        events = group.create_dataset("frames", (len(rows),), dtype=h5py.vlen_dtype(np.uint32))
        events.attrs["Nx"], events.attrs["Ny"] = frame_shape
        for i, r in enumerate(rows):  # one by one: h5py takes rows of equal length for a 2D array
            events[i] = np.asarray(r, np.uint32)

        def attrs(group, tree):
            for k, v in tree.items():
                if isinstance(v, dict):
                    attrs(group.require_group(k), v)
                else:
                    group.attrs[k] = v

        attrs(f.require_group("metadata"), metadata or {})
    return path


def events_of(frames: np.ndarray) -> list[np.ndarray]:
    """The event rows of count frames ``(n, h, w)``: each pixel's index repeated as often as its count."""
    n = frames.shape[0]
    flat = frames.reshape(n, -1)
    hit = np.flatnonzero(flat)  # indices into the (n * h * w) array
    counts = flat.reshape(-1)[hit].astype(np.int64)
    index = np.repeat(hit, counts)
    frame, pixel = np.divmod(index, flat.shape[1])
    return np.split(pixel, np.searchsorted(frame, np.arange(1, n)))


def write_stempy(path: Path, frames: np.ndarray, *, version: int = 3, **kw) -> Path:
    """Count frames ``(ny, nx, h, w)``, or ``(ny, nx, k, h, w)`` with ``k`` frames per position, as electron events.

    Version 3 stores each position's ``k`` frames together; version 2 stores all first frames, then all
    second ones, ..., with ``scan_positions`` saying whose each is (as stempy's conversion appends extra frames).
    """
    if frames.ndim == 4:
        frames = frames[:, :, None]
    ny, nx, k, h, w = frames.shape
    if version >= 3:
        rows = events_of(frames.reshape(-1, h, w))
        positions = None
    else:
        rows = events_of(frames.transpose(2, 0, 1, 3, 4).reshape(-1, h, w))
        positions = np.tile(np.arange(ny * nx), k)
    return write_stempy_events(path, rows, (ny, nx), (h, w), version=version, scan_positions=positions, **kw)
