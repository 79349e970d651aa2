"""--flip-rows and --transpose: a file analyzed with them gives what its flipped / transposed copy gives without.

Known answers: the copy is made with np.flip / np.swapaxes, independently of ``orient``; the maps, mean
pattern, disc and masked pixels of the two analyses are equal, bit for bit, and without --flip-rows the
flipped copy's com_y is the original's with its sign reversed (README, "Detector orientation").
"""

from __future__ import annotations

import numpy as np
import pytest

from file_writers import write_hspy
from processes import serve
from support import Sender, disc_frames, reference
from rrstem.cli import main
from rrstem.stream.orientation import orient
from rrstem.stream.results import read_scan

CAL = dict(energy_kev=200.0, convergence_mrad=21.0, step=0.5, step_units="nm", k=0.8, k_units="mrad")
HOT = (3, 30)  # a hot pixel, in the file's pixel order: masked wherever the frame is oriented


def scan():
    """(5, 6, 32, 40) uint16: a disc that moves with the position, a bright patch near the top right (so a
    flipped mean pattern differs from the original) and a hot pixel; not square, so a transpose shows."""
    f = disc_frames(5, 6, 32, 40, seed=3)
    f[..., 2:8, 26:38] += 10
    f[..., HOT[0], HOT[1]] = 60000
    return f


def analyze(tmp_path, name, frames, *options):
    path = write_hspy(tmp_path / f"{name}.hspy", np.ascontiguousarray(frames), **CAL)
    out = tmp_path / f"{name}.h5"
    assert main(["analyze", str(path), "--no-train", "--no-progress", "--calibration-frames", "8", "--bin", "2",
                 "--out", str(out), *options]) == 0
    return read_scan(out)


def assert_same_analysis(a, b):
    ga, gb = dict(a["attrs"]["geometry"]), dict(b["attrs"]["geometry"])
    for g in (ga, gb):
        g.pop("flip_rows"), g.pop("transpose")
    assert ga == gb  # disc centre and radius, crop, and the masked pixels
    np.testing.assert_array_equal(a["mean_pattern"], b["mean_pattern"])
    np.testing.assert_array_equal(a["pixel_mask"], b["pixel_mask"])
    for name in ("vbf", "vadf", "com_x", "com_y"):
        np.testing.assert_array_equal(a["maps"][name], b["maps"][name], err_msg=name)


def test_orient_is_a_view_in_the_documented_order():
    f = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(orient(f, flip_rows=True), np.flip(f, axis=1))
    np.testing.assert_array_equal(orient(f, transpose=True), np.swapaxes(f, 1, 2))
    both = orient(f, True, True)
    assert both.shape == (2, 4, 3) and np.shares_memory(both, f)
    h = 3
    for i, j in np.ndindex(4, 3):  # pixel (i, j) is the file's (h - 1 - j, i)
        assert both[1, i, j] == f[1, h - 1 - j, i]
    np.testing.assert_array_equal(orient(f[0], True, True), both[0])  # an image takes the same function
    assert orient(f) is f


@pytest.mark.parametrize("flip_rows, transpose", [(True, False), (False, True), (True, True)])
def test_analyze_with_an_orientation_equals_the_oriented_copy(tmp_path, flip_rows, transpose):
    frames = scan()
    copy = np.flip(frames, axis=-2) if flip_rows else frames
    copy = np.swapaxes(copy, -1, -2) if transpose else copy
    options = ["--flip-rows"] * flip_rows + ["--transpose"] * transpose
    oriented = analyze(tmp_path, "file", frames, *options)
    plain = analyze(tmp_path, "copy", copy)
    assert_same_analysis(oriented, plain)
    g = oriented["attrs"]["geometry"]
    assert (g["flip_rows"], g["transpose"]) == (flip_rows, transpose)
    assert g["frame_shape"] == list(copy.shape[2:])
    hot = np.zeros(frames.shape[2:], bool)
    hot[HOT] = True
    hot = np.flip(hot, axis=0) if flip_rows else hot
    hot = hot.T if transpose else hot
    assert g["masked"] == [list(p) for p in np.argwhere(hot)]
    ref = reference(copy, g, oriented["pixel_mask"])  # NumPy on the copy
    np.testing.assert_array_equal(oriented["maps"]["vbf"], ref["vbf"])
    np.testing.assert_allclose(oriented["mean_pattern"], ref["mean_pattern"], rtol=1e-6)  # stored as float32


def test_without_flip_rows_the_flipped_copy_has_com_y_of_opposite_sign(tmp_path):
    frames = scan()
    original = analyze(tmp_path, "file", frames)
    flipped = analyze(tmp_path, "copy", np.flip(frames, axis=-2))
    assert not (flipped["attrs"]["geometry"]["flip_rows"] or original["attrs"]["geometry"]["transpose"])
    np.testing.assert_allclose(flipped["maps"]["com_y"], -original["maps"]["com_y"], atol=1e-9)
    np.testing.assert_allclose(flipped["maps"]["com_x"], original["maps"]["com_x"], atol=1e-9)
    np.testing.assert_array_equal(flipped["mean_pattern"], np.flip(original["mean_pattern"], axis=0))
    assert np.abs(original["maps"]["com_y"]).max() > 1e-3  # the check above is not 0 == -0


def test_serve_orients_streamed_frames(tmp_path):
    frames = scan()
    out = tmp_path / "served.h5"
    proc, frames_ep, _ = serve(tmp_path, "--out", str(out), "--once", "--flip-rows", "--transpose", "--bin", "2")
    try:
        sender = Sender(frames_ep)
        sender.start("s", (5, 6), (32, 40))
        sender.frames("s", 0, frames.reshape(30, 32, 40))
        sender.end("s", 30)
        sender.close()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    res = read_scan(out)
    g = res["attrs"]["geometry"]
    assert (g["flip_rows"], g["transpose"], g["frame_shape"]) == (True, True, [40, 32])
    copy = np.swapaxes(np.flip(frames, axis=-2), -1, -2)
    ref = reference(copy, g, res["pixel_mask"])
    for name in ("vbf", "vadf"):
        np.testing.assert_array_equal(res["maps"][name], ref[name])
    for name in ("com_x", "com_y"):
        np.testing.assert_allclose(res["maps"][name], ref[name], atol=1e-9)


@pytest.mark.parametrize("flip_rows, transpose", [(True, False), (True, True)])
def test_a_detector_mask_is_given_in_the_files_pixel_order_and_oriented_with_it(tmp_path, flip_rows, transpose):
    frames = scan()
    given = (20, 5)  # a pixel of the disc's surroundings, named in the file's order
    mask = np.zeros(frames.shape[2:], bool)
    mask[given] = True
    np.save(tmp_path / "mask.npy", mask)
    options = ["--flip-rows"] * flip_rows + ["--transpose"] * transpose
    res = analyze(tmp_path, "file", frames, "--mask", str(tmp_path / "mask.npy"), *options)
    oriented = np.zeros(frames.shape[2:], bool)
    oriented[given] = True
    oriented[HOT] = True
    oriented = np.flip(oriented, axis=0) if flip_rows else oriented
    oriented = oriented.T if transpose else oriented
    np.testing.assert_array_equal(res["pixel_mask"], oriented)
    reasons = res["pixel_mask_reason"]
    at = tuple(np.argwhere(np.flip(mask, 0).T if transpose else np.flip(mask, 0))[0])
    assert reasons[at] & 1 and reasons.astype(bool).sum() == 2  # bit 1: given by the user (--mask)
