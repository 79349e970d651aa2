"""The defect map inside the service: a synthetic vacancy scan over real sockets gets, in its snapshot and its
results file, the defect map of the NumPy VADF of the whole array, its alarms on the vacancy, and one
``anomaly`` event there from the same map."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from rrstem.client import Client
from rrstem.simulators.graphene import GrapheneSource
from rrstem.simulators.source import stream
from rrstem.stream import defects
from rrstem.stream.preprocess import Geometry
from rrstem.stream.results import read_scan
from rrstem.stream.snapshot import Arrays
from support import wait_results

ANY = "tcp://127.0.0.1:0"


def test_a_vacancy_scan_has_its_defect_map_and_alarms_in_the_snapshot_results_and_events(make_service):
    svc = make_service(events=ANY)
    src = GrapheneSource((64, 64), 64, dose=1e6, defect="vacancy", seed=3)
    frames = src.chunk(0, 64 * 64).astype(np.float64)  # the whole array as streamed, for the NumPy reduction
    with Client(events=svc.events.endpoint, timeout=30.0) as client:
        time.sleep(0.3)  # the subscription reaches the service
        stream(src, svc.listen_endpoint, bind=False, progress=False)
        seen = []
        for event in client.events(timeout=60):
            seen.append(event)
            if event.type == "scan_ended":
                break
        # the finisher scores the final maps before scan_ended (a scan streamed this fast can end within the
        # map's cadence), so every anomaly comes before it and none after
        after = list(client.events(timeout=2.0, until=time.monotonic() + 2.0))
    assert after == [], after
    path = wait_results(svc, timeout=60)
    res = read_scan(path)
    maps = res["maps"]
    g = res["attrs"]["geometry"]
    geometry = Geometry(tuple(g["frame_shape"]), g["bin"], tuple(g["crop"]), tuple(g["center"]), g["radius"],
                        g["adf_inner"], g["adf_outer"])
    _, adf = geometry.detector_masks()
    vadf = (frames * adf).sum(axis=(1, 2)).reshape(64, 64)  # bin 1, no crop: the mask applies as it is
    np.testing.assert_allclose(maps[Arrays.VADF], vadf, rtol=1e-9)
    want = defects.defect_maps(vadf, np.ones((64, 64), bool))
    np.testing.assert_allclose(maps[Arrays.ANOMALY], want[defects.ANOMALY], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(maps[Arrays.ALARMS], want[defects.ALARMS])
    assert float(maps[Arrays.ALARM_THRESHOLD]) == defects.THRESHOLD
    vacancy = (32, 32)  # GrapheneSource puts the defect on the centre position; step 0.2 A
    peak = np.unravel_index(np.nanargmax(maps[Arrays.ANOMALY]), (64, 64))
    assert math.dist(peak, vacancy) * 0.2 <= 1.0 and tuple(maps[Arrays.ALARMS][0]) == peak
    assert all(math.dist(yx, vacancy) * 0.2 <= 1.0 for yx in maps[Arrays.ALARMS].tolist())
    snap = svc.snapshot().arrays  # the snapshot carries the same maps
    np.testing.assert_array_equal(snap[Arrays.ALARMS], maps[Arrays.ALARMS])
    np.testing.assert_allclose(snap[Arrays.ANOMALY], maps[Arrays.ANOMALY])
    (event, *more) = [e for e in seen if e.type == "anomaly"]  # once, on the map's own peak, before scan_ended
    assert not more, [(e.position, e.score, e.size) for e in [event, *more]]
    assert event.position == peak and event.score_name == Arrays.ANOMALY and event.threshold == defects.THRESHOLD
    # scored on the rows complete then: near the final score
    assert event.score == pytest.approx(float(maps[Arrays.ANOMALY][peak]), rel=0.1)
