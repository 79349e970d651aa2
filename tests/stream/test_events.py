"""Known answers for the events: the score they use, anomalies once per position, convergence, the schema."""

from __future__ import annotations

import numpy as np
import pytest

from rrstem.stream import events as E


def test_events_score_the_defect_map_with_its_threshold():
    anomaly = np.zeros((64, 64), np.float32)
    anomaly[40, 20] = 120.0
    score, threshold, name = E.score_map({"vadf": np.ones((64, 64)), "anomaly": anomaly,
                                          "anomaly_threshold": np.array(10.0, np.float32)})
    assert threshold == 10.0 and name == "anomaly" and score[40, 20] == 120.0 and score.dtype == np.float64
    assert E.score_map({"filled": np.ones((64, 64), bool)}) is None


def test_an_anomaly_fires_once_when_its_cluster_is_complete_with_the_latents_there():
    score = np.zeros((20, 20))
    score[8:10, 5:8] = 12.0
    score[9, 6] = 20.0
    latent = np.arange(2 * 400, dtype=float).reshape(2, 20, 20)
    arrays = {"latent": latent, "rotation": np.full((20, 20), 0.5)}
    finder = E.AnomalyFinder("s", (20, 20), step_nm=0.02)
    # rows 0..11 done: the cluster's last row (9) + 1 + BORDER is not scored yet -> wait
    assert finder.update(score, 10.0, "test", arrays, rows_done=12) == []
    (event,) = finder.update(score, 10.0, "test", arrays, rows_done=13)
    assert event.position == (9, 6) and event.score == 20.0 and event.size == 6 and event.bbox == (8, 10, 5, 8)
    assert event.latent == [latent[0, 9, 6], latent[1, 9, 6]] and event.rotation == 0.5
    assert event.position_nm == pytest.approx((0.18, 0.12)) and event.scan_shape == (20, 20)
    score[10, 8] = 15.0  # grows next to the reported cluster: within the margin, not reported again
    assert finder.update(score, 10.0, "test", arrays, rows_done=20) == []
    score[17, 17] = 15.0  # elsewhere: a new one, reported at the scan's end even on its last rows
    (other,) = finder.update(score, 10.0, "test", arrays, rows_done=18, ended=True)
    assert other.position == (17, 17)


def test_convergence_fires_once_when_the_heldout_loss_stops_improving():
    c = E.Convergence(patience=3, rel_tol=0.01)
    improving = np.array([10.0, 9.0, 8.0, 7.0, 6.0, 5.0])
    assert c.check("s", improving, np.arange(6)) is None
    flat = np.r_[improving, 5.01, 4.99, 5.02]  # the last 3 improve on 5.0 by < 1%
    event = c.check("s", flat, np.arange(9) * 100)
    assert event is not None and event.step == 800 and event.heldout_elbo == 4.99 and event.evaluations == 9
    assert c.check("s", flat, np.arange(9)) is None  # once per scan


def test_events_round_trip_and_bad_ones_are_refused():
    ev = E.ScanEnded(scan_id="a", complete=True, end_reason="end", results_path="r.h5", seq=3)
    parts = ev.encode()
    assert parts[0] == b"event.scan_ended" and E.decode_event(parts) == ev
    with pytest.raises(ValueError, match="does not match its type"):
        E.decode_event([b"event.anomaly", parts[1]])
    with pytest.raises(ValueError, match="invalid event: scan_ended.complete: Input should be a valid boolean"):
        E.decode_event([parts[0], E.msgpack.packb({**ev.model_dump(), "complete": "maybe"})])
    with pytest.raises(ValueError, match="2 parts"):
        E.decode_event([parts[0]])
