"""Bad pixels (stream/badpixels.py): hot and dead pixels that sparse counted frames show without losing strokes of
signal, the evidence floor, a user's mask (--mask FILE), the detector's own (DECTRIS pixel_mask, a stream2 start),
and the reasons in the results file. References are NumPy computations on the same frames."""

import logging
import subprocess
import sys

import cbor2
import h5py
import numpy as np
import pytest

from file_writers import write_dectris
from rrstem.simulators.files import open_file
from rrstem.stream import badpixels
from rrstem.stream.badpixels import DEAD, DETECTOR, GIVEN, HOT, SATURATED
from rrstem.stream.detectors.stream2 import Stream2Decoder
from rrstem.stream.framepass import FramePass
from rrstem.stream.preprocess import PreprocessConfig, calibrate
from rrstem.stream.protocol import ProtocolError, Start, decode_header
from rrstem.stream.results import read_scan
from rrstem.stream.store import store_dtype
from support import reference

RRSTEM = [sys.executable, "-m", "rrstem.cli"]
HOT_PIXEL = (40, 9)


def sparse_frames(n: int, seed: int = 0) -> np.ndarray:
    """(n, 64, 64) uint16 counted frames, most pixels 0: a faint background, one-pixel-wide strokes of signal
    (a line, a diagonal, a ring), a hot pixel at ``HOT_PIXEL`` and one large single event."""
    rng = np.random.default_rng(seed)
    rate = np.full((64, 64), 0.01)
    rate[20, 5:60] = 0.6  # a horizontal stroke
    for k in range(40):
        rate[10 + k // 2 + k % 2, 10 + k] = 0.4  # a diagonal stroke, one pixel wide
    yy, xx = np.mgrid[0:64, 0:64]
    rate[np.abs(np.hypot(yy - 44, xx - 40) - 10) < 0.5] = 0.8  # a thin ring
    rate[HOT_PIXEL] = 6.0
    frames = rng.poisson(rate, (n, 64, 64)).astype(np.uint16)
    frames[n // 2, 5, 50] = 900  # one big event in one frame: not persistent
    return frames


def test_sparse_frames_lose_their_hot_pixel_and_no_stroke_of_signal():
    frames = sparse_frames(64)
    g = calibrate(frames, PreprocessConfig(disc_center=(32, 32), disc_radius=8))
    assert g.masked == (HOT_PIXEL,) and g.mask_reasons == (HOT,)
    signal = frames.sum(dtype=np.float64) - frames[:, HOT_PIXEL[0], HOT_PIXEL[1]].sum()
    assert signal > 3000
    out = np.zeros((64, 64, 64), store_dtype(np.uint16, 1))
    FramePass(g, np.uint16, out)(np.arange(64), frames)
    want = frames.copy()
    want[:, HOT_PIXEL[0], HOT_PIXEL[1]] = 0
    np.testing.assert_array_equal(out, want)  # every stroke, every background count and the single event stay
    assert out.sum() == signal


def test_the_old_median_rule_would_have_masked_the_strokes():
    """What this replaces: 8x the neighbourhood median calls a one-pixel-wide stroke hot (a NumPy re-statement)."""
    total = sparse_frames(64).sum(axis=0, dtype=np.float64)
    p = np.pad(total, 1, mode="reflect")
    med = np.median([p[1 + dy:65 + dy, 1 + dx:65 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], axis=0)
    old = total > 8 * med + 10 * np.sqrt(med + 1) + 10
    assert old[20, 5:60].sum() > 40  # most of the horizontal stroke


def test_too_few_frames_mask_nothing_and_say_so(caplog):
    frames = sparse_frames(badpixels.MIN_FRAMES - 1)
    with caplog.at_level(logging.INFO, logger="rrstem.badpixels"):
        g = calibrate(frames, PreprocessConfig(disc_center=(32, 32), disc_radius=8))
    assert g.masked == ()
    assert "hot and dead pixels not looked for: 7 calibration frame(s)" in caplog.text


def test_dense_frames_show_hot_dead_and_stuck_pixels_with_their_reasons():
    rng = np.random.default_rng(1)
    frames = rng.poisson(50, (20, 32, 32)).astype(np.uint16)
    frames[:, 3, 5] = rng.poisson(3000, 20)  # hot
    frames[:, 30, 0] = rng.poisson(3000, 20)  # hot, on the edge
    frames[:, 12, 20] = 0  # dead
    frames[:, 9, 9] = 65535  # stuck at the maximum
    frames[7, 25, 25] = 40000  # one large event: not hot
    g = calibrate(frames, PreprocessConfig(disc_center=(16, 16), disc_radius=6))
    assert dict(zip(g.masked, g.mask_reasons)) == {(3, 5): HOT, (30, 0): HOT, (12, 20): DEAD, (9, 9): SATURATED}
    image = g.mask_reasons_image()
    assert image[3, 5] == HOT and image[12, 20] == DEAD and np.count_nonzero(image) == 4


def test_known_pixels_keep_their_reasons_and_hide_nothing_around_them():
    frames = sparse_frames(16)
    known = badpixels.known_reasons((64, 64), np.eye(64, dtype=bool)[:, ::-1], [(0, 0), (20, 30)])
    g = calibrate(frames, PreprocessConfig(disc_center=(32, 32), disc_radius=8), known)
    reasons = dict(zip(g.masked, g.mask_reasons))
    assert reasons[(0, 0)] == DETECTOR and reasons[(0, 63)] == GIVEN and reasons[(20, 30)] == DETECTOR
    assert reasons[HOT_PIXEL] == HOT and len(reasons) == 64 + 3
    with pytest.raises(ValueError, match="the detector mask is 32x32 pixels, the frames are 64x64"):
        badpixels.known_reasons((64, 64), np.zeros((32, 32), bool))


def test_mask_files_npy_and_hdf5(tmp_path):
    mask = np.zeros((8, 6), np.uint8)
    mask[2, 3] = 1
    np.save(tmp_path / "m.npy", mask)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["entry/mask"] = mask.astype(np.uint32) * 4
        f["other"] = np.ones(3)
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"], f["b"] = mask, mask
    for spec in ("m.npy", "m.h5", "two.h5:b", "two.h5:/a"):
        np.testing.assert_array_equal(badpixels.load_mask(str(tmp_path / spec)), mask != 0)
    with pytest.raises(ValueError, match="has 2 2D datasets"):
        badpixels.load_mask(str(tmp_path / "two.h5"))
    with pytest.raises(ValueError, match="not found"):
        badpixels.load_mask(str(tmp_path / "none.npy"))


def test_the_start_message_carries_bad_pixels():
    start = Start(scan_id="s", scan_shape=(2, 2), frame_shape=(4, 5), dtype="uint16", bad_pixels=[(1, 2), (3, 4)])
    assert decode_header(start.encode()).bad_pixels == ((1, 2), (3, 4))
    plain = Start(scan_id="s", scan_shape=(2, 2), frame_shape=(4, 5), dtype="uint16")
    assert b"bad_pixels" not in plain.encode()  # absent where there are none
    wrong = start.model_dump(mode="json") | {"bad_pixels": [[4, 0]]}
    import msgpack

    with pytest.raises(ProtocolError, match=r"bad pixel \[4, 0\] is outside the 4x5 frame"):
        decode_header(msgpack.packb(wrong))


def test_a_stream2_start_with_a_pixel_mask_names_its_bad_pixels():
    mask = np.zeros((6, 8), np.uint32)
    mask[1, 2] = 1  # gap
    mask[5, 7] = 16  # noisy
    start = {"type": "start", "series_id": 3, "series_unique_id": "u", "image_size_x": 8, "image_size_y": 6,
             "image_dtype": "uint16", "channels": ["threshold_1"],
             "pixel_mask": {"threshold_1": cbor2.CBORTag(40, [[6, 8], cbor2.CBORTag(70, mask.tobytes())])}}
    items = Stream2Decoder((2, 2)).decode([cbor2.dumps(start)])
    assert [i.kind for i in items] == ["start"]
    assert items[0].message.bad_pixels == ((1, 2), (5, 7))


def _analyze(tmp_path, path, *extra):
    return subprocess.run([*RRSTEM, "analyze", str(path), "--no-train", "--no-progress", "--calibration-frames", "8",
                           "--out", str(tmp_path / "r.h5"), *extra], capture_output=True, text=True, timeout=120)


def test_analyze_applies_a_mask_file_and_a_dectris_pixel_mask_and_stores_the_reasons(tmp_path):
    frames = sparse_frames(24, seed=3).reshape(4, 6, 64, 64)
    given = np.zeros((64, 64), bool)
    given[20, 10:14] = True  # four pixels of the stroke, masked on purpose
    with h5py.File(tmp_path / "mask.h5", "w") as f:
        f["detector/mask"] = given
        f["detector/other"] = np.zeros((64, 64))
    np.save(tmp_path / "scan.npy", frames)
    run = _analyze(tmp_path, tmp_path / "scan.npy", "--mask", f"{tmp_path / 'mask.h5'}:detector/mask")
    assert run.returncode == 0, run.stderr
    res = read_scan(tmp_path / "r.h5")
    want = np.zeros((64, 64), np.uint8)
    want[given] = GIVEN
    want[HOT_PIXEL] = HOT
    np.testing.assert_array_equal(res["pixel_mask_reason"], want)
    np.testing.assert_array_equal(res["pixel_mask"], want != 0)
    assert res["attrs"]["geometry"]["mask_reasons"] == [GIVEN] * 4 + [HOT]
    ref = reference(frames, res["attrs"]["geometry"], want != 0)
    np.testing.assert_array_equal(res["maps"]["vbf"], ref["vbf"])
    with h5py.File(tmp_path / "r.h5") as f:
        legend = f["scans"][res["scan_id"]]["pixel_mask_reason"].attrs["legend"]
    assert '"8": "hot' in legend and '"1": "given' in legend

    detector = np.zeros((64, 64), np.uint32)
    detector[0, :] = 1  # a gap row
    (tmp_path / "d").mkdir()
    master = write_dectris(tmp_path / "d", frames, pixel_mask=detector)
    with open_file(master, scan_shape=(4, 6)) as src:
        assert src.start.bad_pixels == tuple((0, c) for c in range(64))
    np.save(tmp_path / "m.npy", given)
    run = _analyze(tmp_path, master, "--scan-shape", "4x6", "--mask", str(tmp_path / "m.npy"))
    assert run.returncode == 0, run.stderr
    res = read_scan(tmp_path / "r.h5", "scan_master")
    want[0, :] |= DETECTOR
    np.testing.assert_array_equal(res["pixel_mask_reason"], want)

    np.save(tmp_path / "small.npy", given[:32])
    run = _analyze(tmp_path, tmp_path / "scan.npy", "--mask", str(tmp_path / "small.npy"))
    assert run.returncode != 0
    assert "the detector mask is 32x64 pixels, the frames are 64x64" in run.stderr + run.stdout


def test_serve_applies_its_mask_file_and_the_start_messages_bad_pixels(tmp_path):
    from processes import serve
    from support import Sender, disc_frames

    given = np.zeros((32, 32), bool)
    given[5, 6] = given[31, 0] = True
    np.save(tmp_path / "m.npy", given)
    out = tmp_path / "r.h5"
    proc, frames_ep, _ = serve(tmp_path, "--out", str(out), "--once", "--mask", str(tmp_path / "m.npy"))
    frames = disc_frames(3, 4, seed=2).reshape(12, 32, 32)
    try:
        s = Sender(frames_ep)
        s.start("masked", (3, 4), (32, 32), bad_pixels=[(0, 1), (5, 6)])
        s.frames("masked", 0, frames)
        s.end("masked", 12)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    res = read_scan(out)
    want = np.zeros((32, 32), np.uint8)
    want[given] = GIVEN
    want[0, 1] |= DETECTOR
    want[5, 6] |= DETECTOR
    np.testing.assert_array_equal(res["pixel_mask_reason"], want)
    ref = reference(frames.reshape(3, 4, 32, 32), res["attrs"]["geometry"], want != 0)
    np.testing.assert_array_equal(res["maps"]["vbf"], ref["vbf"])
