"""HyperSpy ``.hspy`` (HDF5, h5py) and ``.zspy`` (zarr directory): ``/Experiments/<title>/data``.

Each signal is a group under ``Experiments`` holding ``data`` (array order),
``axis-0 .. axis-N-1`` groups whose attrs describe array axis i (``scale``,
``units``, ``navigate``), and ``metadata`` as nested groups whose scalars are
attrs: ``Acquisition_instrument/TEM`` has ``beam_energy`` (keV) and
``convergence_angle`` (mrad). A 4D-STEM signal is two navigation axes then
two signal axes, the order rrstem sends. h5py and zarr arrays are sliced
lazily, chunk by chunk.
"""

from __future__ import annotations

from pathlib import Path

from rrstem.simulators.formats.common import Loaded, pick, calibration, length_nm, pixel_mrad, text


def _child(group, name):
    try:
        return group[name]
    except (KeyError, ValueError):
        return None


def _signals(root) -> dict[str, tuple]:
    experiments = _child(root, "Experiments")
    found = {}
    if experiments is not None:
        for name in sorted(experiments.keys()):
            data = _child(experiments[name], "data")
            if data is not None and hasattr(data, "shape"):
                found[name] = tuple(data.shape)
    return found


def _attr(root, path: str, name: str):
    group = root
    for part in path.split("/"):
        group = _child(group, part)
        if group is None:
            return None
    value = group.attrs.get(name)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def is_hyperspy(root) -> bool:
    return text(root.attrs.get("file_format", "")) == "HyperSpy" or _child(root, "Experiments") is not None


def _load(path: Path, root, key: str | None, closer) -> Loaded:
    try:
        name = pick(_signals(root), key, "HyperSpy signal", path)
        group = root["Experiments"][name]
        data = group["data"]
        energy = _attr(group, "metadata/Acquisition_instrument/TEM", "beam_energy")
        conv = _attr(group, "metadata/Acquisition_instrument/TEM", "convergence_angle")
        axes = [_child(group, f"axis-{i}") for i in range(len(data.shape))]
        step = pixel = None
        for i, axis in enumerate(axes):
            if axis is None:
                continue
            scale, units = axis.attrs.get("scale"), text(axis.attrs.get("units", ""))
            if i < 2:
                step = step or length_nm(scale, units)
            else:
                pixel = pixel or pixel_mrad(scale, units, energy)
        cal = calibration(energy_kev=energy, convergence_mrad=conv, detector_pixel_mrad=pixel, scan_step_nm=step)
        meta = {"format": "hyperspy", "key": name,
                "file_format_version": text(root.attrs.get("file_format_version", "")),
                "signal_type": text(_child(group, "metadata")["Signal"].attrs.get("signal_type", ""))
                if _child(group, "metadata") is not None and _child(group["metadata"], "Signal") is not None else ""}
        return Loaded(data, cal, meta, closer)
    except Exception:
        if closer is not None:
            closer()
        raise


def load_hspy(path: Path, key: str | None, f=None) -> Loaded:
    import h5py

    f = f or h5py.File(path, "r")
    return _load(path, f, key, f.close)


def load_zspy(path: Path, key: str | None) -> Loaded:
    import zarr

    if not path.is_dir() and not path.is_file():
        raise ValueError(f"cannot read {str(path)!r}: no such file or folder")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a zarr store
        raise ValueError(f"{path.name} is not a zarr store ({type(exc).__name__}: {exc})") from None
    return _load(path, root, key, None)
