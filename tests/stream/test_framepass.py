"""The fused pass (bin, mask, sums, store) against a NumPy reduction of the whole array, for every stored dtype."""

import numpy as np
import pytest

from rrstem.stream.framepass import FramePass
from rrstem.stream.preprocess import Geometry, PreprocessConfig
from rrstem.stream.protocol import DTYPES, Start
from rrstem.stream.scan import Scan
from rrstem.stream.store import check_memory
from rrstem.stream.store import narrow_dtype, store_dtype

MASKED = ((5, 6), (2, 2), (10, 11))


def numpy_pass(raw, g):
    """Binned frames and the five sums of (n, H, W) ``raw``, straight from NumPy in float64."""
    f = raw.astype(np.float64)
    if raw.dtype.kind in "ui":
        f[raw == np.iinfo(raw.dtype).max] = 0
    for i, j in g.masked:
        f[:, i, j] = 0
    y0, y1, x0, x1 = g.crop
    hb, wb = g.binned_shape
    binned = f[:, y0:y1, x0:x1].reshape(len(raw), hb, g.bin, wb, g.bin).sum(axis=(2, 4))
    ky, kx = np.mgrid[0:hb, 0:wb]
    bf, adf = g.detector_masks()
    sums = np.stack([(binned * w).sum(axis=(1, 2)) for w in (1, kx, ky, bf, adf)], axis=1)
    return binned, sums


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5])  # 2, 3, 4 bin columns at a constant stride; 5 the general way
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_pass_equals_numpy_bit_for_bit(dtype, b):
    rng = np.random.default_rng(b)
    raw = rng.integers(0, 200, (7, 24, 36)).astype(dtype)
    if raw.dtype.kind in "ui":
        raw[2, 3, 4] = np.iinfo(raw.dtype).max  # saturated in one frame: counts zero
    g = Geometry((24, 36), b, (0, 24 // b * b, 0, 36 // b * b) if b != 3 else (3, 24, 0, 36), (3.0, 5.0), 2.5,
                 3.0, 9.0, MASKED)
    store = np.zeros((10, *g.binned_shape), store_dtype(dtype, b))
    rows = np.array([9, 0, 1, 2, 3, 4, 5])
    sums, total, over = FramePass(g, np.dtype(dtype), store)(rows, raw)
    assert over is None
    binned, ref = numpy_pass(raw, g)
    np.testing.assert_array_equal(store[rows], binned)
    if raw.dtype.kind in "ui":  # integer counts: exact
        np.testing.assert_array_equal(sums, ref)
        np.testing.assert_array_equal(total, binned.sum(axis=0))
    else:
        np.testing.assert_allclose(sums, ref, rtol=1e-12)
        np.testing.assert_allclose(total, binned.sum(axis=0), rtol=1e-6)
    assert (store[6:9] == 0).all()  # untouched rows stay as they were


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_without_saturation_masking_a_pixel_at_the_dtype_maximum_counts(dtype):
    raw = np.full((2, 8, 8), 3, dtype=dtype)
    raw[1, 2, 5] = np.iinfo(dtype).max
    g = Geometry((8, 8), 2, (0, 8, 0, 8), (2.0, 2.0), 1.0, 1.5, 3.0, ((0, 0),))
    store = np.zeros((2, 4, 4), store_dtype(dtype, 2))
    sums, total, _ = FramePass(g, np.dtype(dtype), store, mask_saturated=False)(np.arange(2), raw)
    want = np.full((2, 4, 4), 12)
    want[:, 0, 0] = 9  # the persistently masked pixel (0, 0) counts zero
    want[1, 1, 2] += int(np.iinfo(dtype).max) - 3
    np.testing.assert_array_equal(store, want)
    np.testing.assert_array_equal(sums[:, 0], want.sum(axis=(1, 2)))
    np.testing.assert_array_equal(total, want.sum(axis=0))


def test_strided_frames_and_big_endian_frames_take_the_same_pass():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 1000, (6, 16, 20)).astype(np.uint16)
    g = Geometry((16, 16), 2, (0, 16, 0, 16), (4.0, 4.0), 2.0, 3.0, 9.0, ())
    expected, ref = numpy_pass(np.ascontiguousarray(block[:, :, :16]), g)
    for raw in (block[:, :, :16], block[:, :, :16].astype(">u2")):  # a strided view; Merlin's wire order
        store = np.zeros((6, 8, 8), np.uint32)
        sums, _, _ = FramePass(g, raw.dtype, store)(np.arange(6), raw)
        np.testing.assert_array_equal(store, expected)
        np.testing.assert_array_equal(sums, ref)


def test_counts_that_overflow_the_raw_dtype_are_stored_without_loss():
    """uint16 counts near the maximum, binned 4x4: each bin is ~16 x 60000, far past uint16; the store widens."""
    raw = np.full((3, 16, 16), 60000, np.uint16)
    raw[1, 0, 0] = 65534
    g = Geometry((16, 16), 4, (0, 16, 0, 16), (1.5, 1.5), 1.0, 1.5, 9.0, ())
    assert store_dtype(np.uint16, 1) == np.uint16 and store_dtype(np.uint16, 4) == np.uint32
    assert store_dtype(np.uint8, 1) == np.uint8 and store_dtype(np.uint8, 2) == np.uint16
    assert store_dtype(np.uint32, 2) == np.uint64 and store_dtype(np.int16, 2) == np.int32
    assert store_dtype(np.float64, 4) == np.float32
    store = np.zeros((3, 4, 4), store_dtype(np.uint16, 4))
    sums, _, _ = FramePass(g, np.uint16, store)(np.arange(3), raw)
    assert store[0, 0, 0] == 16 * 60000 and store[1, 0, 0] == 15 * 60000 + 65534
    assert sums[0, 0] == 256 * 60000
    # the largest sum a bin can hold: every pixel one below saturation
    top = np.full((1, 16, 16), 65534, np.uint16)
    FramePass(g, np.uint16, store)(np.arange(1), top)
    assert (store[0] == 16 * 65534).all()


