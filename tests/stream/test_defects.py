"""Known answers for the defect map (stream/defects.py): a missing or a brighter site on a synthetic lattice
gets the highest score, on its own position, at any fill and at the scan's edge; a perfect lattice, noisy or
noise-free, and a map with no lattice get no alarm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rrstem.stream import defects as D

A = 6.15  # positions per lattice constant: incommensurate with the scan, as a real one is


def lattice_map(ny=64, nx=64, site=None, weight=0.0, noise=0.05, seed=0, a=A, angle=0.0):
    """A VADF-like map: Gaussian peaks on a hexagonal lattice (rotated by ``angle`` rad), the one at ``site``
    weighted by ``weight`` (0: missing, 2: a heavier atom), plus white noise of ``noise`` of a peak."""
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    out = np.zeros((ny, nx))
    c, s = math.cos(angle), math.sin(angle)
    n = int(2 * max(ny, nx) / a) + 4  # enough sites to cover the scan at any angle
    for j in range(-n, n + 1):
        for i in range(-n, n + 1):
            u, v = i * a + j * a / 2, j * a * math.sqrt(3) / 2  # the lattice, then rotated
            cy, cx = s * u + c * v, c * u - s * v
            if not (-4 < cy < ny + 4 and -4 < cx < nx + 4):
                continue
            w = weight if site is not None and math.dist((cy, cx), site) < 0.5 else 1.0
            out += w * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.2 ** 2))
    return 10 * out + np.random.default_rng(seed).normal(0, 10 * noise, out.shape)


def site_near(y, x, a=A):
    """The lattice site (angle 0) nearest to (y, x)."""
    j = round(y / (a * math.sqrt(3) / 2))
    i = round((x - j * a / 2) / a)
    return j * a * math.sqrt(3) / 2, i * a + j * a / 2


def peak(score):
    return np.unravel_index(np.nanargmax(score), score.shape)


FULL = np.ones((64, 64), bool)


def test_the_lattice_translations_are_found_to_a_tenth_of_a_position():
    found = D.translations(lattice_map(noise=0.0))
    for want in [(0.0, A), (A * math.sqrt(3) / 2, A / 2), (A * math.sqrt(3) / 2, -A / 2)]:
        assert min(math.dist(t, want) for t in found) < 0.1
    assert D.translations(np.random.default_rng(0).normal(size=(64, 64))) == []  # no lattice


@pytest.mark.parametrize("weight", [0.0, 2.0])  # a vacancy, a heavier substitution
def test_a_changed_site_scores_highest_on_its_own_position_and_alone_above_the_threshold(weight):
    site = site_near(30, 33)
    maps = D.defect_maps(lattice_map(site=site, weight=weight), FULL)
    score = maps[D.ANOMALY]
    assert math.dist(peak(score), site) <= 1.0 and np.nanmax(score) > 2 * D.THRESHOLD
    assert float(maps[D.ALARM_THRESHOLD]) == D.THRESHOLD
    assert all(math.dist(yx, site) <= 2.5 for yx in maps[D.ALARMS].tolist())  # every alarm is on the site
    assert tuple(maps[D.ALARMS][0]) == peak(score)  # highest first
    assert maps[D.ALARMS].dtype == np.int32 and maps[D.ANOMALY].dtype == np.float32


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.3])
def test_a_perfect_lattice_has_no_alarm_with_margin(noise):
    for seed, angle in [(0, 0.0), (1, 0.3), (2, 1.0)]:
        maps = D.defect_maps(lattice_map(noise=noise, seed=seed, angle=angle), FULL)
        assert np.isfinite(maps[D.ANOMALY]).mean() > 0.95
        assert np.nanmax(maps[D.ANOMALY]) < D.THRESHOLD / 1.5 and len(maps[D.ALARMS]) == 0


def test_a_vacancy_at_the_edge_is_found():
    site = site_near(2, 40)
    score = D.defect_score(lattice_map(site=site), FULL)
    assert math.dist(peak(score), site) <= 1.0 and np.nanmax(score) > D.THRESHOLD


def test_while_the_scan_fills_in_only_complete_rows_are_scored_and_nothing_false_alarms():
    site = site_near(40, 20)
    vadf = lattice_map(site=site)
    for rows in range(0, 65, 3):
        filled = np.zeros((64, 64), bool)
        filled[:rows] = True
        if rows < 64:
            filled[rows, :10] = True  # the row being filled
        maps = D.defect_maps(np.where(filled, vadf, np.nan), filled)
        score = maps[D.ANOMALY]
        assert np.isnan(score[rows:]).all()
        if rows < D.MIN_ROWS:
            assert np.isnan(score).all() and float(maps[D.ALARM_THRESHOLD]) == math.inf
        assert all(math.dist(yx, site) <= 2.5 for yx in maps[D.ALARMS].tolist()), rows
    assert np.isfinite(score).mean() > 0.95 and math.dist(peak(score), site) <= 1.0


def test_a_map_with_no_lattice_has_no_threshold_and_no_alarm():
    maps = D.defect_maps(np.random.default_rng(3).normal(size=(64, 64)), FULL)
    assert np.isnan(maps[D.ANOMALY]).all() and float(maps[D.ALARM_THRESHOLD]) == math.inf
    assert maps[D.ALARMS].shape == (0, 2)


def test_the_scan_keeps_its_defect_map_until_a_row_completes_or_it_ends_and_snapshots_never_recompute():
    vadf = lattice_map(site=site_near(20, 20))
    cache = D.DefectMap(min_interval=0.0, busy=1.0)
    filled = np.zeros((64, 64), bool)
    filled[:40] = True
    first = cache.maps({"vadf": vadf, "filled": filled}, refresh=True)
    filled[40, :5] = True  # no new complete row: the same maps
    assert cache.maps({"vadf": vadf, "filled": filled}, refresh=True) is first
    filled[40] = True
    second = cache.maps({"vadf": vadf, "filled": filled}, refresh=True)
    assert cache.maps({"vadf": vadf, "filled": filled}) is second  # a snapshot: the last maps, not redone
    assert second is not first and np.isfinite(second[D.ANOMALY][40]).any()
    assert cache.maps({"vadf": vadf, "filled": filled}, ended=True) is second  # a snapshot after the end
    with cache._compute:  # a recompute under way (the events thread's): a snapshot does not wait for it
        assert cache.maps({"vadf": vadf, "filled": filled}) is second
    final = cache.maps({"vadf": vadf, "filled": filled}, ended=True, refresh=True)  # the results' call
    assert final is not second
    assert cache.maps({"vadf": vadf, "filled": filled}, ended=True, refresh=True) is final  # once
    assert cache.maps({"filled": filled}) == {}


def test_while_frames_arrive_fast_the_map_is_redone_less_often():
    vadf = lattice_map(site=site_near(20, 20))
    filled = np.zeros((64, 64), bool)
    slow, fast = D.DefectMap(min_interval=0.0, busy=1.0, busy_fast=1e-6), D.DefectMap(min_interval=0.0, busy=1.0,
                                                                                        busy_fast=1e-6)
    for rows in (30, 31):  # a new complete row each time: due at once at a slow rate, not at a fast one
        filled[:rows] = True
        a = slow.maps({"vadf": vadf, "filled": filled}, refresh=True, rate=100.0)
        b = fast.maps({"vadf": vadf, "filled": filled}, refresh=True, rate=1e5)
    assert np.isfinite(a[D.ANOMALY][30]).any()  # the slow scan's map has row 30
    assert not np.isfinite(b[D.ANOMALY][30]).any()  # the fast one's is still the map of 30 rows
    assert np.isfinite(fast.maps({"vadf": vadf, "filled": filled}, ended=True, refresh=True)[D.ANOMALY][30]).any()  # the end redoes it
