"""The trainer's thread: attach, pause, resume, reset, cut short, warm start, training while the scan runs."""

import numpy as np
import pytest
import torch

from feeder import FAST, ArrayScan, tilted_discs, wait_for
from rrstem.model.config import TrainerConfig
from rrstem.model.interface import ROTATION
from rrstem.model.trainer import OnlineTrainer


def test_it_is_configured_by_a_plain_dict_of_overrides():
    tr = OnlineTrainer({"latent_dim": 4, "consolidate_seconds": 5.0})  # as ServiceConfig.trainer holds it
    assert tr.cfg.model.latent_dim == 4 and tr.cfg.consolidate_seconds == 5.0
    assert tr.cfg.model.angle_head == "vector" and OnlineTrainer().cfg == TrainerConfig()
    with pytest.raises(ValueError, match="latent_dims"):
        OnlineTrainer({"latent_dims": 4})


def test_it_trains_while_the_scan_runs_then_consolidates():
    scan = ArrayScan(tilted_discs(), "live")
    scan.feed(50)  # not ended: the trainer trains on what has arrived
    with OnlineTrainer(FAST) as tr:
        tr.attach(scan)
        assert wait_for(lambda: tr.status()["state"] == "running" and tr.status()["step"] > 5)
        assert wait_for(lambda: tr.maps() is not None)
        live = tr.maps().arrays[ROTATION]
        assert np.isfinite(live.ravel()[:50]).all() and np.isnan(live.ravel()[50:]).all()
        assert not tr.wait_done(0.05)
        scan.run(rate=2000.0, chunk=10)  # the rest arrives, then the scan ends
        assert wait_for(lambda: tr.status()["state"] in ("consolidating", "done"))
        assert tr.wait_done(60)
        assert np.isfinite(tr.maps().arrays[ROTATION]).all() and tr.status()["state"] == "done"


def test_pause_resume_and_reset():
    scan = ArrayScan(tilted_discs())
    scan.feed(50)  # never ends: the trainer keeps running
    with OnlineTrainer(FAST) as tr:
        tr.attach(scan)
        assert wait_for(lambda: tr.status()["step"] > 3)
        tr.pause()
        assert wait_for(lambda: tr.status()["state"] == "paused")
        n = tr.status()["step"]
        assert not wait_for(lambda: tr.status()["step"] > n, timeout=0.3)
        tr.resume()
        assert wait_for(lambda: tr.status()["state"] == "running" and tr.status()["step"] > n)
        tr.reset_model()
        assert wait_for(lambda: tr.status()["step"] < n)
        assert not tr.wait_done(0.05)


def test_pausing_does_not_stop_a_consolidation():
    with OnlineTrainer({**FAST, "consolidate_seconds": 1.0}) as tr:
        tr.attach(ArrayScan.complete(tilted_discs()))
        assert wait_for(lambda: tr.status()["state"] == "consolidating")
        tr.pause()
        assert tr.wait_done(60) and tr.status()["state"] == "done"


def test_attach_cuts_a_consolidation_short():
    with OnlineTrainer({**FAST, "consolidate_seconds": 600}) as tr:
        tr.attach(ArrayScan.complete(tilted_discs(), "first"))
        assert wait_for(lambda: tr.status()["state"] == "consolidating")
        tr.cfg.consolidate_steps = 20  # the second scan's consolidation ends after 20 steps
        tr.attach(ArrayScan.complete(tilted_discs(), "second"))
        assert tr.wait_done(120)  # the first would take 600 s
        st = tr.status()
        assert st["scan_id"] == "second" and st["state"] == "done" and st["step"] == 20
        assert tr.maps().scan_id == "second"


def test_warm_start_starts_the_next_scan_from_the_last_model():
    with OnlineTrainer({**FAST, "warm_start": True, "consolidate_steps": 20}) as tr:
        tr.attach(ArrayScan.complete(tilted_discs(), "first"))
        assert tr.wait_done(60)
        trained = tr.export()["state"]
        tr.pause()  # the worker takes the next scan up but does not train on it
        tr.attach(ArrayScan.complete(tilted_discs(), "second"))
        assert wait_for(lambda: tr.status()["scan_id"] == "second" and tr.status()["state"] == "paused")
        start = tr.run.model.state_dict()
        for k, v in trained.items():
            assert torch.equal(start[k], torch.from_numpy(v)), k
        tr.resume()
        assert tr.wait_done(60) and tr.status()["step"] == 20


class FlakyScan(ArrayScan):
    """A scan whose mean pattern fails once, then works."""

    failed = False

    def mean_pattern(self):
        if not self.failed:
            self.failed = True
            raise RuntimeError("flaky")
        return super().mean_pattern()


def test_reset_after_a_failure_trains_the_same_scan_afresh():
    scan = FlakyScan(tilted_discs(), "flaky")
    scan.feed(100)
    scan.end()
    with OnlineTrainer(FAST) as tr:
        tr.attach(scan)
        assert wait_for(lambda: tr.status()["state"] == "failed") and str(tr.error) == "flaky"
        assert tr.is_alive()  # a failure on one scan does not end the thread
        tr.reset_model()
        assert tr.wait_done(30) and tr.error is None and tr.status()["state"] == "done"
        assert tr.maps().scan_id == "flaky" and np.isfinite(tr.maps().arrays["rotation"]).all()
