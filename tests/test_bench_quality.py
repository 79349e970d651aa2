"""bench/quality.py's own arithmetic: the reference COM, the anomaly figures, median and worst over seeds.

The benchmark's quality figures are not asserted here (they stay in the
benchmark); what is pinned is that it computes them right from known maps.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


@pytest.fixture
def dataset(tmp_path):
    truth = {"scan_step_angstrom": 0.2, "files": {}, "defects": [{"kind": "vacancy", "position_pixels": [6.0, 5.0]}]}
    (tmp_path / "d.json").write_text(json.dumps(truth))
    ds = quality.Dataset(tmp_path, "d")
    yy, xx = np.mgrid[0:12, 0:10]
    ds._ref = {"com_magnitude": 1.0 + np.hypot(yy - 6, xx - 5), "com_angle": np.arctan2(yy - 6, xx - 5)}
    return ds


def test_reference_com_of_a_shifted_disc():
    """Two patterns: a disc 1 binned pixel right of the other; the mean's COM is between them."""
    frames = np.zeros((1, 2, 16, 16))
    yy, xx = np.mgrid[0:16, 0:16]
    frames[0, 0] = np.hypot(yy - 7.5, xx - 6.5) < 4
    frames[0, 1] = np.hypot(yy - 7.5, xx - 8.5) < 4
    ref = quality.reference_com(frames, b=2)
    assert ref["com_magnitude"] == pytest.approx(np.array([[0.5, 0.5]]), abs=1e-9)
    assert ref["com_angle"] == pytest.approx(np.array([[np.pi, 0.0]]), abs=1e-9)


def test_maps_that_follow_the_com_score_one(dataset):
    ref = dataset.ref
    rot = np.where(np.arange(10) < 7, 1.0, np.nan)[None, :] * (-ref["com_angle"] + 0.3)  # reversed, offset, partial
    lat = np.stack([2 - 3 * ref["com_magnitude"], np.cos(np.arange(120)).reshape(12, 10)])
    got = quality.judge({"rotation": rot, "latent": lat}, dataset)
    assert got["rotation_r"] == pytest.approx(1.0) and got["covered"] == 0.7
    assert got["latent_r"] == pytest.approx(1.0) and got["anomaly_distance_a"] is None and got["alarms"] is None


def test_anomaly_distance_and_alarms(dataset):
    anomaly = np.zeros((12, 10))
    anomaly[7, 4], anomaly[1, 1] = 9.0, 4.0
    alarms = np.array([[7, 4], [1, 1]], dtype=np.int32)
    got = quality.judge({"anomaly": anomaly, "alarms": alarms, "anomaly_threshold": np.array(3.0)}, dataset)
    assert got["anomaly_distance_a"] == pytest.approx(np.sqrt(2) * 0.2, abs=1e-3)  # peak (7, 4), defect (6, 5)
    assert (got["alarms"], got["anomaly_threshold"]) == (2, 3.0)
    # no alarm list: counted against the threshold; an infinite threshold (none yet) raises none
    assert quality.judge({"anomaly": anomaly, "anomaly_threshold": np.array(5.0)}, dataset)["alarms"] == 1
    assert quality.judge({"anomaly": anomaly, "anomaly_threshold": np.array(np.inf)}, dataset)["alarms"] == 0


def test_median_and_worst_over_seeds():
    runs = [{"first": {"results": {"latent_r": v, "alarms": a}, "seconds_to_results": t}}
            for v, a, t in ((0.9, 0, 5.0), (0.5, 2, 9.0), (0.8, 1, 7.0))]
    s = quality.summarize(runs, "first", ["results.latent_r", "results.alarms", "seconds_to_results"])
    assert s["results.latent_r"] == {"median": 0.8, "worst": 0.5, "n": 3, "missing": 0}  # worst: lowest r
    assert s["results.alarms"]["worst"] == 2 and s["seconds_to_results"]["worst"] == 9.0  # worst: most, longest
    v = quality.verdict(s, {"results.latent_r": 0.5, "seconds_to_results": 8.0})
    assert v["results.latent_r"]["pass"] is True and v["seconds_to_results"]["pass"] is False
    # a run without the figure is the worst of all; a figure no run has is unknown
    runs.append({"first": {"results": {}}})
    s = quality.summarize(runs, "first", ["results.latent_r", "results.anomaly_distance_a"])
    assert s["results.latent_r"]["worst"] is None and s["results.latent_r"]["missing"] == 1
    v = quality.verdict(s, {"results.latent_r": 0.5, "results.anomaly_distance_a": 1.0})
    assert v["results.latent_r"]["pass"] is False and v["results.anomaly_distance_a"]["pass"] is None