def test_a_narrow_store_stops_the_pass_at_the_first_frame_that_does_not_fit():
    """uint16 counts binned 4x4 into a uint16 store: frame 2 has a bin of 16 x 5000, past 65535."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 300, (5, 16, 16)).astype(np.uint16)
    raw[2, 4:8, 8:12] = 5000
    g = Geometry((16, 16), 4, (0, 16, 0, 16), (1.5, 1.5), 1.0, 1.5, 9.0, ((0, 1),))
    assert narrow_dtype(np.uint16, 4) == np.uint16 and narrow_dtype(np.uint16, 1) == np.uint16
    assert narrow_dtype(np.uint8, 4) == np.uint16 and narrow_dtype(np.int16, 2) == np.int32
    store = np.zeros((5, 4, 4), np.uint16)
    sums, total, over = FramePass(g, np.uint16, store)(np.arange(5), raw)
    binned, ref = numpy_pass(raw, g)
    assert over == 2 and len(sums) == 2
    np.testing.assert_array_equal(store[:2], binned[:2])
    np.testing.assert_array_equal(sums, ref[:2])
    np.testing.assert_array_equal(total, binned[:2].sum(axis=0))
    assert (store[3:] == 0).all()  # nothing after the frame that did not fit
    # the largest bin that fits passes: 65535 exactly
    raw[2, 4:8, 8:12] = 0
    raw[2, 4, 8] = 65535 - 1  # saturated pixels count zero; this one is one below
    raw[2, 4, 9] = 1
    sums, total, over = FramePass(g, np.uint16, store)(np.arange(5), raw)
    binned, ref = numpy_pass(raw, g)
    assert over is None and binned[2].max() == 65535
    np.testing.assert_array_equal(store, binned)
    np.testing.assert_array_equal(sums, ref)


def test_a_scan_whose_counts_outgrow_uint16_moves_to_uint32_without_loss(caplog):
    """Binned 4x4, frames 0..39 fit uint16; frame 41 does not: the store moves to uint32, every frame exact."""
    rng = np.random.default_rng(4)
    frames = rng.poisson(40, (64, 32, 32)).astype(np.uint16)
    frames[41:, 10:14, 12:16] = 20000  # 16 x 20000 = 320000 in one bin, from frame 41 on
    start = Start(scan_id="bright", scan_shape=(8, 8), frame_shape=(32, 32), dtype="uint16")
    scan = Scan(start, PreprocessConfig(bin=4, calibration_frames=8, mask_outliers=False))
    for lo in range(0, 64, 12):  # batches that straddle the move
        scan.add(lo, frames[lo:lo + 12])
        if lo == 24:
            early_filled, early = scan.filled.copy(), scan.frames  # as a trainer reads: filled, then frames
            assert early.dtype == np.uint16
    assert scan.frames.dtype == np.uint32 and scan.counters["received"] == 64
    g = scan.geometry
    binned, ref = numpy_pass(frames, g)
    np.testing.assert_array_equal(scan.frames, binned)  # bit for bit, the frames before the move too
    np.testing.assert_array_equal(early[early_filled], binned[early_filled])  # the old store still holds its rows
    np.testing.assert_allclose(scan.mean_pattern(), binned.mean(axis=0), rtol=1e-6)
    assert any("frame 41 has a binned count above 65535" in r.getMessage() for r in caplog.records)


def test_memory_check_uses_the_stored_dtype():
    """A 512x512 scan of 96x96 uint16 frames at bin 1 is 4.8 GB of uint16 (it was 9.7 GB as float32)."""
    start = Start(scan_id="big", scan_shape=(512, 512), frame_shape=(96, 96), dtype="uint16")
    need = 512 * 512 * 96 * 96 * 2
    assert need < 6e9
    check_memory(start, PreprocessConfig(bin=1), fraction=need / _total_memory() + 1e-6)  # fits exactly
    with pytest.raises(ValueError, match=r"4\.5 GiB for its binned frames \(uint16\)"):
        check_memory(start, PreprocessConfig(bin=1), fraction=need / _total_memory() * 0.99)


def test_scan_stores_counts_in_their_dtype_and_gives_float32_frames():
    rng = np.random.default_rng(2)
    frames = rng.poisson(30, (16, 8, 8)).astype(np.uint16)
    start = Start(scan_id="s", scan_shape=(4, 4), frame_shape=(8, 8), dtype="uint16")
    scan = Scan(start, PreprocessConfig(bin=1, calibration_frames=4, mask_outliers=False))
    assert scan.add(0, frames) == 16
    assert scan.frames.dtype == np.uint16
    np.testing.assert_array_equal(scan.frames, frames)
    assert scan.frame([1, 2]).dtype == np.float32 and (scan.frame([1, 2]) == frames[6]).all()
    np.testing.assert_allclose(scan.mean_pattern(), frames.mean(axis=0), rtol=1e-6)


def _total_memory() -> int:
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
