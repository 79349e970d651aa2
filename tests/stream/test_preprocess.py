import numpy as np
import pytest

from rrstem.stream.framepass import FramePass
from rrstem.stream.preprocess import PreprocessConfig, calibrate, detect_disc
from rrstem.stream.store import store_dtype


def test_detect_disc_finds_known_centre_and_radius():
    yy, xx = np.mgrid[0:128, 0:128]
    img = np.where((yy - 60.0) ** 2 + (xx - 70.0) ** 2 <= 30.0 ** 2, 100.0, 1.0)
    (cy, cx), r = detect_disc(img)
    assert cy == pytest.approx(60, abs=0.05) and cx == pytest.approx(70, abs=0.05)
    assert r == pytest.approx(30, abs=0.3)


def test_hot_and_saturated_pixels_are_masked():
    rng = np.random.default_rng(0)
    frames = rng.poisson(50, (20, 16, 16)).astype(np.uint16)
    frames[:, 3, 5] = 5000  # hot
    frames[:, 9, 9] = 65535  # stuck at the maximum
    g = calibrate(frames, PreprocessConfig(bin=2, disc_center=(8, 8), disc_radius=4))
    assert set(g.masked) == {(3, 5), (9, 9)}
    live = frames.copy()
    live[4, 12, 1] = 65535  # saturated in one frame only
    out = np.zeros((20, 8, 8), store_dtype(np.uint16, 2))
    FramePass(g, np.uint16, out)(np.arange(20), live)
    clean = live.astype(np.float64)
    clean[:, 3, 5] = clean[:, 9, 9] = 0
    clean[4, 12, 1] = 0
    np.testing.assert_array_equal(out, clean.reshape(20, 8, 2, 8, 2).sum(axis=(2, 4)))


def test_crop_keeps_a_window_around_the_disc_in_whole_bins():
    yy, xx = np.mgrid[0:64, 0:64]
    frames = np.repeat(((yy - 40) ** 2 + (xx - 20) ** 2 <= 6 ** 2)[None] * 100 + 1, 4, axis=0).astype(np.uint16)
    g = calibrate(frames, PreprocessConfig(bin=2, crop=2.0))
    y0, y1, x0, x1 = g.crop
    assert (y1 - y0) % 2 == 0 and (x1 - x0) % 2 == 0
    assert y0 <= 40 - 12 and y1 >= 40 + 12 and x0 <= 20 - 12 and x1 >= 20 + 12
    assert g.binned_shape == ((y1 - y0) // 2, (x1 - x0) // 2)
    # the disc centre in binned pixels maps back to raw pixel (40, 20)
    assert y0 + g.center[0] * 2 + 0.5 == pytest.approx(40, abs=0.1)
    assert x0 + g.center[1] * 2 + 0.5 == pytest.approx(20, abs=0.1)


def test_bad_configuration_says_how_to_fix_it():
    with pytest.raises(ValueError, match="bin must be >= 1"):
        PreprocessConfig(bin=0)
    with pytest.raises(ValueError, match="disc radii"):
        PreprocessConfig(crop=0.5)
