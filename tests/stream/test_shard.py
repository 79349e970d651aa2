"""A scan split into shards (``stream/shard.py``) and merged back (``Scan.merge``) equals the scan taken whole:
every map, the mean pattern and every counter, also with frames the narrow store cannot hold, NaN frames
(invalid) and frames without counts, in shards sent as bytes (msgpack) the way Dask workers send them."""

from __future__ import annotations

import numpy as np
import pytest

from support import disc_frames
from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.protocol import Start
from rrstem.stream.scan import Scan
from rrstem.stream.shard import Shard, feed

NY, NX = 12, 10


def scans(frames: np.ndarray, cfg: PreprocessConfig, calibrate: int, shard_size: int, flyback: int = 0):
    """(the scan taken whole, the scan calibrated on the first ``calibrate`` frames and merged from shards)."""
    start = Start(scan_id="s", scan_shape=(NY, NX), frame_shape=frames.shape[1:], dtype=str(frames.dtype))
    placement = AcquisitionMap((NY, NX), 0, flyback)
    whole, split = Scan(start, cfg), Scan(start, cfg)
    for scan in (whole, split):  # the same first message: the same geometry
        feed(scan, placement, 0, frames[:calibrate])
    feed(whole, placement, calibrate, frames[calibrate:])
    assert split.ready
    for first in range(calibrate, len(frames), shard_size):
        shard = Shard(start, cfg, split.geometry, frames=shard_size)
        feed(shard, placement, first, frames[first:first + shard_size])
        split.merge(*Shard.from_bytes(shard.to_bytes()))
    for scan in (whole, split):
        scan.finish(len(frames))
    return whole, split


def assert_equal(whole: Scan, split: Scan) -> None:
    a, b = whole.maps(score_defects=True), split.maps(score_defects=True)
    assert sorted(a) == sorted(b)
    for name, ref in a.items():
        assert np.array_equal(ref, b[name], equal_nan=ref.dtype.kind == "f"), name
    assert whole.counter_dict() == split.counter_dict() and whole.reasons == split.reasons
    assert whole.zero_counts == split.zero_counts and whole.n_counted() == split.n_counted()
    assert np.array_equal(whole.counted, split.counted)


def test_shards_of_counts_merge_bit_for_bit_also_where_the_store_widens():
    frames = disc_frames(NY, NX, 16, 16, seed=2, level=300.0).reshape(-1, 16, 16)
    frames[70, 4:8, 4:8] = 65000  # binned at 2: above uint16, in the shard that takes frame 70
    frames[90] = 0  # a frame without counts: filled, counted as zero_counts, not for the rrVAE
    whole, split = scans(frames, PreprocessConfig(bin=2, calibration_frames=8), calibrate=16, shard_size=25)
    assert_equal(whole, split)
    assert split.counters["received"] == NY * NX and split.zero_counts == 1 and split.complete


def test_nan_frames_and_flyback_are_counted_by_reason_in_the_shards():
    frames = disc_frames(NY, NX + 2, 16, 16, seed=3, level=200.0).reshape(-1, 16, 16).astype(np.float32)
    frames[50, 3, 3] = np.nan  # invalid: its position stays missing
    whole, split = scans(frames, PreprocessConfig(bin=1, calibration_frames=8), calibrate=24, shard_size=30, flyback=2)
    assert_equal(whole, split)
    assert split.reasons == {"nan_or_inf": 1, "flyback": 2 * NY} and split.counters["missing"] == 1


def test_a_position_in_two_shards_is_refused():
    frames = disc_frames(NY, NX, 16, 16, seed=4).reshape(-1, 16, 16)
    start = Start(scan_id="s", scan_shape=(NY, NX), frame_shape=(16, 16), dtype="uint16")
    cfg = PreprocessConfig(bin=1, calibration_frames=8)
    scan = Scan(start, cfg)
    scan.add(0, frames[:8])
    for _ in range(2):
        shard = Shard(start, cfg, scan.geometry, frames=10)
        shard.add(20, frames[20:30])
        data = shard.to_bytes()
    scan.merge(*Shard.from_bytes(data))
    with pytest.raises(ValueError, match="in both partials"):
        scan.merge(*Shard.from_bytes(data))
    with pytest.raises(ValueError, match="undecodable shard"):
        Shard.from_bytes(b"\x93not a shard")
