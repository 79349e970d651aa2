"""The rrVAE inside the service: a scan over real sockets trains it, and its maps land in the results."""

import numpy as np
import pytest

from support import disc_frames, wait_results
from rrstem.stream.results import read_scan

FAST = {"consolidate_seconds": 2.0, "min_frames": 16, "refresh_seconds": 0.2, "eval_seconds": 0.5}
EMPTY = [9, 30]  #: positions whose frame has no counts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 8x8 scan streamed into a training service, positions ``EMPTY`` with no counts; its results file."""
    from rrstem.stream.preprocess import PreprocessConfig
    from rrstem.stream.service import Service, ServiceConfig
    from support import Sender

    out = tmp_path_factory.mktemp("trained") / "results.h5"
    frames = disc_frames(8, 8, seed=21)
    frames.reshape(64, 32, 32)[EMPTY] = 0  # a blanked beam: measured, but nothing for the rrVAE to learn
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish=None, control=None, out=out, train=True,
                        trainer=FAST, preprocess=PreprocessConfig(calibration_frames=8))
    with Service(cfg) as svc:
        s = Sender(svc.listen_endpoint)
        s.start("t", (8, 8), (32, 32))
        for k in range(0, 64, 8):
            s.frames("t", k, frames.reshape(64, 32, 32)[k:k + 8])
        s.end("t", 64)
        path = wait_results(svc, timeout=60)
        s.close()
    return frames, path


def test_training_over_sockets_writes_rotation_and_latent_maps(trained):
    _, path = trained
    res = read_scan(path)
    maps = res["maps"]
    counted = np.ones(64, bool)
    counted[EMPTY] = False
    counted = counted.reshape(8, 8)
    assert maps["filled"].all() and res["attrs"]["zero_counts"] == len(EMPTY)  # empty frames are positions
    # the rrVAE skips the frames with no counts: its maps are NaN there, finite everywhere else
    assert maps["rotation"].shape == (8, 8) and np.isfinite(maps["rotation"][counted]).all()
    assert np.isnan(maps["rotation"][~counted]).all()
    assert maps["latent"].shape[1:] == (8, 8) and np.isfinite(maps["latent"][:, counted]).all()
    assert np.isfinite(maps["recon_error"][counted]).all() and np.isnan(maps["recon_error"][~counted]).all()
    assert res["model"]["step"] > 0 and res["model"]["state"]
    assert len(res["training"]["loss"]) > 0 and np.isfinite(res["training"]["loss"]).all()
    assert res["units"]["rotation"] == "rad"


def test_the_results_file_holds_the_rrvae_outlier_map_and_the_defect_map_with_its_threshold(trained):
    _, path = trained
    maps = read_scan(path)["maps"]
    counted = np.ones(64, bool)
    counted[EMPTY] = False
    counted = counted.reshape(8, 8)  # the rrVAE's maps are NaN where a frame had no counts
    assert np.isfinite(maps["rrvae_anomaly"][counted]).all() and (maps["recon_sigma"][counted] >= 0).all()
    # the defect map (stream/defects.py) needs MIN_ROWS rows of a lattice: an 8x8 scan has no score, no
    # threshold (inf) and no alarms, written all the same
    a, thr, alarms = maps["anomaly"], float(maps["anomaly_threshold"]), maps["alarms"]
    assert a.shape == (8, 8) and np.isnan(a).all() and thr == np.inf
    assert alarms.shape == (0, 2) and alarms.dtype == np.int32
    import h5py

    with h5py.File(path) as f:  # the threshold is an attribute of the map, as DESIGN.md lays it out
        group = f["scans"][next(iter(f["scans"]))]["maps"]
        assert group["anomaly"].attrs["threshold"] == np.inf
        assert group["anomaly"].attrs["unit"] == "robust_sigma"
        assert group["recon_sigma"].attrs["unit"] == "poisson_sigma"


def test_a_trained_model_encodes_a_scan_without_training(trained, make_service, sender_for):
    frames, path = trained
    svc = make_service(model=path)
    s = sender_for(svc)
    s.start("again", (8, 8), (32, 32))
    s.frames("again", 0, frames.reshape(64, 32, 32))
    s.end("again", 64)
    res = read_scan(wait_results(svc, timeout=30), "again")
    before = read_scan(path)
    # the same frames and the same model give the same maps
    np.testing.assert_allclose(res["maps"]["rotation"], before["maps"]["rotation"], atol=1e-5)
    np.testing.assert_allclose(res["maps"]["latent"], before["maps"]["latent"], atol=1e-5)
    assert res["model"]["step"] == before["model"]["step"]


def test_a_model_of_another_frame_size_is_refused_clearly_and_the_scan_is_still_written(trained, make_service,
                                                                                         sender_for):
    from rrstem.stream.control import ControlClient, ControlError

    frames, path = trained
    svc = make_service(model=path, preprocess={"bin": 2})  # 32x32 frames bin to 16x16; the model takes 32x32
    s = sender_for(svc)
    s.start("binned", (8, 8), (32, 32))
    s.frames("binned", 0, frames.reshape(64, 32, 32))
    s.end("binned", 64)
    res = read_scan(wait_results(svc, timeout=30), "binned")
    assert res["attrs"]["counters"]["received"] == 64 and "rotation" not in res["maps"]
    assert "takes 32x32 frames" in res["attrs"]["model_error"] and "--bin" in res["attrs"]["model_error"]
    assert isinstance(svc.failures[-1].error, ValueError) and svc.failures[-1].scan_id == "binned"
    assert "takes 32x32 frames" in svc.last_error()  # what the dashboard's banner shows
    with ControlClient(svc.control_endpoint, timeout=5) as ctl, pytest.raises(ControlError, match="fixed model"):
        ctl.request("pause_training")


def test_a_scan_too_short_to_calibrate_early_is_still_trained_at_its_end(make_service, sender_for):
    """9 frames, 64 needed for calibration: the scan calibrates at its end, and only then meets the rrVAE."""
    frames = disc_frames(3, 3, seed=22)
    svc = make_service(train=True, trainer=FAST, preprocess={"calibration_frames": 64}, finish_timeout=60)
    s = sender_for(svc)
    s.start("short", (3, 3), (32, 32))
    s.frames("short", 0, frames.reshape(9, 32, 32))
    s.end("short", 9)
    res = read_scan(wait_results(svc, timeout=60))
    assert res["attrs"]["counters"]["received"] == 9
    assert np.isfinite(res["maps"]["rotation"]).all() and res["model"]["step"] > 0
