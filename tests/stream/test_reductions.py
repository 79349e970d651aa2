"""The built-in reductions (stream/reductions/) against known answers and NumPy, their merge and their bytes."""

import numpy as np
import pytest

from rrstem.stream.framepass import FramePass
from rrstem.stream.preprocess import Geometry
from rrstem.stream.reductions import Partial, ScanInfo


def geometry(h=9, w=9):
    return Geometry(frame_shape=(h, w), bin=1, crop=(0, h, 0, w), center=(4.0, 4.0), radius=2.0,
                    adf_inner=3.0, adf_outer=np.inf)


def take(partial: Partial, idx, frames) -> np.ndarray:
    """Add ``frames`` at ``idx`` with their weight sums straight from NumPy (no fused pass)."""
    w = partial.weight_images().reshape(len(partial.table), -1)
    sums = frames.reshape(len(frames), -1).astype(np.float64) @ w.T
    valid = np.isfinite(sums[:, 0])  # as the fused pass: the frame sum is of the valid frames
    return partial.take(np.asarray(idx), sums, frames[valid].sum(axis=0, dtype=np.float64))


def test_single_bright_pixel_has_exact_com():
    p = Partial(ScanInfo((1, 2), geometry()))
    frames = np.zeros((2, 9, 9), np.float32)
    frames[0, 2, 7] = 10.0  # COM at (y=2, x=7)
    frames[1, 6, 1] = 10.0  # COM at (y=6, x=1)
    take(p, [0, 1], frames)
    m = p.maps()
    # relative to the mean pattern's COM at (4, 4)
    np.testing.assert_allclose(m["com_x"][0], [3.0, -3.0])
    np.testing.assert_allclose(m["com_y"][0], [-2.0, 2.0])
    np.testing.assert_allclose(m["com_magnitude"][0], np.hypot(3, 2))
    np.testing.assert_allclose(m["com_angle"][0], [np.arctan2(-2, 3), np.arctan2(2, -3)], rtol=1e-6)
    # (2,7) is sqrt(13) from the centre: neither BF (r<=2) nor ADF (r>=3)? sqrt(13)=3.6 -> ADF
    np.testing.assert_array_equal(m["vbf"][0], [0, 0])
    np.testing.assert_array_equal(m["vadf"][0], [10, 10])
    np.testing.assert_array_equal(m["mean_pattern"], frames.mean(axis=0))


def test_positions_outside_the_filled_mask_are_nan():
    p = Partial(ScanInfo((2, 2), geometry(), pixel_mrad=0.5))
    take(p, [3], np.ones((1, 9, 9), np.float32))
    m = p.maps()
    assert np.isnan(m["vbf"][0]).all() and np.isnan(m["vbf"][1, 0]) and m["vbf"][1, 1] == 13  # pixels within r <= 2
    assert m["com_x"][1, 1] == 0 and np.isnan(m["com_x"][0]).all()  # the only frame is its own reference
    assert {s.name: s.unit for s in p.specs()}["com_x"] == "mrad"
    assert p.filled.tolist() == [False, False, False, True]


def test_an_empty_frame_is_a_position_and_a_nonfinite_one_is_not_taken():
    p = Partial(ScanInfo((1, 3), geometry()))
    frames = np.ones((3, 9, 9), np.float32)
    frames[1] = 0  # no counts: a measurement
    frames[2, 4, 4] = np.nan
    ok = take(p, [0, 1, 2], frames)
    assert ok.tolist() == [True, True, False]
    assert p.filled.tolist() == [True, True, False] and p.count == 2
    m = p.maps()
    assert m["vbf"][0].tolist()[:2] == [13, 0] and np.isnan(m["vbf"][0, 2])
    assert m["com_x"][0, 0] == 0 and np.isnan(m["com_x"][0, 1])  # nothing to divide: no COM
    np.testing.assert_array_equal(m["mean_pattern"], frames[:2].mean(axis=0))


def shards(seed=1, shape=(4, 6), dtype=np.uint16):
    """A whole scan and two shards of it (every other row), each reduced by the fused pass."""
    rng = np.random.default_rng(seed)
    g = Geometry((16, 16), 2, (0, 16, 0, 16), (3.5, 3.5), 2.0, 2.5, 5.0)
    raw = rng.poisson(30, (shape[0] * shape[1], 16, 16)).astype(dtype)
    parts = []
    for rows in (np.arange(len(raw)), np.flatnonzero(np.arange(len(raw)) // shape[1] % 2 == 0),
                 np.flatnonzero(np.arange(len(raw)) // shape[1] % 2 == 1)):
        p = Partial(ScanInfo(shape, g, pixel_mrad=0.25))
        store = np.zeros((len(raw), *g.binned_shape), np.uint32)
        sums, total, _ = FramePass(g, raw.dtype, store, weights=p.weight_images())(rows, raw[rows])
        p.take(rows, sums, total)
        parts.append(p)
    return raw, parts


def test_two_shards_merge_into_one_pass_bit_for_bit():
    raw, (whole, a, b) = shards()
    a.merge(b)
    np.testing.assert_array_equal(a.sums, whole.sums)
    np.testing.assert_array_equal(a.frame_sum, whole.frame_sum)
    assert a.count == whole.count == len(raw) and a.filled.all()
    ma, mw = a.maps(), whole.maps()
    assert ma.keys() == mw.keys()
    for k in mw:
        np.testing.assert_array_equal(ma[k], mw[k], err_msg=k)
    # and the counts are those of NumPy
    binned = raw.astype(np.float64).reshape(len(raw), 8, 2, 8, 2).sum(axis=(2, 4))
    np.testing.assert_array_equal(a.frame_sum, binned.sum(axis=0))
    np.testing.assert_array_equal(a.sums[:, 0], binned.sum(axis=(1, 2)))


def test_a_partial_survives_its_bytes_and_merges_after():
    _, (whole, a, b) = shards(seed=2)
    a2, b2 = Partial.from_bytes(a.to_bytes()), Partial.from_bytes(b.to_bytes())
    a2.merge(b2)
    for k, v in whole.maps().items():
        np.testing.assert_array_equal(a2.maps()[k], v, err_msg=k)
    assert a2.info == whole.info


def test_overlapping_or_foreign_partials_are_refused():
    _, (whole, a, _) = shards(seed=3)
    with pytest.raises(ValueError, match="in both partials"):
        whole.merge(a)
    _, (other, _, _) = shards(seed=3, shape=(6, 4))
    with pytest.raises(ValueError, match="different scans"):
        a.merge(other)
    with pytest.raises(ValueError, match="undecodable partial"):
        Partial.from_bytes(b"\x92\x01")
