import numpy as np
import pytest

from rrstem.stream.maps import FrameSum, PositionSums
from rrstem.stream.preprocess import Geometry


def geometry(h=9, w=9):
    return Geometry(frame_shape=(h, w), bin=1, crop=(0, h, 0, w), center=(4.0, 4.0), radius=2.0,
                    adf_inner=3.0, adf_outer=np.inf)


def test_single_bright_pixel_has_exact_com():
    g = geometry()
    pos = PositionSums((1, 2), g)
    frames = np.zeros((2, 9, 9), np.float32)
    frames[0, 2, 7] = 10.0  # COM at (y=2, x=7)
    frames[1, 6, 1] = 10.0  # COM at (y=6, x=1)
    pos.update(np.array([0, 1]), frames)
    m = pos.snapshot(np.ones(2, bool))
    # relative to the mean pattern's COM at (4, 4)
    np.testing.assert_allclose(m["com_x"][0], [3.0, -3.0])
    np.testing.assert_allclose(m["com_y"][0], [-2.0, 2.0])
    np.testing.assert_allclose(m["com_magnitude"][0], np.hypot(3, 2))
    np.testing.assert_allclose(m["com_angle"][0], [np.arctan2(-2, 3), np.arctan2(2, -3)], rtol=1e-6)
    # (2,7) is sqrt(13) from the centre: neither BF (r<=2) nor ADF (r>=3)? sqrt(13)=3.6 -> ADF
    np.testing.assert_array_equal(m["vbf"][0], [0, 0])
    np.testing.assert_array_equal(m["vadf"][0], [10, 10])


def test_positions_outside_the_filled_mask_are_nan():
    pos = PositionSums((2, 2), geometry(), pixel_mrad=0.5)
    pos.update(np.array([3]), np.ones((1, 9, 9), np.float32))
    m = pos.snapshot(np.array([False, False, False, True]))
    assert np.isnan(m["vbf"][0]).all() and np.isnan(m["vbf"][1, 0]) and m["vbf"][1, 1] == 13  # pixels within r <= 2
    assert m["com_x"][1, 1] == 0 and np.isnan(m["com_x"][0]).all()  # the only frame is its own reference
    assert pos.unit == "mrad"


def test_merge_equals_one_pass():
    rng = np.random.default_rng(1)
    frames = rng.random((6, 9, 9)).astype(np.float32)
    whole, a, b = (PositionSums((2, 3), geometry()) for _ in range(3))
    whole.update(np.arange(6), frames)
    a.update(np.arange(3), frames[:3])
    b.update(np.arange(3, 6), frames[3:])
    a.merge(b)
    np.testing.assert_array_equal(a.sums, whole.sums)
    s1, s2 = FrameSum((9, 9)), FrameSum((9, 9))
    s1.update(np.arange(3), frames[:3])
    s2.update(np.arange(3), frames[3:])
    s1.merge(s2)
    np.testing.assert_allclose(s1.snapshot()["mean_pattern"], frames.mean(axis=0), rtol=1e-6)
